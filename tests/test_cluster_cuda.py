"""CUDA clustering (embedseg_deploy.cluster_cuda): CPU labels under the CUDA simulator; real PTX lowering.

NUMBA_ENABLE_CUDASIM must be set before numba is imported, so the simulator runs in a child process; the
inputs are tiny because every simulated thread costs ~0.2 ms.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from .conftest import REPO

SIM_SCRIPT = """
import json
import numpy as np
from numba import cuda
from embedseg_deploy.cluster import cluster
from embedseg_deploy.cluster_cuda import SIMULATOR, cluster_cuda
from tests._cluster_reference import ideal_output, random_output, two_overlapping_objects

assert SIMULATOR
rng = np.random.default_rng(7)
cases = [  # (raw, spacing, parameters)
    (ideal_output((16, 20), 2, 3.0, spacing=0.05, rng=1)[0], 0.05, dict(min_object_size=5)),
    (ideal_output((8, 16, 8), 2, 2.5, spacing=0.05, rng=2)[0], 0.05, dict(min_object_size=5)),
]
for ndim, size in [(2, 12), (2, 12), (2, 9), (3, 6), (3, 6)]:
    for _ in range(100):  # random outputs with at least two objects (checked on the CPU)
        shape = tuple(int(s) for s in rng.integers(4, size + 1, ndim))
        params = dict(
            min_object_size=int(rng.integers(0, 3)),
            seed_thresh=float(rng.choice([0.5, 0.9])),
            fg_thresh=float(rng.choice([0.0, 0.5])),
            min_unclustered_sum=int(rng.choice([0, 5])),
        )
        raw = random_output(rng, ndim, shape)
        if cluster(raw, [0.05] * ndim, **params).max() >= 2:
            break
    cases.append((raw, 0.05, params))
# the strict limits at their boundaries (tests/test_cluster.py::test_overlap_and_strict_limits)
for mos, mus, mms in [(19, 0, 0), (19, 14, 0), (19, 15, 0), (20, 0, 0), (19, 0, 35)]:
    limits = dict(min_object_size=mos, min_unclustered_sum=mus, min_mask_sum=mms)
    cases.append((two_overlapping_objects(), 0.01, limits))
results = []
for raw, step, params in cases:
    spacing = [step] * (raw.ndim - 1)
    want, want_seeds = cluster(raw, spacing, return_seeds=True, **params)
    got, got_seeds = cluster_cuda(raw, spacing, return_seeds=True, threads=32, **params)
    results.append(dict(
        same=bool(np.array_equal(got, want) and np.array_equal(got_seeds, want_seeds)),
        dtype=str(got.dtype), labels=int(want.max()),
    ))
raw = cases[0][0]
device = cuda.to_device(raw)
on_device = cluster_cuda(device, [0.05, 0.05], min_object_size=5, to_host=False, threads=32)
dispatched = cluster(device, [0.05, 0.05], min_object_size=5)  # runs on the GPU: the input is there
want = cluster(raw, [0.05, 0.05], min_object_size=5)
results.append(dict(
    same=bool(np.array_equal(on_device.copy_to_host(), want) and np.array_equal(dispatched, want)),
    dtype=str(dispatched.dtype), labels=int(want.max()),
))
print(json.dumps(results))
"""

# Device functions are compiled for the current GPU's compute capability; without a GPU there is none,
# so the script names one. The signatures are the types cluster_cuda launches the kernels with.
PTX_SCRIPT = """
import types
import numba.cuda.dispatcher as dispatcher
from numba import cuda, float32, float64, int32, int64, uint8
from embedseg_deploy import cluster_cuda as cc

dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(7, 5))
f2 = float32[:, ::1]
i64, f64 = int64[::1], float64[::1]
signatures = {
    "_k_fill": [(int32[::1], int64), (uint8[::1], int64)],
    "_k_foreground": [(float32[::1], float32, float32, float32[::1], int32[::1])],
    "_k_block_scan": [(int32[::1], i64, i64)],
    "_k_add_block_offsets": [(i64, i64)],
    "_k_gather": [(f2, i64, f2, float32[::1], int32[::1], i64, i64, float32[::1], f2)],
    "_k_bounds": [(f2, f64, f64)],
    "_k_take_sigma": [(f2, i64, i64, f2)],
    "_k_cells": [(f2, f64, f64, i64, i64, int32[::1], int32[::1])],
    "_k_scatter": [(f2, i64, i64, int32[::1], i64, f2, i64, i64)],
    "_k_greedy": [
        (f2, i64, f2, i64, f64, f64, i64, i64, i64, int64, int64, uint8[::1], i64, int32[::1], i64, i64)
    ],
}
kernels = sorted(name for name in dir(cc) if name.startswith("_k_"))
assert kernels == sorted(signatures), kernels
for name, sigs in signatures.items():
    for sig in sigs:
        ptx, _ = cuda.compile_ptx(getattr(cc, name).py_func, sig, cc=(7, 5))
        assert ".entry" in ptx
ptx, _ = cuda.compile_ptx(cc._k_greedy.py_func, signatures["_k_greedy"][0], cc=(7, 5))
assert "fma.rn.f32" not in ptx and "mul.rn.f32" in ptx  # the proposal test is not contracted
print("compiled", len(kernels))
"""


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **env},
        timeout=600,
    )


def test_module_imports_without_a_gpu() -> None:
    done = run_python(
        "import embedseg_deploy.cluster_cuda as cc; assert not cc.SIMULATOR", NUMBA_ENABLE_CUDASIM="0"
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.cudasim
def test_simulator_gives_the_cpu_labels() -> None:
    done = run_python(SIM_SCRIPT, NUMBA_ENABLE_CUDASIM="1")
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(r["same"] for r in results), results
    assert all(r["dtype"] == "int32" for r in results)
    assert [r["labels"] for r in results[-6:-1]] == [2, 2, 1, 0, 0]  # two_overlapping_objects' limits
    assert all(r["labels"] >= 2 for r in results[:7] + results[-1:]), results  # the cases are not trivial


def test_kernels_compile_to_ptx() -> None:
    if importlib.util.find_spec("numba_cuda") is None:
        pytest.skip(
            "numba-cuda is not installed (pip install 'numba-cuda[cu13]', the gpu extra): no PTX compiler"
        )
    done = run_python(PTX_SCRIPT, NUMBA_ENABLE_CUDASIM="0")
    assert done.returncode == 0, done.stderr
    assert "compiled" in done.stdout


@pytest.mark.gpu
def test_real_gpu_gives_the_cpu_labels() -> None:
    """On a CUDA GPU (skipped elsewhere): device-resident outputs cluster to the CPU's labels, 2D and 3D."""
    done = run_python(GPU_SCRIPT, NUMBA_ENABLE_CUDASIM="0")
    if done.returncode == 3:
        pytest.skip(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results and all(r["same"] and r["labels"] > 0 for r in results), results


GPU_SCRIPT = """
import json, sys
from numba import cuda
if not cuda.is_available():
    print("no CUDA GPU: numba.cuda.is_available() is False")
    sys.exit(3)
import numpy as np
from embedseg_deploy.cluster import cluster
from embedseg_deploy.cluster_cuda import cluster_cuda
sys.path.insert(0, "tests")
from _cluster_reference import ideal_output
results = []
for shape, n, radius in [((512, 512), 300, 8.0), ((2048, 2048), 3000, 8.0), ((32, 128, 128), 60, 6.0)]:
    raw, _ = ideal_output(shape, n, radius, rng=1)
    spacing = [1 / 1023] * len(shape)
    cpu = cluster(raw, spacing, min_object_size=20)
    gpu = cluster_cuda(cuda.to_device(raw), spacing, min_object_size=20)
    results.append({"shape": shape, "labels": int(cpu.max()), "same": bool(np.array_equal(cpu, gpu))})
print(json.dumps(results))
"""


PREDICT_SCRIPT = """
import json
import tempfile
from pathlib import Path
import numpy as np
from embedseg_deploy.backends import create_backend
from embedseg_deploy.predict import Predictor
from tests._runtime_models import toy_onnx

model = toy_onnx(Path(tempfile.mkdtemp()) / "toy.onnx", 2)
backend = create_backend(model, "onnx-cpu")
image = np.zeros((40, 52), np.float32)
image[5:15, 6:18] = 5.0
image[22:34, 26:40] = 5.0
cpu = Predictor(backend, tile=0)
expected = cpu.predict(image)
backend.device = "cuda:0"  # the same network, described as a GPU backend: auto clusters on the GPU
auto = Predictor(backend, tile=0)
labels = auto.predict(image)
print(json.dumps({
    "cpu": cpu.cluster_device, "auto": auto.cluster_device, "note": auto.cluster_note,
    "same": bool((labels == expected).all()), "objects": int(expected.max()),
}))
"""


@pytest.mark.cudasim
def test_predictor_clusters_on_the_gpu_beside_a_gpu_backend() -> None:
    """`embedseg-run` reaches the CUDA clustering: a GPU backend's output is clustered by numba CUDA (here
    the simulator), with the CPU's labels; without a usable GPU auto mode stays on the CPU and says why."""
    done = run_python(PREDICT_SCRIPT, NUMBA_ENABLE_CUDASIM="1")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"cpu": "cpu", "auto": "cuda", "note": None, "same": True, "objects": 2}
    done = run_python(PREDICT_SCRIPT, NUMBA_ENABLE_CUDASIM="0")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["auto"] == "cpu":  # no GPU here: the reason is given
        assert "clustering on the CPU" in result["note"] and result["same"]
