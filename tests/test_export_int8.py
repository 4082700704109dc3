"""int8 export (issue 10): a QDQ model calibrated on the user's images, the raw output kept fp32, checked
against the fp32 model on labels; refused when it fails; clear errors for bad calibration data."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("onnxruntime.quantization")

from embedseg_deploy.backends import create_backend
from embedseg_deploy.engine_cache import onnx_contract
from embedseg_deploy.io import write_tiff_atomic
from embedseg_deploy.metrics import matching
from embedseg_deploy.predict import Predictor
from embedseg_deploy.synthetic import make_image, write_dataset
from embedseg_exporters import int8
from embedseg_exporters.cli import main
from embedseg_exporters.verify import VerificationError

from .conftest import upstream_case


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("calib") / "data", n_train=3, n_val=1, n_test=0, seed=9)


def test_int8_export_round_trip(data, tmp_path):
    ckpt = upstream_case(2) / "checkpoint.pth"
    out = tmp_path / "int8.onnx"
    result = CliRunner().invoke(
        main, ["onnx", str(ckpt), "-o", str(out), "--precision", "int8", "--calibrate", str(data)]
    )
    assert result.exit_code == 0, result.output
    assert "onnx-int8 vs onnx-fp32: passed" in result.output and "pooled 4" in result.output
    contract = onnx_contract(out)
    facts = contract.provenance["export"]
    assert facts["precision"] == "int8"
    assert facts["int8"]["fp32_nodes"] == ["/decoders.0/output_conv/ConvTranspose", "/Concat"]
    assert facts["int8"]["calibration"]["tiles"] == int8.DEFAULT_TILES
    assert facts["int8"]["verification"]["passed"]
    backend = create_backend(out, "onnx-cpu")
    assert backend.precision == "int8"
    fp32 = tmp_path / "fp32.onnx"
    assert CliRunner().invoke(main, ["onnx", str(ckpt), "-o", str(fp32)]).exit_code == 0
    image, _ = make_image((301, 250), 40, np.random.default_rng(77))
    a = Predictor(fp32, "onnx-cpu").predict(image)
    b = Predictor(out, "onnx-cpu").predict(image)
    assert a.max() >= 20 and matching(a, b, 0.5).accuracy >= 0.95  # an image it was not calibrated on


def test_a_model_that_fails_the_label_check_is_not_written(data, tmp_path, monkeypatch):
    from embedseg_exporters.onnx_export import export_checkpoint

    monkeypatch.setattr(int8, "MIN_LABEL_AP", 1.01)  # no model can pass: the refusal path
    out = tmp_path / "int8.onnx"
    with pytest.raises(VerificationError, match=r"label AP@0.5 over the held-out tiles .* below 1\.01"):
        export_checkpoint(upstream_case(2) / "checkpoint.pth", out, precision="int8", calibrate=data)
    assert not out.exists()


def test_bad_calibration_input_is_refused_clearly(tmp_path):
    ckpt = str(upstream_case(2) / "checkpoint.pth")
    runner = CliRunner()
    result = runner.invoke(main, ["onnx", ckpt, "-o", str(tmp_path / "a.onnx"), "--precision", "int8"])
    assert result.exit_code == 1 and "int8 needs calibration images: --calibrate" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(
        main, ["onnx", ckpt, "-o", str(tmp_path / "b.onnx"), "--precision", "int8", "--calibrate", str(empty)]
    )
    assert result.exit_code == 1 and f"{empty}: no .tif images to calibrate on" in result.output
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    write_tiff_atomic(stacks / "s.tif", np.zeros((5, 64, 64), np.uint16))
    result = runner.invoke(
        main,
        ["onnx", ckpt, "-o", str(tmp_path / "c.onnx"), "--precision", "int8", "--calibrate", str(stacks)],
    )
    assert result.exit_code == 1 and str(stacks / "s.tif") in result.output
    assert not any(tmp_path.glob("*.onnx"))
