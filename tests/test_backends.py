"""Backends: one interface, the contract read through onnxruntime, no silent fallback, clear failures."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from embedseg_deploy.backends import (
    BackendError,
    ShapeSpec,
    create_backend,
    model_kind,
    onnx_backend,
    parse_device,
)
from embedseg_deploy.contract import ContractError

from ._runtime_models import erfnet_model, toy_contract, toy_model, toy_onnx
from .conftest import upstream_case


@pytest.fixture(scope="module")
def toy2d(tmp_path_factory) -> Path:
    return toy_model(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def toy3d(tmp_path_factory) -> Path:
    return toy_model(tmp_path_factory, 3)


def _toy_reference(x: np.ndarray, contract) -> np.ndarray:
    """What the toy network computes, written independently with scipy (zero padding at the border)."""
    n = x.shape[0]
    ndim = x.ndim - 2
    mean = np.stack([ndimage.uniform_filter(x[i].mean(0), 3, mode="constant") for i in range(n)])
    out = np.zeros((n, 2 * ndim + 1, *x.shape[2:]), np.float32)
    d = 10.0 * contract.spacing[-1]
    out[:, ndim : 2 * ndim] = np.log(np.log(2) / d**2) / 10
    out[:, -1] = 24.0 * mean - 12.0
    return out


@pytest.mark.parametrize("ndim", [2, 3])
def test_onnx_cpu_runs_the_model_and_reads_its_contract(ndim, toy2d, toy3d):
    path = toy2d if ndim == 2 else toy3d
    backend = create_backend(path, "onnx-cpu", threads=2)
    assert backend.name == "onnx-cpu" and backend.device == "cpu" and backend.precision == "fp32"
    assert backend.contract == toy_contract(ndim)
    assert backend.info["providers"] == ["CPUExecutionProvider"]
    rng = np.random.default_rng(ndim)
    x = rng.random((2, 1, *([16] * ndim)), dtype=np.float32)
    out = backend.run(x)
    assert out.shape == (2, 2 * ndim + 1, *([16] * ndim)) and out.dtype == np.float32
    np.testing.assert_allclose(out, _toy_reference(x, backend.contract), atol=2e-5)


def test_cpu_threads_do_not_spin_unless_asked(toy2d):
    def spinning(backend) -> str:
        return backend.session.get_session_options().get_session_config_entry(
            "session.intra_op.allow_spinning"
        )

    assert spinning(create_backend(toy2d, "onnx-cpu")) == "0"
    asked = {"session.intra_op.allow_spinning": "1"}
    assert spinning(create_backend(toy2d, "onnx-cpu", session_config=asked)) == "1"


def test_cpu_sessions_share_an_arena_that_grows_linearly(toy2d):
    # power-of-two arena growth made block-mode peaks jump between block sizes (onnx_backend docstring)
    a, b = create_backend(toy2d, "onnx-cpu"), create_backend(toy2d, "onnx-cpu")
    for backend in (a, b):
        options = backend.session.get_session_options()
        assert options.get_session_config_entry("session.use_env_allocators") == "1"
    x = np.random.default_rng(0).random((1, 1, 16, 16), dtype=np.float32)
    np.testing.assert_array_equal(a.run(x), b.run(x))
    np.testing.assert_allclose(a.run(x), _toy_reference(x, a.contract), atol=2e-5)


def test_auto_picks_a_backend_that_runs_and_says_which(toy2d):
    backend = create_backend(toy2d, "auto", threads=1)
    assert backend.info["auto"]["chosen"] == backend.name
    listed = onnx_backend.available_providers()
    if "CUDAExecutionProvider" not in listed and "TensorrtExecutionProvider" not in listed:
        assert backend.name == "onnx-cpu"
    assert create_backend(toy2d, "auto", device="cpu").name == "onnx-cpu"


@pytest.mark.parametrize("name", ["onnx-cuda", "onnx-trt"])
def test_gpu_backend_without_its_provider_is_an_error(name, toy2d):
    if onnx_backend.PROVIDER_OF[name] in onnx_backend.available_providers():
        pytest.skip("this onnxruntime lists the provider; the fake-session test covers the fallback")
    with pytest.raises(BackendError, match=f"no {onnx_backend.PROVIDER_OF[name]}.*onnxruntime-gpu"):
        create_backend(toy2d, name)


def test_gpu_session_that_lands_on_cpu_is_refused(toy2d, monkeypatch):
    """onnxruntime-gpu without a usable GPU quietly runs a CUDA session on the CPU: that must be an error."""
    import onnxruntime as ort

    seen = {}
    real_session = ort.InferenceSession

    def fake_session(path, sess_options=None, providers=None):
        if providers != ["CPUExecutionProvider"]:
            seen["fallback"] = sess_options.get_session_config_entry("session.disable_cpu_ep_fallback")
            seen["providers"] = providers
        return real_session(path, providers=["CPUExecutionProvider"])  # what a silent fallback gives

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort, "InferenceSession", fake_session)
    with pytest.raises(BackendError, match="refusing to run silently"):
        create_backend(toy2d, "onnx-cuda")
    assert seen["fallback"] == "1"
    assert [p[0] if isinstance(p, tuple) else p for p in seen["providers"]] == ["CUDAExecutionProvider"]
    # auto mode moves on to the CPU and records why
    backend = create_backend(toy2d, "auto")
    assert backend.name == "onnx-cpu"
    assert backend.info["auto"]["skipped"][0]["backend"] == "onnx-cuda"
    assert "refusing" in backend.info["auto"]["skipped"][0]["reason"]


def test_run_checks_shapes_and_channels(toy2d):
    backend = create_backend(toy2d, "onnx-cpu")
    with pytest.raises(BackendError, match="multiple of 8"):
        backend.run(np.zeros((1, 1, 20, 16), np.float32))
    with pytest.raises(BackendError, match="takes 1 channel"):
        backend.run(np.zeros((1, 2, 16, 16), np.float32))
    with pytest.raises(BackendError, match="spatial dims"):
        backend.run(np.zeros((1, 1, 8, 8, 8), np.float32))


def test_static_model_shapes_are_reported_and_tiles_fitted(tmp_path):
    path = toy_onnx(tmp_path / "static.onnx", 2, static_shape=(32, 48))
    backend = create_backend(path, "onnx-cpu")
    assert backend.shapes.min_spatial == backend.shapes.max_spatial == (32, 48)
    assert backend.shapes.max_batch == 1
    assert backend.shapes.fit_tile([64, 64]) == [32, 48]
    assert backend.shapes.problem((32, 48)) is None
    assert "exceeds" in backend.shapes.problem((40, 48))
    assert "batch" in backend.shapes.problem((32, 48), batch=2)


def test_shape_spec_fit_tile_rounds_to_the_multiple():
    spec = ShapeSpec(3, 8, (8, 16, 16), (64, 128, 128))
    assert spec.fit_tile([30, 100, 500]) == [32, 104, 128]
    assert spec.fit_tile([1, 1, 1]) == [8, 16, 16]


def test_bad_model_files_name_the_file(tmp_path, toy2d):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model")
    with pytest.raises(BackendError, match=r"notes\.onnx.*cannot create an onnxruntime"):
        create_backend(text, "onnx-cpu")
    with pytest.raises(BackendError, match="model file not found"):
        create_backend(tmp_path / "missing.onnx")
    with pytest.raises(BackendError, match="is a directory"):
        create_backend(tmp_path)
    with pytest.raises(BackendError, match="unknown backend"):
        create_backend(toy2d, "openvino")
    import onnx

    bare = onnx.load(str(toy2d))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ContractError, match=r"bare\.onnx.*no EmbedSeg contract"):
        create_backend(tmp_path / "bare.onnx", "onnx-cpu")
    # a contract in a sidecar JSON is accepted
    (tmp_path / "bare.onnx.json").write_text(toy_contract(2).to_json())
    assert create_backend(tmp_path / "bare.onnx", "onnx-cpu").contract == toy_contract(2)


def test_model_kinds_and_devices():
    assert (
        model_kind("m.engine") == "engine"
        and model_kind("m.pth") == "checkpoint"
        and model_kind("m.onnx") == "onnx"
    )
    assert (
        parse_device("cuda:1") == ("cuda", 1)
        and parse_device("cpu") == ("cpu", 0)
        and parse_device(2) == ("cuda", 2)
    )
    with pytest.raises(BackendError):
        parse_device("tpu")


def test_cpu_backend_on_a_cuda_device_is_refused(toy2d):
    with pytest.raises(BackendError, match="onnx-cpu cannot run on a CUDA device"):
        create_backend(toy2d, "onnx-cpu", device="cuda")


def _fake_engine(tmp_path: Path, facts: dict) -> Path:
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not really an engine")
    doc = {"kind": "embedseg-tensorrt-engine", "contract": toy_contract(2).to_dict(), "engine": facts}
    (tmp_path / "model.engine.json").write_text(json.dumps(doc))
    return engine


def test_engine_for_another_gpu_is_refused_with_the_reason(tmp_path, monkeypatch):
    from embedseg_deploy.backends import tensorrt_backend

    engine = _fake_engine(
        tmp_path, {"tensorrt_version": "10.13.0", "gpu_name": "Tesla T4", "compute_capability": "7.5"}
    )
    here = {"tensorrt_version": "10.13.0", "gpu_name": "NVIDIA H100", "compute_capability": "9.0"}
    monkeypatch.setattr(tensorrt_backend, "local_environment", lambda device_id=0: here)
    with pytest.raises(BackendError, match=r"model.engine: this engine cannot run here: built for Tesla T4"):
        create_backend(engine, "tensorrt")
    with pytest.raises(BackendError, match=r"TensorRT 10\.13\.0, this machine has TensorRT 11"):
        monkeypatch.setattr(
            tensorrt_backend,
            "local_environment",
            lambda device_id=0: {**here, "tensorrt_version": "11.0", "compute_capability": "7.5"},
        )
        create_backend(engine, "tensorrt")


def test_engine_without_tensorrt_or_sidecar_is_a_clear_error(tmp_path):
    engine = _fake_engine(tmp_path, {"tensorrt_version": "10.13.0", "compute_capability": "9.0"})
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError, match="TensorRT is not installed"):
            create_backend(engine, "auto")
    (tmp_path / "model.engine.json").unlink()
    with pytest.raises(BackendError, match=r"no sidecar model\.engine\.json"):
        create_backend(engine, "tensorrt")


def test_tensorrt_backend_runs_through_the_engine_runner(tmp_path, monkeypatch):
    """No GPU here: the backend over the fakes of TensorRT and cuda-python from test_export_trt."""
    from embedseg_deploy.backends import tensorrt_backend

    from .test_export_trt import FakeCudart, FakeTensorRTRuntime

    here = {"tensorrt_version": "11.0.0.1", "gpu_name": "NVIDIA H100", "compute_capability": "9.0"}
    engine = _fake_engine(tmp_path, {**here, "precision": "fp16"})
    monkeypatch.setattr(tensorrt_backend, "local_environment", lambda device_id=0: here)
    cudart, bindings = FakeCudart(), types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRTRuntime(cudart))
    with pytest.raises(BackendError, match=r"model\.engine: TensorRT could not deserialize the engine"):
        create_backend(engine, "tensorrt")
    engine.write_bytes(b"plan")
    backend = create_backend(engine, "tensorrt")
    assert backend.shapes.min_spatial == (8, 8) and backend.shapes.max_spatial == (32, 32)  # profile 0
    assert backend.precision == "fp16" and backend.describe()["profile"] == [[1, 1, 8, 8], [1, 1, 32, 32]]
    x = np.random.default_rng(0).random((1, 1, 16, 24), dtype=np.float32)
    np.testing.assert_array_equal(backend.run(x), x * np.arange(1.0, 6.0, dtype=np.float32)[:, None, None])
    backend.close()
    assert cudart.mem == {} and cudart.host == {}


def test_torch_backend_matches_onnx_runtime(tmp_path_factory):
    """The optional torch backend (imports torch only when chosen) gives the exported model's outputs."""
    pytest.importorskip("torch")
    case = upstream_case(2)
    ort_backend = create_backend(erfnet_model(tmp_path_factory, case), "onnx-cpu", threads=2)
    torch_backend = create_backend(case / "checkpoint.pth", "auto", threads=2)
    assert torch_backend.name == "torch" and torch_backend.contract.spacing == ort_backend.contract.spacing
    x = np.load(case / "network_input.npy")[None, :, :64, :64]
    np.testing.assert_allclose(torch_backend.run(x), ort_backend.run(x), atol=1e-4)


def _need_gpu() -> None:
    """Skip when this machine has no CUDA GPU; anything else that goes wrong on a GPU machine must fail."""
    from embedseg_deploy.engine_cache import EngineError, gpu_info

    try:
        gpu_info()
    except EngineError as exc:
        pytest.skip(str(exc))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["onnx-cuda", "onnx-trt"])
def test_gpu_backends_match_cpu(name, toy2d, tmp_path):
    if onnx_backend.PROVIDER_OF[name] not in onnx_backend.available_providers():
        pytest.skip(
            f"{name}: this onnxruntime has no {onnx_backend.PROVIDER_OF[name]} (no GPU build installed)"
        )
    _need_gpu()
    gpu = create_backend(toy2d, name, engine_cache=tmp_path / "trt")  # a failure here is a failure
    x = np.random.default_rng(0).random((2, 1, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(gpu.run(x), create_backend(toy2d, "onnx-cpu").run(x), atol=1e-3)


@pytest.mark.trt
def test_native_tensorrt_matches_cpu(toy2d, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    _need_gpu()
    trt = create_backend(toy2d, "tensorrt", engine_cache=tmp_path)
    x = np.random.default_rng(0).random((1, 1, 64, 64), dtype=np.float32)
    np.testing.assert_allclose(trt.run(x), create_backend(toy2d, "onnx-cpu").run(x), atol=1e-3)


def test_static_model_takes_images_smaller_and_larger_than_its_shape(tmp_path):
    """A static 32x48 model: a 20x30 image is reflect-padded up to the model's shape (it used to be refused
    as "below the smallest supported"), a 70x100 image is tiled; both give the dynamic model's labels."""
    from embedseg_deploy.predict import Predictor

    static = Predictor(toy_onnx(tmp_path / "static.onnx", 2, static_shape=(32, 48)), "onnx-cpu", halo=8)
    dynamic = Predictor(toy_onnx(tmp_path / "dynamic.onnx", 2), "onnx-cpu", tile=0)
    rng = np.random.default_rng(3)
    for shape in ((20, 30), (70, 100)):
        image = rng.random(shape, dtype=np.float32)
        image[4:12, 6:16] += 4.0
        expected = dynamic.predict(image)
        assert expected.max() >= 1
        np.testing.assert_array_equal(static.predict(image), expected)


def test_tensorrt_ep_gets_shape_profiles_and_fp32_means_fp32(toy2d):
    """The TensorRT EP is given the contract's GPU profile (without one it rebuilds its engine for every
    new tile shape) and the CUDA EP keeps fp32 layers out of TF32 unless asked."""
    from embedseg_deploy.engine_cache import read_onnx_header

    assert read_onnx_header(toy2d)["inputs"] == ["input"]
    profile = onnx_backend._default_trt_profile(toy2d)
    assert profile == {"min": (1, 1, 8, 8), "opt": (1, 1, 128, 128), "max": (1, 1, 144, 144)}
    trt, cuda = onnx_backend.gpu_providers(
        onnx_backend.TRT_EP, 1, None, profile, onnx_backend._input_name(toy2d)
    )
    assert trt[0] == onnx_backend.TRT_EP and cuda[0] == onnx_backend.CUDA_EP
    assert trt[1]["trt_profile_min_shapes"] == "input:1x1x8x8"
    assert trt[1]["trt_profile_opt_shapes"] == "input:1x1x128x128"
    assert trt[1]["trt_profile_max_shapes"] == "input:1x1x144x144"
    assert trt[1]["device_id"] == cuda[1]["device_id"] == "1"
    assert cuda[1]["use_tf32"] == "0"
    (only_cuda,) = onnx_backend.gpu_providers(onnx_backend.CUDA_EP, tf32=True)
    assert only_cuda[1]["use_tf32"] == "1"


def test_tensorrt_ep_session_is_built_with_the_profile(toy2d, monkeypatch):
    """End to end through a fake session: the providers the TensorRT EP session is created with carry the
    profile, the tiler is kept inside it, and an fp32 model on the TensorRT EP reports tf32."""
    import onnxruntime as ort

    seen = {}
    real_session = ort.InferenceSession

    class Session:
        def __init__(self, path, sess_options=None, providers=None):
            seen["providers"] = providers
            self._real = real_session(path, providers=["CPUExecutionProvider"])

        def get_providers(self):
            return [onnx_backend.TRT_EP, onnx_backend.CUDA_EP]

        def __getattr__(self, name):
            return getattr(self._real, name)

    monkeypatch.setattr(ort, "get_available_providers", lambda: [onnx_backend.TRT_EP, onnx_backend.CPU_EP])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    backend = create_backend(toy2d, "onnx-trt")
    assert dict(seen["providers"])[onnx_backend.TRT_EP]["trt_profile_max_shapes"] == "input:1x1x144x144"
    assert backend.shapes.min_spatial == (8, 8) and backend.shapes.max_spatial == (144, 144)
    assert backend.shapes.max_batch == 1 and backend.precision == "tf32"
    assert backend.describe()["trt_profile"]["opt"] == [1, 1, 128, 128]


def test_auto_uses_only_a_cached_tensorrt_engine_and_survives_any_error(toy2d, monkeypatch, tmp_path):
    """With tensorrt importable, auto mode neither builds an engine (minutes, at model loading) nor crashes
    when something other than a BackendError goes wrong: it says why and moves on."""
    import importlib.util

    import embedseg_deploy.backends as backends
    from embedseg_deploy import engine_cache

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return object() if name == "tensorrt" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(engine_cache.EngineCache, "lookup", lambda self, path, *a, **k: None)

    def no_build(*args, **kwargs):
        raise AssertionError("auto mode must not build an engine")

    monkeypatch.setattr(engine_cache.EngineCache, "get", no_build)
    backend = create_backend(toy2d, "auto", engine_cache=tmp_path)
    skipped = backend.info["auto"]["skipped"]
    assert skipped[0]["backend"] == "tensorrt"
    assert f"no TensorRT engine for {toy2d.name}" in skipped[0]["reason"]
    assert "--backend tensorrt" in skipped[0]["reason"]
    assert backends.engine_build_pending(toy2d, "trt", engine_cache=tmp_path)
    assert not backends.engine_build_pending(toy2d, "onnx-cpu")

    def broken(self, path, *a, **k):
        raise KeyError("compute_capability")

    monkeypatch.setattr(engine_cache.EngineCache, "lookup", broken)
    backend = create_backend(toy2d, "auto", engine_cache=tmp_path)
    assert backend.name == "onnx-cpu"
    assert backend.info["auto"]["skipped"][0]["reason"] == "KeyError: 'compute_capability'"
