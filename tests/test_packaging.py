"""The wheel installs only embedseg-prefixed import names, and the runtime imports without torch."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import embedseg_deploy

from .conftest import REPO, run_without_torch


@pytest.mark.slow
def test_wheel_top_level_names_are_embedseg_prefixed(tmp_path: Path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("embedseg_deploy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"embedseg_deploy", "embedseg_training", "embedseg_exporters"}, top
    # the folders' modules are really inside (not an empty mapping)
    assert "embedseg_training/__init__.py" in names and "embedseg_exporters/__init__.py" in names
    entry_points = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith(".dist-info/entry_points.txt")))
        .decode()
    )
    for script in ("embedseg-run", "embedseg-train", "embedseg-export"):
        assert script in entry_points


def test_every_runtime_module_imports_without_torch():
    modules = [
        m.name
        for m in pkgutil.walk_packages(embedseg_deploy.__path__, "embedseg_deploy.")
        if not m.name.startswith("embedseg_deploy.backends.torch")
    ]
    assert len(modules) >= 2
    code = (
        "import importlib, sys\n"
        "for m in sys.argv[1:]:\n"
        "    importlib.import_module(m)\n"
        "print('ok', len(sys.argv) - 1)"
    )
    proc = run_without_torch(code, *modules)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"ok {len(modules)}"


def test_gpu_extras_pin_one_cuda_major():
    """onnxruntime-gpu, numba-cuda, TensorRT and cuda-python all for CUDA 13: two majors in one process
    load two CUDA runtimes (the gpu and trt extras are meant to be installed together)."""
    import re

    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    gpu = extras["gpu"] + extras["trt"]
    assert not [r for r in gpu if re.search(r"cu1[0-2]\b|cuda-python>=12", r)], gpu
    assert any(r.startswith("onnxruntime-gpu") and ">=1.27" in r for r in gpu)  # its first CUDA 13 build
    assert any("numba-cuda[cu13]" in r for r in gpu) and any(r.startswith("tensorrt-cu13") for r in gpu)
    assert any(r.startswith("cuda-python>=13,<14") for r in gpu)
