"""Shared pieces of the benchmark scripts: thread settings, models, result files, machine facts.

Import this module before numpy/torch/onnxruntime: :func:`pin_threads` sets the thread environment
(OpenBLAS, OpenMP) that those libraries read once, at import.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FIXTURES = Path(os.environ.get("EMBEDSEG_FIXTURES", REPO.parent / "shared" / "fixtures" / "upstream"))
UPSTREAM_VENV = Path(os.environ.get("EMBEDSEG_UPSTREAM_VENV", "/work/upstream-venv"))
MODEL_CACHE = Path(tempfile.gettempdir()) / "embedseg-bench-models"
THREADS = 2

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def pin_threads(threads: int = THREADS, omp_wait_policy: str | None = "PASSIVE") -> dict[str, str]:
    """Thread environment for this process and its children; call before importing numpy or torch.

    ``OMP_WAIT_POLICY=PASSIVE``: on a shared, loaded machine torch's OpenMP threads spin-wait for each
    other and a 2-thread forward pass can take 10x longer (measured: 256^2 tile 0.26 s passive, 0.8-7 s
    active at load 9). Both torch sides (ours and upstream's) get the same policy.
    """
    env = {
        "OMP_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "NUMBA_NUM_THREADS": str(threads),
    }
    if omp_wait_policy:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return {k: os.environ[k] for k in env}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fixture_checkpoint(ndim: int) -> Path:
    path = FIXTURES / f"{ndim}d" / "checkpoint.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: upstream fixture checkpoint not found (set EMBEDSEG_FIXTURES)")
    return path


def exported_model(ndim: int, precision: str = "fp32", cache: Path = MODEL_CACHE) -> Path:
    """The upstream fixture checkpoint of ``ndim`` exported to ONNX (``precision`` fp32/fp16), cached by
    the checkpoint's and the exporter's hashes (an export takes ~5-10 s and needs torch).

    ``$EMBEDSEG_BENCH_MODELS`` names a folder of ready models ``upstream-{2,3}d-{fp32,fp16}.onnx`` used
    as they are (the smoke test puts small stand-ins there).
    """
    given = os.environ.get("EMBEDSEG_BENCH_MODELS")
    if given:
        path = Path(given) / f"upstream-{ndim}d-{precision}.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found ($EMBEDSEG_BENCH_MODELS)")
        return path
    from embedseg_exporters import onnx_export

    ckpt = fixture_checkpoint(ndim)
    key = (sha256(ckpt)[:12] + sha256(Path(onnx_export.__file__))[:8]).encode()
    out = cache / hashlib.sha256(key).hexdigest()[:16] / f"upstream-{ndim}d-{precision}.onnx"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        onnx_export.export_checkpoint(ckpt, out, force=True, verify=False, precision=precision)
    return out


def shown(path: Path) -> str:
    """``path`` as a result file names it: relative to the repository when inside it."""
    path = path.resolve()
    return str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


def header(benchmark: str, threads: int, **parameters: Any) -> dict[str, Any]:
    """Date, machine (CPU, GPUs, load average), versions and parameters of a result document."""
    from embedseg_deploy.machine import machine_info, package_versions

    return {
        "_t0": time.perf_counter(),
        "benchmark": benchmark,
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": package_versions(),
        "parameters": {"threads": threads, **parameters},
        "environment": {
            k: v for k, v in os.environ.items() if k.split("_")[0] in ("OMP", "OPENBLAS", "MKL", "NUMBA")
        },
    }


def finish(doc: dict[str, Any], markdown: Callable[[dict[str, Any]], str], name: str, out_dir: Path) -> str:
    """Add the closing load average and run time, write ``name``.json and ``name``.md atomically; returns
    the markdown."""
    from embedseg_deploy.bench_report import write_json_atomic, write_text_atomic

    doc["machine"]["load_average_after"] = list(os.getloadavg())
    doc["seconds"] = round(time.perf_counter() - doc.pop("_t0", time.perf_counter()), 1)
    text = markdown(doc)
    json_path = write_json_atomic(out_dir / f"{name}.json", doc)
    md_path = write_text_atomic(out_dir / f"{name}.md", text)
    log(f"wrote {json_path} and {md_path} ({doc['seconds']} s)")
    return text


def machine_line(doc: dict[str, Any]) -> str:
    """One markdown line: date, CPU, cores, GPUs, load before/after, versions."""
    m, v = doc["machine"], doc["versions"]
    load = ", ".join(f"{x:.1f}" for x in m["load_average"])
    after = ", ".join(f"{x:.1f}" for x in m.get("load_average_after", []))
    keys = ("embedseg_deploy", "onnxruntime", "torch", "numpy", "numba", "python")
    return (
        f"{doc['date']}; {m['cpu_model']} ({m['cpu_count']} cpus), GPUs: {', '.join(m['gpus']) or 'none'}; "
        f"{doc['parameters']['threads']} threads; load average (1/5/15 min) before {load}, after {after}; "
        f"run time {doc.get('seconds', '?')} s; " + ", ".join(f"{k} {v[k]}" for k in keys if k in v) + "."
    )


def peak_rss_mib() -> float:
    """This process's peak resident set (``VmHWM``). Not ``ru_maxrss``: Linux seeds a child's with its
    parent's resident set at exec, so a child of a big parent reads big."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    import numpy as np

    return float(np.median(values))


@contextlib.contextmanager
def timer(store: dict[str, float], key: str):
    t0 = time.perf_counter()
    yield
    store[key] = store.get(key, 0.0) + time.perf_counter() - t0
