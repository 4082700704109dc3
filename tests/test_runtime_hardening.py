"""Issue 13's runtime cases: memory budget, progress inside a file, resume that knows the model, option
checks, model/contract mismatch at load, multi-series files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from embedseg_deploy import memory
from embedseg_deploy.backends import BackendError, create_backend
from embedseg_deploy.bigimage import plan_blocks
from embedseg_deploy.cli import ConsoleReporter, main
from embedseg_deploy.io import read_provenance
from embedseg_deploy.predict import Predictor, plan_file, settings_differences
from embedseg_deploy.tiling import balanced_tile, plan_tiles

from ._runtime_models import blobs, toy_contract, toy_model, toy_onnx


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def toy2d(tmp_path_factory) -> Path:
    return toy_model(tmp_path_factory, 2)


# --- memory budget ------------------------------------------------------------------------------------


def test_budgets_are_read_as_people_write_them(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 10 * 2**30)
    assert memory.parse_budget("6G").bytes == 6 * 2**30
    assert memory.parse_budget("512M").bytes == 512 * 2**20
    assert memory.parse_budget("2.5GiB").bytes == int(2.5 * 2**30)
    assert memory.parse_budget("40%").bytes == 4 * 2**30
    assert memory.parse_budget(None).bytes == 5 * 2**30 and "50%" in memory.parse_budget(None).source
    for bad in ("lots", "0", "-1G", "150%", "6Q"):
        with pytest.raises(ValueError, match="memory budget"):
            memory.parse_budget(bad)


def _grid(padded, core, halo, net, net_halo):
    """(network pixels of the whole grid, region, network tile) as the block and tile planners cut it."""
    counts = [-(-p // c) for p, c in zip(padded, core, strict=True)]
    region = [min(p, c + 2 * h) for p, c, h in zip(padded, core, halo, strict=True)]
    tile = balanced_tile(region, net, net_halo)
    tiles = len(plan_tiles(region, tile, net_halo))
    return math.prod(counts) * tiles * math.prod(tile), region, tile


def test_blocks_fit_the_budget_with_the_least_network_work():
    padded, halo, net = (16384, 16384), (64, 64), (2048, 2048)
    works = []
    for budget in (300, 600, 1200, 2400):
        core = memory.block_core(budget * 2**20, padded, halo, net, 2, 1, 2, network_halo=halo)
        work, region, tile = _grid(padded, core, halo, net, halo)
        works.append(work)
        assert memory.block_peak(region, tile, 2, 1, 2) <= budget * 2**20
        assert all(c % 8 == 0 for c in core)
        # no square grid that fits does less work (the old rule: the largest square region)
        for side in range(136, 16384, 8):
            square = _grid(padded, (side - 128, side - 128), halo, net, halo)
            if memory.block_peak(square[1], square[2], 2, 1, 2) > budget * 2**20:
                break
            assert work <= square[0]
    assert works == sorted(works, reverse=True) and works[0] > works[-1]
    # a budget below one minimal block still gets the minimal block
    assert memory.block_core(1, padded, halo, net, 2, 1, 2) == [8, 8]
    # 3D: a thin stack is not cut in z (a block there would pay a halo for nothing)
    core3 = memory.block_core(2**30, (64, 2048, 2048), (16, 64, 64), (64, 512, 512), 3, 1, 2)
    assert core3[0] == 64 and math.prod(core3) < 64 * 2048 * 2048


def test_network_tiles_fit_the_budget_with_the_least_work():
    halo = (16, 64, 64)
    for padded in ((64, 1024, 1024), (256, 1024, 1024), (24, 3000, 2000)):
        for budget in (400 * 2**20, 2**31):
            tile = memory.network_tile(budget, padded, halo, 3, 1, 2)
            assert memory.network_tile_peak(tile, 3, 1, 2) <= budget
            work = len(plan_tiles(padded, balanced_tile(padded, tile, halo), halo)) * math.prod(
                balanced_tile(padded, tile, halo)
            )
            # no cube-like tile (the same side in y and x, z whole or halved) that fits does less work
            for z in {padded[0], -(-(padded[0] + 32) // 16) * 8}:  # z whole, or two tiles
                for side in range(136, max(padded) + 8, 8):
                    cube = [z, min(side, padded[1]), min(side, padded[2])]
                    if memory.network_tile_peak(cube, 3, 1, 2) > budget:
                        break
                    b = balanced_tile(padded, cube, halo)
                    assert work <= len(plan_tiles(padded, b, halo)) * math.prod(b) * 1.0001
    # a whole image that fits is one tile; nothing fits a budget below one minimal tile
    assert memory.network_tile(2**34, (64, 512, 512), halo, 3, 1, 2) == [64, 512, 512]
    assert memory.network_tile(1, (64, 512, 512), halo, 3, 1, 2) is None
    capped = memory.network_tile(2**34, (64, 2048, 2048), halo, 3, 1, 2, largest=(64, 512, 512))
    assert capped[0] == 64 and max(capped[1:]) <= 512


def test_the_budget_decides_the_mode_before_reading(toy2d, monkeypatch):
    monkeypatch.setattr(memory, "rss_bytes", lambda: 100 * 2**20)
    p = Predictor(create_backend(toy2d, "onnx-cpu", threads=1), tile=(64, 64), halo=(8, 8))
    header = ((1000, 1300), 2, 1)
    whole = plan_file(p, header, None, None, 2**40)
    assert whole.mode == "whole image" and whole.units == len(plan_tiles((1000, 1300), [64, 64], [8, 8]))
    assert 100 * 2**20 < whole.estimate < 100 * 2**20 + 1.3e6 * 200
    blocks = plan_file(p, header, None, None, whole.estimate - 1)
    assert blocks.mode == "blocks" and "more than the memory budget" in blocks.reason
    padded = [1000, 1304]
    assert blocks.units == len(plan_blocks((1000, 1300), blocks.block, [8, 8], 8, "center")) > 1
    assert math.prod(blocks.block) < math.prod(padded)
    forced = plan_file(p, header, [256, 256], None, 2**40)
    assert forced.mode == "blocks" and forced.block == [256, 256] and forced.reason == "--block given"


# --- progress -----------------------------------------------------------------------------------------


def test_cli_says_what_it_will_do_then_how_far_it_got(toy2d, tmp_path, monkeypatch):
    monkeypatch.setattr(ConsoleReporter, "EVERY_S", 0.0)  # a log line per step (not a terminal here)
    image, _ = blobs((150, 170), 12, seed=3)
    tifffile.imwrite(tmp_path / "big.tif", image)
    args = ["predict", toy2d, tmp_path / "big.tif", "--tile", "64", "--halo", "8", "--threads", "1"]
    result = invoke(*args, "-o", tmp_path / "a")
    assert result.exit_code == 0, result.output
    out = result.output
    announce = out.index("[1/1] big.tif: 150x170 (0.0 Mpx), whole image, 12 tiles")
    steps = [line for line in out.splitlines() if " tiles, " in line and "ETA" in line]
    assert len(steps) == 12 and steps[-1].startswith("  12/12 tiles")
    assert announce < out.index(steps[0]) < out.index("  done: ")
    blocks = invoke(*args, "-o", tmp_path / "b", "--memory-budget", "1")
    assert (
        "blocks (whole image would need" in blocks.output and "more than the memory budget" in blocks.output
    )
    block_steps = [line for line in blocks.output.splitlines() if " tiles+blocks, " in line and "ETA" in line]
    assert block_steps and all(line.endswith(" MVoxel/s") for line in block_steps)
    quiet = invoke(*args, "-o", tmp_path / "c", "-q")
    assert quiet.exit_code == 0 and "tiles" not in quiet.output and "[1/1]" not in quiet.output


# --- resume knows the model --------------------------------------------------------------------------


def test_resume_skips_only_outputs_of_the_same_model_and_settings(toy2d, tmp_path, tmp_path_factory):
    other = toy_onnx(tmp_path_factory.mktemp("other") / "other.onnx", 2, radius=7.0)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        tifffile.imwrite(src / f"img{i}.tif", blobs((64, 72), 4, seed=i)[0])
    out = tmp_path / "out"
    first = invoke("predict", toy2d, src, "-o", out, "-q")
    assert first.exit_code == 0
    settings = read_provenance(out / "img0.tif")
    assert settings["model_sha256"] and settings["seed_thresh"] == 0.9 and settings["tile"] == [64, 64]
    assert json.loads((out / "summary.json").read_text())["label_settings"] == settings
    before = (out / "img0.tif").read_bytes()

    again = invoke("predict", toy2d, src, "-o", out, "-q")
    assert again.exit_code == 0 and "0 segmented, 2 skipped" in again.output

    by_other = invoke("predict", other, src, "-o", out, "-q")
    assert by_other.exit_code == 1
    assert "img0.tif exists but was made with other settings: another model (sha256" in by_other.output
    assert "--overwrite" in by_other.output and (out / "img0.tif").read_bytes() == before

    other_thresh = invoke("predict", toy2d, src, "-o", out, "-q", "--seed-thresh", "0.6")
    assert other_thresh.exit_code == 1 and "seed_thresh 0.9 (this run 0.6)" in other_thresh.output

    redo = invoke("predict", other, src, "-o", out, "-q", "--overwrite")
    assert redo.exit_code == 0 and "2 segmented" in redo.output
    assert read_provenance(out / "img0.tif")["model_sha256"] != settings["model_sha256"]
    assert "0 segmented, 2 skipped" in invoke("predict", other, src, "-o", out, "-q").output


def test_outputs_without_recorded_settings_are_not_taken_as_done(toy2d, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    image, truth = blobs((64, 72), 4, seed=5)
    tifffile.imwrite(src / "a.tif", image)
    (tmp_path / "out").mkdir()
    tifffile.imwrite(tmp_path / "out" / "a.tif", truth.astype(np.uint16))  # some other tool's labels
    result = invoke("predict", toy2d, src, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 1 and "records no settings" in result.output
    assert settings_differences({"a": 1}, {"a": 1}) == []
    assert settings_differences({"tile": [64, 64]}, {"tile": (64, 64)}) == []


# --- options checked at once; model checked at load -------------------------------------------------


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--seed-thresh", "2"], "'--seed-thresh': 2.0 is not in the range 0<=x<=1"),
        (["--fg-thresh", "-1"], "'--fg-thresh': -1.0 is not in the range 0<=x<=1"),
        (["--min-object-size", "-5"], "'--min-object-size': -5 is not in the range x>=0"),
        (["--channel-axis", "5"], "--channel-axis 5: a 2D image with channels has 3 axes"),
        (["--block", "0"], "block sizes must be at least 8 pixels"),
        (["--memory-budget", "lots"], "memory budget 'lots'"),
    ],
)
def test_bad_options_fail_at_once_naming_the_option(toy2d, tmp_path, option, message):
    image, _ = blobs((40, 40), 2, seed=0)
    tifffile.imwrite(tmp_path / "a.tif", image)
    result = invoke("predict", toy2d, tmp_path / "a.tif", "-o", tmp_path / "out", *option)
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out" / "a.tif").exists()


def test_python_api_checks_thresholds_too(toy2d):
    backend = create_backend(toy2d, "onnx-cpu", threads=1)
    for bad in ({"seed_thresh": 2}, {"fg_thresh": -1}, {"min_object_size": -5}, {"min_mask_sum": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Predictor(backend, thresholds=bad)


def test_a_model_with_the_wrong_number_of_output_channels_fails_at_load(tmp_path):
    # a 3D contract on a 2D graph: 7 channels promised, 5 delivered
    wrong = toy_onnx(tmp_path / "wrong.onnx", 2, contract=toy_contract(2).__class__(**{
        **vars(toy_contract(2)), "ndim": 3, "spacing": [1e-3] * 3, "tile": {}, "padding": "end",
    }))  # fmt: skip
    with pytest.raises(BackendError, match=r"wrong\.onnx: the network's output has shape"):
        create_backend(wrong, "onnx-cpu")
    result = invoke("predict", wrong, tmp_path / "none.tif", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "wrong.onnx" in result.output


def test_the_channel_count_mismatch_is_named(tmp_path):
    import onnx
    from onnx import helper

    good = toy_onnx(tmp_path / "good.onnx", 2)
    model = onnx.load(str(good))
    weight = next(i for i in model.graph.initializer if i.name == "W")
    bias = next(i for i in model.graph.initializer if i.name == "B")
    w = onnx.numpy_helper.to_array(weight)[:4]
    b = onnx.numpy_helper.to_array(bias)[:4]
    weight.CopyFrom(onnx.numpy_helper.from_array(w, "W"))
    bias.CopyFrom(onnx.numpy_helper.from_array(b, "B"))
    out = model.graph.output[0]
    out.CopyFrom(helper.make_tensor_value_info("raw", onnx.TensorProto.FLOAT, ["N", "c", "s0", "s1"]))
    onnx.save(model, str(tmp_path / "four.onnx"))
    with pytest.raises(
        BackendError, match=r"four\.onnx: the network outputs 4 channels, but its contract says"
    ):
        create_backend(tmp_path / "four.onnx", "onnx-cpu")


# --- files with several images ------------------------------------------------------------------------


def test_a_file_with_several_images_warns_that_only_the_first_is_used(toy2d, tmp_path):
    image, truth = blobs((48, 56), 3, seed=2)
    path = tmp_path / "two.tif"
    tifffile.imwrite(path, image)
    tifffile.imwrite(path, np.zeros((20, 20), np.uint16), append=True)
    result = invoke("predict", toy2d, path, "-o", tmp_path / "out")
    assert result.exit_code == 0
    assert "WARNING" in result.output and "only the first" in result.output
    record = json.loads((tmp_path / "out" / "summary.json").read_text())["files"][0]
    assert any("only the first" in w for w in record["warnings"]) and record["objects"] == truth.max()
