"""Stop a command that needs an uninstalled extra with one line naming it (torch-free, for both CLIs).

A runtime-only install (``pip install ".[cpu]"``) still puts ``embedseg-train`` and ``embedseg-export`` on the
PATH. Their ``--help`` and ``--version`` must work there, and a command that needs torch or onnx must say
which extra brings it instead of ending in a ``ModuleNotFoundError`` traceback.
"""

from __future__ import annotations

import importlib

import click


class MissingExtra(click.ClickException):
    """A command needs a package of an extra that is not installed; exit status 2, as for a usage error."""

    exit_code = 2


def require(command: str, extra: str, *modules: str) -> None:
    """Import ``modules`` or raise :class:`MissingExtra` naming ``command`` and the pip ``extra``."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise MissingExtra(
                f"{command} needs {name}, which cannot be imported here ({exc}); install it with: "
                f'pip install "embedseg-deploy[{extra}]"'
            ) from None
