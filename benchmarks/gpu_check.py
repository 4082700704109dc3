"""GPU proof: every GPU path of the toolkit run, checked against the CPU and timed, in one command.

    python benchmarks/gpu_check.py             # on a GPU machine: writes benchmarks/results/gpu.{md,json}
    python benchmarks/gpu_check.py --plan      # anywhere: what would run here and why each path would skip

Each check names what it needs (a CUDA GPU, numba CUDA, torch with CUDA, an onnxruntime provider,
TensorRT, the upstream fixtures, the exporter) and reports "ran", "failed" (a parity limit missed) or
"skipped: <what is missing>". Parity is judged as the exporter judges a model (exporters/verify.py:
offsets in pixels, sigma relative, seed absolute, then labels), GPU against the CPU.

``--plan`` runs every check's own code on the CPU at toy sizes, with each GPU call replaced by its CPU
counterpart after the call's arguments were bound to the GPU function's signature, so a broken import,
a renamed function or a wrong argument fails here (exit 1), not in the few minutes a GPU is lent. CI runs
it. The whole real run is budgeted to finish within ``--budget`` seconds (default 420).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DEMO_MODEL = REPO / "embedseg_deploy" / "models" / "demo2d.onnx"
FIXTURE_PLACES = (
    os.environ.get("EMBEDSEG_FIXTURES"),
    REPO / "shared" / "fixtures" / "upstream",
    REPO.parent / "shared" / "fixtures" / "upstream",
    Path("/work/shared/fixtures/upstream"),
)


class Skip(Exception):
    """A check cannot run here; the message says what is missing."""


@dataclass
class Context:
    """What every check gets: plan or real mode, a scratch folder, the fixtures, the time left."""

    plan: bool
    work: Path
    fixtures: Path | None
    deadline: float
    log: Callable[[str], None]
    shared: dict[str, Any] = field(default_factory=dict)

    def size(self, real: Any, toy: Any) -> Any:
        """``real`` on the GPU, ``toy`` in plan mode (CPU stand-ins at GPU sizes would take minutes)."""
        return toy if self.plan else real

    def gpu(self, fn: Callable[..., Any], *args: Any, cpu: Callable[[], Any] | None = None, **kwargs: Any):
        """``fn(*args, **kwargs)`` on the GPU; in plan mode the arguments are bound to ``fn``'s signature
        (a wrong call fails here) and ``cpu()``, the CPU counterpart, gives the result."""
        if self.plan:
            inspect.signature(fn).bind(*args, **kwargs)
            return cpu() if cpu is not None else None
        return fn(*args, **kwargs)

    def timed(
        self, fn: Callable[[], Any], repeats: int, warmup: int = 1, sync: Callable[[], Any] | None = None
    ):
        """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` (``sync`` waits for the GPU)."""
        for _ in range(warmup):
            fn()
        if sync:
            sync()
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))


# ------------------------------------------------------------------------------------------------ needs


def _module(name: str) -> str | None:
    return None if importlib.util.find_spec(name) is not None else f"{name} is not installed"


def need_gpu() -> str | None:
    from embedseg_deploy.machine import gpu_status

    return gpu_status()[1]


def need_numba_cuda() -> str | None:
    if importlib.util.find_spec("numba_cuda") is None:
        return "numba-cuda is not installed (pip install 'embedseg-deploy[gpu]')"
    try:
        from numba import cuda

        return None if cuda.is_available() else "numba sees no CUDA GPU (numba.cuda.is_available() is False)"
    except Exception as exc:
        return f"numba CUDA is unusable: {type(exc).__name__}: {exc}"


def need_torch_cuda() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device (a CPU build, or no GPU)"
    return None


def need_provider(provider: str) -> Callable[[], str | None]:
    def need() -> str | None:
        from embedseg_deploy.backends.onnx_backend import available_providers

        listed = available_providers()
        return None if provider in listed else f"this onnxruntime has no {provider} (it lists {listed})"

    need.__name__ = f"need_{provider}"
    return need


def need_tensorrt() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install 'embedseg-deploy[trt]')"
    if importlib.util.find_spec("cuda") is None:
        return "cuda-python is not installed (the engine runner copies through it)"
    return None


def need_exporter() -> str | None:
    missing = [m for m in ("torch", "onnx") if importlib.util.find_spec(m) is None]
    return (
        f"the exporter needs {' and '.join(missing)} (pip install 'embedseg-deploy[export]')"
        if missing
        else None
    )


def need_fixtures(ctx_fixtures: Path | None) -> str | None:
    if ctx_fixtures is None:
        places = ", ".join(str(p) for p in FIXTURE_PLACES if p)
        return f"the upstream fixtures are not here (looked in {places}; --fixtures DIR)"
    return None


def find_fixtures(given: str | None) -> Path | None:
    for place in (given, *FIXTURE_PLACES):
        if place and (Path(place) / "2d" / "network_output.npy").is_file():
            return Path(place)
    return None


# ------------------------------------------------------------------------------------------------ helpers


def exported(ctx: Context, ndim: int) -> Path:
    """The upstream fixture checkpoint of ``ndim`` exported to ONNX once per run (needs the exporter)."""
    path = ctx.work / f"upstream-{ndim}d.onnx"
    if not path.is_file():
        from embedseg_exporters.onnx_export import export_checkpoint

        export_checkpoint(ctx.fixtures / f"{ndim}d" / "checkpoint.pth", path, force=True, verify=False)
    return path


def onnx_models(ctx: Context) -> dict[str, Path]:
    """The bundled 2D demo model, plus the fixtures' 2D and 3D ERFNets where they and the exporter are."""
    models = {"demo2d": DEMO_MODEL}
    if ctx.fixtures is not None and need_exporter() is None:
        for ndim in (2, 3):
            models[f"upstream-{ndim}d"] = exported(ctx, ndim)
    return models


def parity(test, reference, contract, fixture: Path | None, tolerance: str, names) -> dict[str, Any]:
    """The exporter's verification of ``test`` against ``reference`` (raw-output limits, then labels)."""
    from embedseg_exporters.verify import TOLERANCES, compare, standard_inputs

    inputs = standard_inputs(contract, fixture)
    report = compare(test, reference, contract, inputs, TOLERANCES[tolerance], names=names)
    return {"passed": report.passed, "tolerance": tolerance, **report.to_dict(), "lines": report.lines()}


def tile_input(contract, spatial) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((1, contract.in_channels, *spatial)).astype(np.float32)


def fixture_input(ctx: Context, label: str) -> Path | None:
    """The upstream fixture's network input for an ``upstream-Nd`` model (verification's first case)."""
    return ctx.fixtures / label[-2:] / "network_input.npy" if label.startswith("upstream") else None


def cache_state(folder: Path) -> dict[str, int]:
    """File name -> mtime of a cache folder: unchanged across a load means nothing was rebuilt."""
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*")} if folder.is_dir() else {}


def gpu_tile(ctx: Context, contract) -> list[int]:
    """The contract's GPU tile (toy-sized in plan mode)."""
    return ctx.size(list(contract.recommended_tile("gpu")[0]), [contract.tile_multiple * 4] * contract.ndim)


def engine_tolerance(precision: str) -> str:
    """The exporter's limits for an engine of this precision against ONNX Runtime CPU."""
    return {"fp16": "engine-fp16", "tf32": "engine-tf32", "int8": "engine-int8"}.get(precision, "engine-fp32")


# ------------------------------------------------------------------------------------------------ checks


def check_environment(ctx: Context) -> dict[str, Any]:
    """GPU, driver, CUDA and package versions: what the numbers below were measured with."""
    from embedseg_deploy.machine import machine_info, package_versions

    out: dict[str, Any] = {"machine": machine_info(), "versions": package_versions()}
    for name in ("numba_cuda", "cupy", "cuda", "tensorrt", "torch", "onnx"):
        with contextlib.suppress(Exception):
            mod = importlib.import_module(name)
            out["versions"][name] = str(getattr(mod, "__version__", "present"))
    with contextlib.suppress(Exception):
        import onnxruntime

        out["onnxruntime_providers"] = onnxruntime.get_available_providers()
    with contextlib.suppress(Exception):
        import torch

        out["torch_cuda"] = torch.version.cuda
    smi = shutil.which("nvidia-smi")
    if smi:
        query = [smi, "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"]
        with contextlib.suppress(Exception):
            out["nvidia_smi"] = subprocess.run(
                query, capture_output=True, text=True, timeout=20
            ).stdout.strip()
    if need_numba_cuda() is None:
        from numba import cuda

        out["cuda_runtime"] = ".".join(map(str, cuda.runtime.get_version()))
        out["cuda_driver"] = cuda.cudadrv.driver.driver.get_version()
    return out


def check_cluster_cuda(ctx: Context) -> dict[str, Any]:
    """numba CUDA clustering == CPU clustering (fixtures' network outputs, a synthetic 2048^2 output with
    3000 objects), and its time on a device-resident output (target < 10 ms)."""
    from embedseg_deploy.cluster import cluster
    from embedseg_deploy.cluster_cuda import cluster_cuda
    from embedseg_deploy.synthetic import ideal_output

    cases: dict[str, tuple[np.ndarray, list[float], dict[str, Any]]] = {}
    if ctx.fixtures is not None:
        for ndim in (2, 3):
            folder = ctx.fixtures / f"{ndim}d"
            config = json.loads((folder / "test_config.json").read_text())
            raw = np.load(folder / "network_output.npy")
            if ctx.plan:
                raw = np.ascontiguousarray(raw[(slice(None), *[slice(0, 32)] * ndim)])
            spacing = [1 / (n - 1) for n in raw.shape[1:]]  # any spacing: parity, not upstream's grid
            keys = ("seed_thresh", "fg_thresh", "min_object_size")
            cases[f"fixture-{ndim}d"] = (raw, spacing, {k: config[k] for k in keys})
    shape, n = ctx.size(((2048, 2048), 3000), ((128, 128), 20))
    raw, _ = ideal_output(shape, n, 8.0, rng=1)
    cases[f"synthetic-{'x'.join(map(str, shape))}"] = (raw, [1 / 1023] * 2, {"min_object_size": 20})

    out: dict[str, Any] = {"cases": {}}
    for name, (raw, spacing, params) in cases.items():
        cpu = cluster(raw, spacing, **params)
        gpu = ctx.gpu(
            cluster_cuda, raw, spacing, **params, cpu=lambda r=raw, s=spacing, p=params: cluster(r, s, **p)
        )
        out["cases"][name] = {
            "shape": list(raw.shape),
            "objects": int(cpu.max()),
            "identical": bool(np.array_equal(cpu, gpu)),
            "pixels_differ": int((cpu != gpu).sum()),
        }
    out["passed"] = all(c["identical"] for c in out["cases"].values())

    params = {"min_object_size": 20}
    spacing = [1 / 1023] * 2
    out["cpu_ms"] = 1e3 * ctx.timed(lambda: cluster(raw, spacing, **params), 3)
    if ctx.plan:
        out["gpu_ms"] = 1e3 * ctx.timed(lambda: cluster(raw, spacing, **params), 1)
        ctx.gpu(cluster_cuda, raw, spacing, to_host=False, **params)
    else:
        from numba import cuda

        d_raw = cuda.to_device(raw)
        out["gpu_ms"] = 1e3 * ctx.timed(
            lambda: cluster_cuda(d_raw, spacing, to_host=False, **params), 10, 2, cuda.synchronize
        )
        out["gpu_from_host_ms"] = 1e3 * ctx.timed(lambda: cluster_cuda(raw, spacing, **params), 5, 1)
    out["timed_on"] = f"synthetic {'x'.join(map(str, shape))}, {n} objects"
    out["target_ms"] = 10.0
    return out


def check_torch_cuda(ctx: Context) -> dict[str, Any]:
    """The torch backend on CUDA against ONNX Runtime CPU (raw outputs within the export limits, labels),
    and the network's time per GPU tile in fp32 (TF32 off) and with fp16 autocast."""
    import torch

    from embedseg_deploy.backends import create_backend
    from embedseg_training.model import BranchedERFNet

    device = "cpu" if ctx.plan else "cuda"
    out: dict[str, Any] = {"parity": {}}
    if ctx.fixtures is not None and need_exporter() is None:
        for ndim in (2, 3):
            ckpt = ctx.fixtures / f"{ndim}d" / "checkpoint.pth"
            reference = create_backend(exported(ctx, ndim), "onnx-cpu")
            test = ctx.gpu(
                create_backend, ckpt, "torch", device="cuda", cpu=lambda c=ckpt: create_backend(c, "torch")
            )
            fixture = ctx.fixtures / f"{ndim}d" / "network_input.npy"
            out["parity"][f"{ndim}d"] = parity(
                test.run,
                reference.run,
                reference.contract,
                fixture,
                "engine-fp32",
                ("torch-cuda", "onnx-cpu"),
            )
    else:
        out["parity_skipped"] = need_fixtures(ctx.fixtures) or need_exporter()
    out["passed"] = all(p["passed"] for p in out["parity"].values())

    spatial = ctx.size([1024, 1024], [64, 64])
    model = BranchedERFNet(2, 1).eval().to(device)
    x = torch.randn(1, 1, *spatial, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else None
    if device == "cuda":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True

    def fp32() -> Any:
        with torch.inference_mode():
            return model(x)

    def fp16() -> Any:
        dtype = torch.float16 if device == "cuda" else torch.bfloat16
        with torch.inference_mode(), torch.autocast(device, dtype=dtype):
            return model(x)

    repeats = ctx.size(20, 1)
    out["tile"] = spatial
    out["fp32_ms"] = 1e3 * ctx.timed(fp32, repeats, 3, sync)
    out["fp16_autocast_ms"] = 1e3 * ctx.timed(fp16, repeats, 3, sync)
    return out


def check_amp_training(ctx: Context) -> dict[str, Any]:
    """A few optimizer steps of `embedseg-train` on CUDA with AMP: the loss is finite."""
    from embedseg_deploy.synthetic import write_dataset
    from embedseg_training.train import TrainConfig, train

    data = write_dataset(ctx.work / "train-data", n_train=4, n_val=2, n_test=0, shape=(128, 128), seed=3)
    config = TrainConfig(
        data_dir=str(data),
        out=str(ctx.work / "train-run"),
        epochs=2,
        iterations=ctx.size(10, 2),
        batch_size=4,
        device="cpu" if ctx.plan else "cuda",
        amp=True,
        workers=0,
    )
    t0 = time.perf_counter()
    result = train(config, progress=False)
    losses = [float(row["train_loss"]) for row in result.log]
    return {
        "steps": config.epochs * config.iterations,
        "device": config.device,
        "amp": config.amp and config.device == "cuda",
        "train_loss": losses,
        "val_iou": [float(row["val_iou"]) for row in result.log],
        "seconds": round(time.perf_counter() - t0, 2),
        "passed": all(math.isfinite(v) for v in losses) and len(losses) == config.epochs,
    }


def _ort_gpu(ctx: Context, name: str) -> dict[str, Any]:
    """An onnxruntime GPU provider: load (engine build and cache hit for the TensorRT EP), parity, time."""
    from embedseg_deploy.backends import create_backend

    out: dict[str, Any] = {"models": {}}
    cache = ctx.work / f"{name}-cache"
    for label, model in onnx_models(ctx).items():
        reference = create_backend(model, "onnx-cpu")
        loads, states = [], []
        for _ in range(2 if name == "onnx-trt" else 1):  # the second load must hit the engine cache
            t0 = time.perf_counter()
            test = ctx.gpu(
                create_backend,
                model,
                name,
                engine_cache=cache,
                cpu=lambda m=model: create_backend(m, "onnx-cpu"),
            )
            x = tile_input(test.contract, [m * 2 for m in [test.contract.tile_multiple] * test.contract.ndim])
            test.run(x)  # the TensorRT EP builds its engine on the first run
            loads.append(round(time.perf_counter() - t0, 2))
            states.append(cache_state(cache))
        fixture = fixture_input(ctx, label)
        tolerance = engine_tolerance(test.precision)
        entry = {
            "precision": test.precision,
            "load_seconds": loads,
            "parity": parity(test.run, reference.run, test.contract, fixture, tolerance, (name, "onnx-cpu")),
        }
        if name == "onnx-trt":
            entry["cache_hit"] = states[0] == states[1]
            entry["cache_files"] = len(states[-1])
        tile = gpu_tile(ctx, test.contract)
        x = tile_input(test.contract, tile)
        entry["tile"] = tile
        entry["ms_per_tile"] = 1e3 * ctx.timed(lambda t=test, x=x: t.run(x), ctx.size(20, 1), 2)
        out["models"][label] = entry
    out["passed"] = all(m["parity"]["passed"] and m.get("cache_hit", True) for m in out["models"].values())
    return out


def check_ort_cuda(ctx: Context) -> dict[str, Any]:
    """ONNX Runtime's CUDA EP: parity with the CPU and the time per GPU tile."""
    return _ort_gpu(ctx, "onnx-cuda")


def check_ort_trt(ctx: Context) -> dict[str, Any]:
    """ONNX Runtime's TensorRT EP: engine build with the contract's profile, cache hit on the second load,
    parity, time per GPU tile."""
    return _ort_gpu(ctx, "onnx-trt")


def check_native_trt(ctx: Context) -> dict[str, Any]:
    """Native TensorRT through the engine cache: build, cache hit (same file, not rebuilt), parity, time."""
    from embedseg_deploy.backends import create_backend
    from embedseg_deploy.engine_cache import EngineCache

    out: dict[str, Any] = {"models": {}}
    cache = EngineCache(ctx.work / "engines")
    for label, model in onnx_models(ctx).items():
        reference = create_backend(model, "onnx-cpu")
        t0 = time.perf_counter()
        first = ctx.gpu(cache.get, model, cpu=lambda m=model: m)
        build = time.perf_counter() - t0
        stamp = Path(first).stat().st_mtime_ns
        t0 = time.perf_counter()
        second = ctx.gpu(cache.get, model, cpu=lambda m=model: m)
        hit = time.perf_counter() - t0
        test = ctx.gpu(create_backend, first, "tensorrt", cpu=lambda m=model: create_backend(m, "onnx-cpu"))
        fixture = fixture_input(ctx, label)
        tile = gpu_tile(ctx, test.contract)
        x = tile_input(test.contract, tile)
        out["models"][label] = {
            "engine": str(first),
            "build_seconds": round(build, 2),
            "cache_hit": Path(second) == Path(first) and Path(first).stat().st_mtime_ns == stamp,
            "cache_hit_seconds": round(hit, 3),
            "precision": test.precision,
            "parity": parity(
                test.run,
                reference.run,
                test.contract,
                fixture,
                engine_tolerance(test.precision),
                ("tensorrt", "onnx-cpu"),
            ),
            "tile": tile,
            "ms_per_tile": 1e3 * ctx.timed(lambda t=test, x=x: t.run(x), ctx.size(20, 1), 2),
        }
        if test.contract.ndim == 2:  # the engine runner's overlap of host work and GPU work, measured
            out["models"][label].update(pipelining(ctx, test))
    out["passed"] = all(m["parity"]["passed"] and m["cache_hit"] for m in out["models"].values())
    return out


def pipelining(ctx: Context, backend) -> dict[str, Any]:
    """A tiled 2048^2 prediction with the next tile prepared while the GPU runs, and one call at a time."""
    from embedseg_deploy.predict import Predictor

    tile = ctx.size(512, 64)
    predictor = Predictor(backend, tile=tile)
    shape = ctx.size((2048, 2048), (160, 160))
    x = predictor.prepare(np.random.default_rng(1).random(shape, np.float32))
    timings = {"pipeline_image": "x".join(map(str, shape)), "pipeline_tile": tile}
    for mode in ("asynchronous", "synchronous"):
        if mode == "synchronous":
            backend.asynchronous = False
        timings[f"{mode}_ms"] = 1e3 * ctx.timed(lambda: predictor.predict_raw(x), ctx.size(5, 1), 1)
    vars(backend).pop("asynchronous", None)
    return timings


def check_end_to_end(ctx: Context) -> dict[str, Any]:
    """`embedseg-run predict` on a 2048^2 image on the best GPU backend here (twice: the second run is
    warm), its labels against the CPU's."""
    from embedseg_deploy.io import write_tiff_atomic
    from embedseg_deploy.metrics import matching
    from embedseg_deploy.synthetic import make_image

    shape = ctx.size((2048, 2048), (256, 256))
    image, _ = make_image(shape, ctx.size(1500, 30), np.random.default_rng(5))
    (ctx.work / "e2e").mkdir(exist_ok=True)
    path = write_tiff_atomic(ctx.work / "e2e" / "image.tif", image)
    backend = "onnx-cpu" if ctx.plan else ctx.shared.get("best_backend", "auto")

    def run(name: str, out_dir: str) -> tuple[float, np.ndarray, dict[str, Any], str]:
        cmd = [sys.executable, "-m", "embedseg_deploy.cli", "predict", str(DEMO_MODEL), str(path)]
        cmd += ["-o", str(ctx.work / "e2e" / out_dir), "--backend", name, "--overwrite"]
        if name == "tensorrt":
            cmd += ["--engine-cache", str(ctx.work / "engines")]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
        seconds = time.perf_counter() - t0
        if done.returncode:
            raise RuntimeError(f"embedseg-run predict --backend {name} failed:\n{done.stderr[-2000:]}")
        import tifffile

        labels = tifffile.imread(ctx.work / "e2e" / out_dir / "image.tif")
        summary = json.loads((ctx.work / "e2e" / out_dir / "summary.json").read_text())
        return seconds, labels, summary, done.stderr

    cold, _, _, _ = run(backend, "gpu")
    warm, labels, summary, stderr = run(backend, "gpu")
    _, cpu_labels, _, _ = run("onnx-cpu", "cpu")
    ap = float(matching(cpu_labels, labels, 0.5).accuracy)
    return {
        "image": list(shape),
        "backend": backend,
        "backend_line": next((ln for ln in stderr.splitlines() if ln.startswith("backend ")), ""),
        "cold_seconds": round(cold, 2),
        "warm_seconds": round(warm, 2),
        "timings": summary.get("timings"),
        "objects_gpu": int(labels.max()),
        "objects_cpu": int(cpu_labels.max()),
        "ap50_vs_cpu": ap,
        "passed": ap >= 0.98,
    }


@dataclass
class Check:
    name: str
    run: Callable[[Context], dict[str, Any]]
    needs: tuple[Callable[[], str | None], ...] = ()


CHECKS = (
    Check("environment", check_environment),
    Check("cluster_cuda", check_cluster_cuda, (need_gpu, need_numba_cuda)),
    Check("torch_cuda", check_torch_cuda, (need_gpu, need_torch_cuda)),
    Check("amp_training", check_amp_training, (need_gpu, need_torch_cuda)),
    Check("ort_cuda", check_ort_cuda, (need_gpu, need_provider("CUDAExecutionProvider"))),
    Check("ort_tensorrt_ep", check_ort_trt, (need_gpu, need_provider("TensorrtExecutionProvider"))),
    Check("native_tensorrt", check_native_trt, (need_gpu, need_tensorrt)),
    Check("end_to_end", check_end_to_end, (need_gpu,)),
)


def best_backend(report: dict[str, Any]) -> str:
    """The fastest GPU backend that ran and passed, for the end-to-end run."""
    for check, backend in (
        ("native_tensorrt", "tensorrt"),
        ("ort_tensorrt_ep", "onnx-trt"),
        ("ort_cuda", "onnx-cuda"),
    ):
        entry = report.get(check, {})
        if entry.get("status") == "ran":
            return backend
    return "auto"


# ------------------------------------------------------------------------------------------------ report


def markdown(doc: dict[str, Any]) -> str:
    env = doc["checks"].get("environment", {}).get("result", {})
    lines = [
        "# GPU proof (benchmarks/gpu_check.py)",
        "",
        f"{doc['date']}; mode {doc['mode']}; {doc['seconds']} s; "
        f"GPU: {env.get('nvidia_smi') or ', '.join(env.get('machine', {}).get('gpus', [])) or 'none'}; "
        f"CUDA runtime {env.get('cuda_runtime', '?')}, torch CUDA {env.get('torch_cuda', '?')}; "
        + ", ".join(f"{k} {v}" for k, v in sorted(env.get("versions", {}).items())),
        "",
        *(
            [
                "Plan mode: the checks' own code ran on the CPU at toy sizes; these are not measurements.",
                "",
            ]
            if doc["mode"] == "plan"
            else []
        ),
        "| check | status | numbers |",
        "| --- | --- | --- |",
    ]
    for name, entry in doc["checks"].items():
        if name == "environment":
            continue
        status = entry["status"] + (f": {entry['reason']}" if entry.get("reason") else "")
        lines.append(f"| {name} | {status} | {summary_line(name, entry.get('result') or {})} |")
    return "\n".join(lines) + "\n"


def summary_line(name: str, r: dict[str, Any]) -> str:
    if not r:
        return ""
    if name == "cluster_cuda":
        same = ", ".join(
            f"{k} {'identical' if v['identical'] else str(v['pixels_differ']) + ' px differ'}"
            for k, v in r["cases"].items()
        )
        return f"{same}; {r['timed_on']}: GPU {r['gpu_ms']:.2f} ms (target < 10), CPU {r['cpu_ms']:.1f} ms"
    if name == "torch_cuda":
        par = ", ".join(
            f"{k} {'passed' if v['passed'] else 'FAILED'}" for k, v in r.get("parity", {}).items()
        )
        tile = "x".join(map(str, r["tile"]))
        fp32, fp16 = r["fp32_ms"], r["fp16_autocast_ms"]
        par = par or r.get("parity_skipped")
        return f"parity {par}; {tile} tile fp32 {fp32:.1f} ms, fp16 autocast {fp16:.1f} ms"
    if name == "amp_training":
        losses = ", ".join(f"{v:.3f}" for v in r["train_loss"])
        return f"{r['steps']} steps on {r['device']} (AMP {r['amp']}): loss per epoch {losses}"
    if "models" in r:
        parts = []
        for label, m in r["models"].items():
            tile = "x".join(map(str, m["tile"]))
            extra = f", build {m['build_seconds']} s" if "build_seconds" in m else ""
            extra += f", loads {m['load_seconds']} s" if "load_seconds" in m else ""
            extra += f", cache hit {m['cache_hit']}" if "cache_hit" in m else ""
            if "asynchronous_ms" in m:
                overlap = f"{m['asynchronous_ms']:.0f} vs {m['synchronous_ms']:.0f} ms one at a time"
                extra += f", {m['pipeline_image']} in {m['pipeline_tile']} px tiles with overlap {overlap}"
            parity_ok = "passed" if m["parity"]["passed"] else "FAILED"
            ms = m["ms_per_tile"]
            parts.append(f"{label} ({m['precision']}): parity {parity_ok}, {tile} tile {ms:.1f} ms{extra}")
        return "; ".join(parts)
    if name == "end_to_end":
        return (
            f"{'x'.join(map(str, r['image']))} on {r['backend']}: {r['warm_seconds']} s warm "
            f"({r['cold_seconds']} s cold), {r['objects_gpu']} objects (CPU {r['objects_cpu']}), "
            f"AP@0.5 vs CPU {r['ap50_vs_cpu']:.3f}"
        )
    return ""


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--plan", action="store_true", help="say what would run; run the checks' code on the CPU"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder [benchmarks/results; plan: none]"
    )
    parser.add_argument("--fixtures", default=None, help="upstream fixtures folder (2d/, 3d/)")
    parser.add_argument("--only", default=None, help="comma-separated check names")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run")
    args = parser.parse_args(argv)
    names = [c.name for c in CHECKS]
    only = args.only.split(",") if args.only else names
    unknown = sorted(set(only) - set(names))
    if unknown:
        parser.error(f"unknown checks {unknown}; known: {names}")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    fixtures = find_fixtures(args.fixtures)
    doc: dict[str, Any] = {
        "benchmark": "gpu_check",
        "mode": "plan" if args.plan else "run",
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "fixtures": str(fixtures) if fixtures else None,
        "checks": {},
    }
    broken = failed = 0
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        ctx = Context(args.plan, Path(work), fixtures, t_start + args.budget, log)
        for check in CHECKS:
            if check.name not in only:
                continue
            missing = [why for why in (need() for need in check.needs) if why]
            entry: dict[str, Any] = {"doc": (check.run.__doc__ or "").split("\n\n")[0].strip()}
            if check.name == "end_to_end":
                ctx.shared["best_backend"] = best_backend(doc["checks"])
            if missing:
                entry.update(status="skipped", reason="; ".join(missing))
            elif not args.plan and time.perf_counter() > ctx.deadline:
                entry.update(status="skipped", reason=f"time budget of {args.budget:.0f} s spent")
            if args.plan:
                entry["would"] = "skip" if missing else "run"
                entry.setdefault("status", "would run")
                log(f"{check.name}: would {'skip: ' + '; '.join(missing) if missing else 'run'}")
            if args.plan or "status" not in entry:
                t0 = time.perf_counter()
                try:
                    entry["result"] = check.run(ctx)
                    if not args.plan:
                        entry["status"] = "ran" if entry["result"].get("passed", True) else "failed"
                        failed += entry["status"] == "failed"
                    else:
                        entry["plan_code"] = "ok"
                except Exception as exc:
                    text = f"{type(exc).__name__}: {exc}"
                    if args.plan:
                        entry["plan_code"] = f"BROKEN: {text}"
                        broken += 1
                    else:
                        entry.update(status="failed", reason=text)
                        failed += 1
                    entry["traceback"] = traceback.format_exc()[-3000:]
                    log(f"{check.name}: {'BROKEN' if args.plan else 'FAILED'}: {text}")
                entry["seconds"] = round(time.perf_counter() - t0, 2)
                if not args.plan:
                    numbers = summary_line(check.name, entry.get("result") or {})
                    log(f"{check.name}: {entry['status']} in {entry['seconds']} s {numbers}")
            doc["checks"][check.name] = entry
    doc["seconds"] = round(time.perf_counter() - t_start, 1)
    text = markdown(doc)
    out = args.out if args.out is not None else (None if args.plan else RESULTS)
    if out is not None:
        write_atomic(out / "gpu.json", json.dumps(doc, indent=1, default=str) + "\n")
        write_atomic(out / "gpu.md", text)
        log(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
    print(text)
    if args.plan:
        log(
            f"plan: {broken} check(s) with broken code"
            if broken
            else "plan: every check's code ran on the CPU"
        )
        return 1 if broken else 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
