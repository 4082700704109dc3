"""OME-Zarr in and out: the same labels as TIFF, NGFF metadata read and written, bad stores named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile

zarr = pytest.importorskip("zarr", reason="the zarr extra is not installed")

from embedseg_deploy.backends import create_backend  # noqa: E402
from embedseg_deploy.bigimage import predict_big  # noqa: E402
from embedseg_deploy.io import InputError, write_tiff_atomic  # noqa: E402
from embedseg_deploy.ngff import read_labels_info, write_image  # noqa: E402
from embedseg_deploy.predict import Predictor  # noqa: E402
from embedseg_deploy.sources import is_zarr, open_source  # noqa: E402

from ._runtime_models import blobs, toy_model  # noqa: E402


@pytest.fixture(scope="module")
def predictors(tmp_path_factory) -> dict[int, Predictor]:
    return {
        nd: Predictor(create_backend(toy_model(tmp_path_factory, nd), "onnx-cpu", threads=2), tile=0)
        for nd in (2, 3)
    }


def _labels(path: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(path), mode="r")["0"][...])


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize(
    ("shape", "axes", "px"), [((61, 75), "YX", (0.5, 0.25)), ((11, 37, 45), "ZYX", (2.0, 0.5, 0.5))]
)
def test_ome_zarr_in_gives_the_labels_of_tiff_in(version, shape, axes, px, predictors, tmp_path):
    image, _ = blobs(shape, 6, seed=3)
    p = predictors[len(shape)]
    tif = tmp_path / "in.tif"
    write_tiff_atomic(tif, image, pixel_size=px)
    store = tmp_path / "in.ome.zarr"
    write_image(store, image, axes, px, chunks=[16] * len(shape), version=version)
    before = sorted((f.relative_to(store), f.read_bytes()) for f in store.rglob("*") if f.is_file())
    block = [16] * len(shape)
    from_tiff = predict_big(p, tif, tmp_path / "a.tif", block=block, block_halo=8)
    from_zarr = predict_big(p, store, tmp_path / "b.tif", block=block, block_halo=8)
    assert from_zarr.pixel_size == pytest.approx(px) and from_tiff.n_objects == from_zarr.n_objects > 0
    a, b = tifffile.imread(tmp_path / "a.tif"), tifffile.imread(tmp_path / "b.tif")
    assert np.array_equal(a, b)
    # labels out as OME-Zarr: the same ids, NGFF label metadata, the pixel size; the input is untouched
    out = tmp_path / "labels.ome.zarr"
    predict_big(p, store, out, block=block, block_halo=8, provenance={"model_sha256": "abc"})
    assert np.array_equal(_labels(out), a)
    info = read_labels_info(out)
    assert info == (shape, {"model_sha256": "abc"})
    labels = open_source(out)
    assert labels.pixel_size == pytest.approx(px) and labels.axes == axes
    after = sorted((f.relative_to(store), f.read_bytes()) for f in store.rglob("*") if f.is_file())
    assert after == before
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temp left behind


def test_channels_and_pyramid_levels_are_read_from_the_metadata(tmp_path):
    image = np.arange(2 * 5 * 40 * 48, dtype=np.uint16).reshape(2, 5, 40, 48)
    store = tmp_path / "c.zarr"
    write_image(store, image, "CZYX", (3.0, 0.4, 0.4), chunks=(1, 5, 16, 16), levels=2)
    src = open_source(store)
    assert (src.shape, src.axes, src.pixel_size) == ((2, 5, 40, 48), "CZYX", (3.0, 0.4, 0.4))
    region = (slice(1, 2), slice(2, 4), slice(5, 30), slice(0, 48))
    assert np.array_equal(src.read(region), image[region])
    coarse = open_source(store, level=1)
    assert coarse.shape == (2, 5, 20, 24) and coarse.pixel_size == pytest.approx((3.0, 0.8, 0.8))
    assert np.array_equal(coarse.read((slice(None),) * 4), image[:, :, ::2, ::2])


def test_a_time_axis_of_one_is_dropped(tmp_path):
    image = np.ones((1, 30, 31), np.uint8)
    store = tmp_path / "t.zarr"
    write_image(store, image, "TYX", (0.5, 0.5))
    src = open_source(store)
    assert src.shape == (30, 31) and src.axes == "YX" and src.read((slice(0, 2), slice(0, 3))).shape == (2, 3)


def _store_with_attrs(path: Path, attrs: dict, shape=(20, 20)) -> Path:
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", shape=shape, dtype="uint16")
    group.attrs.update(attrs)
    return path


def _multiscale(axes, scale, path="0"):
    return {
        "multiscales": [
            {
                "version": "0.4",
                "axes": axes,
                "datasets": [
                    {"path": path, "coordinateTransformations": [{"type": "scale", "scale": scale}]}
                ],
            }
        ]
    }


YX = [
    {"name": "y", "type": "space", "unit": "micrometer"},
    {"name": "x", "type": "space", "unit": "micrometer"},
]


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({}, r"not an OME-Zarr image \(no NGFF metadata"),
        ({"image-label": {}}, r"labels, not an image"),
        (_multiscale(YX, [1, 1], path="7"), r"level 0 \('7'\) is listed in the NGFF metadata but missing"),
        (_multiscale(YX[:1], [1]), r"NGFF axes \['y'\] do not match the array's 2 dimensions"),
        (
            _multiscale([{"name": "q", "type": "space"}, YX[1]], [1, 1]),
            r"axis 'q' is not one of t, c, z, y, x",
        ),
        (_multiscale(YX, [1, 1, 1]), r"scale \[1.0, 1.0, 1.0\] does not have 2 entries"),
    ],
)
def test_bad_stores_are_named_with_the_problem(attrs, message, tmp_path):
    store = _store_with_attrs(tmp_path / "bad.zarr", attrs)
    with pytest.raises(InputError, match=r"bad\.zarr: .*" + message):
        open_source(store)


def test_missing_level_and_time_series_are_refused(tmp_path):
    store = tmp_path / "img.zarr"
    write_image(store, np.zeros((3, 20, 20), np.uint8), "TYX", (1.0, 1.0))
    with pytest.raises(InputError, match=r"img\.zarr: the image has 3 time points"):
        open_source(store)
    write_image(store, np.zeros((20, 20), np.uint8), "YX", (1.0, 1.0), levels=2)
    with pytest.raises(InputError, match=r"img\.zarr: level 5 does not exist; the image has levels 0 to 1"):
        open_source(store, level=5)


def test_units_other_than_micrometres_are_converted_and_unknown_ones_dropped(tmp_path):
    axes = [dict(a, unit="nanometer") for a in YX]
    assert open_source(_store_with_attrs(tmp_path / "nm.zarr", _multiscale(axes, [250, 125]))).pixel_size == (
        pytest.approx((0.25, 0.125))
    )
    axes = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    assert (
        open_source(_store_with_attrs(tmp_path / "none.zarr", _multiscale(axes, [2, 2]))).pixel_size is None
    )


def test_labels_are_never_written_into_the_input_store(predictors, tmp_path):
    store = tmp_path / "in.zarr"
    write_image(store, blobs((40, 40), 2, seed=1)[0], "YX", (1.0, 1.0))
    with pytest.raises(InputError, match=r"in\.zarr: the output would be written inside the input"):
        predict_big(predictors[2], store, store / "labels" / "x.zarr", block=32)
    assert is_zarr(store) and not (store / "labels").exists()


def test_an_interrupted_zarr_write_leaves_the_old_labels_whole(predictors, tmp_path, monkeypatch):
    image, _ = blobs((40, 48), 3, seed=2)
    store = tmp_path / "in.zarr"
    write_image(store, image, "YX", (1.0, 1.0))
    out = tmp_path / "out.zarr"
    predict_big(predictors[2], store, out, block=32, provenance={"run": 1})
    old = _labels(out)
    import os

    real_replace = os.replace

    def killed_at_the_rename(src, dst, *args, **kwargs):  # the new store's move into place fails
        if Path(dst) == out and ".old." not in Path(src).name:
            raise KeyboardInterrupt
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", killed_at_the_rename)
    with pytest.raises(KeyboardInterrupt):
        predict_big(predictors[2], store, out, block=32, provenance={"run": 2})
    monkeypatch.undo()
    assert np.array_equal(_labels(out), old) and read_labels_info(out)[1] == {"run": 1}
    # only the finished blocks are left beside it, for a resume; the same command then completes it
    hidden = sorted(f.name for f in tmp_path.iterdir() if f.name.startswith("."))
    assert hidden == [".out.zarr.partial.json", ".out.zarr.partial.tif"]
    result = predict_big(predictors[2], store, out, block=32, provenance={"run": 2})
    assert "resumed an interrupted run; 4 of 4 steps were done" in " ".join(result.warnings)
    assert np.array_equal(_labels(out), old) and read_labels_info(out)[1] == {"run": 2}
    assert not [f.name for f in tmp_path.iterdir() if f.name.startswith(".")]


def test_a_killed_zarr_write_leaves_a_temp_folder_that_the_next_run_removes(tmp_path):
    from embedseg_deploy.predict import remove_stale_temps

    out = tmp_path / "out.zarr"
    stale = tmp_path / ".out.zarr.1a2b3c4d.tmp"
    (stale / "0").mkdir(parents=True)
    (stale / "0" / "c").write_bytes(b"half")
    keep = tmp_path / ".other.zarr.1a2b3c4d.tmp"
    keep.mkdir()
    remove_stale_temps(out)
    assert not stale.exists() and keep.exists()


def _cli(*args):
    from click.testing import CliRunner

    from embedseg_deploy.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_a_batch_of_tiff_and_ome_zarr_gives_the_same_labels_and_resumes(tmp_path):
    from ._runtime_models import toy_onnx

    model = toy_onnx(tmp_path / "toy.onnx", 2)
    image, _ = blobs((53, 67), 5, seed=4)
    folder = tmp_path / "in"
    folder.mkdir()
    write_tiff_atomic(folder / "a.tif", image, pixel_size=(0.5, 0.5))
    write_image(folder / "b.ome.zarr", image, "YX", (0.5, 0.5), chunks=(16, 16), version="0.4")
    _store_with_attrs(folder / "c.zarr", {})  # no NGFF metadata: reported, the others go on
    before = sorted((f.relative_to(folder), f.read_bytes()) for f in folder.rglob("*") if f.is_file())
    out = tmp_path / "out"
    for block in ([], ["--block", "24"]):  # whole image, then block mode
        result = _cli("predict", model, folder, "-o", out, "-q", "--overwrite", *block)
        assert result.exit_code == 1, result.output
        files = {Path(r["input"]).name: r for r in json.loads((out / "summary.json").read_text())["files"]}
        assert files["a.tif"]["status"] == files["b.ome.zarr"]["status"] == "ok"
        assert files["b.ome.zarr"]["output"] == str(out / "b.ome.zarr")
        assert files["c.zarr"]["status"] == "failed"
        assert re.search(r"c\.zarr: not an OME-Zarr image \(no NGFF metadata", files["c.zarr"]["error"])
        tiff_labels = tifffile.imread(out / "a.tif")
        assert tiff_labels.max() > 0 and np.array_equal(_labels(out / "b.ome.zarr"), tiff_labels)
        assert open_source(out / "b.ome.zarr").pixel_size == pytest.approx((0.5, 0.5))
    # the same command again: both finished outputs are skipped; other settings are refused, not redone
    _cli("predict", model, folder, "-o", out, "-q", "--block", "24")
    files = {Path(r["input"]).name: r for r in json.loads((out / "summary.json").read_text())["files"]}
    assert files["a.tif"]["status"] == files["b.ome.zarr"]["status"] == "skipped"
    result = _cli("predict", model, folder / "b.ome.zarr", "-o", out, "-q", "--seed-thresh", "0.7")
    files = json.loads((out / "summary.json").read_text())["files"]
    assert files[0]["status"] == "failed" and "made with other settings" in files[0]["error"]
    assert np.array_equal(_labels(out / "b.ome.zarr"), tiff_labels)
    after = sorted((f.relative_to(folder), f.read_bytes()) for f in folder.rglob("*") if f.is_file())
    assert after == before  # inputs untouched


def test_level_picks_the_pyramid_level_and_a_tiff_has_none(tmp_path):
    from ._runtime_models import toy_onnx

    model = toy_onnx(tmp_path / "toy.onnx", 2)
    image, _ = blobs((64, 80), 5, seed=5)
    write_image(tmp_path / "img.zarr", image, "YX", (0.5, 0.5), levels=2)
    write_tiff_atomic(tmp_path / "img2.tif", image)
    out = tmp_path / "out"
    result = _cli(
        "predict", model, tmp_path / "img.zarr", tmp_path / "img2.tif", "-o", out, "-q", "--level", "1"
    )
    files = {Path(r["input"]).name: r for r in json.loads((out / "summary.json").read_text())["files"]}
    assert result.exit_code == 1
    assert files["img.zarr"]["status"] == "ok" and files["img.zarr"]["shape"] == [32, 40]
    assert files["img.zarr"]["pixel_size"] == pytest.approx([1.0, 1.0])
    assert _labels(out / "img.ome.zarr").shape == (32, 40)
    assert "img2.tif: --level applies to OME-Zarr images" in files["img2.tif"]["error"]
