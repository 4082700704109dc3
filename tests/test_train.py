"""The training loop: tiny 2D/3D runs, checkpoints with a full contract, resume, seeds, config, CLI."""

from __future__ import annotations

import csv
import json
import os
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from embedseg_deploy.contract import Contract
from embedseg_deploy.synthetic import write_dataset
from embedseg_training.checkpoint import load_checkpoint, load_model
from embedseg_training.cli import main
from embedseg_training.train import TrainConfig, TrainError, poly_lr, train
from embedseg_training.validate import kept_epoch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data2d(tmp_path_factory):
    root = tmp_path_factory.mktemp("data2d")
    return write_dataset(root, ndim=2, n_train=2, n_val=1, n_test=0, shape=(64, 64), n_objects=(4, 6), seed=0)


@pytest.fixture(scope="module")
def data3d(tmp_path_factory):
    root = tmp_path_factory.mktemp("data3d")
    return write_dataset(root, ndim=3, n_train=2, n_val=1, n_test=0, shape=(16, 40, 40), n_objects=(3, 4),
                         radius=(4.0, 6.0), anisotropy=2.0, seed=1)  # fmt: skip


TINY_CLI = ["--batch-size", "2", "--iterations", "1", "--val-crops", "2", "--crop-size", "32"]


def _tiny(data, out, **kw) -> TrainConfig:
    settings = dict(data_dir=str(data), out=str(out), epochs=2, batch_size=2, iterations=2, val_crops=4)
    settings.update(kw)
    return TrainConfig(**settings)


def test_tiny_2d_run_writes_checkpoints_with_a_full_contract(data2d, tmp_path):
    result = train(_tiny(data2d, tmp_path / "run", crop_size=[32, 32]), progress=False)
    assert result.epochs_done == 2 and [r["epoch"] for r in result.log] == [1, 2]
    model, contract = load_model(result.best_checkpoint)
    assert not model.training and contract.ndim == 2 and contract.in_channels == 1
    assert contract.spacing == pytest.approx([1 / 1023, 1 / 1023])  # upstream's default grid
    assert contract.normalization.kind == "percentile" and contract.padding == "center"
    assert contract.thresholds.min_object_size == contract.data_properties["min_object_size"] > 0
    assert contract.provenance["config"]["crop_size"] == [32, 32]
    # best.pth's seed threshold was tuned on val after training, and the contract says how
    tune = contract.provenance["seed_tune"]
    assert tune == result.seed_tune.to_dict()
    assert contract.thresholds.seed_thresh == (tune["after"] if tune["kept"] else 0.9)
    from embedseg_training.data import load_split
    from embedseg_training.train import _tune_seed

    again = _tune_seed(result.best_checkpoint, load_split(data2d, "val"), torch.device("cpu"))
    assert again == result.seed_tune  # a tuned best.pth is tuned again from its first threshold
    assert load_model(result.best_checkpoint)[1].provenance["seed_tune"] == tune
    last = load_checkpoint(result.last_checkpoint)
    assert (
        last["epoch"] == 1
        and "optimizer_state_dict" in last
        and "optimizer_state_dict" not in load_checkpoint(result.best_checkpoint)
    )
    assert last["scheduler"]["n_epochs"] == 2
    # best.pth: the latest epoch within two standard errors of the best val AP@0.5 of whole images
    aps = [r["val_ap50"] for r in result.log]
    best = kept_epoch(aps, result.log[0]["val_objects"])
    assert last["best_epoch"] == result.best_epoch == best and result.best_ap50 == aps[best]
    assert (last["best_ap50"], last["best_iou"]) == (aps[best], result.log[best]["val_iou"])
    assert all(0 <= r["val_ap50_90"] <= r["val_ap50"] <= 1 for r in result.log)
    # lr follows the poly schedule over the real number of epochs
    assert [r["lr"] for r in result.log] == pytest.approx([poly_lr(5e-4, e, 2) for e in (0, 1)])
    assert poly_lr(5e-4, 1, 2) == pytest.approx(5e-4 * 0.5**0.9)
    with open(result.run_dir / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and set(rows[0]) >= {"train_loss", "val_loss", "val_iou", "lr", "crops_per_s"}
    assert 0 <= float(rows[0]["data_time_fraction"]) <= 1 and float(rows[0]["crops_per_s"]) > 0
    assert (result.run_dir / "loss.png").stat().st_size > 1000
    # every file of the run folder gets the permissions of any new file (no 0600 from mkstemp)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "log.csv", "loss.png", "best.pth", "last.pth"):
        assert (result.run_dir / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert not list(result.run_dir.glob(".*")), "temp files left in the run folder"
    # the model computes: an eval forward pass on a crop-sized input gives the contract's channels
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 32, 32)).shape == (1, contract.out_channels, 32, 32)


def test_tiny_3d_run(data3d, tmp_path):
    result = train(_tiny(data3d, tmp_path / "run3", epochs=1, crop_size=[8, 24, 24]), progress=False)
    _, contract = load_model(result.last_checkpoint)
    assert contract.ndim == 3 and contract.padding == "end" and contract.anisotropy == pytest.approx(2.0)
    assert contract.pixel_size == pytest.approx([2.0, 1.0, 1.0])
    s = contract.spacing
    assert s[1] == s[2] == pytest.approx(1 / 1023) and s[0] == pytest.approx(2 / 1023)  # isotropic embedding
    assert contract.data_properties["foreground_weight"] > 1  # 3D: #bg / #fg
    assert result.log[0]["val_iou"] >= 0 and result.best_checkpoint is not None


def test_resume_continues_exactly_and_seeds_reproduce(data2d, tmp_path):
    straight = train(_tiny(data2d, tmp_path / "a", crop_size=[32, 32]), progress=False)
    first = train(_tiny(data2d, tmp_path / "b", epochs=1, crop_size=[32, 32]), progress=False)
    # same seed: same first-epoch losses
    assert first.log[0]["train_loss"] == straight.log[0]["train_loss"]
    assert first.log[0]["val_loss"] == straight.log[0]["val_loss"]
    resumed = train(_tiny(data2d, tmp_path / "b", crop_size=[32, 32]), progress=False, resume=True)
    assert [r["epoch"] for r in resumed.log] == [1, 2] and resumed.log[0] == first.log[0]
    assert resumed.log[1]["train_loss"] == straight.log[1]["train_loss"]
    a, b = load_checkpoint(straight.last_checkpoint), load_checkpoint(resumed.last_checkpoint)
    for k, v in a["model_state_dict"].items():
        assert torch.equal(v, b["model_state_dict"][k]), k
    sa, sb = a["optimizer_state_dict"]["state"], b["optimizer_state_dict"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)
    assert int(sa[0]["step"]) == 4  # two epochs of two iterations
    assert (resumed.best_epoch, resumed.best_ap50) == (straight.best_epoch, straight.best_ap50)
    # another seed draws other crops and weights
    other = train(_tiny(data2d, tmp_path / "c", epochs=1, crop_size=[32, 32], seed=7), progress=False)
    assert other.log[0]["train_loss"] != straight.log[0]["train_loss"]


def test_resume_refuses_other_settings_and_missing_runs(data2d, tmp_path):
    with pytest.raises(TrainError, match="nothing to resume"):
        train(_tiny(data2d, tmp_path / "none", crop_size=[32, 32]), progress=False, resume=True)
    train(_tiny(data2d, tmp_path / "r", epochs=1, crop_size=[32, 32]), progress=False)
    with pytest.raises(TrainError, match="spacing"):
        train(_tiny(data2d, tmp_path / "r", crop_size=[32, 32], spacing=0.01), progress=False, resume=True)


def test_defaults_from_the_data_and_workers_do_not_change_losses(data2d, tmp_path):
    # no crop size, iterations or val crops given: data properties' crop, one pass over all objects
    cfg = TrainConfig(data_dir=str(data2d), out=str(tmp_path / "d"), epochs=1, batch_size=4, workers=2)
    result = train(cfg, progress=False)
    saved = json.loads((tmp_path / "d" / "config.json").read_text())
    props = load_checkpoint(result.last_checkpoint)["contract"]["data_properties"]
    n_train = sum(len(set(torch.unique(torch.from_numpy(m)).tolist()) - {0}) for m in _masks(data2d, "train"))
    assert saved["crop_size"] == props["crop_size"] and saved["iterations"] == -(-n_train // 4)
    assert saved["workers"] == 2 and saved["val_crops"] is None
    (tmp_path / "e.json").write_text(json.dumps({**saved, "out": str(tmp_path / "e"), "workers": 0}))
    single = train(tmp_path / "e.json", progress=False)  # a config file works as the API's argument too
    assert single.log[0]["train_loss"] == result.log[0]["train_loss"]
    assert single.log[0]["val_iou"] == result.log[0]["val_iou"]


def _masks(root, split):
    import tifffile

    return [tifffile.imread(p) for p in sorted((root / split / "masks").glob("*.tif"))]


def test_config_round_trip_and_bad_settings(data2d, tmp_path):
    cfg = _tiny(data2d, tmp_path / "x", crop_size=[32, 32])
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(TrainError, match="unknown training settings"):
        TrainConfig.from_dict({**cfg.to_dict(), "learning_rate": 1})
    with pytest.raises(TrainError, match="multiple of 8"):
        train(_tiny(data2d, tmp_path / "y", crop_size=[30, 30]), progress=False)
    with pytest.raises(TrainError, match="data folder not found"):
        train(_tiny(tmp_path / "nowhere", tmp_path / "z"), progress=False)


def test_cli_train_and_config_round_trip(data2d, tmp_path):
    run1, run2 = tmp_path / "cli1", tmp_path / "cli2"
    args = ["--epochs", "1", *TINY_CLI]
    res = CliRunner().invoke(main, [str(data2d), "--out", str(run1), *args, "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert "epoch 1/1" in res.output and "best" in res.output
    saved = json.loads((run1 / "config.json").read_text())
    assert saved["seed"] == 3 and saved["crop_size"] == [32, 32] and saved["iterations"] == 1
    # the written config is accepted again; options given on the command line win
    res = CliRunner().invoke(
        main, ["train", "--config", str(run1 / "config.json"), "--out", str(run2), "-q", "--no-tune-seed"]
    )
    assert res.exit_code == 0, res.output
    again = json.loads((run2 / "config.json").read_text())
    assert again["tune_seed"] is False and saved["tune_seed"] is True
    assert {**again, "out": None, "tune_seed": True} == {**saved, "out": None}
    assert Contract.from_dict(load_checkpoint(run2 / "last.pth")["contract"]).ndim == 2
    best = Contract.from_dict(load_checkpoint(run2 / "best.pth")["contract"])
    assert "seed_tune" not in best.provenance and best.thresholds.seed_thresh == 0.9
    log1 = (run1 / "log.csv").read_text().splitlines()[1].split(",")
    log2 = (run2 / "log.csv").read_text().splitlines()[1].split(",")
    assert log1[1] == log2[1]  # same settings, same seed: same train loss
    res = CliRunner().invoke(main, [str(tmp_path / "missing"), "--out", str(run2), "-q"])
    assert res.exit_code != 0 and "data folder not found" in res.output


def test_cli_prints_settings_counts_steps_shows_progress_and_keeps_runs(data2d, tmp_path):
    run = tmp_path / "steps"
    args = [str(data2d), "--out", str(run), "--batch-size", "2", "--iterations", "2", "--val-crops", "2"]
    args += ["--crop-size", "32", "--steps", "3", "--crop-jitter", "0.1", "--ema", "0.9"]
    res = CliRunner().invoke(main, args)  # not a terminal: progress lines, not a bar
    assert res.exit_code == 0, res.output
    assert "crop 32x32 (jitter 0.1), batch 2, 2 iterations x 2 epochs = 4 steps" in res.output  # ceil(3/2)
    assert (
        "lr 0.0005 (poly), weights averaged (EMA 0.9), spacing 1/1023 per px, thresholds seed 0.9 fg 0.5"
        in res.output
    )
    assert "epoch 1/2: batch 2/2, loss" in res.output and "epoch ETA 0 s" in res.output
    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 2 and config["crop_jitter"] == 0.1 and config["ema"] == 0.9
    best = re.search(r"best .* \(epoch (\d+), val AP@0.5 [0-9.]+, IoU", res.output)
    rows = list(csv.DictReader((run / "log.csv").open()))
    kept = kept_epoch([float(r["val_ap50"]) for r in rows], int(rows[0]["val_objects"]))
    assert best and int(best.group(1)) == 1 + kept  # counted from 1, as printed
    assert "best by val AP" in res.output and "val/ holds 5 objects" in res.output
    before = (run / "last.pth").stat().st_mtime_ns
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0 and "already holds a run (config.json, last.pth, best.pth)" in res.output
    assert "--resume continues it, --force starts over" in res.output
    assert (run / "last.pth").stat().st_mtime_ns == before  # nothing touched
    res = CliRunner().invoke(main, [*args, "--force", "-q"])
    assert res.exit_code == 0, res.output


def test_epochs_in_budget_plans_the_epochs_that_fit():
    from embedseg_training.train import epochs_in_budget

    assert epochs_in_budget(100, 2, 20.0, [10.0, 10.0], 60.0) == 6  # 40 s left, 10 s per epoch
    assert epochs_in_budget(100, 2, 20.0, [15.0, 5.0], 61.0) == 6  # the mean epoch time, not the last
    assert epochs_in_budget(5, 2, 20.0, [10.0, 10.0], 600.0) == 5  # never beyond the configured epochs
    assert epochs_in_budget(100, 3, 70.0, [20.0] * 3, 60.0) == 3  # over budget: stop, never below done
    assert epochs_in_budget(100, 0, 5.0, [], 60.0) == 100  # nothing measured yet


def test_time_budget_replans_the_poly_schedule_and_stops(data2d, tmp_path, monkeypatch):
    import embedseg_training.train as train_module

    calls, plans = [], iter([4, 20, 3])  # shrink, grow (lr held), then stop after 3 epochs

    def scripted(max_epochs, done, elapsed_s, epoch_times_s, budget_s):
        calls.append((max_epochs, done, elapsed_s, list(epoch_times_s), budget_s))
        return next(plans)

    monkeypatch.setattr(train_module, "epochs_in_budget", scripted)
    result = train(
        _tiny(data2d, tmp_path / "budget", epochs=50, crop_size=[32, 32], max_minutes=5), progress=False
    )
    assert result.epochs_done == 3 and result.stopped_by_budget
    lr1 = poly_lr(5e-4, 1, 4)
    assert [r["lr"] for r in result.log] == pytest.approx([5e-4, lr1, lr1])  # poly(2, 20) > lr1: held
    assert [c[1] for c in calls] == [1, 2, 3] and all(c[0] == 50 and c[4] == 300.0 for c in calls)
    assert all(len(c[3]) == c[1] and min(c[3]) > 0 and c[2] >= sum(c[3]) for c in calls)
    assert load_checkpoint(result.last_checkpoint)["scheduler"]["n_epochs"] == 20  # the plan epoch 2 ran on
    unbudgeted = train(_tiny(data2d, tmp_path / "free", crop_size=[32, 32]), progress=False)
    assert not unbudgeted.stopped_by_budget and unbudgeted.epochs_done == 2
    with pytest.raises(TrainError, match="max_minutes"):
        train(_tiny(data2d, tmp_path / "bad", max_minutes=0), progress=False)


def test_cli_time_budget_stops_a_run(data2d, tmp_path):
    run = tmp_path / "cli-budget"
    args = ["--epochs", "50", *TINY_CLI]
    res = CliRunner().invoke(main, [str(data2d), "--out", str(run), *args, "--max-minutes", "0.0001", "-q"])
    assert res.exit_code == 0, res.output
    assert "done: 1 epoch(s)" in res.output  # the first epoch alone outlasts a 6 ms budget
    assert json.loads((run / "config.json").read_text())["max_minutes"] == 0.0001


def test_background_id_option_maps_that_value_to_background(tmp_path):
    """Masks whose background is 1 (upstream's Arabidopsis data) train with --bg-id 1."""
    import tifffile

    from embedseg_deploy.synthetic import write_dataset
    from embedseg_training.train import TrainConfig, _resolve

    root = write_dataset(tmp_path / "data", ndim=2, n_train=2, n_val=1, n_test=0, shape=(64, 64), seed=3)
    for mask in root.glob("*/masks/*.tif"):
        labels = tifffile.imread(mask).astype(np.uint16)
        tifffile.imwrite(mask, np.where(labels == 0, 1, labels + 1).astype(np.uint16))
    shifted = _resolve(TrainConfig(data_dir=str(root), out=str(tmp_path / "run"), bg_id=1))
    plain = _resolve(TrainConfig(data_dir=str(root), out=str(tmp_path / "run2")))
    plain_max = plain.contract.data_properties["max_object_size"]  # background 1 read as one object
    assert plain_max > 2 * shifted.contract.data_properties["max_object_size"]


def _poison_training_losses(monkeypatch, bad_calls):
    """Make the training loss NaN on the given (0-based) training calls; validation stays untouched."""
    import embedseg_training.train as train_module

    real, calls = train_module.spatial_embedding_loss, []

    def loss(*args, compute_iou=False, **kw):
        res = real(*args, compute_iou=compute_iou, **kw)
        if compute_iou:
            return res
        calls.append(len(calls))
        return res._replace(loss=res.loss * float("nan")) if calls[-1] in bad_calls else res

    monkeypatch.setattr(train_module, "spatial_embedding_loss", loss)
    return calls


def test_non_finite_loss_skips_the_step_and_keeps_the_weights_finite(data2d, tmp_path, monkeypatch):
    calls = _poison_training_losses(monkeypatch, {0, 1})
    config = _tiny(data2d, tmp_path / "nan", epochs=1, iterations=3, crop_size=[32, 32])
    with pytest.warns(RuntimeWarning, match=r"epoch 1, batch [12]: loss is nan .*step skipped") as caught:
        result = train(config, progress=False)
    assert len(calls) == 3 and len([w for w in caught if "step skipped" in str(w.message)]) == 2
    row = result.log[0]
    assert row["skipped_steps"] == 2 and np.isfinite(row["train_loss"]) and np.isfinite(row["val_loss"])
    state = load_checkpoint(result.last_checkpoint)["model_state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    with open(result.run_dir / "log.csv") as f:
        assert next(csv.DictReader(f))["skipped_steps"] == "2"


def test_training_stops_after_five_non_finite_losses_in_a_row(data2d, tmp_path, monkeypatch):
    calls = _poison_training_losses(monkeypatch, set(range(100)))
    config = _tiny(data2d, tmp_path / "nan", epochs=2, iterations=8, crop_size=[32, 32])
    with pytest.warns(RuntimeWarning), pytest.raises(TrainError, match=r"nan for 5 batches in a row.*--lr"):
        train(config, progress=False)
    assert len(calls) == 5 and not (tmp_path / "nan" / "last.pth").exists()


def test_omp_wait_policy_is_passive_only_on_a_busy_machine_the_user_left_alone():
    from embedseg_training.cli import omp_wait_policy

    assert omp_wait_policy(0.3, 2, {}) is None  # idle: OpenMP's default (passive was slower)
    assert omp_wait_policy(1.8, 2, {}) == "PASSIVE"  # busy: spinning threads lost 2x (train_threads.md)
    assert omp_wait_policy(9.0, 2, {"OMP_WAIT_POLICY": "ACTIVE"}) is None  # the user's choice stands


@pytest.mark.parametrize("select", ["ap", "iou"])
def test_best_checkpoint_is_chosen_by_full_pipeline_ap_or_by_crop_iou(data2d, tmp_path, monkeypatch, select):
    """A scripted val AP over 5 objects: "ap" keeps the latest epoch within one object (0.2) of the best AP
    whatever the crop IoU says, so 0.8 after 0.9 replaces it and 0.1 does not; "iou" is upstream's rule."""
    import embedseg_training.train as train_module
    from embedseg_training.validate import PipelineScore

    aps = iter([0.9, 0.8, 0.1])
    monkeypatch.setattr(
        train_module, "pipeline_score", lambda *a, **k: PipelineScore(next(aps), 0.5, 5, 5, 1)
    )
    cfg = _tiny(data2d, tmp_path / select, epochs=3, crop_size=[32, 32], select=select)
    seen = []
    result = train(cfg, progress=False, on_epoch=lambda model, contract, row: seen.append(row["epoch"]))
    assert seen == [1, 2, 3]  # the callback sees every epoch (from 1, as log.csv), after its checkpoints
    ious = [r["val_iou"] for r in result.log]
    assert [r["val_ap50"] for r in result.log] == [0.9, 0.8, 0.1]
    assert result.best_epoch == (1 if select == "ap" else ious.index(max(ious)))
    assert load_checkpoint(result.best_checkpoint)["epoch"] == result.best_epoch
    with pytest.raises(TrainError, match="select must be ap or iou"):
        train(_tiny(data2d, tmp_path / "x", select="loss"), progress=False)


def test_a_run_keeps_the_unfed_taps_at_zero_and_records_them(data2d, tmp_path):
    from embedseg_training.dilation import unfed_convs

    def outer_taps(model, name, axis):
        weight = dict(model.named_modules())[name].weight.detach()
        return torch.cat([weight.narrow(2 + axis, 0, 1), weight.narrow(2 + axis, 2, 1)])

    result = train(_tiny(data2d, tmp_path / "crop", crop_size=[16, 16]), progress=False)  # 64 px images
    model, contract = load_model(result.last_checkpoint)
    record = contract.provenance["dilated_taps_off"]
    assert record["crop_size"] == [16, 16]
    assert record["image_shape"] == contract.data_properties["max_image_shape"]
    expected = unfed_convs(model, [16, 16], record["image_shape"])
    assert [n for n, _ in expected] == record["layers"] and len(expected) == 24  # 1/8: d 1, 2, 4
    for name, axis in expected:
        assert torch.count_nonzero(outer_taps(model, name, axis)) == 0
    upstream = train(
        _tiny(data2d, tmp_path / "all", crop_size=[16, 16], dilated_context="all"), progress=False
    )
    model, contract = load_model(upstream.last_checkpoint)
    assert "dilated_taps_off" not in contract.provenance
    assert all(torch.count_nonzero(outer_taps(model, n, a)) > 0 for n, a in expected)
    # a record of the layers alone (as the first runs of this rule wrote it), under either setting
    ckpt = torch.load(result.last_checkpoint, weights_only=True)
    del ckpt["contract"]["provenance"]["dilated_taps_off"]["image_shape"]
    torch.save(ckpt, layers_only := tmp_path / "layers_only.pth")
    for k, (start, context, kept_off) in enumerate(
        (
            (result.last_checkpoint, "crop", True),
            (layers_only, "all", True),
            (upstream.last_checkpoint, "crop", False),
        )
    ):  # fine-tuning keeps the network it starts from, whatever --dilated-context says
        tuned = train(
            _tiny(data2d, tmp_path / f"tuned{k}", init=str(start), dilated_context=context), progress=False
        )
        model, contract = load_model(tuned.last_checkpoint)
        assert (contract.provenance.get("dilated_taps_off", {}).get("layers") == record["layers"]) == kept_off
        assert all((torch.count_nonzero(outer_taps(model, n, a)) == 0) == kept_off for n, a in expected)
    ckpt["contract"]["provenance"]["dilated_taps_off"]["layers"] = ["encoder.initial_block.conv"]
    torch.save(ckpt, bad := tmp_path / "bad_record.pth")
    with pytest.raises(TrainError, match=r"bad_record\.pth: unreadable record of switched-off taps"):
        train(_tiny(data2d, tmp_path / "from-bad", init=str(bad)), progress=False)
    with pytest.raises(TrainError, match="dilated_context must be crop or all"):
        train(_tiny(data2d, tmp_path / "bad", dilated_context="none"), progress=False)


def test_a_run_whose_kept_epoch_has_objects_from_too_wide_seeds_is_reported(data2d, tmp_path, monkeypatch):
    import embedseg_training.train as train_module
    from embedseg_training.validate import PipelineScore

    wide = iter([0, 40, 7])
    monkeypatch.setattr(
        train_module, "pipeline_score", lambda *a, **k: PipelineScore(0.8, 0.5, 5, 5, 1, next(wide))
    )
    with pytest.warns(
        UserWarning, match=r"at its epoch 3, 7 val object\(s\) grew .* \(2 of 3 epochs"
    ) as caught:
        result = train(_tiny(data2d, tmp_path / "run", epochs=3, crop_size=[32, 32]), progress=False)
    assert "another --seed" in str(caught[-1].message)
    assert [r["val_wide_objects"] for r in result.log] == [0, 40, 7]
    assert train_module.degenerate_seeds_warning(result.log[:1], 0, tmp_path / "best.pth") is None


def test_a_weight_averaged_run_judges_keeps_and_resumes_the_average(data2d, tmp_path):
    seen = []

    def keep(module, contract, row):
        seen.append({k: v.detach().clone() for k, v in module.state_dict().items()})

    cfg = _tiny(data2d, tmp_path / "a", crop_size=[32, 32], ema=0.9)
    straight = train(cfg, progress=False, on_epoch=keep)
    last = load_checkpoint(straight.last_checkpoint)
    average = last["weight_average"]
    assert average["updates"] == 4 and average["decay"] == 0.9  # one per optimizer step
    for k, v in seen[-1].items():  # the callbacks saw the average, not the live weights
        assert torch.equal(v, average["weights"][k]), k
    live = last["model_state_dict"]
    assert any(not torch.equal(live[k], v) for k, v in seen[-1].items() if v.is_floating_point())
    best = load_checkpoint(straight.best_checkpoint)["model_state_dict"]
    for k, v in seen[straight.best_epoch].items():  # best.pth holds the average of its epoch
        assert torch.equal(v, best[k]), k
    first = train(_tiny(data2d, tmp_path / "b", epochs=1, crop_size=[32, 32], ema=0.9), progress=False)
    assert [first.log[0][k] for k in ("train_loss", "val_loss")] == [
        straight.log[0][k] for k in ("train_loss", "val_loss")
    ]
    resumed = train(_tiny(data2d, tmp_path / "b", crop_size=[32, 32], ema=0.9), progress=False, resume=True)
    assert resumed.log[1]["val_loss"] == straight.log[1]["val_loss"]
    again = load_checkpoint(resumed.last_checkpoint)["weight_average"]
    assert all(torch.equal(v, again["weights"][k]) for k, v in average["weights"].items())
    train(_tiny(data2d, tmp_path / "c", epochs=1, crop_size=[32, 32]), progress=False)
    with pytest.raises(TrainError, match="no weight average"):  # a plain run cannot resume averaged
        train(_tiny(data2d, tmp_path / "c", crop_size=[32, 32], ema=0.9), progress=False, resume=True)
    with pytest.raises(TrainError, match="ema must be"):
        train(_tiny(data2d, tmp_path / "d", crop_size=[32, 32], ema=1.0), progress=False)
