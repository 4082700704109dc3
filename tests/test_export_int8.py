"""int8 export (issue 10): a QDQ model calibrated on the user's images, the raw output kept fp32, checked
against the fp32 model on labels; refused when it fails; clear errors for bad calibration data."""

from __future__ import annotations

import json

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
from embedseg_exporters import int8, verify
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
    assert "onnx-int8 vs onnx-fp32: passed" in result.output
    assert "pooled val/test images (1); labels" in result.output  # judged on data/val, not calibrated on
    contract = onnx_contract(out)
    facts = contract.provenance["export"]
    assert facts["precision"] == "int8"
    record = facts["int8"]
    assert record["calibration"]["tiles"] == 3  # 3 train images no larger than a tile: each once
    assert record["verification"]["passed"]
    # the mixed-precision record: the output node, then the fewest of the most sensitive blocks
    search = record["search"]
    ranked = [block for block, _ in search["sensitivity"]]
    kept = search["fp32_blocks"]
    assert record["fp32_nodes"][0] == "/Concat" and kept and kept[0] == ranked[0]
    assert [b for b in ranked if b in kept] == kept
    assert all(any(n.startswith(b + "/") for n in record["fp32_nodes"]) for b in kept)
    scores = [score for _, score in search["sensitivity"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    steps = search["steps"]
    assert not steps[0]["passed"] and steps[0]["fp32_blocks"] == 0  # all in int8 failed
    for block in kept[1:]:  # locally fewest: each other kept block, put back in int8, failed
        assert any(s.get("without") == block and not s["passed"] for s in steps)
    backend = create_backend(out, "onnx-cpu")
    assert backend.precision == "int8"
    shown = CliRunner().invoke(main, ["info", str(out)]).output
    assert "int8: cpu (uint8 per tensor, with zero points); calibrated on 3 tiles" in shown
    assert f"fp32 blocks: {', '.join(kept) or 'none'} (and the output node)" in shown
    fp32 = tmp_path / "fp32.onnx"
    assert CliRunner().invoke(main, ["onnx", str(ckpt), "-o", str(fp32)]).exit_code == 0
    tp = fp = fn = 0
    for seed in (77, 78, 79):  # images it was not calibrated on, pooled as the exporter pools them
        image, _ = make_image((301, 250), 40, np.random.default_rng(seed))
        a = Predictor(fp32, "onnx-cpu").predict(image)
        m = matching(a, Predictor(out, "onnx-cpu").predict(image), 0.5)
        assert a.max() >= 20 and m.accuracy >= 0.9
        tp, fp, fn = tp + m.tp, fp + m.fp, fn + m.fn
    assert tp / (tp + fp + fn) >= 0.95
    # embedseg-run bench times them side by side and compares the int8 labels with fp32's
    from embedseg_deploy.cli import main as run_main

    report = tmp_path / "bench.json"
    args = ["bench", str(fp32), "--also", str(out), "--backends", "onnx-cpu", "--quick", "-q", "--no-plot"]
    result = CliRunner().invoke(run_main, [*args, "-o", str(report)])
    assert result.exit_code == 0, result.output
    agreement = json.loads(report.read_text())["agreement"]
    assert [a["backend"] for a in agreement] == ["onnx-cpu-int8"]
    assert 0.0 < agreement[0]["ap50_90"] <= agreement[0]["ap50"] <= 1.0
    assert "AP@0.5:0.9" in report.with_suffix(".md").read_text()


def test_a_model_that_fails_the_label_check_is_not_written(data, tmp_path, monkeypatch):
    from embedseg_exporters.onnx_export import export_checkpoint

    ckpt, out = upstream_case(2) / "checkpoint.pth", tmp_path / "int8.onnx"
    monkeypatch.setattr(int8, "DEFAULT_TILES", 4)
    monkeypatch.setattr(verify, "FEW_OBJECTS", 0)  # no one-object grace on the small test images
    monkeypatch.setattr(int8, "MIN_LABEL_AP", 1.01)  # the held-out verdict refuses
    with pytest.raises(VerificationError, match=r"label AP@0.5 over the val/test images .* below 1\.01") as e:
        export_checkpoint(ckpt, out, precision="int8", calibrate=data)
    assert "most sensitive blocks" in str(e.value) and "relax the limits" not in str(e.value)
    assert not out.exists()
    monkeypatch.setattr(int8, "SEARCH_MIN_AP", 1.01)  # no mix of fp32 blocks passes the search
    with pytest.raises(VerificationError, match=r"even with \d+ blocks in fp32") as e:
        export_checkpoint(ckpt, out, precision="int8", calibrate=data)
    assert "most sensitive blocks" in str(e.value) and "/decoders." in str(e.value)
    assert not out.exists()


def test_int8_calibrates_on_the_training_data_the_checkpoint_records(data, tmp_path, monkeypatch):
    from embedseg_exporters.onnx_export import ExportError, export_onnx
    from embedseg_training.checkpoint import load_model

    monkeypatch.setattr(int8, "DEFAULT_TILES", 4)
    model, contract = load_model(upstream_case(2) / "checkpoint.pth")
    contract.provenance["config"] = {"data_dir": str(data)}
    exported = export_onnx(model, contract, precision="int8")
    assert exported.contract.provenance["export"]["int8"]["calibration"]["folder"] == str(data)
    assert any(c.name == "pooled val/test images" for c in exported.report.cases)
    contract.provenance["config"] = {"data_dir": str(tmp_path / "gone")}
    with pytest.raises(ExportError, match=r"trained on .*gone, which is not on this machine"):
        export_onnx(model, contract, precision="int8")


def test_fp16_labels_are_judged_on_the_users_images(data, tmp_path):
    ckpt = str(upstream_case(2) / "checkpoint.pth")
    out = tmp_path / "fp16.onnx"
    args = ["onnx", ckpt, "-o", str(out), "--precision", "fp16", "--verify-input", str(data)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "img000.tif 1x1x256x256" in result.output
    assert "pooled verification images (1); labels" in result.output
    verification = onnx_contract(out).provenance["export"]["verification"]
    assert verification["images"]["pooled verification images"]["ap50"] >= 0.99
    assert verification["statistic"] == "mean" and "img000.tif 1x1x256x256: mean offset_px" in result.output
    # no images like the user's (an upstream checkpoint records no training data): every pixel judged
    alone = CliRunner().invoke(main, ["onnx", ckpt, "-o", str(tmp_path / "a.onnx"), "--precision", "fp16"])
    assert alone.exit_code == 0, alone.output
    assert onnx_contract(tmp_path / "a.onnx").provenance["export"]["verification"]["statistic"] == "max"
    assert "so raw errors per pixel" in " ".join(alone.output.split())
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["onnx", ckpt, "-o", str(tmp_path / "b.onnx"), "--precision", "fp16", "--verify-input", str(empty)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and f"{empty}: no .tif images to verify on" in result.output


def test_bad_calibration_input_is_refused_clearly(tmp_path):
    ckpt = str(upstream_case(2) / "checkpoint.pth")
    runner = CliRunner()
    result = runner.invoke(main, ["onnx", ckpt, "-o", str(tmp_path / "a.onnx"), "--precision", "int8"])
    assert result.exit_code == 1 and "int8 needs calibration images: --calibrate" in result.output
    assert "the checkpoint records no training data" in result.output
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


def _int8_copy(path, tmp_path, target):
    """An fp32 model file relabelled as an int8 export for ``target``: resolve_precision reads only the
    contract."""
    import onnx

    from embedseg_deploy.engine_cache import onnx_contract as read_contract
    from embedseg_exporters.onnx_export import set_contract

    model, contract = onnx.load(str(path)), read_contract(path)
    contract.provenance["export"].update(precision="int8", int8={"target": target})
    set_contract(model, contract)
    out = tmp_path / f"int8-{target}.onnx"
    out.write_bytes(model.SerializeToString())
    return out, read_contract(out)


def test_tensorrt_int8_needs_a_symmetric_int8_model(tmp_path):
    from embedseg_deploy.engine_cache import EngineError, resolve_precision

    from ._export_models import exported

    fp32, result = exported("ours-2d")
    with pytest.raises(EngineError, match=r"int8 engines are built from an int8 ONNX model.*--int8-target"):
        resolve_precision(fp32, result.contract, "int8")
    cpu, contract = _int8_copy(fp32, tmp_path, "cpu")
    with pytest.raises(EngineError, match=r"quantized for the CPU .* --int8-target tensorrt"):
        resolve_precision(cpu, contract, None)
    gpu, contract = _int8_copy(fp32, tmp_path, "tensorrt")
    assert resolve_precision(gpu, contract, None) == resolve_precision(gpu, contract, "int8") == "int8"
    with pytest.raises(EngineError, match="is an int8 model: its engine is int8"):
        resolve_precision(gpu, contract, "fp32")


def test_int8_for_tensorrt_has_symmetric_activations(data, tmp_path, monkeypatch):
    import onnx
    from onnx import numpy_helper

    from embedseg_exporters.onnx_export import export_checkpoint

    monkeypatch.setattr(int8, "DEFAULT_TILES", 4)
    out = tmp_path / "trt-int8.onnx"
    ckpt = upstream_case(2) / "checkpoint.pth"
    export_checkpoint(ckpt, out, precision="int8", calibrate=data, int8_target="tensorrt")
    model = onnx.load(str(out))
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    zero_points = [constants[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(zero_points) > 50
    assert all(z.dtype == np.int8 and not z.any() for z in zero_points)  # TensorRT's scheme: zero point 0
    facts = onnx_contract(out).provenance["export"]["int8"]
    assert facts["target"] == "tensorrt" and facts["activations"] == int8.TARGETS["tensorrt"]
    assert create_backend(out, "onnx-cpu").precision == "int8"  # ONNX Runtime CPU runs it too


@pytest.mark.parametrize(("n_objects", "removed", "passed"), [(40, 1, True), (40, 2, False), (140, 2, False)])
def test_pooled_label_verdict_allows_one_object_only_below_100(n_objects, removed, passed):
    from embedseg_deploy.cluster import cluster
    from embedseg_deploy.contract import Contract
    from embedseg_deploy.synthetic import ideal_output
    from embedseg_exporters.verify import labels_of, pooled_label_case

    side = 160 if n_objects < 100 else 320
    raw, truth = ideal_output((side, side), n_objects, 6.0, rng=3)
    contract = Contract(ndim=2, spacing=[1 / 1023, 1 / 1023])
    test = raw.copy()
    for k in range(1, removed + 1):
        test[-1][truth == k] = -20.0  # no seediness: the object is gone
    x = {"tile": np.zeros((1, 1, side, side), np.float32)}
    case = pooled_label_case(lambda _: test[None], lambda _: raw[None], contract, x, 0.99, "tiles")
    n = len(np.unique(labels_of(raw, contract, cluster))) - 1
    assert case.labels["n_ref"] == n and case.labels["n_test"] == n - removed
    assert (not case.problems) == passed
    assert case.labels["one_object_grace"] == (passed and removed == 1)


@pytest.mark.parametrize(("removed", "passed"), [(1, True), (2, False)])
def test_per_tile_collapse_check_allows_one_object(removed, passed):
    from embedseg_deploy.contract import Contract
    from embedseg_deploy.synthetic import ideal_output
    from embedseg_exporters.verify import compare

    raw, truth = ideal_output((64, 64), 8, 6.0, rng=5)
    test = raw.copy()
    for k in range(1, removed + 1):
        test[-1][truth == k] = -20.0
    contract = Contract(ndim=2, spacing=[1 / 1023, 1 / 1023])
    x = {"tile": np.zeros((1, 1, 64, 64), np.float32)}
    tolerance = int8.TOLERANCE
    report = compare(lambda _: test[None], lambda _: raw[None], contract, x, tolerance, label_cases=("tile",))
    labels = report.cases[0].labels
    assert labels["ap50"] < int8.TOLERANCE.min_label_ap  # 7/8 or 6/8 objects: below 0.9 either way
    label_problems = [p for p in report.cases[0].problems if "label" in p]
    assert (not label_problems) == passed


def test_failure_hint_suggests_a_coarser_spacing_only_for_fine_ones():
    from embedseg_deploy.contract import Contract

    result = int8.Search(["/Concat"], sensitivity=[("/decoders.0/output_conv", 2.0)])
    fine = int8.failure_hint(result, Contract(ndim=2, spacing=[1 / 1023, 1 / 1023]))
    assert "/decoders.0/output_conv (2)" in fine and "1/1023 per pixel" in fine and "--spacing 0.0039" in fine
    coarse = int8.failure_hint(result, Contract(ndim=2, spacing=[1 / 255, 1 / 255]))
    assert "--calibration-tiles" in coarse and "spacing" not in coarse
