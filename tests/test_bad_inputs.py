"""The bad-input corpus (tests/bad_inputs/): every case gets a clear message naming the file, a batch goes on
past bad files, exit codes say what happened, and no input is ever changed."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from embedseg_deploy.cli import main

from ._runtime_models import toy_contract, toy_onnx

HERE = Path(__file__).resolve().parent / "bad_inputs"


def _corpus_module():
    spec = importlib.util.spec_from_file_location("make_corpus", HERE / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CORPUS = _corpus_module()
IMAGES = {name: case for name, case in CORPUS.CASES.items() if case[1] in ("ok", "fail")}
MODELS = {name: case for name, case in CORPUS.CASES.items() if case[1] == "model"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The committed corpus, or a fresh one when it is missing (e.g. a sparse checkout)."""
    folder = HERE / "corpus"
    if all((folder / name).exists() for name in CORPUS.CASES):
        return folder
    return CORPUS.make(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A 2D one-channel toy model trained (so its contract says) on 1 µm pixels."""
    path = tmp_path_factory.mktemp("model") / "toy.onnx"
    return toy_onnx(path, 2, contract=toy_contract(2, pixel_size=[1.0, 1.0]))


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _run(*args: str):
    return CliRunner().invoke(
        main, ["predict", *map(str, args), "--threads", "1", "-q"], catch_exceptions=False
    )


def test_the_corpus_is_big_enough_and_small():
    assert len(CORPUS.CASES) >= 25
    total = sum(p.stat().st_size for p in (HERE / "corpus").rglob("*") if p.is_file())
    assert total < 1_000_000


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_each_bad_image_alone(name, corpus, model, tmp_path):
    what, expect, pattern = IMAGES[name]
    before = _hashes(corpus)
    result = _run(model, corpus / name, "-o", tmp_path)
    assert _hashes(corpus) == before, "an input file was modified"
    out = tmp_path / (re.sub(r"(\.ome)?\.tiff?$", "", name) + ".tif")
    summary = json.loads((tmp_path / "summary.json").read_text())
    (record,) = summary["files"]
    if expect == "fail":
        assert result.exit_code == 1, (what, result.output)
        assert re.search(pattern, result.output), (what, result.output)
        assert record["status"] == "failed" and re.search(pattern, record["error"])
        assert not out.exists()
    else:
        assert result.exit_code == 0, (what, result.output)
        assert record["status"] == "ok"
        labels = tifffile.imread(out)
        assert labels.dtype == np.uint16 and list(labels.shape) == record["shape"]
        if pattern:
            assert any(re.search(pattern, w) for w in record["warnings"]), record
            assert "WARNING" in result.output
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_a_batch_goes_on_past_bad_files(corpus, model, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    for i in range(2):
        tifffile.imwrite(good / f"good{i}.tif", tifffile.imread(corpus / "uint8.tif"))
    inputs = [corpus / n for n in sorted(IMAGES)] + [good, corpus / "folder_named.tif"]
    inputs += [tmp_path / "missing.tif", str(tmp_path / "nomatch_*.tif")]
    before = _hashes(corpus)
    result = _run(model, *inputs, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert _hashes(corpus) == before
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    n_fail = sum(case[1] == "fail" for case in IMAGES.values()) + 3
    assert summary["counts"] == {
        "ok": len(IMAGES) - n_fail + 3 + 2,
        "skipped": 0,
        "failed": n_fail,
        "not run": 0,
    }
    for name in ("good0.tif", "good1.tif", "uint8.tif", "one_pixel.tif"):
        assert (tmp_path / "out" / name).is_file()
    for text in ("folder_named.tif: folder holds no .tif/.tiff files", "missing.tif: file not found",
                 "nomatch_*.tif: pattern matches no file", "nan.tif: image has 1 NaN"):  # fmt: skip
        assert text in result.output


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_bad_model_stops_before_any_image(name, corpus, tmp_path):
    what, _, pattern = MODELS[name]
    image = tmp_path / "in.tif"
    tifffile.imwrite(image, tifffile.imread(corpus / "uint8.tif"))
    before = _hashes(corpus)
    result = _run(corpus / name, image, "-o", tmp_path / "out", "--backend", "auto")
    assert result.exit_code == 2, (what, result.output)
    assert result.output.startswith("Error: ") and re.search(pattern, result.output), result.output
    assert _hashes(corpus) == before
    assert not (tmp_path / "out" / "in.tif").exists()


def test_engine_for_another_gpu_says_so(corpus, tmp_path, monkeypatch):
    from embedseg_deploy.backends import tensorrt_backend

    here = {
        "tensorrt_version": "10.13.0.35",
        "gpu_name": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
    }
    monkeypatch.setattr(tensorrt_backend, "local_environment", lambda device_id=0: here)
    result = _run(corpus / "engine_other_gpu.engine", corpus / "uint8.tif", "-o", tmp_path)
    assert result.exit_code == 2
    assert (
        "engine_other_gpu.engine: this engine cannot run here: built for Tesla T4 (compute capability 7.5)"
        in (result.output)
    )
    assert "rebuild it on this PC" in result.output


def test_missing_model_and_model_folder(corpus, tmp_path):
    for model in (tmp_path / "nothere.onnx", corpus / "folder_named.tif"):
        result = _run(model, corpus / "uint8.tif", "-o", tmp_path / "out")
        assert result.exit_code == 2 and str(model) in result.output


def test_output_equal_to_input_is_refused(corpus, model, tmp_path):
    src = tmp_path / "img.tif"
    tifffile.imwrite(src, tifffile.imread(corpus / "uint8.tif"))
    before = src.read_bytes()
    result = _run(model, src, "-o", tmp_path)
    assert result.exit_code == 2  # refused up front, before the model loads
    assert "the output folder holds input images" in result.output and "img.tif" in result.output
    assert src.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["img.tif"]
    for given in ([tmp_path], [str(tmp_path / "*.tif")]):  # the folder itself, or a pattern inside it
        result = _run(model, *given, "-o", tmp_path)
        assert result.exit_code == 2 and "the output folder holds input images" in result.output


def test_unwritable_output_folder(corpus, model, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = _run(model, corpus / "uint8.tif", "-o", blocker / "out")
    assert result.exit_code == 2
    assert "a_file/out: output folder cannot be created or written" in result.output
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        result = _run(model, corpus / "uint8.tif", "-o", locked)
        assert result.exit_code == 2 and "cannot be created or written" in result.output


def test_disk_full_stops_the_run_keeps_the_finished_files_and_resumes(corpus, model, tmp_path, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        tifffile.imwrite(src / f"img{i}.tif", tifffile.imread(corpus / "uint8.tif"))
    real_imwrite = tifffile.imwrite
    calls = {"n": 0}

    def full_disk(file, data=None, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second output hits a full disk half-way, as numpy reports it
            file.write(b"II*\x00partial")
            raise OSError("16384 requested and 10072 written")
        return real_imwrite(file, data, *args, **kwargs)

    monkeypatch.setattr(tifffile, "imwrite", full_disk)
    out = tmp_path / "out"
    result = _run(model, src, "-o", out)
    assert result.exit_code == 1
    assert f"img1.tif: cannot write output: no space left on {out} (writing img1.tif)" in result.output
    assert "stopped:" in result.output and "1 file(s) not run" in result.output
    assert "run the same command to resume" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["img0.tif", "summary.json"]  # no partial/temp file
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"ok": 1, "skipped": 0, "failed": 1, "not run": 1} and summary["stopped"]
    monkeypatch.setattr(tifffile, "imwrite", real_imwrite)
    result = _run(model, src, "-o", out)
    assert result.exit_code == 0 and "2 segmented, 1 skipped" in result.output
    assert tifffile.imread(out / "img1.tif").shape == (32, 32)


def test_disk_full_while_writing_the_summary_is_a_message(corpus, model, tmp_path, monkeypatch):
    from embedseg_deploy import predict as predict_module
    from embedseg_deploy.io import DiskFullError

    def full(path, *args, **kwargs):
        raise DiskFullError(path)

    monkeypatch.setattr(predict_module, "atomic_write_json", full)
    out = tmp_path / "out"
    result = _run(model, corpus / "uint8.tif", "-o", out)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"cannot write the summary: no space left on {out}" in result.output
    assert (out / "uint8.tif").is_file()  # the finished label file is kept


def test_a_real_full_disk(corpus, model, tmp_path):
    """A 1 MiB tmpfs: the first 512 x 512 label file fits, the second does not."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.decode().strip() or 'not permitted'})")
    try:
        src = tmp_path / "in"
        src.mkdir()
        rng = np.random.default_rng(0)
        for i in range(3):  # noise: many objects, so the labels do not compress away
            tifffile.imwrite(src / f"img{i}.tif", rng.integers(0, 255, (512, 512), dtype=np.uint8))
        out = disk / "out"
        result = _run(model, src, "-o", out, "--min-object-size", "0")
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert "no space left on" in result.output and "stopped:" in result.output
        kept = sorted(p.name for p in out.iterdir())
        assert "img0.tif" in kept and not [k for k in kept if k.startswith(".")]
        assert tifffile.imread(out / "img0.tif").shape == (512, 512)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
