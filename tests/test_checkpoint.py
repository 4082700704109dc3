"""Checkpoints: round trip, weights_only loading, upstream import (both fixtures) and clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from embedseg_deploy.contract import Contract, Normalization, spacing_from_upstream_grid
from embedseg_deploy.io import sha256_file
from embedseg_training.checkpoint import (
    CheckpointError,
    convert_upstream,
    import_upstream,
    load_checkpoint,
    load_model,
    save_checkpoint,
    upstream_normalization,
)
from embedseg_training.cli import main
from embedseg_training.model import BranchedERFNet

from .conftest import upstream_case

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _contract(ndim=2):
    return Contract(ndim=ndim, spacing=[0.01] * ndim, normalization=Normalization("absolute", divisor=255))


def test_round_trip_with_optimizer_and_weights_only(tmp_path):
    torch.manual_seed(0)
    model = BranchedERFNet(2)
    opt = torch.optim.Adam(model.parameters(), lr=5e-4, weight_decay=1e-4)
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    opt.step()
    log = [{"epoch": 0, "train_loss": 1.5, "val_loss": 1.2, "val_iou": 0.4, "lr": 5e-4}]
    path = save_checkpoint(
        tmp_path / "last.pth",
        model,
        _contract(),
        epoch=3,
        best_iou=0.4,
        optimizer_state_dict=opt.state_dict(),
        scheduler={"last_epoch": 3},
        log=log,
    )
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temp file left behind
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == 1 and raw["epoch"] == 3 and raw["log"] == log and "torch" in raw["versions"]
    ck = load_checkpoint(path)
    assert Contract.from_dict(ck["contract"]) == _contract()
    opt2 = torch.optim.Adam(BranchedERFNet(2).parameters(), lr=1.0)
    opt2.load_state_dict(ck["optimizer_state_dict"])
    assert opt2.param_groups[0]["lr"] == 5e-4
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    loaded, contract = load_model(path)
    assert not loaded.training and contract == _contract()
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_best_checkpoint_has_no_optimizer(tmp_path):
    path = save_checkpoint(tmp_path / "best.pth", BranchedERFNet(3), _contract(3), epoch=0, best_iou=0.1)
    assert "optimizer_state_dict" not in load_checkpoint(path)


@pytest.mark.parametrize("ndim", [2, 3])
def test_upstream_import_gives_same_weights_and_correct_contract(tmp_path, ndim):
    case = upstream_case(ndim)
    props = json.loads((case / "data_properties.json").read_text())
    cfg = json.loads((case / "test_config.json").read_text())
    out = tmp_path / "ours.pth"
    convert_upstream(case / "checkpoint.pth", out)  # JSON files found beside the checkpoint
    model, contract = load_model(out)
    upstream = torch.load(case / "checkpoint.pth", weights_only=True)
    for k, v in upstream["model_state_dict"].items():
        assert torch.equal(model.state_dict()[k], v)

    assert contract.ndim == ndim and contract.in_channels == 1 and contract.n_sigma == ndim
    grid = [cfg[k] for k in ("n_z", "n_y", "n_x")[3 - ndim :]]
    pixel = [cfg[k] for k in ("l_z", "l_y", "l_x")[3 - ndim :]]
    assert contract.spacing == pytest.approx(spacing_from_upstream_grid(ndim, grid, pixel), rel=1e-12)
    # one pixel is exactly one step of upstream's torch.linspace(0, l, n) grid
    for s, n, l in zip(contract.spacing, grid, pixel, strict=True):
        assert s == pytest.approx(torch.linspace(0, l, int(n), dtype=torch.float64)[1].item(), rel=1e-12)
    if ndim == 3:
        assert contract.anisotropy == 2.0 and contract.pixel_size == [2.0, 1.0, 1.0]
        assert contract.spacing[0] == pytest.approx(2.0 / (props["n_x"] - 1))  # physically isotropic
    assert contract.padding == ("center" if ndim == 2 else "end")
    assert contract.normalization == Normalization("percentile", pmin=1.0, pmax=99.8)
    assert contract.thresholds.seed_thresh == 0.9 and contract.thresholds.fg_thresh == 0.5
    assert contract.thresholds.min_object_size == int(props["min_object_size"]) == cfg["min_object_size"]
    assert contract.provenance["source_sha256"] == sha256_file(case / "checkpoint.pth")
    assert contract.data_properties["foreground_weight"] == props["foreground_weight"]
    ck = load_checkpoint(out)
    assert ck["epoch"] == upstream["epoch"] and ck["best_iou"] == upstream["best_iou"]
    assert [r["val_iou"] for r in ck["log"]] == upstream["logger_data"]["iou"]

    # the upstream checkpoint loads directly too, with its JSON files from its folder
    model2, contract2 = load_model(case / "checkpoint.pth")
    assert contract2.spacing == contract.spacing and contract2.provenance["source_sha256"]
    x = torch.from_numpy(np.load(case / "network_input.npy"))[None]
    if ndim == 2:
        with torch.no_grad():
            out_arr = model2(x)[0].numpy()
        assert np.abs(out_arr - np.load(case / "network_output.npy")).max() < 1e-4


def test_upstream_without_json_files_is_a_clear_error(tmp_path):
    case = upstream_case(2)
    shutil.copy(case / "checkpoint.pth", tmp_path / "best_iou_model.pth")
    with pytest.raises(CheckpointError, match=r"data_properties\.json"):
        load_model(tmp_path / "best_iou_model.pth")
    _, contract = load_model(tmp_path / "best_iou_model.pth", upstream_json_dir=case)
    assert contract.ndim == 2


def test_upstream_options_and_normalizations():
    case = upstream_case(3)
    options = {"min_object_size": 7, "seed_thresh": 0.8, "norm": "absolute", "data_type": "8-bit"}
    _, c = import_upstream(case / "checkpoint.pth", case / "data_properties.json", anisotropy=4.0, **options)
    assert c.spacing[0] == pytest.approx(4.0 / 95) and c.anisotropy == 4.0
    assert c.thresholds.min_object_size == 7 and c.thresholds.seed_thresh == 0.8
    assert c.normalization == Normalization("absolute", divisor=255.0)
    assert "fg_thresh 0.5: upstream's defaults taken" in " ".join(c.provenance["notes"])
    assert upstream_normalization("absolute", "8-bit").divisor == 255
    assert upstream_normalization("absolute", "16-bit").divisor == 65535
    assert upstream_normalization("mean-std", None).kind == "mean-std"
    with pytest.raises(CheckpointError, match="data_type"):
        upstream_normalization("absolute", "32-bit")
    with pytest.raises(CheckpointError, match="unknown upstream normalisation"):
        upstream_normalization("zscore", None)


def _lone_upstream(tmp_path, ndim, props=None, norm=None):
    """An upstream checkpoint copied alone into tmp_path, with the given JSON files beside it."""
    shutil.copy(upstream_case(ndim) / "checkpoint.pth", tmp_path / "best_iou_model.pth")
    for name, doc in (("data_properties.json", props), ("normalization.json", norm)):
        if doc is not None:
            (tmp_path / name).write_text(json.dumps(doc))
    return tmp_path / "best_iou_model.pth"


NORM = {"data_type": "16-bit", "norm": "min-max-percentile"}


def test_incomplete_upstream_json_is_an_error_naming_key_file_and_option(tmp_path):
    """No silent defaults for what changes the model's meaning: grid, anisotropy, normalisation."""
    ckpt = _lone_upstream(tmp_path, 2, {"foo": 1}, NORM)
    with pytest.raises(CheckpointError, match=r"data_properties\.json: no n_y, n_x: .*--grid N_Y,N_X"):
        load_model(ckpt)  # was: exported with upstream's 1024 grid, 4x off the fixture's 256
    _, contract = load_model(ckpt, grid=[256, 256])
    assert contract.spacing == pytest.approx([1 / 255, 1 / 255])
    notes = " ".join(contract.provenance["notes"])
    assert "min_object_size not in" in notes and "seed_thresh 0.9, fg_thresh 0.5" in notes

    props = json.loads((upstream_case(2) / "data_properties.json").read_text())
    (tmp_path / "normalization.json").unlink()
    with pytest.raises(CheckpointError, match=r"no normalization\.json .*--normalization FILE or --norm"):
        load_model(ckpt, grid=[256, 256])
    (tmp_path / "normalization.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(CheckpointError, match=r"normalization\.json: no 'norm' key.*--norm"):
        import_upstream(ckpt, props, tmp_path / "normalization.json")
    _, contract = import_upstream(ckpt, props, tmp_path / "normalization.json", norm="mean-std")
    assert contract.normalization.kind == "mean-std"
    with pytest.raises(CheckpointError, match=r"data_type '8-bit' or '16-bit'.*--data-type"):
        import_upstream(ckpt, {**props, "data_type": None}, {"norm": "absolute"})

    props3 = json.loads((upstream_case(3) / "data_properties.json").read_text())
    del props3["pixel_size_z_microns"]
    (tmp_path / "3d").mkdir()
    ckpt3 = _lone_upstream(tmp_path / "3d", 3, props3, NORM)
    with pytest.raises(CheckpointError, match=r"no pixel_size_z_microns .*anisotropy.*--anisotropy Z_OVER_X"):
        load_model(ckpt3)  # was: anisotropy 1 assumed, halving the z spacing of the fixture
    _, contract = load_model(ckpt3, anisotropy=2.0)
    assert contract.spacing[0] == pytest.approx(2.0 / 95)
    del props3["n_z"]
    with pytest.raises(CheckpointError, match=r"no n_z: .*--grid N_Z,N_Y,N_X"):
        import_upstream(ckpt3, props3, NORM, anisotropy=2.0)


def test_refusal_of_pickled_objects_never_suggests_weights_only_false(tmp_path):
    import argparse

    path = tmp_path / "trainer_state.pth"
    torch.save({"model_state_dict": BranchedERFNet(2).state_dict(), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: holds more than weights (a pickled argparse.Namespace object)")
    assert "not a plain checkpoint" in message and "weights_only" not in message and "trust" not in message
    junk = tmp_path / "junk.pth"
    junk.write_text("nope")  # 'n' is a pickle opcode torch's weights-only unpickler refuses
    with pytest.raises(CheckpointError, match=r"junk\.pth: not a torch checkpoint") as caught:
        load_checkpoint(junk)
    assert "weights_only" not in str(caught.value) and "Unsupported operand 110)" in str(caught.value)
    torch.save(BranchedERFNet(2), tmp_path / "whole.pth")  # a whole pickled model
    with pytest.raises(CheckpointError, match=r"whole\.pth: holds more than weights .*BranchedERFNet"):
        load_checkpoint(tmp_path / "whole.pth")


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"notes\.pth: not a torch checkpoint"):
        load_checkpoint(text)
    unknown = tmp_path / "unknown.pth"
    torch.save({"weights": {"a": torch.zeros(2)}, "epoch": 1}, unknown)
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        load_checkpoint(unknown)
    listy = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listy)
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        load_checkpoint(listy)
    # wrong-shaped weights: a 2D state dict under a contract that says 2 input channels
    state = BranchedERFNet(2).state_dict()
    wrong = save_checkpoint(
        tmp_path / "wrong.pth", state, Contract(ndim=2, in_channels=2, spacing=[0.1, 0.1])
    )
    with pytest.raises(CheckpointError, match=r"wrong\.pth: weights do not fit"):
        load_model(wrong)
    # a 2D upstream state dict read as 3D (bad contract ndim)
    mixed = save_checkpoint(tmp_path / "mixed.pth", state, _contract(3))
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_model(mixed)
    # a future format
    torch.save(
        {"format": 2, "model_state_dict": state, "contract": _contract().to_dict()}, tmp_path / "f2.pth"
    )
    with pytest.raises(CheckpointError, match="unsupported checkpoint format"):
        load_checkpoint(tmp_path / "f2.pth")


def test_weights_are_saved_atomically_over_an_existing_file(tmp_path):
    path = tmp_path / "best.pth"
    save_checkpoint(path, BranchedERFNet(2), _contract(), epoch=0)
    save_checkpoint(path, BranchedERFNet(2), _contract(), epoch=1)
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth"]


def test_cli_import_upstream(tmp_path):
    case = upstream_case(3)
    out = tmp_path / "model.pth"
    res = CliRunner().invoke(main, ["import-upstream", str(case / "checkpoint.pth"), "--out", str(out),
                                    "--anisotropy", "2"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "3D" in res.output
    _, contract = load_model(out)
    assert contract.padding == "end" and contract.spacing[1] == pytest.approx(1 / 95)
    bad = tmp_path / "bad.pth"
    bad.write_text("nope")
    res = CliRunner().invoke(main, ["import-upstream", str(bad), "--out", str(tmp_path / "x.pth"),
                                    "--data-properties", str(case / "data_properties.json")])  # fmt: skip
    assert res.exit_code != 0 and "not a torch checkpoint" in res.output
    assert not (tmp_path / "x.pth").exists()


def test_cli_import_upstream_names_its_options_and_refuses_to_overwrite(tmp_path):
    case = upstream_case(3)
    out = tmp_path / "model.pth"
    args = ["import-upstream", str(case / "checkpoint.pth"), "--out", str(out)]
    res = CliRunner().invoke(main, [*args, "--grid", "96,96"])
    assert res.exit_code == 1 and "--grid gives 2 size(s), but this 3D model needs 3" in res.output
    assert "grid=" not in res.output and not out.exists()
    assert CliRunner().invoke(main, args).exit_code == 0
    stamp = out.stat().st_mtime_ns
    res = CliRunner().invoke(main, [*args, "--seed-thresh", "0.7"])
    assert res.exit_code == 1 and f"{out} exists; pass --force" in res.output
    assert out.stat().st_mtime_ns == stamp
    res = CliRunner().invoke(main, [*args, "--seed-thresh", "0.7", "--force"])
    assert res.exit_code == 0, res.output
    _, contract = load_model(out)
    assert contract.thresholds.seed_thresh == 0.7


def test_cli_import_upstream_prints_the_defaults_it_takes(tmp_path):
    ckpt = _lone_upstream(tmp_path, 2, {"n_y": 256.0, "n_x": 256.0})
    out = tmp_path / "model.pth"
    res = CliRunner().invoke(main, ["import-upstream", str(ckpt), "--out", str(out)])
    assert res.exit_code == 1 and "--norm min-max-percentile|mean-std|absolute" in res.output
    res = CliRunner().invoke(main, ["import-upstream", str(ckpt), "--out", str(out), "--norm", "mean-std"])
    assert res.exit_code == 0, res.output
    assert (
        "note: min_object_size not in" in res.output and "note: seed_thresh 0.9, fg_thresh 0.5" in res.output
    )
    assert load_model(out)[1].normalization.kind == "mean-std"


def test_cli_norm_choices_match_the_importer():
    from embedseg_training import cli
    from embedseg_training.checkpoint import UPSTREAM_NORMS

    assert cli.UPSTREAM_NORMS == UPSTREAM_NORMS
