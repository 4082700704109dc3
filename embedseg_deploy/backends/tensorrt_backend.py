"""Native TensorRT backend: a serialized engine plus its sidecar JSON (``model.engine.json``).

Given an ONNX model instead, the engine comes from :class:`embedseg_deploy.engine_cache.EngineCache`
(built on first use on this machine, reused afterwards).

The engine runs through :class:`embedseg_deploy.engine_cache.EngineRunner`, the project's one engine
runner (the exporter's verification uses it too): device buffers reused across calls, copies through
``cuda.bindings.runtime`` (cuda-python, the ``trt`` extra; numba-cuda pulls the same package for the GPU
clustering), the lightest dependable choice: no torch, no cupy. The runner raises ``EngineError``; this
backend maps it to :class:`BackendError` at its boundary (``__init__`` and ``_run``), so callers of a
backend only ever see ``BackendError``.

The tiler is offered optimisation profile 0's shapes (:class:`ShapeSpec` is one box, and the union of
several profiles need not be one); engines from :class:`EngineCache` have a single profile anyway.

An engine is tied to the TensorRT version and the GPU's compute capability, so before deserialising, the
sidecar is compared with this machine (``engine_cache.engine_problems``); a mismatch is a clear error that
says to rebuild the engine on this PC, never a crash inside TensorRT.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ..contract import Contract
from ..engine_cache import (
    EngineCache,
    EngineError,
    EngineRunner,
    engine_problems,
    local_environment,
    read_sidecar,
)
from .base import Backend, BackendError, ShapeSpec


class TensorRTBackend(Backend):
    """A deserialized TensorRT engine with one execution context and cached device buffers."""

    def __init__(
        self, model_path: str | os.PathLike, device_id: int = 0, engine_cache: str | os.PathLike | None = None
    ):
        path = Path(model_path)
        if not path.is_file():
            raise BackendError(f"{path}: model file not found")
        built: float | None = None
        try:
            if path.suffix.lower() == ".onnx":
                cache = EngineCache(engine_cache, device_id)
                cached = cache.lookup(path)
                if cached is None:
                    start = time.perf_counter()
                    cached = cache.get(path)
                    built = round(time.perf_counter() - start, 2)
                path = cached
            doc = read_sidecar(path)
            contract, facts = Contract.from_dict(doc["contract"]), dict(doc["engine"])
            env = local_environment(device_id)
        except EngineError as exc:
            text = str(exc)
            raise BackendError(text if path.name in text else f"{path}: {text}") from None
        problems = engine_problems(facts, env)
        if problems:
            raise BackendError(
                f"{path}: this engine cannot run here: {'; '.join(problems)}; rebuild it on this PC "
                "(embedseg-export trt, or give the ONNX model with --backend tensorrt to build it on first "
                "use)"
            )
        try:
            self._runner = EngineRunner(path, device_id)
        except EngineError as exc:
            raise BackendError(f"tensorrt: {exc}") from None
        lo, hi = self._runner.profiles[0]
        shapes = ShapeSpec(contract.ndim, contract.tile_multiple, lo[2:], hi[2:], hi[0])
        super().__init__(
            name="tensorrt",
            device=f"cuda:{device_id}",
            precision=str(facts.get("precision") or contract.provenance.get("precision") or "fp32"),
            contract=contract,
            shapes=shapes,
            model_path=path,
            info={
                "tensorrt": env["tensorrt_version"],
                "gpu": env["gpu_name"],
                "compute_capability": env["compute_capability"],
                "profile": [list(lo), list(hi)],
                "engine": str(path),
                **({"engine_built_seconds": built} if built is not None else {}),
            },
        )

    asynchronous = True

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self._submit(batch)()

    def _submit(self, batch: np.ndarray):
        """Queue the batch on the engine's stream; the returned function waits for its output."""
        try:
            handle = self._runner.submit(batch)
        except EngineError as exc:
            raise BackendError(f"tensorrt: {exc}") from None

        def wait() -> np.ndarray:
            try:
                return self._runner.wait(handle)
            except EngineError as exc:
                raise BackendError(f"tensorrt: {exc}") from None

        return wait

    def close(self) -> None:
        self._runner.close()
