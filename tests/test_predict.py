"""The Predictor: upstream parity without torch, tiled == whole image, TTA on every backend, Python API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from embedseg_deploy.backends import BackendError, create_backend
from embedseg_deploy.io import InputError
from embedseg_deploy.predict import PixelSizeWarning, Predictor, check_pixel_size, label_dtype, predict_files
from embedseg_deploy.synthetic import make_image
from embedseg_deploy.tiling import balanced_tile, plan_tiles
from embedseg_deploy.tta import predict_tta

from ._runtime_models import blobs, erfnet_model, toy_contract, toy_model
from .conftest import run_without_torch, upstream_case

# BranchedERFNet's outputs change up to 231 px away from an input change (measured with an impulse, 2D and
# 3D alike), so a halo of 240 makes tiled prediction exact; the strips below need 2 tiles along x.
ERFNET_REACH_HALO = 240
STRIP = {2: ((40, 797), (48, 640), (0, 240)), 3: ((12, 20, 797), (16, 24, 640), (0, 0, 240))}


@pytest.fixture(scope="module")
def toy2d(tmp_path_factory) -> Path:
    return toy_model(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def cpu2d(toy2d):
    return create_backend(toy2d, "onnx-cpu", threads=2)


@pytest.mark.slow
@pytest.mark.parametrize("ndim", [2, 3])
def test_cli_reproduces_upstream_labels_without_torch(ndim, tmp_path_factory, tmp_path):
    """`embedseg-run predict` on ONNX Runtime CPU, torch blocked, gives upstream EmbedSeg's labels exactly."""
    case = upstream_case(ndim)
    model = erfnet_model(tmp_path_factory, case)
    code = "from embedseg_deploy.cli import main\nmain()"
    args = ["predict", str(model), str(case / "image.tif"), "-o", str(tmp_path), "--backend", "onnx-cpu"]
    proc = run_without_torch(code, *args, "--threads", "2", "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels = tifffile.imread(tmp_path / "image.tif")
    expected = tifffile.imread(case / "upstream_labels.tif")
    assert labels.dtype == np.uint16 and labels.shape == expected.shape
    assert labels.max() == expected.max() > 0
    np.testing.assert_array_equal(labels, expected)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["predictor"]["backend"] == "onnx-cpu" and summary["predictor"]["tile"] is not None
    assert "torch" not in summary["versions"]
    (record,) = summary["files"]
    assert record["status"] == "ok" and record["objects"] == int(expected.max())
    assert {"read", "normalize", "network", "cluster", "write"} <= set(record["timings"])


@pytest.mark.slow
@pytest.mark.parametrize("ndim", [2, 3])
def test_tiled_equals_whole_image_with_the_real_network(ndim, tmp_path_factory):
    shape, tile, halo = STRIP[ndim]
    backend = create_backend(erfnet_model(tmp_path_factory, upstream_case(ndim)), "onnx-cpu", threads=2)
    image, _ = make_image(shape, 30, np.random.default_rng(ndim), radius=(5.0, 8.0))
    whole = Predictor(backend, tile=0)
    tiled = Predictor(backend, tile=tile, halo=halo)
    x = tiled.prepare(image)
    assert len(plan_tiles(x.shape[1:], tiled.tile, tiled.halo, 8, backend.contract.padding)) == 2
    expected = whole.predict(image)
    assert expected.max() >= 5
    np.testing.assert_array_equal(tiled.predict(image), expected)


def test_toy_tiles_with_batches_equal_whole_image(cpu2d):
    image, truth = blobs((150, 173), 12, seed=3)
    whole = Predictor(cpu2d, tile=0).predict(image)
    for batch in (1, 3):
        tiled = Predictor(cpu2d, tile=48, halo=8, batch_size=batch).predict(image)
        np.testing.assert_array_equal(tiled, whole)
    assert whole.max() == truth.max()


@pytest.mark.slow
def test_tta_is_the_same_on_every_backend(tmp_path_factory):
    """TTA through the Predictor equals the group average of whole-image passes, on each backend here."""
    case = upstream_case(2)
    onnx_path = erfnet_model(tmp_path_factory, case)
    image = tifffile.imread(case / "image.tif")[:48, :48]  # square: one shape for every transform
    reference_backend = create_backend(onnx_path, "onnx-cpu", threads=2)
    plain = Predictor(reference_backend, tile=0)
    x = plain.prepare(image)
    expected = predict_tta(x, plain.predict_raw, placement=reference_backend.contract.padding)
    assert not np.allclose(expected, plain.predict_raw(x), atol=1e-3)  # TTA really changes the output
    candidates = [
        (onnx_path, "onnx-cpu"),
        (onnx_path, "onnx-cuda"),
        (onnx_path, "onnx-trt"),
        (onnx_path, "tensorrt"),
    ]
    candidates.append((case / "checkpoint.pth", "torch"))
    ran = []
    for model, name in candidates:
        try:
            backend = create_backend(model, name, threads=2)
        except BackendError:
            continue  # GPU backends and torch where absent: covered by their own skip-marked tests
        whole = Predictor(backend, tile=0, tta=True).predict_raw(x)
        np.testing.assert_allclose(whole, expected, atol=2e-4 if name != "onnx-cpu" else 0)
        ran.append(name)
    assert "onnx-cpu" in ran


def test_tta_on_a_symmetric_network_changes_nothing(cpu2d):
    image, _ = blobs((72, 88), 6, seed=5)
    plain = Predictor(cpu2d, tile=0)
    tta = Predictor(cpu2d, tile=0, tta=True)
    x = plain.prepare(image)
    np.testing.assert_allclose(tta.predict_raw(x), plain.predict_raw(x), atol=1e-5)
    np.testing.assert_array_equal(tta.predict(image), plain.predict(image))


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.uint32, np.float32, np.float64])
def test_any_integer_or_float_dtype_gives_the_same_labels(dtype, cpu2d):
    image, _ = blobs((64, 64), 4, seed=1)
    image = (image // 8).astype(np.uint16)  # fits every dtype
    predictor = Predictor(cpu2d)
    expected = predictor.predict(image)
    assert expected.max() > 0
    np.testing.assert_array_equal(predictor.predict(image.astype(dtype)), expected)


def test_channels_follow_the_one_channel_rule(tmp_path_factory):
    backend = create_backend(toy_model(tmp_path_factory, 2, in_channels=2), "onnx-cpu")
    image, truth = blobs((64, 80), 5, seed=2)
    two = np.stack([image, image], axis=-1)  # YXC
    predictor = Predictor(backend)
    last = predictor.predict(two)
    np.testing.assert_array_equal(predictor.predict(np.moveaxis(two, -1, 0)), last)
    assert last.max() == truth.max()
    with pytest.raises(InputError, match="channel"):
        predictor.predict(np.stack([image] * 3, axis=0))


def test_pixel_size_is_checked_against_the_model():
    contract = toy_contract(2, pixel_size=[0.5, 0.5])
    assert check_pixel_size((0.51, 0.49), contract) is None
    assert check_pixel_size(None, contract) is None
    warn = check_pixel_size((0.6, 0.6), contract, "x.tif: ")
    assert warn.startswith("x.tif: pixel size (0.6, 0.6)") and "0.5" in warn


def test_predictor_warns_on_pixel_size_and_constant_images(tmp_path):
    from ._runtime_models import toy_onnx

    model = toy_onnx(tmp_path / "px.onnx", 2, contract=toy_contract(2, pixel_size=[0.5, 0.5]))
    predictor = Predictor(model, backend="onnx-cpu")
    image, _ = blobs((48, 48), 2, seed=0)
    with pytest.warns(PixelSizeWarning, match="differs from the model"):
        result = predictor.run(image, pixel_size=(1.0, 1.0))
    assert any("differs" in w for w in result.warnings)
    flat = predictor.run(np.full((40, 40), 7, np.uint16))
    assert flat.n_objects == 0 and any("constant" in w for w in flat.warnings)


def test_thresholds_override_the_contract(cpu2d):
    image, truth = blobs((64, 64), 4, seed=4)
    assert Predictor(cpu2d).predict(image).max() == truth.max()
    assert Predictor(cpu2d, thresholds={"min_object_size": 10_000}).predict(image).max() == 0
    with pytest.raises(ValueError, match="unknown clustering parameters"):
        Predictor(cpu2d, thresholds={"seed": 0.5})


def test_labels_widen_to_uint32_past_65535_objects(cpu2d, tmp_path, monkeypatch):
    assert label_dtype(65535) == np.uint16 and label_dtype(65536) == np.uint32
    image, _ = blobs((264, 256), 2, seed=0)
    tifffile.imwrite(tmp_path / "in.tif", image)
    predictor = Predictor(cpu2d)
    many = np.arange(1, 264 * 256 + 1, dtype=np.int32).reshape(264, 256)  # 67584 one-pixel objects
    monkeypatch.setattr(predictor, "cluster", lambda raw, origin=None, return_seeds=False: many)
    summary = predict_files(predictor, [tmp_path / "in.tif"], tmp_path / "out")
    out = tifffile.imread(tmp_path / "out" / "in.tif")
    assert summary["failed"] == 0 and out.dtype == np.uint32
    np.testing.assert_array_equal(out, many)


def test_objects_are_counted_and_ids_made_consecutive(cpu2d, tmp_path, monkeypatch):
    """The clustering leaves gaps in its ids (overwritten objects, objects in the cropped padding): the
    file holds ids 1..n in the clustering's order and ``objects`` is n, not the largest raw id."""
    image, _ = blobs((48, 64), 2, seed=0)
    tifffile.imwrite(tmp_path / "in.tif", image)
    gappy = np.zeros((48, 64), np.int32)
    gappy[:10, :10], gappy[20:30, :10], gappy[40:, 50:] = 7, 3, 170
    predictor = Predictor(cpu2d)
    monkeypatch.setattr(predictor, "cluster", lambda raw, origin=None, return_seeds=False: gappy.copy())
    summary = predict_files(predictor, [tmp_path / "in.tif"], tmp_path / "out")
    out = tifffile.imread(tmp_path / "out" / "in.tif")
    expected = np.select([gappy == 3, gappy == 7, gappy == 170], [1, 2, 3], 0)
    np.testing.assert_array_equal(out, expected)
    assert summary["objects"] == summary["files"][0]["objects"] == 3


def test_predict_files_keeps_pixel_size_and_saves_seeds(cpu2d, tmp_path):
    from embedseg_deploy.io import read_tiff, write_tiff_atomic

    image, truth = blobs((56, 64), 4, seed=6)
    write_tiff_atomic(tmp_path / "a.tif", image, pixel_size=(0.25, 0.5))
    summary = Predictor(cpu2d).predict_files([tmp_path / "a.tif"], tmp_path / "out", save_seeds=True)
    labels = read_tiff(tmp_path / "out" / "a.tif")
    seeds = tifffile.imread(tmp_path / "out" / "seeds" / "a.tif")
    assert labels.data.dtype == np.uint16 and labels.data.max() == truth.max()
    np.testing.assert_allclose(labels.pixel_size, (0.25, 0.5), rtol=1e-6)
    assert seeds.dtype == np.float32 and seeds.shape == image.shape and seeds.min() >= 0 and seeds.max() <= 1
    assert (
        summary["counts"] == {"ok": 1, "skipped": 0, "failed": 0, "not run": 0}
        and summary["objects"] == truth.max()
    )


def test_images_too_big_for_the_memory_budget_go_block_by_block(cpu2d, tmp_path):
    """The budget decides the mode before any pixel is read, and the reporter hears it first."""
    from embedseg_deploy.predict import Reporter

    image, truth = blobs((64, 64), 4, seed=9)
    tifffile.imwrite(tmp_path / "big.tif", image)
    events = []
    reporter = Reporter(
        start=lambda path, plan, i, n: events.append(("start", plan)),
        step=lambda done, total, unit: events.append(("step", (done, total, unit))),
        end=lambda record, i, n: events.append(("end", record)),
    )
    roomy = predict_files(Predictor(cpu2d), [tmp_path / "big.tif"], tmp_path / "whole", reporter=reporter)
    assert roomy["files"][0]["mode"] == "whole image" and events[0][1].mode == "whole image"
    events.clear()
    summary = predict_files(
        Predictor(cpu2d), [tmp_path / "big.tif"], tmp_path / "out", save_seeds=True, memory_budget=1,
        reporter=reporter,
    )  # fmt: skip
    (record,) = summary["files"]
    plan = events[0][1]
    assert events[0][0] == "start" and plan.mode == "blocks" and "more than the memory budget" in plan.reason
    steps = [e[1] for e in events if e[0] == "step"]
    # the budget (1 byte) reaches the blocks: no network tile fits it, so the network runs per block
    assert steps[-1] == (plan.units, plan.units, "tiles+blocks") and events[-1][0] == "end"
    assert any("no tile fits the memory budget" in w for w in record["warnings"])
    assert record["mode"].startswith("blocks") and record["objects"] == truth.max()
    assert record["pixel_size"] is None and "pixel_size" in record
    assert any("seeds are not saved" in w for w in record["warnings"])
    again = predict_files(Predictor(cpu2d), [tmp_path / "big.tif"], tmp_path / "out", memory_budget=1)
    assert again["counts"]["skipped"] == 1  # resumable in block mode too


@pytest.mark.parametrize(
    ("shape", "tile", "halo"),
    [((2050, 2050), 2048, 64), ((70, 600, 600), (64, 512, 512), (16, 64, 64)), ((4000, 3000), 2048, 64)],
)
def test_balanced_tiles_cover_an_image_slightly_larger_than_the_tile_cheaply(shape, tile, halo):
    """As many tiles as the contract's tile needs, each as small as that count allows: an image just past
    the tile costs a little more than itself, not 2x per axis."""
    ndim = len(shape)
    tile = [tile] * ndim if isinstance(tile, int) else tile
    halo = [halo] * ndim if isinstance(halo, int) else halo
    balanced = balanced_tile(shape, tile, halo)
    fixed, small = plan_tiles(shape, tile, halo), plan_tiles(shape, balanced, halo)
    assert len(small) == len(fixed) and all(b <= t for b, t in zip(balanced, tile, strict=True))
    for axis in range(ndim):  # one multiple of 8 less would need more tiles
        smaller = list(balanced)
        smaller[axis] -= 8
        assert smaller[axis] <= 2 * halo[axis] or len(plan_tiles(shape, smaller, halo)) > len(small)
    assert sum(np.prod(t.shape) for t in small) < 0.6 * sum(np.prod(t.shape) for t in fixed)


def test_predictor_uses_balanced_tiles_and_keeps_the_labels(cpu2d):
    image, _ = blobs((70, 75), 4, seed=2)  # padded 72 x 80: just past the toy contract's 64 px tile
    seen = []

    class Counting:
        def __getattr__(self, name):
            return getattr(cpu2d, name)

        def run(self, batch):
            seen.append(batch.shape[2:])
            return cpu2d.run(batch)

    predictor = Predictor(cpu2d)
    predictor.backend = Counting()
    labels = predictor.predict(image)
    assert predictor.tile == [64, 64] and seen == [(48, 48)] * 4  # 4 tiles of 64 x 64 before
    np.testing.assert_array_equal(labels, Predictor(cpu2d, tile=0).predict(image))


def test_saved_seeds_are_the_seediness_the_clustering_uses(cpu2d):
    """Thresholding the saved seed map at fg_thresh gives exactly the clustering's foreground."""
    from ._cluster_reference import activations

    image, _ = blobs((96, 120), 8, seed=7)
    predictor = Predictor(cpu2d)
    result = predictor.run(image, want_seeds=True)
    raw = predictor.predict_raw(predictor.prepare(image))
    np.testing.assert_array_equal(result.seeds, activations(raw)[2])
