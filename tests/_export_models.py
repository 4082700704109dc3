"""Checkpoints and exported ONNX models shared by the test_export_* files.

Exporting (with verification against torch) costs seconds per model on 2 cores, so each model is made
once per pytest process and reused by every test file that asks for it.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import UPSTREAM

ROOT = Path(tempfile.mkdtemp(prefix="embedseg-export-tests-"))
atexit.register(shutil.rmtree, ROOT, ignore_errors=True)
KINDS = ("ours-2d", "ours-3d", "upstream-2d", "upstream-3d")
_CACHE: dict[str, object] = {}


@contextlib.contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """torch with ``n`` intra-op threads (OpenMP spin-waits make 2 threads ~20x slower on a loaded box)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def our_checkpoint(ndim: int) -> Path:
    """A checkpoint written by save_checkpoint from a freshly initialised, seeded BranchedERFNet."""
    key = f"ckpt-{ndim}"
    if key not in _CACHE:
        import torch

        from embedseg_deploy.contract import Contract
        from embedseg_training.checkpoint import save_checkpoint
        from embedseg_training.model import BranchedERFNet

        torch.manual_seed(100 + ndim)
        model = BranchedERFNet(ndim)
        model.init_output()
        spacing = [1 / 1023] * 2 if ndim == 2 else [2 / 1023, 1 / 1023, 1 / 1023]
        contract = Contract(ndim=ndim, spacing=spacing, anisotropy=1.0 if ndim == 2 else 2.0)
        _CACHE[key] = save_checkpoint(ROOT / f"ours_{ndim}d.pth", model, contract, epoch=0)
    return _CACHE[key]  # type: ignore[return-value]


def checkpoint_of(kind: str) -> Path:
    source, dims = kind.split("-")
    ndim = int(dims[0])
    if source == "ours":
        return our_checkpoint(ndim)
    path = UPSTREAM / f"{ndim}d" / "checkpoint.pth"
    if not path.exists():
        pytest.skip(f"upstream fixtures not found at {path.parent} (set EMBEDSEG_FIXTURES)")
    return path


def exported(kind: str):
    """(ONNX path, Exported) of ``kind``: fp32, legacy exporter, verified (fixture tile for upstream)."""
    if kind not in _CACHE:
        from embedseg_exporters.onnx_export import export_checkpoint

        out = ROOT / f"{kind}.onnx"
        with torch_threads():
            _CACHE[kind] = (out, export_checkpoint(checkpoint_of(kind), out))
    return _CACHE[kind]
