"""ONNX Runtime backends: CPU, CUDA and the TensorRT execution provider.

The contract is read from the model's ``metadata_props`` through onnxruntime itself
(``get_modelmeta().custom_metadata_map``): the runtime tier has no ``onnx`` package.

GPU providers never fall back silently. ``get_available_providers()`` lists CUDA/TensorRT whenever
onnxruntime-gpu is installed, even without a GPU or without cuDNN, and a session asked for them then runs
on the CPU. So GPU sessions are created with ``session.disable_cpu_ep_fallback=1`` and the providers the
session really got (``session.get_providers()``) are checked; a mismatch is a :class:`BackendError`.

Intra-op threads sleep instead of spin-waiting (:data:`DEFAULT_SESSION_CONFIG`; ``session_config``
overrides it): on 2 cores (1024 x 1024 2D, fp32, 2 threads) spinning gained 2 % when idle but lost 12-14 %
(up to 2x, H8) when another process used the cores, and it would also take CPU from the clustering that
follows each call. A microscope PC shares its cores with the acquisition software.

The CPU memory arena is shrunk after every run (``shrink_arena``; ORT's run option
``memory.enable_memory_arena_shrinkage``): the arena otherwise keeps the largest run's activations and grows
in powers of two. A 2048^2 2D ERFNet: peak RSS 528 MiB instead of 792, 263 MiB kept after the run instead
of 792, same speed. Switching the arena off instead made the first run of a session 2x slower (14.7 s vs
7.7 s), which whole-image prediction pays on every image (benchmarks/results/memory_stages.md).
The arena also grows by exactly what is asked (``kSameAsRequested``, one process-wide CPU arena shared by
the sessions) instead of in powers of two, so its peak is linear in the input: a 1952^2 input peaked at
138 B/px with power-of-two growth and 104 B/px with linear growth (1768^2: 114 and 103), same speed. The
block planner's memory model is linear, so this is what keeps block-mode peaks flat.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..contract import METADATA_KEY, Contract, ContractError
from .base import Backend, BackendError, ShapeSpec

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"
PROVIDER_OF = {"onnx-cpu": CPU_EP, "onnx-cuda": CUDA_EP, "onnx-trt": TRT_EP}
DEFAULT_SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise BackendError(
            "onnxruntime is not installed: pip install 'embedseg-deploy[cpu]' (or [gpu] for onnxruntime-gpu)"
        ) from exc
    return onnxruntime


def available_providers() -> list[str]:
    """Providers this onnxruntime build lists (a GPU provider listed here may still not work)."""
    try:
        return list(_ort().get_available_providers())
    except BackendError:
        return []


def read_contract(session: Any, path: Path) -> Contract:
    """The contract stored in the model's metadata, or the JSON file beside it (``model.onnx.json``)."""
    meta = session.get_modelmeta().custom_metadata_map
    text = meta.get(METADATA_KEY)
    source = f"metadata key {METADATA_KEY!r}"
    if text is None:
        sidecar = Path(str(path) + ".json")
        if not sidecar.is_file():
            raise ContractError(
                f"{path}: the ONNX model carries no EmbedSeg contract (metadata key {METADATA_KEY!r} "
                f"missing, no {sidecar.name} beside it); export it with embedseg-export"
            )
        text, source = sidecar.read_text(), str(sidecar)
    try:
        return Contract.from_json(text)
    except ContractError as exc:
        raise ContractError(f"{path}: bad contract in {source}: {exc}") from None


def _shape_spec(session: Any, contract: Contract) -> ShapeSpec:
    """Static dims of the model input become min = max; symbolic ones are free."""
    dims = session.get_inputs()[0].shape
    spatial = dims[2:] if len(dims) == contract.ndim + 2 else [None] * contract.ndim
    static = [d if isinstance(d, int) and d > 0 else None for d in spatial]
    fixed = tuple(static) if all(s is not None for s in static) else None
    batch = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None
    return ShapeSpec(contract.ndim, contract.tile_multiple, fixed, fixed, batch)


class OnnxRuntimeBackend(Backend):
    """One onnxruntime session on the CPU, CUDA or TensorRT execution provider."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        backend: str = "onnx-cpu",
        device_id: int = 0,
        threads: int | None = None,
        engine_cache: str | os.PathLike | None = None,
        trt_profile: dict[str, tuple[int, ...]] | None = None,
        cuda_options: dict[str, Any] | None = None,
        session_config: dict[str, str] | None = None,
        shrink_arena: bool = True,
        tf32: bool = False,
    ):
        if backend not in PROVIDER_OF:
            raise BackendError(f"unknown onnxruntime backend {backend!r}; choose from {sorted(PROVIDER_OF)}")
        ort = _ort()
        path = Path(model_path)
        if not path.is_file():
            raise BackendError(f"{path}: model file not found")
        provider = PROVIDER_OF[backend]
        if provider not in ort.get_available_providers():
            hint = "install onnxruntime-gpu (pip install 'embedseg-deploy[gpu]') instead of onnxruntime"
            raise BackendError(
                f"{backend}: this onnxruntime build has no {provider} "
                f"(it lists {ort.get_available_providers()}); {hint}"
            )
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        for key, value in {**DEFAULT_SESSION_CONFIG, **(session_config or {})}.items():
            opts.add_session_config_entry(str(key), str(value))
        providers: list[Any]
        trt_shapes: dict[str, tuple[int, ...]] | None = None
        if provider == CPU_EP:
            providers = [CPU_EP]
            if shrink_arena and _linear_cpu_arena(ort):
                opts.add_session_config_entry("session.use_env_allocators", "1")
        else:
            opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
            if provider == TRT_EP:
                trt_shapes = dict(trt_profile) if trt_profile else _default_trt_profile(path)
            providers = gpu_providers(
                provider, device_id, engine_cache, trt_shapes, _input_name(path), tf32, cuda_options
            )
        try:
            session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise BackendError(
                f"{path}: cannot create an onnxruntime {backend} session: {_first_line(exc)}"
            ) from None
        got = session.get_providers()
        if not got or got[0] != provider:
            raise BackendError(
                f"{backend}: asked for {provider} but the session runs on {got}; refusing to run silently "
                "elsewhere (check the GPU, CUDA/cuDNN libraries, onnxruntime-gpu)"
            )
        contract = read_contract(session, path)
        _check_output(session, contract, path)
        io_type = session.get_inputs()[0].type
        export = contract.provenance.get("export") or {}
        precision = str(export.get("precision") or ("fp16" if "float16" in io_type else "fp32"))
        if precision == "fp32" and (provider == TRT_EP or (provider == CUDA_EP and tf32)):
            precision = "tf32"  # what may run: the TensorRT EP has no switch to keep fp32 layers from TF32
        shapes = _shape_spec(session, contract)
        if trt_shapes:  # the tiler stays inside the profile: a shape outside it would rebuild the engine
            lo, hi = trt_shapes["min"], trt_shapes["max"]
            shapes = ShapeSpec(contract.ndim, contract.tile_multiple, tuple(lo[2:]), tuple(hi[2:]), hi[0])
        super().__init__(
            name=backend,
            device="cpu" if provider == CPU_EP else f"cuda:{device_id}",
            precision=precision,
            contract=contract,
            shapes=shapes,
            model_path=path,
            info={
                "onnxruntime": ort.__version__,
                "providers": got,
                "threads": threads,
                "engine_cache": str(engine_cache) if engine_cache else None,
                **({"trt_profile": {k: list(v) for k, v in trt_shapes.items()}} if trt_shapes else {}),
            },
        )
        self.session = session
        self._input = session.get_inputs()[0].name
        self._output = session.get_outputs()[0].name
        self._fp16_io = "float16" in io_type
        self._run_options = ort.RunOptions()
        if shrink_arena and provider == CPU_EP:
            self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def _run(self, batch: np.ndarray) -> np.ndarray:
        feed = batch.astype(np.float16) if self._fp16_io else batch
        try:
            (out,) = self.session.run([self._output], {self._input: feed}, self._run_options)
        except Exception as exc:
            raise BackendError(
                f"{self.name}: inference failed on {batch.shape}: {_first_line(exc)}"
            ) from None
        return out

    def close(self) -> None:
        self.session = None


def gpu_providers(
    provider: str,
    device_id: int = 0,
    engine_cache: str | os.PathLike | None = None,
    trt_profile: dict[str, tuple[int, ...]] | None = None,
    input_name: str = "image",
    tf32: bool = False,
    cuda_options: dict[str, Any] | None = None,
) -> list[Any]:
    """The ``providers`` list of a CUDA or TensorRT EP session.

    The CUDA EP keeps fp32 layers in fp32 (``use_tf32=0``) unless ``tf32``: native TensorRT engines clear
    TF32 for fp32 too, so "fp32" means the same on every backend. The TensorRT EP gets explicit shape
    profiles (``trt_profile``: full input shapes under ``min``/``opt``/``max``); without them it builds an
    engine for the first shape it sees and rebuilds, for minutes, whenever a tile falls outside it.
    """
    cuda = {
        "device_id": str(device_id),
        "cudnn_conv_algo_search": "HEURISTIC",
        "use_tf32": "1" if tf32 else "0",
        **(cuda_options or {}),
    }
    providers: list[Any] = [(CUDA_EP, cuda)]
    if provider == TRT_EP:
        trt: dict[str, Any] = {"device_id": str(device_id)}
        if engine_cache is not None:
            Path(engine_cache).mkdir(parents=True, exist_ok=True)
            trt.update(
                trt_engine_cache_enable="True",
                trt_engine_cache_path=str(engine_cache),
                trt_timing_cache_enable="True",
                trt_timing_cache_path=str(engine_cache),
            )
        if trt_profile:
            shapes = _profile_strings(trt_profile, input_name)
            trt.update({f"trt_profile_{k}_shapes": v for k, v in shapes.items()})
        providers.insert(0, (TRT_EP, trt))
    return providers


def _default_trt_profile(path: Path) -> dict[str, tuple[int, ...]] | None:
    """The contract's GPU profile (min one multiple per axis, opt the tile, max tile + 2 halo; batch 1),
    the one native TensorRT engines are built with; None when the file holds no readable contract."""
    try:
        from ..engine_cache import default_profile, onnx_contract

        profile = default_profile(onnx_contract(path))
    except Exception:
        return None
    return {"min": profile.min, "opt": profile.opt, "max": profile.max}


def _check_output(session: Any, contract: Any, path: Path) -> None:
    """The graph's output must be what the contract describes (N, 2*ndim+1, *spatial): found at load, not
    on every file. A symbolic channel count is checked on the smallest input the model takes."""
    outputs = session.get_outputs()
    shape = list(outputs[0].shape) if outputs else []
    expected = (
        f"(N, {contract.out_channels}, {', '.join('*' * contract.ndim)}) ({', '.join(contract.channels)})"
    )
    if len(shape) != contract.ndim + 2:
        raise BackendError(f"{path}: the network's output has shape {shape}, its contract says {expected}")
    channels = shape[1]
    if not isinstance(channels, int):
        probe = np.zeros((1, contract.in_channels, *[contract.tile_multiple * 2] * contract.ndim), np.float32)
        if "float16" in session.get_inputs()[0].type:
            probe = probe.astype(np.float16)
        try:
            channels = session.run(None, {session.get_inputs()[0].name: probe})[0].shape[1]
        except Exception:
            return  # the model cannot run a tiny input; run() checks every output shape anyway
    if channels != contract.out_channels:
        raise BackendError(
            f"{path}: the network outputs {channels} channels, but its contract says {expected}; "
            "the model file and its contract do not belong together (re-export the model)"
        )


def _input_name(path: Path) -> str:
    """The graph's input name, read without onnxruntime (the TensorRT EP's profile strings name it)."""
    try:
        from ..engine_cache import read_onnx_header

        return (read_onnx_header(path)["inputs"] or ["image"])[0]
    except Exception:
        return "image"


def _profile_strings(profile: dict[str, tuple[int, ...]], input_name: str) -> dict[str, str]:
    """``{'min': (1,1,64,64), ...}`` -> TRT EP option strings ``'image:1x1x64x64'``."""
    return {k: f"{input_name}:" + "x".join(str(int(d)) for d in v) for k, v in profile.items()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:500] if text else type(exc).__name__


_ARENA_SAME_AS_REQUESTED = 1
_linear_arena: bool | None = None


def _linear_cpu_arena(ort: Any) -> bool:
    """Register, once per process, a shared CPU arena that grows by what is requested; False where this
    onnxruntime cannot (its sessions then keep their own power-of-two arenas)."""
    global _linear_arena
    if _linear_arena is None:
        try:
            arena, default = ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, ort.OrtMemType.DEFAULT
            info = ort.OrtMemoryInfo("Cpu", arena, 0, default)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, _ARENA_SAME_AS_REQUESTED, -1, -1))
            _linear_arena = True
        except Exception:  # an old onnxruntime without the API, or an allocator registered elsewhere
            _linear_arena = False
    return _linear_arena
