"""`embedseg-run bench` and the benchmark runner: smoke tests of complete, well-formed reports (no timing
assertions), plus the pure helpers (statistics, FLOP counting, report validation) on exact cases."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embedseg_deploy.bench import (
    STAGES,
    agreement,
    bench_command,
    conv_flops,
    latency_stats,
    median_spread,
    tile_plan_pixels,
    validate_report,
)
from embedseg_deploy.cli import main as cli_main
from embedseg_deploy.io import write_tiff_atomic

from ._runtime_models import blobs, toy_onnx
from .conftest import REPO, UPSTREAM


@pytest.fixture(scope="module")
def toys(tmp_path_factory) -> Path:
    """Small stand-ins for the exported fixture models, named as the benchmark scripts expect them."""
    folder = tmp_path_factory.mktemp("bench-models")
    for ndim in (2, 3):
        for precision in ("fp32", "fp16"):
            toy_onnx(folder / f"upstream-{ndim}d-{precision}.onnx", ndim)
    return folder


@pytest.fixture(scope="module")
def quick_report(toys, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench-cli") / "report.json"
    args = [
        str(toys / "upstream-2d-fp32.onnx"),
        "--also",
        str(toys / "upstream-3d-fp32.onnx"),
        "--quick",
        "--threads",
        "1",
        "-q",
        "-o",
        str(out),
    ]
    result = CliRunner().invoke(bench_command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), out


def test_latency_stats_match_numpy():
    x = [0.3, 0.1, 0.2, 0.5, 0.4]
    s = latency_stats(x)
    assert s["n"] == 5 and s["min"] == 0.1 and s["max"] == 0.5
    assert s["p50"] == pytest.approx(np.percentile(x, 50)) and s["p99"] == pytest.approx(np.percentile(x, 99))
    assert s["mean"] == pytest.approx(0.3)
    assert latency_stats([])["p50"] is None
    m = median_spread([1.0, 3.0, 2.0, float("nan"), 10.0])
    assert m == {"median": 2.5, "min": 1.0, "max": 10.0, "iqr_half": pytest.approx((4.75 - 1.75) / 2), "n": 4}


def test_conv_flops_counts_the_toy_networks(toys):
    # one 3x3(x3) convolution, 1 -> 2*ndim+1 channels: 2 FLOPs per multiply-add, per output element
    for ndim, shape in ((2, (2, 1, 32, 48)), (3, (1, 1, 8, 16, 24))):
        counted = conv_flops(toys / f"upstream-{ndim}d-fp32.onnx", shape)
        expected = 2 * (2 * ndim + 1) * 3**ndim * shape[0] * math.prod(shape[2:])
        assert counted["conv"] == expected and counted["total"] == expected
        assert counted["conv_transpose"] == 0


def test_agreement_renames_ids_but_not_extra_objects():
    a = np.zeros((10, 10), np.int32)
    a[:5], a[5:, :5] = 1, 2
    b = np.where(a == 1, 2, np.where(a == 2, 1, 0))  # same objects, swapped ids
    b[9, 9] = 3  # one extra pixel object on reference background
    r = agreement(a, b)
    assert r["equal_pixels"] == pytest.approx(0.24) and r["equal_pixels_renamed"] == pytest.approx(0.99)
    assert r["ap50"] == pytest.approx(2 / 3) and r["objects"] == [2, 3] and not r["identical"]
    assert agreement(a, a)["identical"] and agreement(a, a)["equal_pixels_renamed"] == 1.0


def test_tile_plan_pixels_counts_overlap():
    assert tile_plan_pixels((256, 256), None, [0, 0], 8, "center") == (1, 256 * 256)
    n, px = tile_plan_pixels((1024, 1024), [512, 512], [32, 32], 8, "center")
    assert n == 9 and px == 9 * 512 * 512  # last tiles shift inwards: 2.25x the image's pixels


def test_bench_report_is_complete_and_well_formed(quick_report):
    report, out = quick_report
    assert validate_report(report) == [] and report["problems"] == []
    assert {len(r["spatial"]) for r in report["results"]} == {2, 3}
    for r in report["results"]:
        assert set(r["stages_s"]) == set(STAGES)
        assert r["stages_s"]["network"] > 0 and r["stages_s"]["read"] > 0 and r["stages_s"]["write"] > 0
        assert r["stages_s"]["h2d"] is None  # CPU: no transfer
        assert r["latency_s"]["n"] == 2 and r["per_tile_s"]["n"] >= 2
        assert r["throughput_per_s"] == pytest.approx(r["pixels"] / 1e6 / r["latency_s"]["p50"])
        assert r["network_gflop"] > 0  # counted on the ONNX graph
    for b in report["backends"]:
        assert b["build_seconds"] > 0 and b["threads"] == 1 and b["precision"] == "fp32"
    if not report["machine"]["gpus"]:  # every GPU backend is listed with its reason
        gpu = {s["backend"] for s in report["skipped"]}
        assert {"onnx-cuda", "onnx-trt", "tensorrt"} <= gpu and all(s["reason"] for s in report["skipped"])
    assert out.with_suffix(".md").read_text().count("| onnx-cpu") >= 2
    pytest.importorskip("matplotlib")
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_validate_report_names_what_is_broken(quick_report):
    report, _ = quick_report
    broken = copy.deepcopy(report)
    del broken["results"][0]["stages_s"]["decode"]
    broken["results"][1]["latency_s"]["p90"] = -1.0
    del broken["machine"]["cpu_model"]
    problems = validate_report(broken)
    assert any("decode" in p for p in problems)
    assert any("p90" in p for p in problems)
    assert any("cpu_model" in p for p in problems)
    assert validate_report({}) and "no results" in validate_report({"results": []})


def test_bench_on_given_images_through_the_cli(toys, tmp_path):
    image, _ = blobs((64, 80), 4, seed=1)
    path = write_tiff_atomic(tmp_path / "cells.tif", image)
    out = tmp_path / "r.json"
    args = [
        "bench",
        str(toys / "upstream-2d-fp32.onnx"),
        str(path),
        "--backends",
        "onnx-cpu",
        "--repeats",
        "2",
        "--warmup",
        "0",
        "--ort-config",
        "session.intra_op.allow_spinning=0",
        "--tile",
        "32",
        "--halo",
        "8",
        "--no-plot",
        "-q",
        "-o",
        str(out),
    ]
    result = CliRunner().invoke(cli_main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    (r,) = report["results"]
    assert r["image"] == "cells.tif" and r["spatial"] == [64, 80] and report["skipped"] == []
    assert report["parameters"]["ort_session_config"] == {"session.intra_op.allow_spinning": "0"}
    assert r["tiles"] > 1 and r["per_tile_s"]["n"] == 2 * r["tiles"] and r["objects"] == 4
    assert "| onnx-cpu |" in result.output and not out.with_suffix(".png").exists()


def test_bench_refuses_an_unusable_backend(toys, tmp_path):
    result = CliRunner().invoke(
        bench_command,
        [str(toys / "upstream-2d-fp32.onnx"), "--backends", "torch", "-q", "-o", str(tmp_path / "r.json")],
    )
    assert result.exit_code == 2 and "no backend could run" in result.output


def test_benchmark_runner_quick_results_are_well_formed(toys, tmp_path):
    """run_all.py --quick with stand-in models (no exports) and without the upstream venv: every benchmark
    writes a complete JSON + markdown result (checked by the runner itself and here)."""
    if not (UPSTREAM / "2d" / "checkpoint.pth").is_file():
        pytest.skip("upstream fixture checkpoints absent (the torch side of the benchmarks needs them)")
    env = {**os.environ, "EMBEDSEG_BENCH_MODELS": str(toys), "EMBEDSEG_FIXTURES": str(UPSTREAM)}
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "run_all.py"),
        "--quick",
        "--no-upstream",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from run_all import BENCHMARKS, check_result
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    for name in BENCHMARKS:
        doc = json.loads((tmp_path / f"{name}_quick.json").read_text())
        assert check_result(name, doc) == []
        assert (tmp_path / f"{name}_quick.md").read_text().startswith("# ")
        assert doc["machine"]["load_average"] and doc["versions"]["numpy"]


def test_seed_benchmark_statistics_match_simulation_and_hand_counts():
    """bench_seeds' reading aids: the pass chance of equal-quality seeds on a small test split agrees with a
    simulation, and the paired comparison with upstream counts wins, ties and losses per seed."""
    environment = dict(os.environ)
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_seeds
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    # a changed NUMBA_NUM_THREADS breaks every later numba compile in this process (CI failed so)
    assert dict(os.environ) == environment, "importing a benchmark must leave the environment alone"
    rng = np.random.default_rng(0)
    for mean, n, seeds in ((0.8, 15, 5), (0.9, 60, 5), (0.5, 22, 3)):
        found = rng.binomial(n, mean, size=(20000, seeds)) / n
        simulated = np.mean((found >= 0.9 * mean - 1e-12).all(axis=1))
        res = bench_seeds.resolution(mean, n, seeds)
        assert abs(res["p_all_pass"] - simulated) < 0.015, (mean, n, res, simulated)
        assert res["sd"] == pytest.approx(found.std(), rel=0.05)

    def row(variant, rule, seeds, aps):
        return {"set": "s", "variant": variant, "rule": rule, "seeds": seeds, "ap50": {"per_seed": aps}}

    rows = [
        row("upstream", "iou", [1, 2, 3, 4], [0.5, 0.8, 0.7, 0.9]),
        row("default", "ap", [2, 3, 4, 5], [0.8, 0.9, 0.6, 1.0]),
    ]
    (p,) = bench_seeds.paired(rows)
    assert (p["seeds"], p["wins"], p["ties"], p["losses"]) == (3, 1, 1, 1)
    assert p["mean_difference"] == pytest.approx((0.0 + 0.2 - 0.3) / 3, abs=1e-4)
    assert p["sign_test_p"] == pytest.approx(0.75)  # P(at least 1 win of 2 by chance)
