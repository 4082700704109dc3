"""Inference backends behind one small interface (see embedseg_deploy.backends.base).

:func:`create_backend` opens a model file on a named backend, or with ``"auto"`` on the fastest one that
really runs here (for ONNX models: native TensorRT with an engine already in the cache, the TensorRT EP,
the CUDA EP, then the CPU), and records why the faster ones were passed over. Auto mode never builds a
TensorRT engine (minutes, during model loading): it says that one could be built, and how. An explicitly
named backend that cannot run is an error, never a silent CPU run.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from .base import Backend, BackendError, ShapeSpec

BACKENDS = ("onnx-cpu", "onnx-cuda", "onnx-trt", "tensorrt", "torch")
ALIASES = {
    "cpu": "onnx-cpu",
    "ort-cpu": "onnx-cpu",
    "cuda": "onnx-cuda",
    "ort-cuda": "onnx-cuda",
    "ort-trt": "onnx-trt",
    "trt": "tensorrt",
}
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
CHECKPOINT_SUFFIXES = (".pth", ".pt")
AUTO_ONNX_ORDER = ("onnx-trt", "onnx-cuda", "onnx-cpu")

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "ShapeSpec",
    "create_backend",
    "engine_build_pending",
    "model_kind",
    "parse_device",
]


def model_kind(path: str | os.PathLike) -> str:
    """'engine', 'checkpoint', 'package' (a bioimage.io zip) or 'onnx', from the file name."""
    suffix = Path(path).suffix.lower()
    if suffix == ".zip":
        return "package"
    if suffix in ENGINE_SUFFIXES:
        return "engine"
    if suffix in CHECKPOINT_SUFFIXES:
        return "checkpoint"
    return "onnx"


def parse_device(device: str | int | None) -> tuple[str, int]:
    """'cpu' | 'cuda' | 'cuda:1' | 1 -> ('cpu' or 'cuda', device id)."""
    if device is None:
        return "auto", 0
    if isinstance(device, int):
        return "cuda", device
    text = str(device).strip().lower()
    if text in ("cpu", "auto"):
        return text, 0
    if text.startswith("cuda") or text.startswith("gpu"):
        _, _, idx = text.partition(":")
        if idx and not idx.isdigit():
            raise BackendError(f"bad device {device!r}: use cpu, cuda or cuda:N")
        return "cuda", int(idx or 0)
    raise BackendError(f"bad device {device!r}: use cpu, cuda or cuda:N")


def create_backend(
    model: str | os.PathLike,
    backend: str = "auto",
    device: str | int | None = None,
    threads: int | None = None,
    engine_cache: str | os.PathLike | None = None,
    **options: Any,
) -> Backend:
    """Open ``model`` on ``backend`` (one of :data:`BACKENDS`, an alias, or ``"auto"``).

    ``threads`` sets the CPU thread count (ORT intra-op threads, torch threads); ``engine_cache`` is the
    TensorRT EP's engine cache folder; ``options`` go to the backend class.
    """
    name = ALIASES.get(backend.lower(), backend.lower())
    if name != "auto" and name not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose auto or one of {', '.join(BACKENDS)}")
    path = Path(model)
    if not path.exists():
        raise BackendError(f"{path}: model file not found")
    if path.is_dir():
        raise BackendError(f"{path}: is a directory, not a model file")
    kind, device_id = parse_device(device)
    package = None
    if model_kind(path) == "package":
        from ..bioimageio import PackageError, extract_onnx

        try:
            package, path = path, extract_onnx(path)
        except PackageError as exc:
            raise BackendError(str(exc)) from None
    if name == "auto":
        backend = _auto(path, kind, device_id, threads, engine_cache, options)
    else:
        backend = _open(name, path, kind, device_id, threads, engine_cache, options)
    if package is not None:
        backend.info["package"] = str(package)
    return backend


def _open(name, path, kind, device_id, threads, engine_cache, options) -> Backend:
    mk = model_kind(path)
    if name == "tensorrt":
        if mk == "checkpoint":
            raise BackendError(f"{path}: the tensorrt backend runs engines or ONNX models, not checkpoints")
        if kind == "cpu":
            raise BackendError("tensorrt is a GPU backend; device cpu was asked for")
        from .tensorrt_backend import TensorRTBackend

        return TensorRTBackend(path, device_id=device_id, engine_cache=engine_cache, **options)
    if name == "torch":
        from .torch_backend import TorchBackend

        torch_device = "cpu" if kind in ("cpu", "auto") else f"cuda:{device_id}"
        return TorchBackend(path, device=torch_device, threads=threads, **options)
    if mk != "onnx":
        raise BackendError(f"{path}: backend {name} runs ONNX models; this file looks like a {mk}")
    if name == "onnx-cpu" and kind == "cuda":
        raise BackendError("onnx-cpu cannot run on a CUDA device; use --backend onnx-cuda")
    if name != "onnx-cpu" and kind == "cpu":
        raise BackendError(f"{name} is a GPU backend; device cpu was asked for")
    from .onnx_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(
        path, backend=name, device_id=device_id, threads=threads, engine_cache=engine_cache, **options
    )


def engine_build_pending(
    model: str | os.PathLike, backend: str, device: str | int | None = None, engine_cache=None
) -> bool:
    """True when opening ``model`` on ``backend`` will build a TensorRT engine first (native TensorRT named
    for an ONNX model with no engine cached for this GPU): the CLI says so before the wait."""
    name = ALIASES.get(backend.lower(), backend.lower())
    if name != "tensorrt" or model_kind(model) != "onnx" or not Path(model).is_file():
        return False
    try:
        _cached_engine(Path(model), parse_device(device)[1], engine_cache)
    except BackendError:
        return True
    except Exception:  # no TensorRT or no GPU: opening the backend will say so
        return False
    return False


def _cached_engine(path: Path, device_id: int, engine_cache) -> Path:
    """The engine the cache already holds for ``path`` on this GPU; a BackendError saying how to build one
    otherwise (auto mode never builds: that takes minutes)."""
    from ..engine_cache import EngineCache

    cache = EngineCache(engine_cache, device_id)
    found = cache.lookup(path)
    if found is None:
        raise BackendError(
            f"no TensorRT engine for {path.name} on this GPU in {cache.root} yet; build one once with "
            f"`embedseg-run predict --backend tensorrt ...` or `embedseg-export trt {path}` (minutes), "
            "later runs pick it up"
        )
    return found


def _auto(path, kind, device_id, threads, engine_cache, options) -> Backend:
    mk = model_kind(path)
    if mk == "engine":
        order: tuple[str, ...] = ("tensorrt",)
    elif mk == "checkpoint":
        order = ("torch",)
    else:
        from .onnx_backend import PROVIDER_OF, available_providers

        listed = available_providers()
        order = tuple(n for n in AUTO_ONNX_ORDER if PROVIDER_OF[n] in listed)
        if importlib.util.find_spec("tensorrt") is not None:
            order = ("tensorrt", *order)  # only with an engine already cached (see _cached_engine)
        if kind == "cpu":
            order = ("onnx-cpu",)
        elif kind == "cuda":
            order = tuple(n for n in order if n != "onnx-cpu")
        if not order:
            order = ("onnx-cpu",)
    skipped: list[dict[str, str]] = []
    for name in order:
        try:
            if name == "tensorrt" and mk == "onnx":
                _cached_engine(path, device_id, engine_cache)
            backend = _open(name, path, kind, device_id, threads, engine_cache, dict(options))
        except Exception as exc:  # any failure moves on: a build error of one backend is not the run's
            reason = str(exc) if isinstance(exc, BackendError) else f"{type(exc).__name__}: {exc}"
            if len(order) == 1 or name == order[-1]:
                detail = "; ".join(f"{s['backend']}: {s['reason']}" for s in skipped)
                raise BackendError(f"{reason}" + (f" (also tried {detail})" if detail else "")) from None
            skipped.append({"backend": name, "reason": reason})
            continue
        backend.info["auto"] = {"chosen": name, "skipped": skipped}
        return backend
    raise BackendError(f"{path}: no backend could run this model")  # pragma: no cover - loop always returns
