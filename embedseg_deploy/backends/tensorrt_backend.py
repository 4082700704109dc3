"""Native TensorRT backend: a serialized engine plus its sidecar JSON (``model.engine.json``).

Given an ONNX model instead, the engine comes from :class:`embedseg_deploy.engine_cache.EngineCache`
(built on first use on this machine, reused afterwards).

Device buffers and copies go through ``cuda.bindings.runtime`` (cuda-python, the ``trt`` extra; numba-cuda
pulls the same package for the GPU clustering), the lightest dependable choice: no torch, no cupy.

An engine is tied to the TensorRT version and the GPU's compute capability, so before deserialising, the
sidecar is compared with this machine (``engine_cache.engine_problems``); a mismatch is a clear error that
says to rebuild the engine on this PC, never a crash inside TensorRT.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..contract import Contract
from ..engine_cache import EngineCache, EngineError, engine_problems, local_environment, read_sidecar
from .base import Backend, BackendError, ShapeSpec


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6 layout
        except ImportError as exc:
            raise BackendError(
                "tensorrt backend needs cuda-python: pip install 'embedseg-deploy[trt]'"
            ) from exc
    return cudart


def _check(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` tuple, raising on error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA error in {what}: {err}")
    return values[0] if len(values) == 1 else values


class TensorRTBackend(Backend):
    """A deserialized TensorRT engine with one execution context and cached device buffers."""

    def __init__(
        self, model_path: str | os.PathLike, device_id: int = 0, engine_cache: str | os.PathLike | None = None
    ):
        path = Path(model_path)
        if not path.is_file():
            raise BackendError(f"{path}: model file not found")
        try:
            if path.suffix.lower() == ".onnx":
                path = EngineCache(engine_cache, device_id).get(path)
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
        import tensorrt as trt

        cudart = _cudart()
        _check(cudart.cudaSetDevice(device_id), "cudaSetDevice")
        gpu_name, cc = env["gpu_name"], env["compute_capability"]
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BackendError(
                f"{path}: TensorRT could not deserialize the engine (corrupt or built elsewhere)"
            )
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendError(f"{path}: expected one input and one output tensor, got {inputs} / {outputs}")
        self._engine, self._input, self._output = engine, inputs[0], outputs[0]
        self._in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._input)))
        self._out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._output)))
        lo, _opt, hi = (tuple(s) for s in engine.get_tensor_profile_shape(self._input, 0))
        shapes = ShapeSpec(contract.ndim, contract.tile_multiple, tuple(lo[2:]), tuple(hi[2:]), int(hi[0]))
        self._context = engine.create_execution_context()
        self._stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (pointer, bytes)
        self._cudart = cudart
        super().__init__(
            name="tensorrt",
            device=f"cuda:{device_id}",
            precision=str(facts.get("precision") or contract.provenance.get("precision") or "fp32"),
            contract=contract,
            shapes=shapes,
            model_path=path,
            info={
                "tensorrt": trt.__version__,
                "gpu": gpu_name,
                "compute_capability": cc,
                "profile": [lo, hi],
            },
        )

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self._cudart.cudaFree(ptr), "cudaFree")
            ptr = int(_check(self._cudart.cudaMalloc(nbytes), "cudaMalloc"))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def _run(self, batch: np.ndarray) -> np.ndarray:
        cudart, ctx = self._cudart, self._context
        host_in = np.ascontiguousarray(batch, dtype=self._in_dtype)
        if not ctx.set_input_shape(self._input, host_in.shape):
            raise BackendError(f"tensorrt: input shape {host_in.shape} is outside the engine's profile")
        out_shape = tuple(ctx.get_tensor_shape(self._output))
        host_out = np.empty(out_shape, dtype=self._out_dtype)
        d_in = self._buffer(self._input, host_in.nbytes)
        d_out = self._buffer(self._output, host_out.nbytes)
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(
            cudart.cudaMemcpyAsync(d_in, host_in.ctypes.data, host_in.nbytes, h2d, self._stream), "H2D copy"
        )
        ctx.set_tensor_address(self._input, d_in)
        ctx.set_tensor_address(self._output, d_out)
        if not ctx.execute_async_v3(int(self._stream)):
            raise BackendError("tensorrt: execute_async_v3 failed")
        _check(
            cudart.cudaMemcpyAsync(host_out.ctypes.data, d_out, host_out.nbytes, d2h, self._stream),
            "D2H copy",
        )
        _check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return host_out.astype(np.float32, copy=False)

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self._cudart.cudaFree(ptr)
        self._buffers.clear()
        self._context = None
