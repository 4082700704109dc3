"""Instance segmentation metrics with the semantics of StarDist's ``stardist.matching``.

What is computed (see ``docs/reference/peers.md`` §4):

* Both label images are relabelled to ``1..N`` (0 stays background); the overlap ``O[i, j]`` counts the
  pixels with true label ``i`` and predicted label ``j``, background included, so object areas are exact.
* Scores: ``iou = O / (|T| + |P| - O)`` (default), ``iot = O / |T|``, ``iop = O / |P|``.
* At a threshold ``thr`` the optimal assignment minimises ``-[s >= thr] - s / (2 n)`` with
  ``n = min(N_true, N_pred)``: first the number of pairs with ``s >= thr`` (inclusive), then the total
  score. TP = assigned pairs with ``s >= thr``; FP = N_pred - TP; FN = N_true - TP.
* precision, recall, accuracy = TP / (TP + FP + FN) (the "AP" of DSB/EmbedSeg/Cellpose), F1, and from the
  scores of the TP pairs: mean_matched_score (SQ), mean_true_score and panoptic_quality (SQ x F1).
  Every rate is 0 when TP = 0 (both images empty included); the score means are 0 when their
  denominator is 0.
* Datasets: ``pooled`` (StarDist ``by_image=False``: counts summed, rates recomputed; the summed score is
  rebuilt as ``sum(mean_true_score * n_true)``) or ``per_image_mean`` (EmbedSeg, Cellpose, Kaggle DSB:
  plain means of the per-image rates; counts still summed).
* Extras: ``ignore_label`` (pixels where the ground truth has that label are removed from both images
  before anything else, so objects lying wholly inside vanish), SEG of the Cell Tracking Challenge, and the
  DSB-2018 score (mean accuracy over IoU 0.50:0.05:0.95).

Unlike StarDist the overlap is sparse (only the pairs that share pixels), so 3D volumes with thousands of
objects need memory proportional to the number of touching pairs, not ``N_true x N_pred``; the
assignment is solved exactly on small pieces of that sparse graph (see :func:`_optimal_pairs`). Where
several assignments are optimal (ties), TP/FP/FN agree with StarDist but the mean scores may come from
another optimal assignment than scipy's dense pick (3 of 4530 records in a random cross-check, all
``iop``). Scores are float64 (StarDist: float32), which can only decide differently for unions of more
than ~10^5 pixels whose score lies within ~1e-7 of the threshold. Deliberate differences: thresholds must
be > 0 (at 0 StarDist counts pairs that share no pixel as matches), and ``matched_pairs`` lists the
assigned pairs that share pixels (StarDist pads its list with arbitrary zero-score pairs).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Literal, overload

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components, min_weight_full_bipartite_matching

Criterion = Literal["iou", "iot", "iop"]
Aggregation = Literal["pooled", "per_image_mean"]
CRITERIA: tuple[str, ...] = ("iou", "iot", "iop")
AGGREGATIONS: tuple[str, ...] = ("pooled", "per_image_mean")
DSB_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
"""IoU thresholds 0.50, 0.55, ..., 0.95 of the Kaggle DSB-2018 score (exact decimal values)."""

_DENSE_LIMIT = 1_000_000
"""Largest ``rows x cols`` of a connected piece solved with a dense assignment (8 MB of costs)."""


class LabelError(ValueError):
    """A label image is not a non-negative integer array, or two label images do not fit together."""


# --------------------------------------------------------------------------------------------- overlap


@dataclass(frozen=True, eq=False)
class Overlap:
    """Sparse overlap of a true and a predicted label image: only the object pairs that share pixels.

    Objects are numbered ``0..N-1`` in the order of their original labels (sequential label ``k + 1``);
    ``true_ids`` / ``pred_ids`` give the original labels back. ``rows``, ``cols``, ``counts`` list each
    overlapping pair once (``counts > 0``), sorted by row then column.
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    true_area: np.ndarray
    pred_area: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    counts: np.ndarray
    n_pixels: int

    @property
    def n_true(self) -> int:
        return len(self.true_ids)

    @property
    def n_pred(self) -> int:
        return len(self.pred_ids)

    def scores(self, criterion: Criterion = "iou") -> np.ndarray:
        """Score of every overlapping pair (float64, in ``(0, 1]``); areas are never 0 here."""
        o = self.counts.astype(np.float64)
        if criterion == "iou":
            return o / (self.true_area[self.rows] + self.pred_area[self.cols] - self.counts)
        if criterion == "iot":
            return o / self.true_area[self.rows]
        if criterion == "iop":
            return o / self.pred_area[self.cols]
        raise ValueError(f"unknown matching criterion {criterion!r} (use one of {CRITERIA})")

    def dense(self) -> np.ndarray:
        """StarDist's ``(N_true + 1) x (N_pred + 1)`` overlap matrix, background row and column first."""
        out = np.zeros((self.n_true + 1, self.n_pred + 1), dtype=np.int64)
        out[self.rows + 1, self.cols + 1] = self.counts
        out[1:, 0] = self.true_area - out[1:, 1:].sum(axis=1)
        out[0, 1:] = self.pred_area - out[1:, 1:].sum(axis=0)
        out[0, 0] = self.n_pixels - self.true_area.sum() - out[0, 1:].sum()
        return out


def check_labels(y: np.ndarray, name: str = "labels") -> np.ndarray:
    """Return ``y`` as an array after checking it is a 2D/3D array of non-negative integers."""
    y = np.asarray(y)
    if y.dtype.kind not in "iu":
        hint = "; float labels are rejected, cast integral values with .astype(np.uint32)"
        raise LabelError(
            f"{name} must hold integers, got {y.dtype} (labels are non-negative integers"
            + (hint if y.dtype.kind == "f" else "")
            + ")"
        )
    if y.ndim not in (2, 3):
        raise LabelError(f"{name} must be 2D or 3D, got shape {y.shape}")
    if y.dtype.kind == "i" and y.size and int(y.min()) < 0:
        raise LabelError(f"{name} must hold non-negative integers, found label {int(y.min())}")
    return y


def label_overlap(y_true: np.ndarray, y_pred: np.ndarray, ignore_label: int | None = None) -> Overlap:
    """Check two label images and compute their sparse overlap.

    With ``ignore_label``, pixels where ``y_true == ignore_label`` are dropped from both images first.
    The images are read in chunks of :data:`_CHUNK` pixels, so the working memory beyond the inputs is a
    few MB plus two tables of (largest label + 1) entries per image. Images whose largest label exceeds
    their pixel count are first relabelled whole (``np.unique``), which needs a few copies of them.
    """
    y_true = check_labels(y_true, "y_true")
    y_pred = check_labels(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise LabelError(f"y_true {y_true.shape} and y_pred {y_pred.shape} have different shapes")
    if ignore_label is not None and int(ignore_label) < 0:
        raise LabelError(f"ignore_label must be a non-negative integer, got {ignore_label}")
    t, p = y_true.reshape(-1), y_pred.reshape(-1)
    t_values = p_values = None
    if _needs_compacting(t) or _needs_compacting(p):  # huge label values: relabel whole images once
        if ignore_label is not None:
            keep = t != ignore_label
            t, p, ignore_label = t[keep], p[keep], None
        t, t_values = _compact(t)
        p, p_values = _compact(p)
    hist_t = np.zeros(int(t.max(initial=0)) + 1, dtype=np.int64)
    hist_p = np.zeros(int(p.max(initial=0)) + 1, dtype=np.int64)
    n_pixels = 0
    for tc, pc in _chunks(t, p, ignore_label):
        hist_t += np.bincount(tc, minlength=hist_t.size)
        hist_p += np.bincount(pc, minlength=hist_p.size)
        n_pixels += tc.size
    true_ids, lut_t = _sequential(hist_t)
    pred_ids, lut_p = _sequential(hist_p)
    n_pred = len(pred_ids)
    keys, weights = [np.zeros(0, dtype=np.int64)], [np.zeros(0)]
    for tc, pc in _chunks(t, p, ignore_label):
        k, w = _pair_keys(lut_t[tc], lut_p[pc], n_pred)
        keys.append(k)
        weights.append(w)
    pairs, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    counts = np.bincount(inverse, weights=np.concatenate(weights), minlength=pairs.size).astype(np.int64)
    return Overlap(
        true_ids=true_ids if t_values is None else t_values[true_ids],
        pred_ids=pred_ids if p_values is None else p_values[pred_ids],
        true_area=hist_t[true_ids],
        pred_area=hist_p[pred_ids],
        rows=pairs // max(n_pred, 1),
        cols=pairs % max(n_pred, 1),
        counts=counts,
        n_pixels=n_pixels,
    )


_CHUNK = 1 << 20


def _needs_compacting(flat: np.ndarray) -> bool:
    """Whether the largest label is too big for lookup tables of about the image's size."""
    return flat.size > 0 and int(flat.max()) > flat.size + 65536


def _compact(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels replaced by their rank (0 stays 0 when present) and the original value of each rank."""
    values, inverse = np.unique(flat, return_inverse=True)
    if values[0] != 0:
        values, inverse = np.concatenate(([0], values)), inverse + 1
    return inverse.astype(np.int64), values.astype(np.int64)


def _chunks(
    t: np.ndarray, p: np.ndarray, ignore_label: int | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Consecutive chunks of both flat images, without the ignored pixels."""
    for start in range(0, t.size, _CHUNK):
        tc, pc = t[start : start + _CHUNK], p[start : start + _CHUNK]
        if ignore_label is not None:
            keep = tc != ignore_label
            tc, pc = tc[keep], pc[keep]
        yield tc, pc


def _sequential(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels present (by pixel histogram, background excluded) and a lookup table to ``1..N``."""
    ids = np.flatnonzero(hist[1:]) + 1
    lut = np.zeros(hist.size, dtype=np.int32 if len(ids) < 2**31 else np.int64)
    lut[ids] = np.arange(1, len(ids) + 1)
    return ids.astype(np.int64), lut


def _pair_keys(seq_t: np.ndarray, seq_p: np.ndarray, n_pred: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct keys ``row * n_pred + col`` of the overlapping pairs in a chunk, with pixel counts."""
    both = (seq_t > 0) & (seq_p > 0)
    key = (seq_t[both].astype(np.int64) - 1) * n_pred + (seq_p[both] - 1)
    if key.size == 0:
        return key, np.zeros(0)
    # Neighbouring pixels mostly share their pair: collapse runs before sorting.
    starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    run_len = np.diff(np.append(starts, key.size))
    pairs, inverse = np.unique(key[starts], return_inverse=True)
    return pairs, np.bincount(inverse, weights=run_len)


# -------------------------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class Matching:
    """Matching statistics of one image at one threshold (StarDist's record, typed).

    With ``report_matches``: ``matched_pairs`` (original labels, sorted by true label), their
    ``matched_scores`` (also those below the threshold) and ``matched_tps`` (indices of the pairs that
    count as true positives).
    """

    criterion: str
    thresh: float
    fp: int
    tp: int
    fn: int
    precision: float
    recall: float
    accuracy: float
    f1: float
    n_true: int
    n_pred: int
    mean_true_score: float
    mean_matched_score: float
    panoptic_quality: float
    matched_pairs: tuple[tuple[int, int], ...] | None = None
    matched_scores: tuple[float, ...] | None = None
    matched_tps: tuple[int, ...] | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("matched_pairs", "matched_scores", "matched_tps"):
            if out[key] is None:
                del out[key]
            else:
                out[key] = [list(v) if isinstance(v, tuple) else v for v in out[key]]
        return out


@dataclass(frozen=True)
class DatasetMatching:
    """Matching statistics of a dataset at one threshold; ``aggregation`` says how they were combined."""

    criterion: str
    thresh: float
    aggregation: str
    n_images: int
    fp: int
    tp: int
    fn: int
    precision: float
    recall: float
    accuracy: float
    f1: float
    n_true: int
    n_pred: int
    mean_true_score: float
    mean_matched_score: float
    panoptic_quality: float

    def to_dict(self) -> dict:
        return asdict(self)


def _rates(tp: int, fp: int, fn: int) -> dict[str, float]:
    if tp == 0:
        return {"precision": 0.0, "recall": 0.0, "accuracy": 0.0, "f1": 0.0}
    return {
        "precision": tp / (tp + fp),
        "recall": tp / (tp + fn),
        "accuracy": tp / (tp + fp + fn),
        "f1": 2 * tp / (2 * tp + fp + fn),
    }


def _safe_divide(x: float, y: float, eps: float = 1e-10) -> float:
    return float(x / y) if abs(y) > eps else 0.0


def _score_means(sum_matched: float, tp: int, fp: int, fn: int, n_true: int) -> dict[str, float]:
    return {
        "mean_true_score": _safe_divide(sum_matched, n_true),
        "mean_matched_score": _safe_divide(sum_matched, tp),
        "panoptic_quality": _safe_divide(sum_matched, tp + fp / 2 + fn / 2),
    }


def _check_thresh(thresh: float) -> float:
    thr = float(thresh)
    if not thr > 0:
        raise ValueError(f"threshold must be > 0, got {thresh}")
    return thr


@overload
def match_overlap(
    overlap: Overlap, thresh: float = ..., criterion: Criterion = ..., report_matches: bool = ...
) -> Matching: ...
@overload
def match_overlap(
    overlap: Overlap, thresh: Sequence[float], criterion: Criterion = ..., report_matches: bool = ...
) -> tuple[Matching, ...]: ...
def match_overlap(overlap, thresh=0.5, criterion="iou", report_matches=False):
    """Match the objects of an :class:`Overlap` at ``thresh`` (a number, or a sequence: one record each)."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown matching criterion {criterion!r} (use one of {CRITERIA})")
    scores = overlap.scores(criterion)
    if np.ndim(thresh) == 0:
        return _match_one(overlap, scores, _check_thresh(thresh), criterion, report_matches)
    return tuple(_match_one(overlap, scores, _check_thresh(t), criterion, report_matches) for t in thresh)


def _match_one(ov: Overlap, scores: np.ndarray, thr: float, criterion: str, report: bool) -> Matching:
    n_true, n_pred = ov.n_true, ov.n_pred
    chosen = _optimal_pairs(ov.rows, ov.cols, scores, thr, n_true, n_pred)
    chosen_scores = scores[chosen]
    is_tp = chosen_scores >= thr
    tp = int(np.count_nonzero(is_tp))
    fp, fn = n_pred - tp, n_true - tp
    sum_matched = float(chosen_scores[is_tp].sum())
    extra = {}
    if report:
        extra = {
            "matched_pairs": tuple(
                (int(ov.true_ids[i]), int(ov.pred_ids[j]))
                for i, j in zip(ov.rows[chosen], ov.cols[chosen], strict=True)
            ),
            "matched_scores": tuple(float(s) for s in chosen_scores),
            "matched_tps": tuple(int(k) for k in np.flatnonzero(is_tp)),
        }
    return Matching(
        criterion=criterion,
        thresh=thr,
        fp=fp,
        tp=tp,
        fn=fn,
        **_rates(tp, fp, fn),
        n_true=n_true,
        n_pred=n_pred,
        **_score_means(sum_matched, tp, fp, fn, n_true),
        **extra,
    )


def _optimal_pairs(
    rows: np.ndarray,
    cols: np.ndarray,
    scores: np.ndarray,
    thr: float,
    n_true: int,
    n_pred: int,
    dense_limit: int | None = None,
) -> np.ndarray:
    """Indices of the overlapping pairs in an optimal StarDist assignment, sorted by row.

    StarDist solves the dense ``N_true x N_pred`` assignment with cost ``-[s >= thr] - s / (2 n)``.
    Pairs that share no pixel cost 0 (``thr > 0``), so an assignment's cost is that of its overlapping
    pairs, and the optimum is a maximum-weight matching of the sparse graph of overlapping pairs with
    weights ``w = [s >= thr] + s / (2 n) > 0`` (any such matching extends to a full assignment with
    zero-cost pairs). Two exact reductions keep the pieces small:

    1. *Forced pairs*: a pair with ``s >= thr`` whose two objects have no other pair ``>= thr`` is in
       every optimum: an assignment without it gains a whole match by taking it and dropping the (below
       threshold) partners of its two objects, which costs less than the tie-breaker's total of 0.5.
       For IoU with ``thr > 0.5`` every pair ``>= thr`` is forced, as no object can reach IoU > 0.5 with two
       disjoint partners. Forced objects have no other pair ``>= thr``, so one pass finds all of them.
    2. *Connected pieces*: a maximum-weight matching of a graph is the union of maximum-weight matchings
       of its connected components, and weights use the global ``n``, so each piece is solved alone:
       with a dense rectangular assignment when it is small, else with the sparse LAPJVsp solver.

    The TP count and the objective always equal the dense solution's. Where several assignments are
    optimal (ties, e.g. equal ``iop`` scores of objects inside one merged prediction), this one may
    differ from scipy's dense pick, and so may the mean scores of the TP pairs.
    """
    dense_limit = _DENSE_LIMIT if dense_limit is None else dense_limit
    n = min(n_true, n_pred)
    if n == 0 or rows.size == 0:
        return np.zeros(0, dtype=np.int64)
    hit = scores >= thr
    row_hits = np.bincount(rows[hit], minlength=n_true)
    col_hits = np.bincount(cols[hit], minlength=n_pred)
    forced = hit & (row_hits[rows] == 1) & (col_hits[cols] == 1)
    row_done = np.zeros(n_true, dtype=bool)
    col_done = np.zeros(n_pred, dtype=bool)
    row_done[rows[forced]] = True
    col_done[cols[forced]] = True
    rest = np.flatnonzero(~row_done[rows] & ~col_done[cols])
    weights = hit[rest] + scores[rest] / (2 * n)
    solved = rest[_max_weight_matching(rows[rest], cols[rest], weights, n_true, n_pred, dense_limit)]
    chosen = np.concatenate((np.flatnonzero(forced), solved))
    return chosen[np.argsort(rows[chosen], kind="stable")]


def _max_weight_matching(
    rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, n_true: int, n_pred: int, dense_limit: int
) -> np.ndarray:
    """Edge indices of a maximum-weight matching of a bipartite graph with positive weights."""
    if rows.size == 0:
        return np.zeros(0, dtype=np.int64)
    graph = sparse.coo_matrix(
        (np.ones(rows.size, dtype=np.int8), (rows, n_true + cols)), shape=(n_true + n_pred,) * 2
    )
    _, piece_of_node = connected_components(graph, directed=False)
    piece = piece_of_node[rows]
    order = np.argsort(piece, kind="stable")
    bounds = np.flatnonzero(np.diff(piece[order])) + 1
    chosen = []
    for edges in np.split(order, bounds):
        if edges.size == 1:
            chosen.append(edges)
        else:
            chosen.append(edges[_solve_piece(rows[edges], cols[edges], weights[edges], dense_limit)])
    return np.concatenate(chosen)


def _solve_piece(rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, dense_limit: int) -> np.ndarray:
    """Edge indices of a maximum-weight matching of one connected piece."""
    row_nodes, r = np.unique(rows, return_inverse=True)
    col_nodes, c = np.unique(cols, return_inverse=True)
    n_r, n_c = len(row_nodes), len(col_nodes)
    if n_r * n_c <= dense_limit:
        gain = np.zeros((n_r, n_c))
        gain[r, c] = weights
        edge = np.full((n_r, n_c), -1, dtype=np.int64)
        edge[r, c] = np.arange(rows.size)
        ri, ci = linear_sum_assignment(gain, maximize=True)
        picked = edge[ri, ci]
        return picked[picked >= 0]
    # Sparse solver: it needs every row matched and nonzero costs, so each row gets a private dummy
    # column of cost 2 and a real pair costs 2 - w (w < 2); every full matching has n_r pairs, so
    # minimising the cost maximises the real weight.
    cost = np.concatenate((2.0 - weights, np.full(n_r, 2.0)))
    i = np.concatenate((r, np.arange(n_r)))
    j = np.concatenate((c, n_c + np.arange(n_r)))
    ri, ci = min_weight_full_bipartite_matching(sparse.csr_matrix((cost, (i, j)), shape=(n_r, n_c + n_r)))
    real = ci < n_c
    edge = sparse.csr_matrix((np.arange(1, rows.size + 1), (r, c)), shape=(n_r, n_c))
    return np.asarray(edge[ri[real], ci[real]]).ravel() - 1


@overload
def matching(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    thresh: float = ...,
    criterion: Criterion = ...,
    report_matches: bool = ...,
    ignore_label: int | None = ...,
) -> Matching: ...
@overload
def matching(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    thresh: Sequence[float],
    criterion: Criterion = ...,
    report_matches: bool = ...,
    ignore_label: int | None = ...,
) -> tuple[Matching, ...]: ...
def matching(y_true, y_pred, thresh=0.5, criterion="iou", report_matches=False, ignore_label=None):
    """StarDist's ``matching(y_true, y_pred, thresh, criterion, report_matches)`` plus ``ignore_label``."""
    overlap = label_overlap(y_true, y_pred, ignore_label=ignore_label)
    return match_overlap(overlap, thresh, criterion, report_matches)


# ----------------------------------------------------------------------------------------- aggregation


def aggregate(results: Sequence[Matching], aggregation: Aggregation = "pooled") -> DatasetMatching:
    """Combine per-image records of one threshold and criterion into a dataset record."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r} (use one of {AGGREGATIONS})")
    if not results:
        raise ValueError("cannot aggregate an empty list of matchings")
    if len({(m.thresh, m.criterion) for m in results}) != 1:
        raise ValueError("all matchings to aggregate must share threshold and criterion")
    counts = {k: sum(getattr(m, k) for m in results) for k in ("fp", "tp", "fn", "n_true", "n_pred")}
    if aggregation == "pooled":
        sum_matched = sum(m.mean_true_score * m.n_true for m in results)
        tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
        values = {**_rates(tp, fp, fn), **_score_means(sum_matched, tp, fp, fn, counts["n_true"])}
    else:
        keys = (
            "precision",
            "recall",
            "accuracy",
            "f1",
            "mean_true_score",
            "mean_matched_score",
            "panoptic_quality",
        )
        values = {k: float(np.mean([getattr(m, k) for m in results])) for k in keys}
    return DatasetMatching(
        criterion=results[0].criterion,
        thresh=results[0].thresh,
        aggregation=aggregation,
        n_images=len(results),
        **counts,
        **values,
    )


@overload
def matching_dataset(
    y_true: Sequence[np.ndarray],
    y_pred: Sequence[np.ndarray],
    thresh: float = ...,
    criterion: Criterion = ...,
    aggregation: Aggregation = ...,
    ignore_label: int | None = ...,
) -> DatasetMatching: ...
@overload
def matching_dataset(
    y_true: Sequence[np.ndarray],
    y_pred: Sequence[np.ndarray],
    thresh: Sequence[float],
    criterion: Criterion = ...,
    aggregation: Aggregation = ...,
    ignore_label: int | None = ...,
) -> tuple[DatasetMatching, ...]: ...
def matching_dataset(y_true, y_pred, thresh=0.5, criterion="iou", aggregation="pooled", ignore_label=None):
    """StarDist's ``matching_dataset``; ``aggregation="per_image_mean"`` is its ``by_image=True``."""
    if len(y_true) != len(y_pred):
        raise LabelError(f"y_true has {len(y_true)} images but y_pred has {len(y_pred)}")
    if len(y_true) == 0:
        raise LabelError("no images to evaluate")
    single = np.ndim(thresh) == 0
    thresholds = [thresh] if single else list(thresh)
    per_image = [
        matching(t, p, thresholds, criterion, ignore_label=ignore_label)
        for t, p in zip(y_true, y_pred, strict=True)
    ]
    out = tuple(aggregate([m[k] for m in per_image], aggregation) for k in range(len(thresholds)))
    return out[0] if single else out


# ----------------------------------------------------------------------------------------- SEG and DSB


@dataclass(frozen=True)
class SegResult:
    """SEG of the Cell Tracking Challenge for one image.

    Each true object ``G`` is matched to the predicted object ``P`` covering strictly more than half of
    it (unique if any) and scores ``IoU(G, P)``, else 0; ``seg = sum_iou / n_true`` (0 without true
    objects).
    """

    seg: float
    n_true: int
    n_matched: int
    sum_iou: float

    def to_dict(self) -> dict:
        return asdict(self)


def seg_from_overlap(overlap: Overlap) -> SegResult:
    """SEG from an :class:`Overlap` (uses the exact integer test ``2 |P ∩ G| > |G|``)."""
    covers = 2 * overlap.counts > overlap.true_area[overlap.rows]
    ious = overlap.scores("iou")[covers]
    total = float(ious.sum())
    return SegResult(_safe_divide(total, overlap.n_true), overlap.n_true, int(ious.size), total)


def seg_score(y_true: np.ndarray, y_pred: np.ndarray, ignore_label: int | None = None) -> SegResult:
    """SEG of one pair of label images."""
    return seg_from_overlap(label_overlap(y_true, y_pred, ignore_label=ignore_label))


def aggregate_seg(results: Sequence[SegResult], aggregation: Aggregation = "pooled") -> float:
    """Dataset SEG: over all true objects (``pooled``, the CTC definition) or the mean of image SEGs."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r} (use one of {AGGREGATIONS})")
    if not results:
        raise ValueError("cannot aggregate an empty list of SEG results")
    if aggregation == "pooled":
        return _safe_divide(sum(r.sum_iou for r in results), sum(r.n_true for r in results))
    return float(np.mean([r.seg for r in results]))


def dsb_from_matchings(results: Sequence[Matching | DatasetMatching]) -> float:
    """Kaggle DSB-2018 score: the mean accuracy over the IoU thresholds :data:`DSB_THRESHOLDS`.

    ``results`` must hold one IoU record per DSB threshold (extra thresholds are ignored). Applied to
    ``per_image_mean`` dataset records this is the competition's mean over images of the image scores.
    """
    by_thresh = {round(r.thresh, 6): r for r in results if r.criterion == "iou"}
    missing = [t for t in DSB_THRESHOLDS if round(t, 6) not in by_thresh]
    if missing:
        raise ValueError(f"DSB score needs IoU matchings at thresholds {missing}")
    return float(np.mean([by_thresh[round(t, 6)].accuracy for t in DSB_THRESHOLDS]))


def dsb_score(y_true: np.ndarray, y_pred: np.ndarray, ignore_label: int | None = None) -> float:
    """DSB-2018 score of one pair of label images."""
    return dsb_from_matchings(matching(y_true, y_pred, DSB_THRESHOLDS, "iou", ignore_label=ignore_label))
