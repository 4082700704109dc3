"""`embedseg-run`: predict (files, folders, globs, options, resume), evaluate, info, demo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from embedseg_deploy import demo as demo_module
from embedseg_deploy.cli import main
from embedseg_deploy.io import read_tiff, write_tiff_atomic

from ._runtime_models import blobs, toy_model


@pytest.fixture(scope="module")
def toy2d(tmp_path_factory) -> Path:
    return toy_model(tmp_path_factory, 2)


@pytest.fixture
def images(tmp_path) -> tuple[Path, list[np.ndarray]]:
    folder = tmp_path / "images"
    folder.mkdir()
    truths = []
    for i in range(3):
        image, truth = blobs((72, 90), 5, seed=10 + i)
        write_tiff_atomic(folder / f"cell_{i}.tif", image, pixel_size=(0.4, 0.4))
        truths.append(truth)
    return folder, truths


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_predict_folder_and_glob_with_summary(toy2d, images, tmp_path):
    folder, truths = images
    out = tmp_path / "out"
    result = invoke(
        "predict", toy2d, folder, str(folder / "cell_*.tif"), "-o", out, "--threads", "1", "--save-seeds"
    )
    assert result.exit_code == 0, result.output
    assert "backend onnx-cpu on cpu (fp32) [auto]" in result.output
    assert "3 segmented, 0 skipped (done before), 0 failed" in result.output
    for i, truth in enumerate(truths):
        labels = read_tiff(out / f"cell_{i}.tif")
        assert labels.data.dtype == np.uint16 and labels.data.max() == truth.max()
        np.testing.assert_allclose(labels.pixel_size, (0.4, 0.4), rtol=1e-6)
        assert tifffile.imread(out / "seeds" / f"cell_{i}.tif").dtype == np.float32
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objects"] == sum(int(t.max()) for t in truths)
    assert (
        summary["predictor"]["backend"] == "onnx-cpu" and summary["predictor"]["auto"]["chosen"] == "onnx-cpu"
    )
    assert {"embedseg_deploy", "numpy", "onnxruntime", "tifffile"} <= set(summary["versions"])
    assert {"read", "normalize", "network", "cluster", "write", "total"} <= set(summary["timings"])
    assert [f["status"] for f in summary["files"]] == ["ok"] * 3


def test_rerun_skips_finished_outputs_and_redoes_broken_ones(toy2d, images, tmp_path):
    folder, _ = images
    out = tmp_path / "out"
    assert invoke("predict", toy2d, folder, "-o", out, "-q").exit_code == 0
    first = (out / "cell_0.tif").read_bytes()
    (out / "cell_1.tif").write_bytes((out / "cell_1.tif").read_bytes()[:200])  # a damaged output
    tifffile.imwrite(out / "cell_2.tif", np.zeros((5, 5), np.uint16))  # an output of the wrong shape
    result = invoke("predict", toy2d, folder, "-o", out, "-q")
    assert result.exit_code == 0 and "2 segmented, 1 skipped" in result.output
    assert (out / "cell_0.tif").read_bytes() == first
    assert tifffile.imread(out / "cell_2.tif").shape == (72, 90)
    result = invoke("predict", toy2d, folder, "-o", out, "-q", "--overwrite")
    assert "3 segmented, 0 skipped" in result.output


def test_options_reach_the_predictor(toy2d, images, tmp_path):
    folder, _ = images
    result = invoke(
        "predict", toy2d, folder / "cell_0.tif", "-o", tmp_path / "o", "--tile", "32,48", "--halo", "8",
        "--batch-size", "2", "--tta", "--min-object-size", "100000", "--backend", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    p = summary["predictor"]
    assert p["tile"] == [32, 48] and p["halo"] == [8, 8] and p["batch_size"] == 2 and p["tta"] is True
    assert p["thresholds"]["min_object_size"] == 100000 and summary["objects"] == 0
    whole = invoke("predict", toy2d, folder / "cell_0.tif", "-o", tmp_path / "w", "--tile", "0", "-q")
    assert whole.exit_code == 0
    assert json.loads((tmp_path / "w" / "summary.json").read_text())["predictor"]["tile"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tile", "abc"], "Invalid value for --tile: 'abc'"),
        (["--tile", "24", "--halo", "16"], "must be larger than twice the halo"),
        (["--backend", "openvino"], "Invalid value for '--backend'"),
        (["--backend", "onnx-cuda"], "onnx-cuda"),
    ],
)
def test_bad_options_exit_2(args, message, toy2d, images, tmp_path):
    folder, _ = images
    result = invoke("predict", toy2d, folder, "-o", tmp_path / "o", *args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_block_mode_from_the_cli(toy2d, images, tmp_path):
    folder, truths = images
    result = invoke(
        "predict", toy2d, folder, "-o", tmp_path / "o", "--block", "32", "--block-halo", "16", "-q"
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert all(f["mode"].startswith("blocks (") for f in summary["files"]) and len(summary["files"]) == 3
    for i, truth in enumerate(truths):
        assert tifffile.imread(tmp_path / "o" / f"cell_{i}.tif").max() == truth.max()


def test_info_shows_the_contract(toy2d):
    result = invoke("info", toy2d)
    assert result.exit_code == 0
    out = result.output
    assert "network     BranchedERFNet 2D, 1 input channel(s), outputs offset_x, offset_y, sigma_x" in out
    assert "embedding units per pixel (y, x): an embedding unit spans 1023 x 1023 pixels" in out
    assert "pixel size  not recorded" in out
    assert "None" not in out and "{" not in out and "Thresholds(" not in out
    doc = json.loads(invoke("info", toy2d, "--json").output)
    assert doc["contract"]["ndim"] == 2 and doc["backend"]["backend"] == "onnx-cpu"


def test_evaluate_wraps_the_evaluation(toy2d, images, tmp_path):
    folder, truths = images
    gt = tmp_path / "gt"
    gt.mkdir()
    for i, truth in enumerate(truths):
        tifffile.imwrite(gt / f"cell_{i}.tif", truth.astype(np.uint16))
    invoke("predict", toy2d, folder, "-o", tmp_path / "pred", "-q")
    result = invoke("evaluate", tmp_path / "pred", gt, "-o", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "eval" / "evaluation.csv").is_file() and (
        tmp_path / "eval" / "evaluation.json"
    ).is_file()
    assert "0.5" in result.output
    missing = invoke("evaluate", tmp_path / "nothere", gt)
    assert missing.exit_code == 2 and "nothere" in missing.output


def test_demo_runs_offline_with_a_given_model(toy2d, tmp_path):
    result = invoke("demo", "--model", toy2d, "-o", tmp_path / "demo")
    assert result.exit_code == 0, result.output
    assert "AP@0.5" in result.output and "objects" in result.output and "timings" in result.output
    png = (tmp_path / "demo" / "demo_overlay.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    labels = tifffile.imread(tmp_path / "demo" / "demo_labels.tif")
    truth = tifffile.imread(tmp_path / "demo" / "demo_truth.tif")
    assert labels.shape == truth.shape == (256, 256) and labels.max() > 0
    plt = pytest.importorskip("matplotlib.image")
    assert plt.imread(tmp_path / "demo" / "demo_overlay.png").shape == (256, 256, 3)


def test_demo_without_the_bundled_model_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_module, "DEFAULT_MODEL", tmp_path / "models" / "demo2d.onnx")
    result = invoke("demo", "-o", tmp_path / "demo")
    assert result.exit_code == 2
    assert "demo model is not bundled" in result.output and "--model" in result.output


def test_bundled_demo_model_when_present(tmp_path):
    if not demo_module.DEFAULT_MODEL.is_file():
        pytest.skip("models/demo2d.onnx is not in the package yet (trained later by the lead)")
    result = invoke("demo", "-o", tmp_path / "demo")
    assert result.exit_code == 0, result.output
