"""A batch run killed mid-way (SIGKILL) and started again: every output ends complete and valid, none lost."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

from embedseg_deploy.predict import Predictor, output_is_complete

from ._runtime_models import blobs, toy_model

N_FILES = 40


def _outputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("img*.tif"))


def test_kill_mid_batch_then_resume(tmp_path_factory, tmp_path):
    model = toy_model(tmp_path_factory, 2)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(N_FILES):
        tifffile.imwrite(src / f"img{i:02d}.tif", blobs((160, 160), 10, seed=i)[0])
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "embedseg_deploy.cli", "predict", str(model), str(src), "-o", str(out)]
    cmd += ["--tta", "--threads", "1", "-q"]  # TTA makes each file slow enough to be caught mid-batch

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not (out / "summary.json").exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = _outputs(out)
    assert 1 <= len(done) < N_FILES
    for path in done:  # whatever exists after the kill is a complete label image
        assert output_is_complete(path, (160, 160))
    killed = json.loads((out / "summary.json").read_text())  # written as the run goes
    assert not killed["finished"] and 1 <= killed["counts"]["ok"] <= len(done)
    assert killed["counts"]["not run"] == N_FILES - killed["counts"]["ok"]

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{N_FILES - len(done)} segmented, {len(done)} skipped" in resumed.stdout
    assert [p.name for p in _outputs(out)] == [f"img{i:02d}.tif" for i in range(N_FILES)]
    assert not list(out.glob(".*.tmp")), "temp files of the killed run were left behind"
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"ok": N_FILES - len(done), "skipped": len(done), "failed": 0, "not run": 0}

    predictor = Predictor(model, backend="onnx-cpu", tta=True, threads=1)
    for i in (0, len(done) - 1, len(done), N_FILES - 1):  # before, at and after the kill
        expected = predictor.predict(tifffile.imread(src / f"img{i:02d}.tif"))
        np.testing.assert_array_equal(tifffile.imread(out / f"img{i:02d}.tif"), expected)
