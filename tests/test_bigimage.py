"""Big images block by block: same objects as whole-image mode, lazy reading, exact global statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from embedseg_deploy.backends import create_backend
from embedseg_deploy.bigimage import (
    norm_stats,
    percentiles_from_histogram,
    plan_blocks,
    predict_big,
)
from embedseg_deploy.contract import Normalization
from embedseg_deploy.io import InputError, channel_axis_of, read_tiff, write_tiff_atomic
from embedseg_deploy.predict import Predictor
from embedseg_deploy.sources import open_source

from ._runtime_models import blobs, same_partition, toy_model


@pytest.fixture(scope="module")
def predictors(tmp_path_factory) -> dict[int, Predictor]:
    return {
        nd: Predictor(create_backend(toy_model(tmp_path_factory, nd), "onnx-cpu", threads=2), tile=0)
        for nd in (2, 3)
    }


@pytest.fixture(scope="module")
def tiled(tmp_path_factory) -> dict[int, Predictor]:
    """Predictors with network tiles: block mode runs the network once over the whole image."""
    return {
        nd: Predictor(create_backend(toy_model(tmp_path_factory, nd), "onnx-cpu", threads=2), tile=32, halo=8)
        for nd in (2, 3)
    }


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16])
def test_histogram_percentiles_are_numpys(dtype):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    for n in (1, 2, 7, 1000, 4097):
        x = rng.integers(info.min, info.max, size=n, endpoint=True).astype(dtype)
        values, counts = np.unique(x, return_counts=True)
        q = [0, 1, 12.5, 50, 99.8, 100]
        # the reference is what embedseg_deploy.normalize computes: numpy on the float64 image
        assert percentiles_from_histogram(counts, values, q) == list(np.percentile(x.astype(np.float64), q))


def test_blocks_partition_the_padded_image():
    plan = plan_blocks((21, 50), (16, 24), (8, 8), 8, "center")
    cover = np.zeros((24, 56), int)
    for core, region in plan:
        cover[core] += 1
        assert all(
            r.start % 8 == 0 and r.start <= c.start and c.stop <= r.stop
            for c, r in zip(core, region, strict=True)
        )
    assert (cover == 1).all() and len(plan) == 2 * 3


def _write(path: Path, image: np.ndarray, compress: bool = False, pixel_size=None) -> Path:
    if compress:
        tifffile.imwrite(path, image, compression="zlib")
    else:
        write_tiff_atomic(path, image, pixel_size=pixel_size)
    return path


@pytest.mark.parametrize(
    ("shape", "block", "compress"),
    [((150, 181), (48, 64), False), ((26, 70, 61), (16, 32, 32), False), ((26, 70, 61), (16, 32, 32), True)],
    ids=["2d-memmap", "3d-memmap", "3d-compressed-pages"],
)
@pytest.mark.parametrize("network", ["per block", "once"])
def test_blocks_find_the_objects_of_whole_image_mode(shape, block, compress, network, predictors, tiled,
                                                     tmp_path):  # fmt: skip
    ndim = len(shape)
    image, truth = blobs(shape, 12 if ndim == 2 else 8, radius=4.0, seed=ndim)
    src = _write(tmp_path / "big.tif", image, compress, pixel_size=[0.5] * ndim if not compress else None)
    before = src.read_bytes()
    predictor = (predictors if network == "per block" else tiled)[ndim]
    whole = predictor.predict(image)
    out = tmp_path / "labels.tif"
    tiles = {"network_tile": 32} if network == "once" else {}
    result = predict_big(predictor, src, out, block=block, block_halo=16, **tiles)
    assert (result.network_tiles > 1) == (network == "once")
    labels = read_tiff(out)
    # >=: a ball near the end of an axis has a mirror image in the rounding padding whose seed starts an
    # object reaching into the image, as in upstream's whole-image prediction
    assert result.blocks > 4 and result.n_objects == whole.max() >= truth.max()
    assert labels.data.dtype == np.uint16 and labels.data.max() == result.n_objects
    assert same_partition(labels.data, whole)
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.tif", "labels.tif"]  # no temp files left
    if not compress:
        np.testing.assert_allclose(labels.pixel_size, [0.5] * ndim, rtol=1e-6)


def test_float_images_and_channel_axes(tmp_path, tmp_path_factory):
    image, truth = blobs((64, 72), 4, seed=8)
    two = np.stack([image, image], -1).astype(np.float32) / 7.0  # YXC float
    src = _write(tmp_path / "f.tif", two)
    predictor = Predictor(create_backend(toy_model(tmp_path_factory, 2, in_channels=2), "onnx-cpu"), tile=0)
    result = predict_big(predictor, src, tmp_path / "out.tif", block=32, block_halo=16)
    assert same_partition(tifffile.imread(tmp_path / "out.tif"), predictor.predict(two))
    assert result.n_objects == truth.max()
    lazy = open_source(src)
    assert channel_axis_of(lazy.shape, 2, 2, axes=lazy.axes) == 2
    lo, hi = norm_stats(lazy, 2, Normalization())
    np.testing.assert_allclose(lo, np.percentile(two[..., 0], 1.0))
    np.testing.assert_allclose(hi, np.percentile(two[..., 1], 99.8))


def test_a_compressed_single_page_cannot_be_read_lazily(predictors, tmp_path):
    image, _ = blobs((64, 64), 3, seed=1)
    src = _write(tmp_path / "c.tif", image, compress=True)
    with pytest.raises(InputError, match=r"c\.tif: pixel data are compressed.*uncompressed TIFF"):
        predict_big(predictors[2], src, tmp_path / "out.tif", block=32)
    assert not (tmp_path / "out.tif").exists()


def test_nan_in_a_big_float_image_is_refused(predictors, tmp_path):
    image = np.ones((40, 40), np.float32)
    image[3, 4] = np.nan
    src = _write(tmp_path / "nan.tif", image)
    with pytest.raises(InputError, match=r"nan\.tif: image has NaN"):
        predict_big(predictors[2], src, tmp_path / "out.tif", block=16)
    assert [p.name for p in tmp_path.iterdir()] == ["nan.tif"]


def test_a_truncated_file_is_refused_before_mapping(predictors, tmp_path):
    image, _ = blobs((64, 64), 3, seed=1)
    src = _write(tmp_path / "t.tif", image)
    src.write_bytes(src.read_bytes()[:-500])
    with pytest.raises(InputError, match=r"t\.tif: truncated or corrupt TIFF"):
        predict_big(predictors[2], src, tmp_path / "out.tif", block=32)
    assert [p.name for p in tmp_path.iterdir()] == ["t.tif"]


def test_a_single_channel_image_for_a_two_channel_model_names_the_file(tmp_path, tmp_path_factory):
    predictor = Predictor(create_backend(toy_model(tmp_path_factory, 2, in_channels=2), "onnx-cpu"), tile=0)
    src = _write(tmp_path / "one.tif", blobs((64, 64), 3, seed=1)[0])
    with pytest.raises(InputError, match=r"one\.tif: image has 1 channel\(s\), the model takes 2"):
        predict_big(predictor, src, tmp_path / "out.tif", block=32)
    assert [p.name for p in tmp_path.iterdir()] == ["one.tif"]


def test_output_onto_the_input_is_refused(predictors, tmp_path):
    src = _write(tmp_path / "in.tif", blobs((64, 64), 3, seed=1)[0])
    before = src.read_bytes()
    with pytest.raises(InputError, match=r"in\.tif: the output would overwrite the input"):
        predict_big(predictors[2], src, tmp_path / "." / "in.tif", block=32)
    assert src.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["in.tif"]


def test_block_regions_share_one_shape_and_hold_their_core_with_context():
    shape, block, halo = (70, 600, 530), (32, 256, 256), (16, 64, 64)
    padded = (72, 600, 536)  # rounded up to multiples of 8 at the end
    plan = plan_blocks(shape, block, halo, 8, "end")
    assert len({tuple(r.stop - r.start for r in region) for _, region in plan}) == 1
    for core, region in plan:
        for c, r, h, p in zip(core, region, halo, padded, strict=True):
            assert r.start <= c.start and c.stop <= r.stop and r.start % 8 == 0
            # a full halo of context on each side, unless the region meets the image border there
            assert c.start - r.start >= h or r.start == 0
            assert r.stop - c.stop >= h or r.stop == p
