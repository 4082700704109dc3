"""TensorRT engines for EmbedSeg ONNX models: build, describe (sidecar JSON), cache per machine and run.

This module belongs to the runtime tier: it imports neither torch nor onnx, and imports ``tensorrt`` (and
``cuda-python``) only inside the functions that build or run an engine or look at the GPU, so importing it is
free. ``embedseg-export trt`` builds and verifies through it, and the runtime uses :class:`EngineCache` to
build an engine on first use and reuse it afterwards, and :class:`EngineRunner` (in its ``tensorrt``
backend) to run it.

Design decisions:

* **Precision lives in the ONNX model.** TensorRT 11 removed ``BuilderFlag.FP16``: every network is
  strongly typed. So an fp16 engine is always built from the fp16 ONNX model (``embedseg-export onnx
  --precision fp16``: fp16 compute, fp32 I/O and the fp32 islands chosen by measurement), and every network
  is created ``STRONGLY_TYPED`` (required for that on TensorRT 10, accepted and ignored on 11). One code
  path for both majors, and TensorRT never picks precisions behind our back. ``fp32`` and ``fp16`` builds
  clear ``BuilderFlag.TF32`` (fp32 layers stay true fp32); ``tf32`` is an fp32 model with TF32 allowed.
* **Engines are machine-specific.** They only load on the TensorRT version and GPU compute capability they
  were built with, so the cache key is ``(ONNX sha256, TensorRT version, compute capability, precision,
  profiles)`` and the sidecar (``model.engine.json``) records all of it; :func:`engine_problems` compares
  a sidecar with this machine.
* **Profiles are full input shapes** ``(N, C, *spatial)`` with every spatial size a multiple of the
  contract's ``tile_multiple`` (8: three stride-2 downsamplers). The default profile comes from the
  contract's GPU tile: min = one multiple per axis, opt = tile, max = tile + 2 * halo.
* The contract is read from the ONNX ``metadata_props`` by :func:`read_onnx_header`, a ~40-line
  protobuf walk over the top-level ``ModelProto`` fields, so neither onnx nor onnxruntime is needed here.

The sidecar layout is ``{"contract": {...}, "engine": {...}}``; ``engine`` holds ``tensorrt_version``,
``gpu_name``, ``compute_capability``, ``precision``, ``profiles``, ``input``/``output`` tensor names,
``onnx_sha256``, ``cache_key`` and build facts; the same facts sit in ``contract.provenance["engine"]``.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .contract import METADATA_KEY, Contract, ContractError
from .io import atomic_write_bytes, sha256_file

SIDECAR_KIND = "embedseg-tensorrt-engine"
PRECISIONS = ("fp32", "tf32", "fp16", "int8")
CACHE_ENV = "EMBEDSEG_ENGINE_CACHE"


class EngineError(RuntimeError):
    """An engine cannot be built, described or used here (clear message, names the file)."""


# ----------------------------------------------------------------------------------------------------------
# Shapes and profiles


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimisation profile: full input shapes ``(N, C, *spatial)``, min <= opt <= max."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        shapes = (self.min, self.opt, self.max)
        if len({len(s) for s in shapes}) != 1 or len(self.min) < 3:
            raise EngineError(f"profile shapes must be N x C x spatial of one rank, got {list(shapes)}")
        if not all(0 < a <= b <= c for a, b, c in zip(*shapes, strict=True)):
            raise EngineError(f"profile needs 0 < min <= opt <= max in every dim, got {list(shapes)}")

    def contains(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.min) and all(
            a <= s <= c for a, s, c in zip(self.min, shape, self.max, strict=True)
        )

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[int]]) -> Profile:
        try:
            return cls(*(tuple(int(v) for v in data[k]) for k in ("min", "opt", "max")))
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineError(f"bad profile {data!r}: {exc}") from None


def check_spatial(spatial: Sequence[int], multiple: int, what: str = "tile") -> None:
    """Raise unless every spatial size is a positive multiple of ``multiple``."""
    bad = [s for s in spatial if s <= 0 or s % multiple]
    if bad:
        raise EngineError(
            f"{what} {'x'.join(map(str, spatial))}: every spatial size must be a positive multiple of "
            f"{multiple} (the network downsamples three times by 2)"
        )


def parse_shape(text: str, ndim: int, what: str = "tile") -> tuple[int, ...]:
    """``"256x256"`` -> ``(256, 256)`` (array order, ``ndim`` sizes)."""
    try:
        sizes = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise EngineError(f"{what} {text!r}: expected sizes like 256x256 (2D) or 32x128x128 (3D)") from None
    if len(sizes) != ndim:
        raise EngineError(
            f"{what} {text!r}: this is a {ndim}D model, so give {ndim} sizes (e.g. {'x'.join(['64'] * ndim)})"
        )
    return sizes


def parse_batch(text: str) -> tuple[int, int, int]:
    """``--batch`` text, ``B`` or ``MIN/OPT/MAX``, as (min, opt, max)."""
    parts = text.split("/")
    try:
        values = [int(b) for b in (parts * 3 if len(parts) == 1 else parts)]
    except ValueError:
        values = []
    if len(values) != 3 or not 0 < values[0] <= values[1] <= values[2]:
        raise EngineError(
            f"batch {text!r}: expected a positive integer or MIN/OPT/MAX with MIN <= OPT <= MAX"
        )
    return values[0], values[1], values[2]


def parse_profile(tile: str, ndim: int, in_channels: int, multiple: int = 8, batch: str = "1") -> Profile:
    """A profile from ``--tile`` text (``OPT`` or ``MIN/OPT/MAX``) and ``--batch`` text (same forms)."""
    parts = tile.split("/")
    if len(parts) not in (1, 3):
        raise EngineError(
            f"tile {tile!r}: give one size (static) or MIN/OPT/MAX, e.g. 256x256/512x512/512x512"
        )
    spatial = [parse_shape(p, ndim) for p in (parts * 3 if len(parts) == 1 else parts)]
    for s in spatial:
        check_spatial(s, multiple)
    batches = parse_batch(batch)
    return Profile(*(tuple([b, in_channels, *s]) for b, s in zip(batches, spatial, strict=True)))


def default_profile(contract: Contract, device: str = "gpu", batch: Sequence[int] = (1, 1, 1)) -> Profile:
    """min = one multiple per axis, opt = the contract's tile, max = tile + 2 * halo (rounded up)."""
    size, halo = contract.recommended_tile(device)
    m = contract.tile_multiple
    big = [-(-(s + 2 * h) // m) * m for s, h in zip(size, halo, strict=True)]
    c = contract.in_channels
    b0, b1, b2 = batch
    return Profile((b0, c, *[m] * contract.ndim), (b1, c, *size), (b2, c, *big))


# ----------------------------------------------------------------------------------------------------------
# Files: atomic writes, the ONNX header (``sha256_file`` comes from ``embedseg_deploy.io``)


def write_atomic(path: str | os.PathLike, data: bytes, force: bool = False) -> Path:
    """:func:`embedseg_deploy.io.atomic_write_bytes` with the exporters' errors (``--force``)."""
    path = Path(path)
    if path.exists() and not force:
        raise EngineError(f"{path} exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise EngineError(f"{path}: folder {path.parent} does not exist")
    return atomic_write_bytes(path, data)


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or oversized varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of each field of one protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        yield number, wire, value


# ModelProto field numbers (onnx.proto3): ir_version 1, producer_name 2, producer_version 3, graph 7,
# opset_import 8 (domain 1, version 2), metadata_props 14 (key 1, value 2).
_MODEL_WIRE = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2}


def read_onnx_header(path: str | os.PathLike) -> dict[str, Any]:
    """``ir_version``, ``opset`` (domain -> version), ``producer``, ``metadata`` and ``inputs`` (the graph's
    input names, initializers left out) of an ONNX file.

    Raises :class:`EngineError` when the file is not a readable ONNX model.
    """
    path = Path(path)
    try:
        buf = memoryview(path.read_bytes())
    except OSError as exc:
        raise EngineError(f"{path}: cannot read: {exc.strerror or exc}") from None
    header: dict[str, Any] = {"ir_version": None, "opset": {}, "producer": "", "metadata": {}, "inputs": []}
    has_graph = False
    try:
        for number, wire, value in _fields(buf):
            if number in _MODEL_WIRE and wire != _MODEL_WIRE[number]:
                raise ValueError(f"field {number} has wire type {wire}")
            if number == 1:
                header["ir_version"] = value
            elif number == 2:
                header["producer"] = bytes(value).decode("utf-8", "replace")
            elif number == 7:
                has_graph = True
                header["inputs"] = _graph_inputs(value)
            elif number == 8:
                entry = {n: v for n, _, v in _fields(value)}
                domain = bytes(entry.get(1, b"")).decode("utf-8", "replace") or "ai.onnx"
                header["opset"][domain] = int(entry.get(2, 0))
            elif number == 14:
                entry = {n: bytes(v).decode("utf-8") for n, _, v in _fields(value)}
                header["metadata"][entry.get(1, "")] = entry.get(2, "")
    except (ValueError, UnicodeDecodeError) as exc:
        raise EngineError(
            f"{path}: not a valid ONNX model (corrupted or another kind of file: {exc})"
        ) from None
    if header["ir_version"] is None or not has_graph:
        raise EngineError(f"{path}: not a valid ONNX model (no IR version or no graph)")
    return header


def _graph_inputs(graph: memoryview) -> list[str]:
    """Names of a GraphProto's inputs (field 11, ValueInfoProto name 1) that are not initializers (field 5,
    TensorProto name 8)."""
    inputs, weights = [], set()
    for number, wire, value in _fields(graph):
        if number in (5, 11) and wire == 2:
            key = 8 if number == 5 else 1
            name = next((bytes(v).decode("utf-8") for n, w, v in _fields(value) if n == key and w == 2), "")
            if number == 5:
                weights.add(name)
            else:
                inputs.append(name)
    return [n for n in inputs if n not in weights]


def onnx_contract(path: str | os.PathLike, header: Mapping[str, Any] | None = None) -> Contract:
    """The model contract stored in an ONNX file's metadata."""
    header = header if header is not None else read_onnx_header(path)
    text = header["metadata"].get(METADATA_KEY)
    if text is None:
        raise EngineError(
            f"{path}: the ONNX model carries no EmbedSeg contract (metadata key {METADATA_KEY!r}); "
            "export it with embedseg-export onnx"
        )
    try:
        return Contract.from_json(text)
    except ContractError as exc:
        raise EngineError(f"{path}: bad contract in the ONNX metadata: {exc}") from None


def onnx_precision(contract: Contract) -> str:
    """``fp16`` or ``int8`` for a model exported with that ``--precision``, else ``fp32``."""
    return str(contract.provenance.get("export", {}).get("precision", "fp32"))


def int8_target(contract: Contract) -> str | None:
    """Where an int8 model's activations were quantized for: ``cpu`` (uint8 with zero points, the fast
    ONNX Runtime CPU kernels) or ``tensorrt`` (symmetric int8, TensorRT's only scheme); None if not int8."""
    if onnx_precision(contract) != "int8":
        return None
    return str(contract.provenance["export"].get("int8", {}).get("target", "cpu"))


def resolve_precision(path: str | os.PathLike, contract: Contract, precision: str | None) -> str:
    """The engine precision for this ONNX model: ``precision`` checked against what the model holds."""
    model = onnx_precision(contract)
    if precision is None:
        precision = model
    if precision not in PRECISIONS:
        raise EngineError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if model == "int8" and int8_target(contract) != "tensorrt":
        raise EngineError(
            f"{path} is an int8 model quantized for the CPU (uint8 activations with zero points); TensorRT "
            "runs symmetric int8 only: export it with embedseg-export onnx --precision int8 "
            "--int8-target tensorrt"
        )
    if (model == "int8") != (precision == "int8"):
        raise EngineError(
            f"{path} is an int8 model: its engine is int8 (use the fp32 ONNX for {precision})"
            if model == "int8"
            else f"{path} is an {model} model: int8 engines are built from an int8 ONNX model, calibrated "
            "on your images (embedseg-export onnx CHECKPOINT --precision int8 --int8-target tensorrt)"
        )
    if model == "fp16" and precision != "fp16":
        raise EngineError(f"{path} is an fp16 model: its engine is fp16 (use the fp32 ONNX for {precision})")
    if model != "fp16" and precision == "fp16":
        raise EngineError(
            f"{path} is an fp32 model: fp16 engines are built from the fp16 ONNX model "
            "(embedseg-export onnx --precision fp16, or embedseg-export trt --precision fp16, which converts "
            "it); TensorRT 11 has no fp16 builder flag"
        )
    return precision


# ----------------------------------------------------------------------------------------------------------
# The local machine


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise EngineError(
            "TensorRT is not installed (pip install 'embedseg-deploy[trt]' with NVIDIA's package index, "
            "or NVIDIA's wheel/tarball); TensorRT engines need it and a CUDA GPU"
        ) from exc
    return tensorrt


def cuda_runtime() -> Any:
    """cuda-python's runtime module: ``cuda.bindings.runtime``, or ``cuda.cudart`` before cuda-python 12.6."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise EngineError(
                "running a TensorRT engine needs cuda-python (pip install 'embedseg-deploy[trt]', "
                "or pip install cuda-python)"
            ) from exc
    return cudart


def cuda_check(result: Any, what: str) -> Any:
    """The value(s) of a cuda-python ``(err, *values)`` result; EngineError when ``err`` is not success."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EngineError(f"CUDA error in {what}: {err}")
    return values[0] if len(values) == 1 else values


def gpu_info(device_id: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability ``"M.m"``) through cuda-python, else ``nvidia-smi``."""
    try:
        cudart = cuda_runtime()
    except EngineError:
        cudart = None
    if cudart is not None:
        err, prop = cudart.cudaGetDeviceProperties(device_id)
        if int(err) == 0:
            name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
            return name.rstrip("\x00").strip(), f"{prop.major}.{prop.minor}"
    smi = shutil.which("nvidia-smi")
    if smi:
        query = [smi, f"--id={device_id}", "--query-gpu=name,compute_cap", "--format=csv,noheader"]
        try:
            out = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True).stdout
            name, cc = (v.strip() for v in out.strip().splitlines()[0].rsplit(",", 1))
            return name, cc
        except (subprocess.SubprocessError, OSError, ValueError, IndexError):
            pass
    raise EngineError(f"no CUDA GPU {device_id} found (cuda-python and nvidia-smi report none)")


def local_environment(device_id: int = 0) -> dict[str, str]:
    """TensorRT version, GPU name and compute capability of this machine."""
    trt = import_tensorrt()
    name, cc = gpu_info(device_id)
    return {"tensorrt_version": str(trt.__version__), "gpu_name": name, "compute_capability": cc}


def engine_problems(facts: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """Why an engine described by ``facts`` cannot run on the machine ``env`` (empty when it can).

    A plain engine needs the exact TensorRT version it was built with and the same compute capability.
    """
    problems = []
    built, here = str(facts.get("tensorrt_version", "")), str(env.get("tensorrt_version", ""))
    if built != here and not facts.get("version_compatible"):
        problems.append(f"built with TensorRT {built or '?'}, this machine has TensorRT {here or '?'}")
    built_cc, cc = str(facts.get("compute_capability", "")), str(env.get("compute_capability", ""))
    if built_cc != cc and facts.get("hardware_compatibility", "none") in ("none", None, ""):
        problems.append(
            f"built for {facts.get('gpu_name', '?')} (compute capability {built_cc or '?'}), "
            f"this GPU is {env.get('gpu_name', '?')} (compute capability {cc or '?'})"
        )
    return problems


# ----------------------------------------------------------------------------------------------------------
# Running an engine


class EngineRunner:
    """A deserialized engine (one input, one output) run on host arrays, one call in flight behind another.

    The one engine runner of the project: the runtime's ``tensorrt`` backend and the exporter's verification
    both use it. Each call picks the optimisation profile whose [min, max] holds the input shape (the
    active one when it does, so profiles only switch when needed) and reuses its buffers when the data fits
    (reallocating only to grow). Host data passes through page-locked (pinned) staging buffers, which the
    copies can use directly (pageable memory is staged by the driver, synchronously), and there are two
    of them per tensor: :meth:`submit` queues the copies and the execution on the runner's stream and
    returns at once, so the caller can prepare the next tile while the GPU works; :meth:`wait` (after the
    call's event) copies the output out of its staging buffer. ``runner(x)`` is both. Errors are
    :class:`EngineError`; the backend turns them into ``BackendError`` at its boundary.
    """

    SLOTS = 2

    def __init__(self, engine: bytes | str | os.PathLike, device_id: int = 0):
        where = "" if isinstance(engine, bytes | bytearray | memoryview) else f"{engine}: "
        data = engine if not where else Path(engine).read_bytes()
        trt = import_tensorrt()
        self._cudart = cudart = cuda_runtime()
        cuda_check(cudart.cudaSetDevice(device_id), "cudaSetDevice")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise EngineError(
                f"{where}TensorRT could not deserialize the engine (corrupt, or built with another "
                "TensorRT version or GPU)"
            )
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineError(f"{where}expected one input and one output tensor, got {inputs} / {outputs}")
        self.input, self.output = inputs[0], outputs[0]
        self.in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input)))
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output)))
        #: (min, max) input shape of every optimisation profile, in profile order
        self.profiles = [
            tuple(tuple(int(v) for v in s) for s in self.engine.get_tensor_profile_shape(self.input, k)[::2])
            for k in range(self.engine.num_optimization_profiles)
        ]
        self.context = self.engine.create_execution_context()
        self.stream = cuda_check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.profile = 0  # a new context starts on profile 0
        self._buffers: dict[str, tuple[int, int]] = {}  # tensor name -> (device pointer, bytes)
        self._pinned: dict[tuple[str, int], tuple[int, int]] = {}  # (tensor, slot) -> (host pointer, bytes)
        self._events = [cuda_check(cudart.cudaEventCreate(), "cudaEventCreate") for _ in range(self.SLOTS)]
        self._next = 0  # the slot the next submit uses

    def select_profile(self, shape: Sequence[int]) -> int:
        """Make a profile that holds ``shape`` active (the current one when it does) and return its index."""
        shape = tuple(shape)

        def holds(k: int) -> bool:
            lo, hi = self.profiles[k]
            return len(lo) == len(shape) and all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True))

        if not holds(self.profile):
            k = next((k for k in range(len(self.profiles)) if holds(k)), None)
            if k is None:
                ranges = "; ".join(f"{list(lo)}..{list(hi)}" for lo, hi in self.profiles)
                raise EngineError(
                    f"input shape {list(shape)} lies outside every profile of the engine ({ranges})"
                )
            if not self.context.set_optimization_profile_async(k, int(self.stream)):
                raise EngineError(f"TensorRT could not switch to optimisation profile {k}")
            self.profile = k
        return self.profile

    def _buffer(self, name: str, nbytes: int) -> int:
        """A device buffer of at least ``nbytes`` for ``name``, reused across calls, grown when too small.
        Calls run in stream order, so one device buffer per tensor serves both slots."""
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                cuda_check(self._cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
                cuda_check(self._cudart.cudaFree(ptr), "cudaFree")
                del self._buffers[name]
            ptr = int(cuda_check(self._cudart.cudaMalloc(nbytes), "cudaMalloc"))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def _host(self, name: str, slot: int, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        """A pinned host array of ``shape`` for ``name`` in ``slot`` (grown when too small)."""
        nbytes = int(np.prod(shape)) * dtype.itemsize
        ptr, size = self._pinned.get((name, slot), (0, 0))
        if size < nbytes:
            if ptr:
                cuda_check(self._cudart.cudaFreeHost(ptr), "cudaFreeHost")
                del self._pinned[(name, slot)]
            ptr = int(cuda_check(self._cudart.cudaMallocHost(max(nbytes, 1)), "cudaMallocHost"))
            self._pinned[(name, slot)] = (ptr, nbytes)
        raw = (ctypes.c_uint8 * nbytes).from_address(ptr)
        return np.frombuffer(raw, dtype=dtype).reshape(tuple(shape))

    def submit(self, x: np.ndarray) -> tuple[int, tuple[int, ...]]:
        """Queue ``x`` (full input shape): copy in, execute, copy out, on the runner's stream; returns the
        handle for :meth:`wait`. At most :attr:`SLOTS` calls may be waiting at once."""
        cudart, ctx = self._cudart, self.context
        slot = self._next
        self._next = (slot + 1) % self.SLOTS
        cuda_check(cudart.cudaEventSynchronize(self._events[slot]), "cudaEventSynchronize")  # slot free
        shape = tuple(int(v) for v in x.shape)
        self.select_profile(shape)
        if not ctx.set_input_shape(self.input, shape):
            raise EngineError(f"TensorRT rejected input shape {list(shape)}")
        out_shape = tuple(int(v) for v in ctx.get_tensor_shape(self.output))
        host_in = self._host(self.input, slot, shape, self.in_dtype)
        np.copyto(host_in, x, casting="unsafe")
        host_out = self._host(self.output, slot, out_shape, self.out_dtype)
        d_in = self._buffer(self.input, host_in.nbytes)
        d_out = self._buffer(self.output, host_out.nbytes)
        kind = cudart.cudaMemcpyKind
        h2d, d2h = kind.cudaMemcpyHostToDevice, kind.cudaMemcpyDeviceToHost
        cuda_check(
            cudart.cudaMemcpyAsync(d_in, host_in.ctypes.data, host_in.nbytes, h2d, self.stream), "H2D copy"
        )
        ctx.set_tensor_address(self.input, d_in)
        ctx.set_tensor_address(self.output, d_out)
        if not ctx.execute_async_v3(int(self.stream)):
            raise EngineError("TensorRT execute_async_v3 failed")
        cuda_check(
            cudart.cudaMemcpyAsync(host_out.ctypes.data, d_out, host_out.nbytes, d2h, self.stream), "D2H copy"
        )
        cuda_check(cudart.cudaEventRecord(self._events[slot], self.stream), "cudaEventRecord")
        return slot, out_shape

    def wait(self, handle: tuple[int, tuple[int, ...]]) -> np.ndarray:
        """The output of a :meth:`submit` call, as a new float32 array (its staging buffer is reused)."""
        slot, out_shape = handle
        cuda_check(self._cudart.cudaEventSynchronize(self._events[slot]), "cudaEventSynchronize")
        return self._host(self.output, slot, out_shape, self.out_dtype).astype(np.float32, copy=True)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The engine's output for the host array ``x`` (full input shape), as float32."""
        return self.wait(self.submit(x))

    def close(self) -> None:
        """Free the buffers, events and stream (idempotent)."""
        if self.stream is not None:
            self._cudart.cudaStreamSynchronize(self.stream)
        for ptr, _ in self._buffers.values():
            self._cudart.cudaFree(ptr)
        self._buffers.clear()
        for ptr, _ in self._pinned.values():
            self._cudart.cudaFreeHost(ptr)
        self._pinned.clear()
        for event in self._events:
            self._cudart.cudaEventDestroy(event)
        self._events = []
        if self.stream is not None:
            self._cudart.cudaStreamDestroy(self.stream)
            self.stream = None
        self.context = None


# ----------------------------------------------------------------------------------------------------------
# Building


def cache_key(
    onnx_sha256: str,
    tensorrt_version: str,
    compute_capability: str,
    precision: str,
    profiles: Sequence[Profile],
) -> str:
    """Hex digest naming an engine: same key, same engine (on any machine with that TensorRT and GPU)."""
    doc = {
        "onnx_sha256": onnx_sha256,
        "tensorrt_version": tensorrt_version,
        "compute_capability": compute_capability,
        "precision": precision,
        "profiles": [p.to_dict() for p in profiles],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def check_profiles(profiles: Sequence[Profile], contract: Contract) -> None:
    if not profiles:
        raise EngineError("at least one optimisation profile is needed")
    for p in profiles:
        for shape in (p.min, p.opt, p.max):
            if len(shape) != contract.ndim + 2 or shape[1] != contract.in_channels:
                raise EngineError(
                    f"profile shape {list(shape)} does not fit a {contract.ndim}D model with "
                    f"{contract.in_channels} input channel(s) (N x C x spatial)"
                )
            check_spatial(shape[2:], contract.tile_multiple, "profile shape")


def build_engine(
    onnx_path: str | os.PathLike,
    profiles: Sequence[Profile],
    precision: str,
    workspace_bytes: int | None = None,
    timing_cache: str | os.PathLike | None = None,
    verbose: bool = False,
) -> tuple[bytes, dict[str, Any]]:
    """Serialized engine for ``onnx_path`` and facts about the build (TensorRT 10 and 11).

    ``timing_cache``: a file read before and written after the build (created when missing).
    """
    onnx_path = Path(onnx_path)
    cache_path = Path(timing_cache) if timing_cache else None
    if cache_path and not cache_path.parent.is_dir():  # found out now, not after a build of minutes
        raise EngineError(f"{cache_path}: folder {cache_path.parent} does not exist (timing cache)")
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = 1 << int(strongly_typed) if strongly_typed is not None else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors or 'no details'}")
    if network.num_inputs != 1 or network.num_outputs != 1:
        raise EngineError(
            f"{onnx_path}: expected one input and one output, got {network.num_inputs}/{network.num_outputs}"
        )
    input_name, output_name = network.get_input(0).name, network.get_output(0).name

    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    tf32 = precision == "tf32"
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    for p in profiles:
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, p.min, p.opt, p.max)
        config.add_optimization_profile(profile)

    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        # a cache from another TensorRT version or GPU: start an empty one (it is rewritten after the build)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise EngineError(f"{onnx_path}: TensorRT failed to build the engine (see the TensorRT log above)")
    if cache_path:
        atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    facts = {
        "tensorrt_version": str(trt.__version__),
        "precision": precision,
        "tf32": tf32,
        "strongly_typed": True,
        "input": input_name,
        "output": output_name,
        "profiles": [p.to_dict() for p in profiles],
        "workspace_bytes": workspace_bytes,
        "build_seconds": round(seconds, 2),
        "version_compatible": False,
        "hardware_compatibility": "none",
    }
    return bytes(memoryview(serialized)), facts


def make_sidecar(
    contract: Contract, facts: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> dict:
    """The ``model.engine.json`` document: the contract (facts also in its provenance) and the facts."""
    doc_contract = Contract.from_dict(contract.to_dict())
    doc_contract.provenance = {**doc_contract.provenance, "engine": dict(facts)}
    return {"kind": SIDECAR_KIND, "contract": doc_contract.to_dict(), "engine": dict(facts), **(extra or {})}


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    return Path(str(engine_path) + ".json")


def read_sidecar(engine_path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of ``engine_path`` with its contract checked."""
    side = sidecar_path(engine_path)
    try:
        doc = json.loads(side.read_text())
    except FileNotFoundError:
        raise EngineError(
            f"{engine_path}: no sidecar {side.name} beside the engine (it holds the contract)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineError(f"{side}: unreadable sidecar: {exc}") from None
    if not isinstance(doc, dict) or "contract" not in doc or "engine" not in doc:
        raise EngineError(f"{side}: not an engine sidecar (needs 'contract' and 'engine')")
    try:
        Contract.from_dict(doc["contract"])
    except ContractError as exc:
        raise EngineError(f"{side}: bad contract: {exc}") from None
    return doc


def write_engine(
    path: str | os.PathLike, engine: bytes, sidecar: Mapping[str, Any], force: bool = False
) -> Path:
    """Write the engine and its sidecar atomically (engine last, so a present engine has its sidecar)."""
    path = Path(path)
    side = sidecar_path(path)
    if not force and (path.exists() or side.exists()):
        raise EngineError(f"{path if path.exists() else side} exists; pass --force to overwrite it")
    facts = {**sidecar["engine"], "engine_sha256": hashlib.sha256(engine).hexdigest()}
    doc = {**sidecar, "engine": facts}
    doc["contract"] = {**doc["contract"], "provenance": {**doc["contract"]["provenance"], "engine": facts}}
    write_atomic(side, (json.dumps(doc, indent=1) + "\n").encode(), force=True)
    write_atomic(path, engine, force=True)
    return path


# ----------------------------------------------------------------------------------------------------------
# The cache


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "embedseg-deploy" / "engines"


class EngineCache:
    """Engines keyed by (ONNX sha256, TensorRT version, compute capability, precision, profiles).

    ``get(onnx)`` returns the engine path for this machine, building it on first use. Files:
    ``<root>/<onnx stem>-<precision>-sm<cc>-trt<version>-<key>.engine`` + ``.engine.json``, and one timing
    cache per TensorRT version and compute capability.
    """

    def __init__(self, root: str | os.PathLike | None = None, device_id: int = 0):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.device_id = device_id

    def entry(
        self,
        onnx_path: str | os.PathLike,
        precision: str | None = None,
        profiles: Sequence[Profile] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> tuple[Path, dict[str, Any]]:
        """Where the engine for these settings lives (it may not exist yet) and the facts that key it."""
        onnx_path = Path(onnx_path)
        contract = onnx_contract(onnx_path)
        precision = resolve_precision(onnx_path, contract, precision)
        profiles = list(profiles) if profiles else [default_profile(contract)]
        check_profiles(profiles, contract)
        env = dict(env) if env is not None else local_environment(self.device_id)
        digest = sha256_file(onnx_path)
        key = cache_key(digest, env["tensorrt_version"], env["compute_capability"], precision, profiles)
        cc = env["compute_capability"].replace(".", "")
        name = f"{onnx_path.stem}-{precision}-sm{cc}-trt{env['tensorrt_version']}-{key}.engine"
        keyed = {**env, "precision": precision, "profiles": profiles, "onnx_sha256": digest, "cache_key": key}
        return self.root / name, {"contract": contract, **keyed}

    def lookup(
        self, onnx_path: str | os.PathLike, precision: str | None = None, profiles=None
    ) -> Path | None:
        """The cached engine for these settings on this machine, or None."""
        path, keyed = self.entry(onnx_path, precision, profiles)
        return path if _usable(path, keyed) else None

    def get(
        self,
        onnx_path: str | os.PathLike,
        precision: str | None = None,
        profiles: Sequence[Profile] | None = None,
        workspace_bytes: int | None = None,
    ) -> Path:
        """The engine for ``onnx_path`` on this machine: from the cache, or built now and stored."""
        path, keyed = self.entry(onnx_path, precision, profiles)
        if _usable(path, keyed):
            return path
        self.root.mkdir(parents=True, exist_ok=True)
        cc = keyed["compute_capability"].replace(".", "")
        timing = self.root / f"timing-trt{keyed['tensorrt_version']}-sm{cc}.cache"
        engine, facts = build_engine(
            onnx_path, keyed["profiles"], keyed["precision"], workspace_bytes, timing
        )
        facts.update(
            gpu_name=keyed["gpu_name"],
            compute_capability=keyed["compute_capability"],
            onnx_sha256=keyed["onnx_sha256"],
            onnx_file=Path(onnx_path).name,
            cache_key=keyed["cache_key"],
            built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        write_engine(path, engine, make_sidecar(keyed["contract"], facts), force=True)
        return path


def _usable(path: Path, keyed: Mapping[str, Any]) -> bool:
    """True when ``path`` holds a complete engine made for exactly ``keyed`` on this kind of machine."""
    if not path.is_file():
        return False
    try:
        facts = read_sidecar(path)["engine"]
    except EngineError:
        return False
    return facts.get("cache_key") == keyed["cache_key"] and not engine_problems(facts, keyed)
