"""Full-pipeline validation of training: the val images segmented by the runtime, scored as AP."""

from __future__ import annotations

import numpy as np
import pytest

from embedseg_deploy.backends.torch_backend import ModuleBackend
from embedseg_deploy.predict import Predictor
from embedseg_deploy.synthetic import write_dataset
from embedseg_training.checkpoint import load_model
from embedseg_training.data import load_split
from embedseg_training.train import TrainConfig, train
from embedseg_training.validate import (
    FEW_VAL_OBJECTS,
    keeps,
    kept_epoch,
    pick_images,
    pipeline_score,
    score_labels,
    small_val_note,
    tolerance,
    wide_objects,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_score_labels_counts_merges_and_misses_pooled_over_images():
    truth = np.zeros((20, 30), np.int32)
    truth[2:8, 2:8], truth[2:8, 10:16], truth[12:18, 2:8] = 1, 2, 3
    assert score_labels([truth], [truth.copy()]).ap50 == 1.0
    merged = truth.copy()
    merged[2:8, 2:16] = 1  # two objects and the gap between become one: IoU 36 / 84 with either
    missed = truth.copy()
    missed[missed == 3] = 0
    score = score_labels([truth, truth], [merged, missed])
    # image 1: TP 1 (object 3), FP 1, FN 2; image 2: TP 2, FN 1 -> 3 / (3 + 1 + 3)
    assert score.ap50 == pytest.approx(3 / 7) and (score.n_true, score.n_pred, score.images) == (6, 4, 2)
    shrunk = truth.copy()
    shrunk[2:8, 2:5] = 0  # IoU 0.5 exactly with object 1: a match at 0.5, not above
    assert score_labels([truth], [shrunk]).ap50_90 < score_labels([truth], [shrunk]).ap50 == 1.0


def test_pick_images_keeps_the_pixel_budget_and_notes_what_it_left_out(tmp_path):
    root = write_dataset(
        tmp_path / "d", ndim=2, n_train=1, n_val=3, n_test=0, shape=(64, 64), n_objects=(4, 6), seed=2
    )
    val = load_split(root, "val")
    assert pick_images(val, max_pixels=2 * 64 * 64) == val[:2]
    assert pick_images(val, max_pixels=10) == val[:1]  # at least one image, whatever its size
    note = small_val_note(val, val[:2])
    n = sum(s.n_objects for s in val[:2])
    assert n < FEW_VAL_OBJECTS and f"val/ holds {n} objects" in note and "scores 2 of 3 val images" in note


def test_a_live_model_scores_exactly_as_its_checkpoint_does_in_the_runtime(tmp_path):
    root = write_dataset(tmp_path / "d", ndim=2, n_train=2, n_val=2, n_test=0, shape=(72, 88), seed=4)
    cfg = TrainConfig(str(root), str(tmp_path / "run"), epochs=2, batch_size=2, iterations=2, crop_size=[32])
    result = train(cfg, progress=False)
    model, contract = load_model(result.best_checkpoint)
    model.train()
    val = load_split(root, "val")
    live = pipeline_score(ModuleBackend(model, contract), val)
    assert model.training  # the check puts back the mode it found
    runtime = Predictor(result.best_checkpoint, "torch")
    labels = [runtime.predict(s.image[0]) for s in val]
    assert live == score_labels([s.mask for s in val], labels)
    assert live.ap50 == pytest.approx(result.best_ap50)
    # thresholds the runtime accepts change the score the same way
    strict = pipeline_score(ModuleBackend(model, contract), val, {"seed_thresh": 0.999})
    assert strict.n_pred <= live.n_pred
    # every epoch records its wide objects; against a zero extent every object found is wide
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    column = rows[0].split(",").index("val_wide_objects")
    assert all(r.split(",")[column].isdigit() for r in rows[1:])
    loose = {"seed_thresh": 0.01, "fg_thresh": 0.01}  # an untrained model: find some objects
    anything = pipeline_score(ModuleBackend(model, contract), val, loose, [0.0, 0.0])
    assert anything.wide_objects == anything.n_pred > 0
    # at a middle limit the count equals the labels in the image whose own seed is wider, by brute force
    predictor = Predictor(ModuleBackend(model, contract), thresholds=loose)
    sigmas = []
    for s in val:
        x = predictor.prepare(s.image, channel_axis=0)
        raw = predictor.predict_raw(x)
        found, seeds = predictor.cluster(raw, return_seeds=True)
        shown = np.unique(np.asarray(found)[predictor.crop(x.shape[1:])])
        for label in shown[shown > 0]:
            at = raw[(slice(2, 4), *seeds[label - 1])].astype(np.float64)  # sigma x, y at the label's seed
            sigmas.append((1 / np.sqrt(2 * np.exp(10 * at)) / np.array(contract.spacing)[::-1]).max())
    limit = float(np.median(sigmas))
    middle = pipeline_score(ModuleBackend(model, contract), val, loose, [limit, limit])
    assert 0 < middle.wide_objects == sum(sigma > limit for sigma in sigmas) < len(sigmas)


def bandwidth_raw(sigma_px: float, spacing: float) -> float:
    """The raw sigma channel value whose bandwidth exp(-s d^2), s = exp(10 raw), has sigma ``sigma_px``."""
    return float(np.log(1.0 / (2.0 * (sigma_px * spacing) ** 2)) / 10.0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_wide_objects_counts_seeds_wider_than_the_largest_object(ndim):
    spacing = [2 / 1023, 1 / 1023, 1 / 1023][3 - ndim :]  # 3D: z pixels twice as far in embedding units
    raw = np.zeros((2 * ndim + 1, *[6] * ndim), np.float32)
    for d in range(ndim):  # channel d is axis ndim - 1 - d: sigma 5 px everywhere
        raw[ndim + d] = bandwidth_raw(5.0, spacing[ndim - 1 - d])
    seeds = np.array([[1] * ndim, [2] * ndim, [3] * ndim])
    limit = [15.0] * ndim
    assert wide_objects(raw, seeds, spacing, limit) == 0
    raw[ndim][(2,) * ndim] = bandwidth_raw(400.0, spacing[ndim - 1])  # one seed 400 px wide along x
    raw[ndim][(4,) * ndim] = bandwidth_raw(400.0, spacing[ndim - 1])  # wide, but no object starts there
    assert wide_objects(raw, seeds, spacing, limit) == 1
    raw[2 * ndim - 1][(3,) * ndim] = bandwidth_raw(16.0, spacing[0])  # 16 px along the first array axis
    assert wide_objects(raw, seeds, spacing, limit) == 2
    assert wide_objects(raw, seeds, spacing, [17.0] * ndim) == 1
    assert wide_objects(raw, seeds[:0], spacing, limit) == 0
    # per axis: 500 px allowed along x (the last array axis) leaves only the 16 px along the first axis
    assert wide_objects(raw, seeds, spacing, [15.0] * (ndim - 1) + [500.0]) == 1


def test_an_epoch_is_kept_within_two_standard_errors_of_the_best_ap_so_far():
    assert keeps(0.0, [], 10) and keeps(0.9, [1.0], 10) and not keeps(0.89, [1.0], 10)  # one object at least
    assert tolerance(0.8, 22) == pytest.approx(0.1706, abs=1e-4)  # 2 sqrt(0.8 * 0.2 / 22) > 1 / 22
    assert keeps(0.63, [0.8], 22) and not keeps(0.62, [0.8], 22)
    assert keeps(0.882, [0.9], 1000) and not keeps(0.88, [0.9], 1000)  # 2 sqrt(0.09 / 1000) = 0.019
    # a noisy rise, a collapse at the end: the latest epoch near the top, not the single highest, not the last
    aps = [0.0, 0.5, 0.82, 0.78, 0.8, 0.79, 0.2]
    assert kept_epoch(aps, 20) == 5 and kept_epoch(aps, 10_000) == 2
    # the online rule and the offline replay agree
    kept = [i for i in range(len(aps)) if keeps(aps[i], aps[:i], 20)]
    assert kept[-1] == kept_epoch(aps, 20)


def _dim_and_bright(path, dim: int, unlabelled: int = 0):
    """The toy network (seediness rises with local brightness) on 16 balls, the first ``dim`` of them
    dimmer: found as foreground (seediness > 0.5) but peaking under the 0.9 seed threshold; the last
    ``unlabelled`` dim ones are left out of the mask (objects nobody annotated)."""
    from types import SimpleNamespace

    from embedseg_deploy.backends import create_backend

    from ._runtime_models import blobs, toy_onnx

    _, labels = blobs((128, 128), 16, radius=4.0, seed=3, gap=10.0)
    rng = np.random.default_rng(0)
    level = np.where((labels > 0) & (labels <= dim), 660.0, 1100.0)  # peaks 0.85-0.89 vs over 0.9
    if unlabelled:  # the annotated dim balls a little dimmer (peaks 0.79-0.83) than the others
        level[(labels > 0) & (labels <= dim - unlabelled)] = 640.0
    image = np.where(labels > 0, level, 100.0) + rng.normal(0, 20, labels.shape)
    mask = np.where((labels <= dim - unlabelled) | (labels > dim), labels, 0)
    sample = SimpleNamespace(image=image[None].astype(np.float32), mask=mask)
    return (
        create_backend(toy_onnx(path / "toy.onnx", 2), "onnx-cpu"),
        [sample],
        int((np.unique(mask) > 0).sum()),
    )


def test_the_seed_threshold_is_lowered_to_what_nearly_all_val_objects_reach(tmp_path):
    from embedseg_deploy.predict import Predictor
    from embedseg_training.validate import SEED_QUANTILE, object_peaks, tune_seed_thresh

    backend, val, n = _dim_and_bright(tmp_path, dim=3)
    peaks = object_peaks(
        val[0].mask, Predictor(backend).run(val[0].image, channel_axis=0, want_seeds=True).seeds
    )
    assert len(peaks) == n == 16 and (peaks[:3] < 0.9).all() and (peaks[:3] > 0.5).all()
    assert (peaks[3:] > 0.9).all()
    tune = tune_seed_thresh(backend, val, 0.9)
    assert tune.kept and tune.below == 3 and tune.objects == 16
    assert tune.after == pytest.approx(np.quantile(peaks, SEED_QUANTILE), abs=1e-4) and tune.after < 0.9
    assert tune.val_ap50[1] > tune.val_ap50[0]  # dim objects seeded at the tuned threshold, not at 0.9
    assert pipeline_score(backend, val, {"seed_thresh": tune.after}).ap50 == pytest.approx(tune.val_ap50[1])
    bright = tune_seed_thresh(*_dim_and_bright(tmp_path / "bright", dim=0)[:2], 0.9)
    assert not bright.kept and bright.after == 0.9 and bright.below == 0  # never raised
    # lowering it would also seed unannotated dim balls: val AP falls, the threshold stays
    backend, val, n = _dim_and_bright(tmp_path / "fp", dim=12, unlabelled=9)
    crowded = tune_seed_thresh(backend, val, 0.9)
    assert n == 7 and crowded.below == 3 and crowded.after < 0.9
    assert crowded.val_ap50[1] < crowded.val_ap50[0] and not crowded.kept
