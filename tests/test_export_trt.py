"""TensorRT path: profiles, cache keys, sidecars and the engine cache everywhere; real builds where TensorRT
and a GPU are present (skipped with the reason otherwise)."""

from __future__ import annotations

import ctypes
import hashlib
import json
import sys
import types

import numpy as np
import onnx
import pytest

from embedseg_deploy import engine_cache as ec
from embedseg_deploy.contract import Contract
from embedseg_deploy.engine_cache import EngineCache, EngineError, Profile
from embedseg_exporters import verify
from embedseg_exporters.fp16 import convert_to_fp16
from embedseg_exporters.onnx_export import set_contract

from ._export_models import exported
from .conftest import UPSTREAM

ENV = {"tensorrt_version": "10.13.3.9", "gpu_name": "NVIDIA H100", "compute_capability": "9.0"}


def _kind(ndim: int) -> str:
    return f"upstream-{ndim}d" if (UPSTREAM / f"{ndim}d" / "checkpoint.pth").exists() else f"ours-{ndim}d"


# ------------------------------------------------------------------------------------------------ no GPU


def test_profiles_from_tile_text():
    p = ec.parse_profile("128x128/256x256/512x512", 2, 1, batch="1/2/4")
    assert p == Profile((1, 1, 128, 128), (2, 1, 256, 256), (4, 1, 512, 512))
    assert ec.parse_profile("16x64x64", 3, 2) == Profile(*[(1, 2, 16, 64, 64)] * 3)
    assert p.contains((3, 1, 200, 512)) and not p.contains((3, 1, 520, 512))
    for tile, ndim, message in (
        ("100x100", 2, "multiple of 8"),
        ("256x256x8", 2, "2D model"),
        ("512x512/256x256/128x128", 2, "min <= opt <= max"),
        ("256x256/512x512", 2, "MIN/OPT/MAX"),
        ("axb", 2, "expected sizes"),
    ):
        with pytest.raises(EngineError, match=message):
            ec.parse_profile(tile, ndim, 1)
    with pytest.raises(EngineError, match="batch"):
        ec.parse_profile("64x64", 2, 1, batch="4/2/1")


def test_default_profile_from_contract():
    c = Contract(
        ndim=3, spacing=[0.02, 0.01, 0.01], tile={"gpu": {"size": [32, 128, 128], "halo": [4, 20, 20]}}
    )
    assert ec.default_profile(c) == Profile((1, 1, 8, 8, 8), (1, 1, 32, 128, 128), (1, 1, 40, 168, 168))


def test_cache_key_covers_every_component():
    p = [Profile((1, 1, 8, 8), (1, 1, 64, 64), (1, 1, 64, 64))]
    base = ec.cache_key("a" * 64, "10.13.3.9", "9.0", "fp16", p)
    assert base == ec.cache_key("a" * 64, "10.13.3.9", "9.0", "fp16", list(p))
    others = [
        ec.cache_key("b" * 64, "10.13.3.9", "9.0", "fp16", p),
        ec.cache_key("a" * 64, "11.0.0.1", "9.0", "fp16", p),
        ec.cache_key("a" * 64, "10.13.3.9", "8.6", "fp16", p),
        ec.cache_key("a" * 64, "10.13.3.9", "9.0", "fp32", p),
        ec.cache_key("a" * 64, "10.13.3.9", "9.0", "fp16", [Profile(*[(1, 1, 64, 64)] * 3)]),
    ]
    assert len({base, *others}) == 6


def test_engine_problems_name_version_and_gpu():
    assert ec.engine_problems(ENV, ENV) == []
    other = {**ENV, "tensorrt_version": "10.12.0.36", "compute_capability": "8.6", "gpu_name": "RTX 3090"}
    problems = ec.engine_problems(other, ENV)
    assert len(problems) == 2 and "TensorRT 10.12.0.36" in problems[0] and "RTX 3090" in problems[1]
    assert len(ec.engine_problems({**other, "version_compatible": True}, ENV)) == 1


def test_onnx_header_without_onnx_and_corrupted_files(tmp_path):
    path, result = exported("ours-2d")
    header = ec.read_onnx_header(path)
    model = onnx.load(str(path))
    assert header["ir_version"] == model.ir_version and header["opset"] == {"ai.onnx": 17}
    assert header["metadata"] == {p.key: p.value for p in model.metadata_props}
    assert ec.onnx_contract(path) == result.contract
    data = path.read_bytes()
    for name, content in (("cut.onnx", data[: len(data) // 3]), ("noise.onnx", bytes(range(256)) * 40)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(EngineError, match="not a valid ONNX model"):
            ec.read_onnx_header(tmp_path / name)
    bare = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    (tmp_path / "bare.onnx").write_bytes(bare.SerializeToString())
    with pytest.raises(EngineError, match="no EmbedSeg contract"):
        ec.onnx_contract(tmp_path / "bare.onnx")


def _fp16_copy(path, tmp_path):
    model = onnx.load(str(path))
    contract = ec.onnx_contract(path)
    contract.provenance["export"]["precision"] = "fp16"
    converted = convert_to_fp16(model)
    set_contract(converted, contract)
    out = tmp_path / "model_fp16.onnx"
    out.write_bytes(converted.SerializeToString())
    return out


def test_precision_comes_from_the_onnx_model(tmp_path):
    path, result = exported("ours-2d")
    c = result.contract
    assert ec.resolve_precision(path, c, None) == "fp32"
    assert ec.resolve_precision(path, c, "tf32") == "tf32"
    with pytest.raises(EngineError, match="fp16 engines are built from the fp16 ONNX"):
        ec.resolve_precision(path, c, "fp16")
    fp16 = _fp16_copy(path, tmp_path)
    c16 = ec.onnx_contract(fp16)
    assert ec.resolve_precision(fp16, c16, None) == "fp16"
    with pytest.raises(EngineError, match="is an fp16 model"):
        ec.resolve_precision(fp16, c16, "fp32")


def test_engine_cache_builds_once_then_reuses(tmp_path, monkeypatch):
    path, result = exported("ours-2d")
    builds = []

    def fake_build(onnx_path, profiles, precision, workspace_bytes=None, timing_cache=None, verbose=False):
        builds.append((str(onnx_path), precision, [p.to_dict() for p in profiles], str(timing_cache)))
        facts = {"tensorrt_version": ENV["tensorrt_version"], "precision": precision, "input": "image"}
        return b"serialized engine", {**facts, "output": "raw", "profiles": [p.to_dict() for p in profiles]}

    env = dict(ENV)
    monkeypatch.setattr(ec, "local_environment", lambda device_id=0: dict(env))
    monkeypatch.setattr(ec, "build_engine", fake_build)
    cache = EngineCache(tmp_path / "cache")
    static = [ec.parse_profile("64x64", 2, 1)]
    assert cache.lookup(path, profiles=static) is None
    first = cache.get(path, profiles=static)
    assert first.read_bytes() == b"serialized engine" and len(builds) == 1
    assert first.name.startswith("ours-2d-fp32-sm90-trt10.13.3.9-") and first.suffix == ".engine"
    assert cache.get(path, profiles=static) == first and cache.lookup(path, profiles=static) == first
    assert len(builds) == 1  # reused, not rebuilt
    side = ec.read_sidecar(first)
    facts = side["engine"]
    assert facts["onnx_sha256"] == ec.sha256_file(path) and facts["compute_capability"] == "9.0"
    assert side["contract"]["provenance"]["engine"]["cache_key"] == facts["cache_key"]
    assert Contract.from_dict(side["contract"]).spacing == result.contract.spacing
    # a new profile, or a new TensorRT on this machine: another engine
    cache.get(path)  # the contract's default profile
    env["tensorrt_version"] = "10.14.1.48"
    assert cache.lookup(path, profiles=static) is None
    cache.get(path, profiles=static)
    assert len(builds) == 3 and len(list((tmp_path / "cache").glob("*.engine"))) == 3
    assert builds[0][3].endswith("timing-trt10.13.3.9-sm90.cache")


def test_engine_and_sidecar_written_together_never_overwritten(tmp_path):
    _, result = exported("ours-2d")
    facts = {**ENV, "precision": "fp32", "profiles": [ec.default_profile(result.contract).to_dict()]}
    engine = tmp_path / "model.engine"
    ec.write_engine(engine, b"bytes", ec.make_sidecar(result.contract, facts))
    with pytest.raises(EngineError, match="--force"):
        ec.write_engine(engine, b"other", ec.make_sidecar(result.contract, facts))
    assert engine.read_bytes() == b"bytes"
    doc = json.loads((tmp_path / "model.engine.json").read_text())
    assert doc["engine"]["engine_sha256"] == hashlib.sha256(b"bytes").hexdigest()
    assert doc["kind"] == ec.SIDECAR_KIND and ec.read_sidecar(engine) == doc
    assert Contract.from_dict(doc["contract"]).provenance["engine"] == doc["engine"]
    assert doc["engine"]["compute_capability"] == "9.0" and not list(tmp_path.glob(".*.tmp"))


def test_bad_tile_fails_before_tensorrt_is_needed(tmp_path):
    from embedseg_exporters.tensorrt_build import build_trt

    path, _ = exported("ours-2d")
    with pytest.raises(EngineError, match="multiple of 8"):
        build_trt(path, tmp_path / "m.engine", tiles=["100x100"])
    assert not list(tmp_path.iterdir())


def test_missing_output_or_timing_cache_folder_fails_before_the_build(tmp_path, monkeypatch):
    from embedseg_exporters.tensorrt_build import build_trt

    path, _ = exported("ours-2d")
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT())  # a build would succeed
    with pytest.raises(EngineError, match=r"no/m\.engine: folder .* does not exist"):
        build_trt(path, tmp_path / "no" / "m.engine", tiles=["64x64"])
    with pytest.raises(EngineError, match=r"t\.cache: folder .* does not exist"):
        ec.build_engine(
            path, [ec.parse_profile("64x64", 2, 1)], "fp32", timing_cache=tmp_path / "no" / "t.cache"
        )
    assert not list(tmp_path.iterdir())


def test_without_tensorrt_the_build_says_so(tmp_path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed: the missing-TensorRT message cannot be checked")
    from embedseg_exporters.tensorrt_build import build_trt

    path, _ = exported("ours-2d")
    with pytest.raises(EngineError, match="TensorRT is not installed"):
        build_trt(path, tmp_path / "m.engine", tiles=["64x64"])
    assert not list(tmp_path.iterdir())


class FakeTensorRT:
    """The slice of the TensorRT 11 Python API that build_engine uses (no FP16 flag, as in 11.x)."""

    __version__ = "11.0.0.1"

    class Logger:
        WARNING, VERBOSE = "warning", "verbose"

        def __init__(self, level):
            self.level = level

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 0  # deprecated and ignored in 11.x, required on 10.x

    class BuilderFlag:
        TF32 = "tf32"

    class MemoryPoolType:
        WORKSPACE = "workspace"

    def __init__(self, parse_ok=True, build_ok=True):
        self.calls: list = []
        self.parse_ok, self.build_ok = parse_ok, build_ok
        fake = self

        class Tensor:
            def __init__(self, name):
                self.name = name

        class Network:
            num_inputs = num_outputs = 1

            def get_input(self, i):
                return Tensor("image")

            def get_output(self, i):
                return Tensor("raw")

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                fake.calls.append(("profile", name, tuple(lo), tuple(opt), tuple(hi)))

        class Cache:
            def serialize(self):
                return b"timings"

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("workspace", pool, size))

            def clear_flag(self, flag):
                fake.calls.append(("clear", flag))

            def add_optimization_profile(self, profile):
                fake.calls.append(("add_profile",))

            def create_timing_cache(self, data):
                fake.calls.append(("timing_in", bytes(data)))
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                return True

            def get_timing_cache(self):
                return Cache()

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls.append(("network_flags", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"plan" if fake.build_ok else None

        class Parser:
            num_errors = 1

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                fake.calls.append(("parse", path))
                return fake.parse_ok

            def get_error(self, i):
                return "Unsupported ONNX op Foo"

        self.Builder, self.OnnxParser = Builder, Parser


def test_build_engine_call_sequence_with_a_fake_tensorrt(tmp_path, monkeypatch):
    """No TensorRT here: check the builder code path against the documented API shape (TRT 11 flags)."""
    path, _ = exported("ours-2d")
    profiles = [ec.parse_profile("64x64/128x128/256x256", 2, 1, batch="1/1/2")]
    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    timing = tmp_path / "timing.cache"
    timing.write_bytes(b"old")
    plan, facts = ec.build_engine(path, profiles, "fp32", workspace_bytes=2**30, timing_cache=timing)
    assert plan == b"plan" and timing.read_bytes() == b"timings"
    assert ("network_flags", 1) in fake.calls and ("clear", "tf32") in fake.calls
    assert ("profile", "image", (1, 1, 64, 64), (1, 1, 128, 128), (2, 1, 256, 256)) in fake.calls
    assert ("timing_in", b"old") in fake.calls and ("workspace", "workspace", 2**30) in fake.calls
    assert facts["tensorrt_version"] == "11.0.0.1" and facts["input"] == "image" and not facts["tf32"]
    fake.calls.clear()
    ec.build_engine(path, profiles, "tf32")
    assert not [c for c in fake.calls if c[0] == "clear"]
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(parse_ok=False))
    with pytest.raises(EngineError, match="parser failed: Unsupported ONNX op Foo"):
        ec.build_engine(path, profiles, "fp32")
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(build_ok=False))
    with pytest.raises(EngineError, match="failed to build"):
        ec.build_engine(path, profiles, "fp32")


class FakeCudart:
    """cuda-python's runtime as the runner uses it; host bytearrays stand in for device memory."""

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = "h2d", "d2h"

    def __init__(self):
        self.mem: dict[int, bytearray] = {}
        self.host: dict[int, ctypes.Array] = {}  # pinned host buffers: real memory at real addresses
        self.calls: list[str] = []
        self.events: list[str] = []  # "record k" / "sync k" in call order
        self.cudaSetDevice = self.cudaStreamSynchronize = self.cudaStreamDestroy = lambda *a: (0,)
        self.cudaStreamCreate = lambda: (0, 7)
        self._n_events = 0

    def cudaMallocHost(self, n):
        self.calls.append("malloc_host")
        buf = (ctypes.c_uint8 * n)()
        self.host[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def cudaFreeHost(self, ptr):
        self.calls.append("free_host")
        del self.host[ptr]
        return (0,)

    def cudaEventCreate(self):
        self._n_events += 1
        return 0, self._n_events - 1

    def cudaEventRecord(self, event, stream):
        self.events.append(f"record {event}")
        return (0,)

    def cudaEventSynchronize(self, event):
        self.events.append(f"sync {event}")
        return (0,)

    def cudaEventDestroy(self, event):
        return (0,)

    def cudaMalloc(self, n):
        self.calls.append("malloc")
        self.mem[ptr := 4096 * len(self.calls)] = bytearray(n)
        return 0, ptr

    def cudaFree(self, ptr):
        self.calls.append("free")
        del self.mem[ptr]
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        if kind == "h2d":
            self.mem[dst][:n] = ctypes.string_at(src, n)
        else:
            ctypes.memmove(dst, bytes(self.mem[src][:n]), n)
        return (0,)


class FakeTensorRTRuntime:
    """The TensorRT 10/11 runtime API the runner uses; the engine's channel c is x * (c+1) + 10 * profile."""

    __version__ = "11.0.0.1"
    Logger = FakeTensorRT.Logger
    TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    nptype = staticmethod(np.dtype)
    PROFILES = (
        ((1, 1, 8, 8), (1, 1, 16, 16), (1, 1, 32, 32)),
        ((1, 1, 40, 40), (1, 1, 64, 64), (2, 1, 64, 64)),
    )

    def __init__(self, cudart: FakeCudart):
        self.switches: list[int] = []
        fake, mem = self, cudart.mem

        class Context:
            profile, addr = 0, {}

            def set_optimization_profile_async(self, k, stream):
                fake.switches.append(k)
                self.profile = k
                return True

            def set_input_shape(self, name, shape):  # TensorRT checks the shape against the active profile
                lo, _, hi = fake.PROFILES[self.profile]
                self.shape = tuple(shape)
                return all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True))

            def get_tensor_shape(self, name):
                return (self.shape[0], 5, *self.shape[2:])

            def set_tensor_address(self, name, ptr):
                self.addr = {**self.addr, name: ptr}

            def execute_async_v3(self, stream):
                x = np.frombuffer(mem[self.addr["image"]], np.float32, int(np.prod(self.shape))).reshape(
                    self.shape
                )
                y = x * np.arange(1, 6, dtype=np.float32)[None, :, None, None] + 10 * self.profile
                mem[self.addr["raw"]][: y.nbytes] = y.tobytes()
                return True

        class Engine:
            num_io_tensors, num_optimization_profiles = 2, len(self.PROFILES)
            get_tensor_name = staticmethod(("image", "raw").__getitem__)
            get_tensor_mode = staticmethod(lambda name: "in" if name == "image" else "out")
            get_tensor_dtype = staticmethod(lambda name: "float32")
            get_tensor_profile_shape = staticmethod(lambda name, k: fake.PROFILES[k])
            create_execution_context = staticmethod(Context)

        class Runtime:
            def __init__(self, logger):
                self.deserialize_cuda_engine = lambda data: Engine() if bytes(data) == b"plan" else None

        self.Runtime = Runtime


@pytest.mark.parametrize("layout", ["cuda.bindings.runtime", "cuda.cudart"])
def test_engine_runner_picks_profiles_and_reuses_buffers(layout, tmp_path, monkeypatch):
    """No GPU here: the one engine runner against fakes of TensorRT's runtime API and of cuda-python."""
    cudart, fake_module = FakeCudart(), types.ModuleType("fake")
    fake_module.runtime = fake_module.cudart = cudart
    monkeypatch.setitem(sys.modules, "cuda", fake_module)  # `from cuda import cudart` (cuda-python < 12.6)
    monkeypatch.setitem(
        sys.modules, "cuda.bindings", fake_module if layout == "cuda.bindings.runtime" else None
    )
    trt = FakeTensorRTRuntime(cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(EngineError, match="could not deserialize"):
        ec.EngineRunner(b"junk")
    (tmp_path / "m.engine").write_bytes(b"plan")
    runner = ec.EngineRunner(tmp_path / "m.engine")
    rng = np.random.default_rng(0)
    for shape, profile in (((1, 1, 32, 32), 0), ((2, 1, 48, 64), 1), ((1, 1, 16, 8), 0), ((1, 1, 64, 64), 1)):
        x = rng.random(shape, dtype=np.float32)
        expected = x * np.arange(1, 6, dtype=np.float32)[None, :, None, None] + 10 * profile
        np.testing.assert_array_equal(runner(x), expected)
    assert trt.switches == [1, 0, 1]  # switched only when the active profile did not hold the shape
    # pinned staging buffers per slot (2), device buffers per tensor: grown once, then reused
    host, device = ["malloc_host"] * 2, ["malloc"] * 2
    assert cudart.calls == [*host, *device, *host, "free", "malloc", "free", "malloc"]
    # two calls in flight: the second is queued before the first is waited for; outputs stay apart
    x1, x2, x3 = (rng.random((1, 1, 32, 32), dtype=np.float32) for _ in range(3))
    cudart.events.clear()
    h1, h2 = runner.submit(x1), runner.submit(x2)
    y2, y1 = runner.wait(h2), runner.wait(h1)
    scale = np.arange(1, 6, dtype=np.float32)[None, :, None, None]
    np.testing.assert_array_equal(y1, x1 * scale)
    np.testing.assert_array_equal(y2, x2 * scale)
    y3 = runner(x3)  # reuses slot 0 after its event: its earlier output was already copied out
    np.testing.assert_array_equal(y3, x3 * scale)
    np.testing.assert_array_equal(y1, x1 * scale)
    assert cudart.events[:4] == ["sync 0", "record 0", "sync 1", "record 1"]
    with pytest.raises(EngineError, match=r"input shape \[1, 1, 36, 36\] lies outside every profile"):
        runner(np.zeros((1, 1, 36, 36), np.float32))
    runner.close()
    assert cudart.mem == {} and cudart.host == {}


# ------------------------------------------------------------------------------------------------ GPU


@pytest.fixture(scope="module")
def trt_env():
    try:
        return ec.local_environment()
    except EngineError as exc:
        pytest.skip(f"needs TensorRT and a CUDA GPU: {exc}")


@pytest.mark.trt
@pytest.mark.gpu
def test_fp32_engine_2d_verified_against_onnxruntime(trt_env, tmp_path):
    from embedseg_exporters.tensorrt_build import build_trt

    kind = _kind(2)
    path, result = exported(kind)
    fixture = UPSTREAM / "2d" / "network_input.npy" if kind.startswith("upstream") else None
    tile = "240x256" if fixture else "128x128"
    out, sidecar = build_trt(path, tmp_path / "m.engine", tiles=[f"64x64/{tile}/{tile}"], fixture=fixture)
    assert sidecar["verification"]["passed"] and out.is_file()
    facts = ec.read_sidecar(out)["engine"]
    assert facts["tensorrt_version"] == trt_env["tensorrt_version"] and facts["precision"] == "fp32"
    assert facts["compute_capability"] == trt_env["compute_capability"] and facts["tf32"] is False
    names = {c["name"] for c in sidecar["verification"]["cases"]}
    assert {"synthetic", "profile0-min"} <= names
    runner = ec.EngineRunner(out.read_bytes())
    x = verify.fixture_tile(result.contract, fixture)[1]
    errors = verify.output_errors(runner(x), verify.ort_runner(path)(x), result.contract.spacing)
    assert errors["offset_px"] <= verify.TOLERANCES["engine-fp32"].offset_px


@pytest.mark.trt
@pytest.mark.gpu
def test_3d_engine_with_dynamic_profile_and_fp16(trt_env, tmp_path):
    from embedseg_exporters.tensorrt_build import build_trt

    path, _ = exported(_kind(3))
    tiles = ["16x32x32/32x64x64/32x96x96"]
    _, fp32 = build_trt(path, tmp_path / "m32.engine", tiles=tiles)
    assert fp32["verification"]["passed"] and len(fp32["verification"]["cases"]) == 3
    _, fp16 = build_trt(path, tmp_path / "m16.engine", tiles=tiles, precision="fp16")
    assert fp16["engine"]["precision"] == "fp16" and fp16["verification"]["passed"]
    assert (tmp_path / "m16.fp16.onnx").is_file()
    assert fp16["engine"]["onnx_sha256"] == ec.sha256_file(tmp_path / "m16.fp16.onnx")


@pytest.mark.trt
@pytest.mark.gpu
def test_engine_cache_real_build_is_reused(trt_env, tmp_path):
    from embedseg_exporters.info import describe

    path, _ = exported("ours-2d")
    cache = EngineCache(tmp_path)
    profile = [ec.parse_profile("64x64", 2, 1)]
    first = cache.get(path, profiles=profile)
    stamp = first.stat().st_mtime_ns
    assert cache.get(path, profiles=profile) == first and first.stat().st_mtime_ns == stamp
    assert describe(first)["problems"] == []
    out = ec.EngineRunner(first)(np.zeros((1, 1, 64, 64), np.float32))
    assert out.shape == (1, 5, 64, 64) and np.isfinite(out).all()


@pytest.mark.trt
@pytest.mark.gpu
def test_int8_engine_from_a_symmetric_qdq_model(trt_env, tmp_path):
    from embedseg_deploy.synthetic import write_dataset
    from embedseg_exporters.onnx_export import export_checkpoint
    from embedseg_exporters.tensorrt_build import build_trt

    data = write_dataset(tmp_path / "data", n_train=3, n_val=1, n_test=0, seed=9)
    model = tmp_path / "int8.onnx"
    ckpt = UPSTREAM / "2d" / "checkpoint.pth"
    export_checkpoint(ckpt, model, precision="int8", calibrate=data, int8_target="tensorrt")
    out, sidecar = build_trt(model, tmp_path / "m.engine", tiles=["64x64/256x256/256x256"])
    assert out.is_file() and sidecar["engine"]["precision"] == "int8" and sidecar["verification"]["passed"]
    labels = [c for c in sidecar["verification"]["cases"] if c.get("labels")]
    assert labels and all(c["labels"]["ap50"] >= 0.9 for c in labels)
