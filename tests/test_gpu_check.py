"""benchmarks/gpu_check.py, the GPU proof: its --plan mode runs here (no GPU) and must catch broken code."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np

from .conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_plan_runs_every_check_and_says_why_each_would_skip(tmp_path):
    """The command CI runs: every check's code runs on the CPU; without a GPU each GPU path would skip and
    says what is missing; results go to --out only when asked."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--plan", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu.json").read_text())
    checks = doc["checks"]
    assert list(checks) == [c.name for c in _module().CHECKS]
    codes = {name: c["plan_code"] for name, c in checks.items()}
    assert set(codes.values()) == {"ok"}, codes
    for name, entry in checks.items():
        if entry["would"] == "skip":
            assert entry["status"] == "skipped" and entry["reason"], (name, entry)
            assert f"{name}: would skip: {entry['reason']}" in done.stderr
    if not (tmp_path / "gpu.md").read_text().count("NVIDIA"):  # no GPU on this machine
        assert checks["cluster_cuda"]["would"] == "skip" and checks["environment"]["would"] == "run"
    cluster = checks["cluster_cuda"]["result"]
    assert cluster["passed"] and all(c["identical"] for c in cluster["cases"].values())
    assert "Plan mode" in (tmp_path / "gpu.md").read_text()


def test_plan_fails_on_a_gpu_call_with_a_wrong_argument(monkeypatch, capsys):
    """A renamed keyword at a GPU call site is found without a GPU: the call is bound to the GPU
    function's signature before its CPU stand-in runs."""
    gc = _module()
    from embedseg_deploy.cluster import cluster
    from embedseg_deploy.cluster_cuda import cluster_cuda

    def broken(ctx):
        raw = np.zeros((5, 16, 16), np.float32)
        ctx.gpu(cluster_cuda, raw, [0.01, 0.01], min_size=3, cpu=lambda: cluster(raw, [0.01, 0.01]))
        return {"passed": True}

    monkeypatch.setattr(gc, "CHECKS", (gc.Check("environment", gc.check_environment), gc.Check("x", broken)))
    assert gc.main(["--plan"]) == 1
    assert "x: BROKEN: TypeError" in capsys.readouterr().err
    monkeypatch.setattr(gc, "CHECKS", (gc.Check("x", lambda ctx: {"passed": True}),))
    assert gc.main(["--plan"]) == 0


def test_unknown_check_names_are_refused():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--plan", "--only", "cluster_cuda,nonsense"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 2 and "unknown checks ['nonsense']" in done.stderr
