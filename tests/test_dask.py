"""Block-level resume and dask.distributed execution: the labels never depend on how the run went.

A block-mode run killed part way and started again, a run on a 2-worker LocalCluster, and one whose
worker is killed mid-run all give exactly the labels of one undisturbed single-process run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from embedseg_deploy import bigimage
from embedseg_deploy.bigimage import predict_big
from embedseg_deploy.cli import main
from embedseg_deploy.io import read_tiff, write_tiff_atomic
from embedseg_deploy.predict import Predictor, predict_files

from ._runtime_models import blobs, toy_model

distributed = pytest.importorskip("distributed", reason="the dask extra (dask[distributed]) is not installed")

BLOCK = (16, 32, 32)
RUN = {"block": BLOCK, "block_halo": 16, "network_tile": (32, 64, 64)}  # 18 blocks, 4 network tiles


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return toy_model(tmp_path_factory, 3)


@pytest.fixture(scope="module")
def predictor(model) -> Predictor:
    return Predictor(model, backend="onnx-cpu", threads=1, tile=32, halo=8)


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A 3D image of about 20 blobs that block mode cuts into 2 x 3 x 3 = 18 blocks, and its labels."""
    image, _ = blobs((26, 90, 85), 40, radius=4.0, seed=5)
    path = tmp_path_factory.mktemp("dask") / "vol.tif"
    write_tiff_atomic(path, image, pixel_size=[1.0, 1.0, 1.0])
    return path, image


@pytest.fixture(scope="module")
def reference(predictor, volume, tmp_path_factory) -> np.ndarray:
    out = tmp_path_factory.mktemp("dask-ref") / "ref.tif"
    result = predict_big(predictor, volume[0], out, **RUN)
    labels = read_tiff(out).data
    assert result.blocks == 18 and result.network_tiles == 1 * 2 * 2  # tiles of a region: 32x64x64
    assert labels.max() == result.n_objects >= 15
    return labels


@pytest.fixture(scope="module")
def executor(predictor):
    from embedseg_deploy.dask_run import DaskExecutor

    with DaskExecutor(predictor, workers=2, threads=1) as ex:
        yield ex


def test_the_spec_rebuilds_the_same_predictor(predictor):
    again = Predictor(**predictor.spec())
    assert again.label_settings() == predictor.label_settings()
    assert again.backend.name == "onnx-cpu" and again.tile == [32, 32, 32]


def test_a_run_interrupted_between_a_blocks_pixels_and_its_journal_resumes_exactly(
    predictor, volume, reference, tmp_path, monkeypatch
):
    out = tmp_path / "labels.tif"
    real_save = bigimage.PartialLabels._save

    def dies_after_block_5(self):  # block 5's pixels are in the map, the journal does not know
        if self.blocks_done == 6:
            raise KeyboardInterrupt
        real_save(self)

    monkeypatch.setattr(bigimage.PartialLabels, "_save", dies_after_block_5)
    with pytest.raises(KeyboardInterrupt):
        predict_big(predictor, volume[0], out, **RUN)
    monkeypatch.undo()
    assert not out.exists()
    partial = tmp_path / ".labels.tif.partial.tif"
    assert tifffile.memmap(partial, mode="r").max() > 0  # block 5's ids, not journaled
    result = predict_big(predictor, volume[0], out, **RUN)
    assert "9 of 22 steps were done" in result.warnings[-1]  # 4 network tiles, 5 blocks
    assert np.array_equal(read_tiff(out).data, reference)
    assert not partial.exists() and not (tmp_path / ".labels.tif.partial.json").exists()


def test_a_run_interrupted_in_the_network_pass_resumes_exactly(
    predictor, volume, reference, tmp_path, monkeypatch
):
    out = tmp_path / "labels.tif"
    real_save = bigimage.PartialLabels._save

    def dies_after_tile_2(self):
        if self.tiles_done == 3:
            raise KeyboardInterrupt
        real_save(self)

    monkeypatch.setattr(bigimage.PartialLabels, "_save", dies_after_tile_2)
    with pytest.raises(KeyboardInterrupt):
        predict_big(predictor, volume[0], out, **RUN)
    monkeypatch.undo()
    assert (tmp_path / ".labels.tif.partial.raw.npy").is_file()
    result = predict_big(predictor, volume[0], out, **RUN)
    assert "2 of 22 steps were done" in result.warnings[-1]
    assert np.array_equal(read_tiff(out).data, reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif"]


def test_the_network_once_gives_the_labels_of_the_network_per_block(predictor, volume, reference, tmp_path):
    per_block = predict_big(predictor, volume[0], tmp_path / "b.tif", **RUN, network_once=False)
    assert per_block.network_tiles == 0
    assert np.array_equal(read_tiff(tmp_path / "b.tif").data, reference)


def test_other_settings_do_not_resume_a_partial_run(predictor, volume, reference, tmp_path, monkeypatch):
    out = tmp_path / "labels.tif"
    monkeypatch.setattr(bigimage.PartialLabels, "_save", _raise_after(3, bigimage.PartialLabels._save))
    with pytest.raises(KeyboardInterrupt):
        predict_big(predictor, volume[0], out, **RUN, provenance={"seed_thresh": 0.8})
    monkeypatch.undo()
    again = {"seed_thresh": 0.9}
    result = predict_big(predictor, volume[0], out, **RUN, provenance=again)
    assert not any("resumed" in w for w in result.warnings)
    assert np.array_equal(read_tiff(out).data, reference)


def _raise_after(blocks: int, real):
    def save(self):
        if self.blocks_done > blocks:
            raise KeyboardInterrupt
        real(self)

    return save


def test_a_killed_cli_run_resumes_at_its_first_unfinished_block(model, volume, reference, tmp_path):
    out_dir = tmp_path / "out"
    cmd = [sys.executable, "-m", "embedseg_deploy.cli", "predict", str(model), str(volume[0]), "-o",
           str(out_dir), "--backend", "onnx-cpu", "--tile", "0", "--block", "16,32,32", "--block-halo", "16",
           "--threads", "1", "-q"]  # fmt: skip
    journal = out_dir / ".vol.tif.partial.json"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = 0
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            import json

            done = json.loads(journal.read_text())["blocks_done"]
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.fail(f"the run finished before it could be killed (rc {proc.returncode}, {done} blocks)")
    assert not (out_dir / "vol.tif").exists()
    again = subprocess.run(cmd[:-1], capture_output=True, text=True, check=True)
    assert "resumed an interrupted run" in again.stderr
    assert np.array_equal(read_tiff(out_dir / "vol.tif").data, reference)


def test_blocks_on_two_dask_workers_equal_one_process(predictor, executor, volume, reference, tmp_path):
    out = tmp_path / "labels.tif"
    predict_big(predictor, volume[0], out, **RUN, executor=executor)
    assert np.array_equal(read_tiff(out).data, reference)


def test_a_worker_killed_mid_run_costs_only_a_retry(predictor, executor, volume, reference, tmp_path):
    pids = executor.client.run(os.getpid)
    victim = sorted(pids.values())[0]
    killed = []

    def progress(done: int, total: int) -> None:
        if done == 3 and not killed:
            os.kill(victim, signal.SIGKILL)
            killed.append(done)

    out = tmp_path / "labels.tif"
    predict_big(predictor, volume[0], out, **RUN, executor=executor, progress=progress)
    assert killed and np.array_equal(read_tiff(out).data, reference)
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)


def test_files_on_the_cluster_equal_files_in_one_process(predictor, executor, volume, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for seed in range(3):
        image, _ = blobs((20, 40, 44), 6, seed=seed)
        write_tiff_atomic(folder / f"small{seed}.tif", image)
    os.link(volume[0], folder / "vol.tif")
    (folder / "broken.tif").write_bytes(b"not a tiff")
    kwargs = {"block": None, "memory_budget": "8G"}  # whole images: the budget counts this process's RSS
    here = predict_files(predictor, [folder], tmp_path / "here", **kwargs)
    there = predict_files(predictor, [folder], tmp_path / "there", executor=executor, **kwargs)
    assert here["counts"] == there["counts"] == {"ok": 4, "skipped": 0, "failed": 1, "not run": 0}
    for name in ("small0", "small1", "small2", "vol"):
        a, b = (read_tiff(tmp_path / d / f"{name}.tif").data for d in ("here", "there"))
        assert np.array_equal(a, b), name
    modes = [[f.get("mode", "") for f in run["files"]] for run in (here, there)]
    assert modes[0] == modes[1] and sum(m.startswith("whole image") for m in modes[0]) == 4
    failed = [f for f in there["files"] if f["status"] == "failed"]
    assert "broken.tif" in failed[0]["error"]


def test_the_cli_runs_on_a_local_dask_cluster(model, volume, reference, tmp_path):
    args = ["predict", model, volume[0], "-o", tmp_path / "out", "--backend", "onnx-cpu", "--tile", "0",
            "--block", "16,32,32", "--block-halo", "16", "--dask", "--dask-workers", "2"]  # fmt: skip
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "dask local cluster" in result.stderr and "2 worker(s)" in result.stderr
    assert np.array_equal(read_tiff(tmp_path / "out" / "vol.tif").data, reference)


def test_a_scheduler_that_cannot_be_reached_is_a_clear_error(predictor):
    from embedseg_deploy.dask_run import DaskExecutor

    with pytest.raises((OSError, TimeoutError), match=r"127\.0\.0\.1:9"):
        DaskExecutor(predictor, "tcp://127.0.0.1:9", connect_timeout=1)


def test_an_input_taken_for_an_address_is_explained(model, volume, tmp_path):
    args = ["predict", model, "--dask", volume[0], volume[0], "-o", tmp_path / "out"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2 and "not a scheduler address" in result.stderr
    assert "--dask=ADDRESS" in result.stderr and not (tmp_path / "out" / "vol.tif").exists()


def test_the_runtime_works_without_dask():
    code = (
        "import sys; sys.modules['distributed'] = None; import embedseg_deploy.cli, embedseg_deploy.dask_run"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
