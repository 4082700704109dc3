"""embedseg-export: the commands, and a clear message + non-zero exit for every kind of bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from embedseg_deploy import engine_cache as ec
from embedseg_exporters import info as info_module
from embedseg_exporters.cli import main

from ._export_models import exported, our_checkpoint
from .conftest import UPSTREAM

ENV = {"tensorrt_version": "10.13.3.9", "gpu_name": "NVIDIA H100", "compute_capability": "9.0"}


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def fails(result, *fragments: str) -> None:
    """Exit status 1 with a one-line 'Error: ...' naming every fragment, no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "Error: " in result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


def test_onnx_export_report_force_and_info(tmp_path):
    ckpt, out, report = our_checkpoint(2), tmp_path / "m.onnx", tmp_path / "verify.json"
    result = run("onnx", ckpt, "-o", out, "--report", report, "--threads", "1")
    assert result.exit_code == 0, result.output
    assert (
        "verification: onnx-fp32 vs torch-fp32: passed" in result.output and f"wrote {out}" in result.output
    )
    assert json.loads(report.read_text())["passed"] is True
    stamp = out.stat().st_mtime_ns
    fails(run("onnx", ckpt, "-o", out, "--no-verify", "--threads", "1"), "exists", "--force")
    assert out.stat().st_mtime_ns == stamp
    again = run("onnx", ckpt, "-o", out, "--no-verify", "--force", "--threads", "1")
    assert again.exit_code == 0 and "verification" not in again.output and out.stat().st_mtime_ns != stamp
    shown = run("info", out)
    assert shown.exit_code == 0 and "onnx" in shown.output and "BranchedERFNet 2D" in shown.output
    doc = json.loads(run("info", out, "--json").output)
    assert (
        doc["kind"] == "onnx" and doc["contract"]["ndim"] == 2 and doc["details"]["opset"] == {"ai.onnx": 17}
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_report_in_a_missing_folder_fails_before_the_export(tmp_path):
    out, report = tmp_path / "m.onnx", tmp_path / "no" / "verify.json"
    fails(
        run("onnx", our_checkpoint(2), "-o", out, "--report", report, "--threads", "1"),
        "no",
        "does not exist",
    )
    assert not out.exists()


def test_info_on_checkpoints():
    ours = run("info", our_checkpoint(3))
    assert ours.exit_code == 0 and "checkpoint" in ours.output and "BranchedERFNet_3d 3D" in ours.output
    upstream = UPSTREAM / "2d" / "checkpoint.pth"
    if not upstream.exists():
        pytest.skip("upstream fixtures absent")
    doc = json.loads(run("info", upstream, "--json").output)
    assert doc["details"]["layout"] == "upstream" and doc["contract"]["spacing"] == [1 / 255, 1 / 255]


def test_wrong_kind_of_file(tmp_path):
    onnx_path, _ = exported("ours-2d")
    fails(run("onnx", onnx_path, "-o", tmp_path / "x.onnx"), "is an onnx", "needs a checkpoint")
    fails(run("trt", our_checkpoint(2), "-o", tmp_path / "x.engine"), "is a checkpoint", "needs an onnx")
    tif = UPSTREAM / "2d" / "image.tif"
    if tif.exists():
        fails(run("info", tif), "TIFF image")
    fails(run("info", tmp_path / "missing.onnx"), "no such file")
    fails(run("info", tmp_path), "is a folder")
    (tmp_path / "notes.txt").write_text("hello")
    fails(run("info", tmp_path / "notes.txt"), "not a model file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_unknown_checkpoint_layout_and_missing_upstream_json(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "odd.pth")
    fails(run("onnx", tmp_path / "odd.pth", "-o", tmp_path / "odd.onnx"), "unknown checkpoint layout")
    upstream = UPSTREAM / "2d" / "checkpoint.pth"
    if upstream.exists():
        os.symlink(upstream, tmp_path / "best_iou_model.pth")
        result = run("onnx", tmp_path / "best_iou_model.pth", "-o", tmp_path / "u.onnx")
        fails(result, "data_properties.json", "--upstream-json DIR", "embedseg-train import-upstream")
        assert "upstream_json_dir" not in result.output  # the option, not the Python argument
    assert not list(tmp_path.glob("*.onnx"))


def test_upstream_export_prints_the_defaults_it_takes(tmp_path):
    case = UPSTREAM / "2d"
    if not (case / "checkpoint.pth").exists():
        pytest.skip("upstream fixtures absent")
    for name in ("checkpoint.pth", "data_properties.json", "normalization.json"):  # no test_config.json
        os.symlink(case / name, tmp_path / name)
    out = tmp_path / "u.onnx"
    result = run("onnx", tmp_path / "checkpoint.pth", "-o", out, "--no-verify", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert "note: seed_thresh 0.9, fg_thresh 0.5: upstream's defaults taken" in result.output
    shown = run("info", tmp_path / "checkpoint.pth")
    assert shown.exit_code == 0 and "note: seed_thresh 0.9" in shown.output


def test_onnx_help_shows_the_fp32_and_fp16_verification_limits():
    text = " ".join(run("onnx", "--help").output.split())
    assert "fp32: 0.01,0.001,0.001 per pixel, labels identical" in text
    assert "fp16 on images like yours: 0.1,0.05,0.005 as means, labels pooled AP@0.5 >= 0.99" in text
    assert "fp16 on tiles alone: 0.1,0.1,0.02 per pixel" in text


def test_corrupted_onnx(tmp_path):
    onnx_path, _ = exported("ours-2d")
    data = onnx_path.read_bytes()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(data[: len(data) // 2])
    fails(run("info", broken), "broken.onnx", "not a valid ONNX model")
    fails(run("trt", broken, "-o", tmp_path / "m.engine"), "not a valid ONNX model")
    assert not (tmp_path / "m.engine").exists()


def test_tile_not_a_multiple_of_8(tmp_path):
    onnx_path, _ = exported("ours-2d")
    fails(run("trt", onnx_path, "-o", tmp_path / "m.engine", "--tile", "100x100"), "100x100", "multiple of 8")
    fails(run("trt", onnx_path, "-o", tmp_path / "m.engine", "--tile", "64x64x64"), "2D model")
    assert not list(tmp_path.iterdir())


def test_engine_from_another_tensorrt_or_gpu(tmp_path, monkeypatch):
    _, result = exported("ours-2d")
    facts = {"tensorrt_version": "10.12.0.36", "gpu_name": "RTX 3090", "compute_capability": "8.6"}
    engine = tmp_path / "m.engine"
    ec.write_engine(engine, b"opaque", ec.make_sidecar(result.contract, {**facts, "precision": "fp32"}))
    monkeypatch.setattr(info_module, "local_environment", lambda device_id=0: dict(ENV))
    fails(run("info", engine), "TensorRT 10.12.0.36", "RTX 3090", "rebuild")
    monkeypatch.setattr(info_module, "local_environment", lambda device_id=0: dict(facts))
    ok = run("info", engine)
    assert ok.exit_code == 0 and "RTX 3090" in ok.output
    fails(run("info", tmp_path / "m.engine.json"), "sidecar", "pass the engine")
    (tmp_path / "m.engine.json").unlink()
    fails(run("info", engine), "no sidecar")


def test_trt_without_tensorrt_says_how_to_get_it(tmp_path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed")
    onnx_path, _ = exported("ours-2d")
    fails(run("trt", onnx_path, "-o", tmp_path / "m.engine", "--tile", "64x64"), "TensorRT is not installed")
    assert not list(tmp_path.iterdir())


def test_bad_option_values():
    result = run(
        "onnx", our_checkpoint(2), "-o", "x.onnx", "--precision", "fp16", "--keep-fp32", "heads,tail"
    )
    assert result.exit_code == 2 and "tail" in result.output


def test_tolerance_option_sets_the_verification_limits(tmp_path):
    ckpt, out = our_checkpoint(2), tmp_path / "m.onnx"
    strict = run("onnx", ckpt, "-o", out, "--tolerance", "1e-12,1e-12,1e-12", "--threads", "1")
    fails(strict, "--tolerance PX,REL,ABS")  # rounding noise exceeds 1e-12: refused, with the way out
    assert not out.exists()
    loose = run("onnx", ckpt, "-o", out, "--tolerance", "1e-2,1e-3,1e-3", "--threads", "1")
    assert loose.exit_code == 0, loose.output
    usage = run("onnx", ckpt, "-o", out, "--tolerance", "1e-3,1e-3", "--force")
    assert usage.exit_code == 2 and "three numbers" in usage.output
