"""Shared fixtures: the upstream EmbedSeg interoperability fixtures and a torch-free subprocess runner."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _find_upstream_fixtures() -> Path:
    """The upstream EmbedSeg fixtures: $EMBEDSEG_FIXTURES, else shared/ beside the checkout or under /work."""
    if os.environ.get("EMBEDSEG_FIXTURES"):
        return Path(os.environ["EMBEDSEG_FIXTURES"])
    candidates = [REPO.parent / "shared" / "fixtures" / "upstream", Path("/work/shared/fixtures/upstream")]
    return next((c for c in candidates if c.is_dir()), candidates[0])


UPSTREAM = _find_upstream_fixtures()

# Blocks `import torch` (and anything under it) in a child interpreter: proves the runtime needs no torch.
TORCH_BLOCKER = textwrap.dedent(
    """
    import sys
    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this process (runtime must not need it)")
            return None
    sys.meta_path.insert(0, _NoTorch())
    """
)


@pytest.fixture
def one_torch_thread():
    """One torch intra-op thread for the test: on the shared 2-core CI machine, OpenMP threads
    spin-waiting against other processes made torch tests up to 10x slower with 2 threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def upstream_case(ndim: int) -> Path:
    """Folder of the upstream fixture for 2D or 3D; skips the test when the fixtures are absent."""
    path = UPSTREAM / f"{ndim}d"
    if not (path / "checkpoint.pth").exists():
        pytest.skip(f"upstream fixtures not found at {path} (set EMBEDSEG_FIXTURES)")
    return path


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def upstream_dir(request) -> Path:
    return upstream_case(request.param)


def run_without_torch(
    code: str, *args: str, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run Python ``code`` in a child process where importing torch fails."""
    return subprocess.run(
        [sys.executable, "-c", TORCH_BLOCKER + "\n" + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )
