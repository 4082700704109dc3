"""Validation that sees what the user will see: the val images segmented by the runtime's own pipeline
(normalisation, tiling, clustering with the contract's thresholds), scored against their masks.

Upstream selects the checkpoint by the mean per-object IoU of ``phi > 0.5`` on val crops, which never
clusters: a model whose seediness fires on background (one seed with a huge bandwidth takes every
foreground pixel) can have the best crop IoU and segment nothing. Pooled AP@0.5 of whole images is the
number users meet. It is a noisy estimate: over ``n`` val objects its standard error is about
``sqrt(AP (1 - AP) / n)`` (0.085 at AP 0.8 over 22 objects), and the highest of a noisy curve is often an
early epoch (benchmarks/results/train_seeds_spacing.md: best-AP selection lost 0.02-0.1 test AP to the
last epoch on val sets of 22-100 objects), while the poly schedule makes later epochs the converged ones.
The highest of such a curve also sits above its own epoch's level: with 20-50 epochs of about equal
quality the largest of their noisy scores is about two standard errors high (the expected maximum of 20-50
normal draws is 1.9-2.2 sigma). So an epoch is kept when its AP is within two standard errors (at least one
object) of the best so far (:func:`keeps`): the latest such epoch wins, and a collapsed epoch, far below,
is never kept. Replayed on the seed benchmark's per-epoch records (5 seeds per set; mean / worst test
AP@0.5 of the kept epochs, one -> two standard errors): DSB (22 val objects) 0.744 / 0.611 -> 0.795 /
0.733 (= the last epochs), nuclei-2d 0.901 / 0.846 both, HeLa 0.882 / 0.846 -> 0.880 / 0.846, nuclei-3d
0.984 both (benchmarks/results/train_seeds*.md); models that relapse late (every dilated tap trained)
lost by it, 0.848 -> 0.835 on nuclei-2d. The width was chosen on these records; fresh DSB seeds 6-10
checked it (benchmarks/results/train_seeds_dsb_fresh.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from embedseg_deploy.contract import axis_of_dim
from embedseg_deploy.metrics import matching_dataset

from .data import Sample

AP_THRESHOLDS = tuple(round(0.5 + 0.05 * k, 2) for k in range(9))  # 0.50 ... 0.90
MAX_VAL_PIXELS = 1 << 22  # per epoch: ~1-2 s of network + clustering on 2 CPU cores
FEW_VAL_OBJECTS = 30  # below this an object moves AP by more than 3 %


@dataclass(frozen=True)
class PipelineScore:
    """Pooled over the images: AP = TP / (TP + FP + FN) at IoU 0.5, and its mean over 0.50-0.90;
    ``wide_objects``: objects whose seed's bandwidth is wider than any annotated object
    (:func:`wide_objects`)."""

    ap50: float
    ap50_90: float
    n_true: int
    n_pred: int
    images: int
    wide_objects: int = 0

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def pick_images(samples: Sequence[Sample], max_pixels: int = MAX_VAL_PIXELS) -> list[Sample]:
    """The val images scored every epoch: in order, while their pixels fit ``max_pixels`` (at least one)."""
    out, total = [], 0
    for s in samples:
        size = int(np.prod(s.shape))
        if out and total + size > max_pixels:
            break
        out.append(s)
        total += size
    return out


def small_val_note(samples: Sequence[Sample], used: Sequence[Sample]) -> str | None:
    """A warning when the val images are too few to tell checkpoints apart, or only some are scored."""
    n = sum(s.n_objects for s in used)
    notes = []
    if n < FEW_VAL_OBJECTS:
        notes.append(
            f"val/ holds {n} objects: one object moves its AP by {1 / max(n, 1):.2f}, so the checkpoint is "
            f"chosen on a coarse score; give val/ images with at least {FEW_VAL_OBJECTS} objects"
        )
    if len(used) < len(samples):
        notes.append(
            f"the full-pipeline check scores {len(used)} of {len(samples)} val images each epoch "
            f"({MAX_VAL_PIXELS / 1e6:.1f} Mpx)"
        )
    return "; ".join(notes) or None


STANDARD_ERRORS = 2.0  # the width of :func:`tolerance` (see the module docstring)


def tolerance(best: float, n_objects: int) -> float:
    """How far below the best val AP@0.5 an epoch may score and count as as good: two standard errors of
    the best AP as a proportion over ``n_objects``, at least one object (the score's resolution)."""
    n = max(n_objects, 1)
    return max(1.0 / n, STANDARD_ERRORS * math.sqrt(max(best * (1.0 - best), 0.0) / n))


def keeps(ap50: float, earlier: Sequence[float], n_objects: int) -> bool:
    """Whether an epoch of val AP ``ap50`` replaces the kept checkpoint after epochs of APs ``earlier``: when
    it is within :func:`tolerance` of the best AP so far, its own included."""
    peak = max([ap50, *earlier])
    return ap50 >= peak - tolerance(peak, n_objects) - 1e-9


def kept_epoch(aps: Sequence[float], n_objects: int) -> int:
    """The epoch (0-based) that :func:`keeps`, applied after every epoch, leaves as the best."""
    return max(i for i in range(len(aps)) if keeps(aps[i], aps[:i], n_objects))


SEED_QUANTILE = 0.05  # the share of val objects whose seediness may peak under a tuned seed threshold


def object_peaks(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The highest seediness (``seeds``, the seed map) inside each object of ``mask``, in label order."""
    ids, where = np.unique(mask.ravel(), return_inverse=True)
    best = np.full(len(ids), -np.inf)
    np.maximum.at(best, where, seeds.ravel())
    return best[ids > 0]


@dataclass(frozen=True)
class SeedTune:
    """A seed threshold chosen on val: what it was, what it became and why."""

    before: float
    after: float
    quantile: float
    objects: int
    below: int  # val objects whose seediness peaks under ``before``
    val_ap50: tuple[float, float]  # at ``before``, at the candidate
    kept: bool  # ``after`` is the candidate; the threshold in use is ``after`` if kept, else ``before``

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "val_ap50": list(self.val_ap50)}


def tune_seed_thresh(
    backend, samples: Sequence[Sample], seed_thresh: float, fg_thresh: float = 0.5
) -> SeedTune:
    """Lower ``seed_thresh`` to the :data:`SEED_QUANTILE` quantile of the val objects' peak seediness
    (not under ``fg_thresh``: a seed is a foreground pixel) where that is lower, when val AP@0.5 rises or
    stays the same above zero (an untrained model's 0 -> 0 is no evidence).

    The seed threshold (0.9, upstream's) only starts objects; a model whose centres on some objects peak
    at 0.83-0.87 finds them as foreground and never seeds them (DSB, seed 6 of
    benchmarks/results/train_seeds_dsb_fresh.md: five small nuclei). The quantile asks that nearly all
    val objects can start a cluster; the threshold is never raised."""
    from embedseg_deploy.predict import Predictor

    predictor = Predictor(backend, thresholds={"seed_thresh": seed_thresh})
    runs = [predictor.run(s.image, channel_axis=0, want_seeds=True) for s in samples]
    peaks = np.concatenate(
        [object_peaks(s.mask, r.seeds) for s, r in zip(samples, runs, strict=True)] or [[]]
    )
    candidate = seed_thresh
    if peaks.size:
        candidate = min(seed_thresh, max(fg_thresh, float(np.quantile(peaks, SEED_QUANTILE))))
    before = score_labels([s.mask for s in samples], [r.labels for r in runs]).ap50  # = pipeline_score's
    after = before
    if candidate < seed_thresh:
        after = pipeline_score(backend, samples, {"seed_thresh": candidate}).ap50
    return SeedTune(
        before=seed_thresh,
        after=candidate,
        quantile=SEED_QUANTILE,
        objects=int(peaks.size),
        below=int((peaks < seed_thresh).sum()),
        val_ap50=(round(before, 4), round(after, 4)),
        kept=candidate < seed_thresh and (after > before or after == before > 0),
    )


def pipeline_score(
    backend,
    samples: Sequence[Sample],
    thresholds: Mapping[str, float] | None = None,
    max_extent: Sequence[float] | None = None,
) -> PipelineScore:
    """Segment ``samples`` with ``backend`` (any runtime backend; in training a live model), score them;
    with ``max_extent`` (the largest annotated object of train/ and val/, px per array axis) also count
    :func:`wide_objects`."""
    from embedseg_deploy.cluster import consecutive_labels
    from embedseg_deploy.predict import Predictor

    predictor = Predictor(backend, thresholds=dict(thresholds or {}))
    labels, wide = [], 0
    for s in samples:
        x = predictor.prepare(s.image, channel_axis=0)
        keep = predictor.crop(x.shape[1:])
        raw = predictor.predict_raw(x)
        found, seeds = predictor.cluster(raw, return_seeds=True)
        found = np.asarray(found)[keep]
        if max_extent is not None:  # before consecutive_labels, which renumbers in place
            ids = np.unique(found[found > 0])
            wide += wide_objects(raw, seeds[ids - 1], backend.contract.spacing, max_extent)
        labels.append(consecutive_labels(found)[0])
    return dataclasses.replace(score_labels([s.mask for s in samples], labels), wide_objects=wide)


def wide_objects(raw: np.ndarray, seeds: np.ndarray, spacing: Sequence[float], limit: Sequence[float]) -> int:
    """How many of the objects started at ``seeds`` (n, ndim indices into ``raw``) have a clustering
    bandwidth, the sigma of ``exp(-s (e - c)^2)`` with ``s = exp(10 raw)`` at the seed, wider than
    ``limit`` pixels on some array axis.

    A healthy model's seeds are about as wide as their objects (DSB nuclei: median sigma 5-7 px, the
    largest nucleus 36 x 37 px). A degenerate one starts objects on background with bandwidths of hundreds
    of pixels, and each takes pixels of every object around it into one label: DSB seed 17
    (benchmarks/results/wide_objects.md: one on val and one on test, test AP@0.5 0.526; none in the
    other 19 DSB, 10 HeLa, 5 nuclei-2d and 5 nuclei-3d seeds)."""
    ndim = len(spacing)
    at = raw[(slice(ndim, 2 * ndim), *np.asarray(seeds, np.int64).reshape(-1, ndim).T)]  # (ndim, n)
    wide = np.zeros(at.shape[1], bool)
    for d in range(ndim):
        axis = axis_of_dim(d, ndim)
        width = limit[axis] * spacing[axis]
        # sigma_px > L  <=>  1 / sqrt(2 s) > L * spacing  <=>  10 raw < -log(2 (L * spacing)^2)
        wide |= at[d] < (-math.log(2.0 * width**2) / 10.0 if width > 0 else math.inf)
    return int(wide.sum())


def score_labels(truth: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> PipelineScore:
    per_thresh = matching_dataset(list(truth), list(labels), AP_THRESHOLDS)
    return PipelineScore(
        ap50=float(per_thresh[0].accuracy),
        ap50_90=float(np.mean([m.accuracy for m in per_thresh])),
        n_true=int(per_thresh[0].n_true),
        n_pred=int(per_thresh[0].n_pred),
        images=len(truth),
    )
