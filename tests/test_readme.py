"""The README's two set-up commands stay true: CI runs the same test command, the demo command exists."""

from __future__ import annotations

import re

from click.testing import CliRunner

from embedseg_deploy.cli import main as run_main

from .conftest import REPO

TEST_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[all]" && python -m pytest'
DEMO_COMMAND = 'pip install ".[cpu]" && embedseg-run demo'


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_has_exactly_the_two_setup_commands():
    setup = (REPO / "README.md").read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    assert _bash_blocks(setup) == [DEMO_COMMAND, TEST_COMMAND]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert TEST_COMMAND in ci.splitlines()


def test_demo_command_and_extras_exist():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r"^cpu = \[", pyproject, flags=re.M)
    assert 'embedseg-run = "embedseg_deploy.cli:main"' in pyproject
    result = CliRunner().invoke(run_main, ["demo", "--help"])
    assert result.exit_code == 0, result.output
