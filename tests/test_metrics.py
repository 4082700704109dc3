"""Metrics with StarDist's `matching` semantics: hand-computed cases, a dense reference, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.optimize import linear_sum_assignment

from embedseg_deploy import metrics as M
from embedseg_deploy.metrics import (
    DSB_THRESHOLDS,
    LabelError,
    aggregate,
    aggregate_seg,
    dsb_score,
    label_overlap,
    matching,
    matching_dataset,
    seg_score,
)

# ------------------------------------------------------------------------------------------ hand cases


def box(shape, *slices, label=1, out=None):
    """Paint ``label`` into ``out`` (new zero array of ``shape`` when None) over the given slices."""
    out = np.zeros(shape, np.uint16) if out is None else out
    out[tuple(slice(a, b) for a, b in slices)] = label
    return out


def shifted_squares():
    """StarDist's docstring vector: a 10x10 square and the same square shifted by 5 px (IoU 50/150)."""
    y_true = box((20, 20), (2, 12), (2, 12))
    y_pred = box((20, 20), (2, 12), (7, 17))
    return y_true, y_pred


def three_objects():
    """GT 7: A (100 px), 3: B (100 px), 42: C (16 px, missed); pred 5 = A shifted 2 rows (IoU 80/120),
    pred 1 = B plus 25 px (IoU 100/125 = 0.8), pred 9 = 9 px without partner."""
    y_true = box((30, 30), (0, 10), (0, 10), label=7)
    box(None, (0, 10), (15, 25), label=3, out=y_true)
    box(None, (20, 24), (0, 4), label=42, out=y_true)
    y_pred = box((30, 30), (2, 12), (0, 10), label=5)
    box(None, (0, 10), (15, 25), label=1, out=y_pred)
    box(None, (10, 15), (15, 20), label=1, out=y_pred)
    box(None, (25, 28), (25, 28), label=9, out=y_pred)
    return y_true, y_pred


def expect(m, **values):
    for key, value in values.items():
        assert getattr(m, key) == pytest.approx(value, abs=1e-12), key


def test_shifted_square_docstring_vector():
    y_true, y_pred = shifted_squares()
    m = matching(y_true, y_pred, 0.5)
    expect(m, tp=0, fp=1, fn=1, precision=0, recall=0, accuracy=0, f1=0, panoptic_quality=0)
    expect(m, mean_true_score=0, mean_matched_score=0, n_true=1, n_pred=1)
    low = matching(y_true, y_pred, 0.3)
    expect(low, tp=1, fp=0, fn=0, accuracy=1, mean_matched_score=1 / 3, panoptic_quality=1 / 3)


def test_three_objects_by_hand():
    y_true, y_pred = three_objects()
    m50, m70, m80, m81 = matching(y_true, y_pred, [0.5, 0.7, 0.8, 0.81])
    sum50 = 2 / 3 + 0.8
    expect(m50, tp=2, fp=1, fn=1, n_true=3, n_pred=3, precision=2 / 3, recall=2 / 3, accuracy=0.5, f1=2 / 3)
    expect(m50, mean_matched_score=sum50 / 2, mean_true_score=sum50 / 3, panoptic_quality=sum50 / 3)
    expect(m70, tp=1, fp=2, fn=2, precision=1 / 3, recall=1 / 3, accuracy=0.2, f1=1 / 3)
    expect(m70, mean_matched_score=0.8, mean_true_score=0.8 / 3, panoptic_quality=0.8 / 3)
    expect(m80, tp=1)  # IoU exactly 0.8 counts: the threshold is inclusive
    expect(m81, tp=0, accuracy=0, panoptic_quality=0)


def test_report_matches_uses_original_labels():
    y_true, y_pred = three_objects()
    m = matching(y_true, y_pred, 0.7, report_matches=True)
    assert m.matched_pairs == ((3, 1), (7, 5))  # sorted by true label; 42 and 9 have no partner
    assert m.matched_scores == pytest.approx((0.8, 2 / 3))
    assert m.matched_tps == (0,)
    d = m.to_dict()
    assert (
        d["matched_pairs"] == [[3, 1], [7, 5]] and "matched_pairs" not in matching(y_true, y_pred).to_dict()
    )


def test_iot_and_iop():
    y_true, y_pred = three_objects()  # B' holds all of B: iot 1, iop 0.8; A/A': 0.8 both
    expect(matching(y_true, y_pred, 0.9, "iot"), tp=1, mean_matched_score=1.0)
    expect(matching(y_true, y_pred, 0.9, "iop"), tp=0)
    expect(matching(y_true, y_pred, 0.8, "iop"), tp=2, mean_matched_score=0.8)
    # one prediction over two GT halves: iot 1 for both halves, iop 0.5 each
    halves = box((10, 10), (0, 10), (0, 5), label=1)
    box(None, (0, 10), (5, 10), label=2, out=halves)
    whole = box((10, 10), (0, 10), (0, 10))
    expect(matching(halves, whole, 0.9, "iot"), tp=1, fn=1, mean_matched_score=1.0)
    expect(matching(halves, whole, 0.6, "iop"), tp=0)


def test_both_empty_and_one_empty():
    empty = np.zeros((8, 9), np.uint8)
    m = matching(empty, empty, [0.5, 0.9])[0]
    expect(m, tp=0, fp=0, fn=0, n_true=0, n_pred=0, precision=0, recall=0, accuracy=0, f1=0)
    expect(m, mean_true_score=0, mean_matched_score=0, panoptic_quality=0)
    y, _ = three_objects()
    expect(matching(y, np.zeros_like(y)), tp=0, fp=0, fn=3, accuracy=0, recall=0)
    expect(matching(np.zeros_like(y), y), tp=0, fp=3, fn=0, accuracy=0, precision=0)


def test_instanseg_edge_case_at_exactly_half():
    """One prediction made of two equal GT halves has IoU 0.5 with both: StarDist counts 1 TP + 1 FN."""
    halves = box((10, 10), (0, 10), (0, 5), label=1)
    box(None, (0, 10), (5, 10), label=2, out=halves)
    whole = box((10, 10), (0, 10), (0, 10))
    m = matching(halves, whole, 0.5)
    expect(m, tp=1, fp=0, fn=1, precision=1, recall=0.5, accuracy=0.5, f1=2 / 3)
    expect(m, mean_matched_score=0.5, mean_true_score=0.25, panoptic_quality=0.5 / 1.5)
    expect(matching(halves, whole, 0.51), tp=0)


def tie_breaker_strips():
    """T1 = cols 0-9, T2 = 10-19; P1 = 4-13, P2 = 0-3: IoU(T1,P1) 6/14, IoU(T1,P2) 0.4, IoU(T2,P1) 0.25."""
    y_true = box((3, 20), (0, 3), (0, 10), label=1)
    box(None, (0, 3), (10, 20), label=2, out=y_true)
    y_pred = box((3, 20), (0, 3), (4, 14), label=1)
    box(None, (0, 3), (0, 4), label=2, out=y_pred)
    return y_true, y_pred


def test_tie_breaker_maximises_total_score_not_tp_score():
    """At 0.3 one TP is possible either way; T1-P2 + T2-P1 (0.4 + 0.25) beats T1-P1 (0.43) in total IoU,
    so StarDist's assignment reports the TP score 0.4, not the larger 0.43 a greedy match would."""
    y_true, y_pred = tie_breaker_strips()
    m = matching(y_true, y_pred, 0.3, report_matches=True)
    expect(m, tp=1, fp=1, fn=1, mean_matched_score=0.4)
    assert m.matched_pairs == ((1, 2), (2, 1)) and m.matched_tps == (0,)
    expect(matching(y_true, y_pred, 0.2), tp=2, mean_matched_score=0.325)
    expect(matching(y_true, y_pred, 0.41), tp=1, mean_matched_score=6 / 14)


def test_most_true_positives_win_over_a_larger_iou_sum():
    """StarDist's objective ranks assignments by TP count first, total IoU second. One strip, at 0.2:
    T1 = cols 0-9, T2 = 10-11; P2 = 0-2, P1 = 3-11. IoU(T1,P1) 7/12, IoU(T1,P2) 3/10, IoU(T2,P1) 2/9.
    T1-P1 alone has the larger IoU sum (0.583 > 0.3 + 0.222) but one TP; T1-P2 + T2-P1 has two, and wins.
    A plain maximum-IoU-sum assignment would report tp=1 here."""
    y_true = box((1, 12), (0, 1), (0, 10), label=1)
    box(None, (0, 1), (10, 12), label=2, out=y_true)
    y_pred = box((1, 12), (0, 1), (3, 12), label=1)
    box(None, (0, 1), (0, 3), label=2, out=y_pred)
    for threshold in (0.2, [0.2, 0.6]):
        m = matching(y_true, y_pred, threshold, report_matches=True)
        m = m[0] if isinstance(m, tuple) else m
        expect(m, tp=2, fp=0, fn=0, accuracy=1.0, mean_matched_score=(3 / 10 + 2 / 9) / 2)
        assert m.matched_pairs == ((1, 2), (2, 1)) and m.matched_tps == (0, 1)
    expect(matching(y_true, y_pred, 0.5), tp=1, fp=1, fn=1, mean_matched_score=7 / 12)


def test_3d_cubes():
    y_true = box((8, 8, 8), (0, 4), (0, 4), (0, 4), label=2)
    box(None, (6, 8), (6, 8), (6, 8), label=5, out=y_true)
    y_pred = box((8, 8, 8), (1, 5), (0, 4), (0, 4), label=1)  # overlap 48 of 64: IoU 48/80
    expect(matching(y_true, y_pred, 0.6), tp=1, fp=0, fn=1, mean_matched_score=0.6)
    expect(matching(y_true, y_pred, 0.61), tp=0)
    expect(matching(y_true, y_pred, 0.75, "iot"), tp=1, mean_matched_score=0.75)
    assert seg_score(y_true, y_pred).seg == pytest.approx(0.6 / 2)


# ----------------------------------------------------------------------------------------- aggregation


def dataset():
    y1, p1 = three_objects()  # at 0.5: tp 2 fp 1 fn 1, score sum 2/3 + 0.8
    y2 = box((6, 6), (1, 4), (1, 4))  # a perfect match
    return [y1, y2, np.zeros((5, 5), np.uint8)], [p1, y2.copy(), np.zeros((5, 5), np.uint8)]


def test_pooled_and_per_image_mean_by_hand():
    ys, ps = dataset()
    s1 = 2 / 3 + 0.8  # image 1 score sum; image 2 adds 1.0; image 3 is empty
    pooled = matching_dataset(ys, ps, 0.5, aggregation="pooled")
    expect(pooled, tp=3, fp=1, fn=1, n_true=4, n_pred=4, n_images=3, precision=0.75, recall=0.75, f1=0.75)
    expect(pooled, accuracy=0.6, mean_matched_score=(s1 + 1) / 3, mean_true_score=(s1 + 1) / 4)
    expect(pooled, panoptic_quality=(s1 + 1) / 4)
    assert pooled.aggregation == "pooled"
    mean = matching_dataset(ys, ps, [0.5], aggregation="per_image_mean")[0]
    expect(mean, tp=3, fp=1, fn=1, n_true=4, n_pred=4, precision=(2 / 3 + 1) / 3, accuracy=(0.5 + 1) / 3)
    expect(mean, f1=(2 / 3 + 1) / 3, mean_matched_score=(s1 / 2 + 1) / 3, mean_true_score=(s1 / 3 + 1) / 3)
    expect(mean, panoptic_quality=(s1 / 3 + 1) / 3)


def test_pooled_of_copies_keeps_rates():
    y, p = three_objects()
    one = matching(y, p, 0.5)
    two = matching_dataset([y, y], [p, p], 0.5)
    assert (two.tp, two.fp, two.fn, two.n_true) == (2 * one.tp, 2 * one.fp, 2 * one.fn, 2 * one.n_true)
    for key in ("precision", "recall", "accuracy", "f1", "mean_true_score", "mean_matched_score"):
        assert getattr(two, key) == pytest.approx(getattr(one, key)), key


def test_aggregate_refuses_mixed_or_empty():
    y, p = three_objects()
    with pytest.raises(ValueError, match="share"):
        aggregate(list(matching(y, p, [0.5, 0.6])))
    with pytest.raises(ValueError, match="empty"):
        aggregate([])
    with pytest.raises(ValueError, match="aggregation"):
        aggregate([matching(y, p)], "mean")
    with pytest.raises(LabelError, match="3 images"):
        matching_dataset([y, y, y], [p])


# ------------------------------------------------------------------------------------ SEG, DSB, ignore


def test_seg_by_hand():
    """A: pred covers 51 of 100 px (+20 outside): IoU 51/120; B: exactly half covered: no match;
    C and D (16 px each) merged in one prediction: both matched with IoU 0.5."""
    y_true = box((30, 30), (0, 10), (0, 10), label=1)
    box(None, (0, 10), (12, 22), label=2, out=y_true)
    box(None, (20, 24), (0, 4), label=3, out=y_true)
    box(None, (20, 24), (4, 8), label=4, out=y_true)
    y_pred = box((30, 30), (0, 5), (0, 10), label=1)
    y_pred[5, 0] = 1
    box(None, (10, 12), (0, 10), label=1, out=y_pred)
    box(None, (0, 5), (12, 22), label=2, out=y_pred)
    box(None, (20, 24), (0, 8), label=3, out=y_pred)
    s = seg_score(y_true, y_pred)
    assert (s.n_true, s.n_matched) == (4, 3)
    assert s.seg == pytest.approx((51 / 120 + 0 + 0.5 + 0.5) / 4)
    # StarDist's iot@0.5 is not SEG: it counts B (exactly half, >=) but only one of C and D
    assert matching(y_true, y_pred, 0.5, "iot").tp == 3
    empty = seg_score(np.zeros((4, 4), np.uint8), y_pred[:4, :4])
    assert (empty.seg, empty.n_true) == (0.0, 0)
    assert aggregate_seg([s, empty], "pooled") == pytest.approx(s.sum_iou / 4)
    assert aggregate_seg([s, empty], "per_image_mean") == pytest.approx(s.seg / 2)


def test_dsb_score_by_hand():
    y_true, y_pred = three_objects()  # IoUs 2/3 and 0.8 among 3 GT and 3 predictions
    assert DSB_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    assert dsb_score(y_true, y_pred) == pytest.approx((4 * 2 / 4 + 3 * 1 / 5) / 10)
    with pytest.raises(ValueError, match="DSB"):
        M.dsb_from_matchings(matching(y_true, y_pred, [0.5, 0.6]))


def test_ignore_label_removes_pixels_from_both_images():
    """GT label 1 marks an unlabelled region; P1 spills 50 px into it, P2 lies wholly inside it."""
    y_true = box((10, 20), (0, 10), (10, 20), label=1)
    box(None, (0, 10), (0, 10), label=2, out=y_true)
    y_pred = box((10, 20), (0, 10), (0, 15), label=1)
    box(None, (2, 6), (15, 20), label=2, out=y_pred)
    expect(matching(y_true, y_pred, 0.5), n_true=2, n_pred=2, tp=1, fp=1, fn=1, mean_matched_score=2 / 3)
    m = matching(y_true, y_pred, 0.5, ignore_label=1, report_matches=True)
    expect(m, n_true=1, n_pred=1, tp=1, fp=0, fn=0, mean_matched_score=1.0, accuracy=1.0)
    assert m.matched_pairs == ((2, 1),)
    assert seg_score(y_true, y_pred, ignore_label=1).seg == 1.0
    assert label_overlap(y_true, y_pred, ignore_label=1).n_pixels == 100


# ----------------------------------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((4, 4), np.float32), "float labels are rejected"),
        (np.zeros((4, 4), bool), "non-negative integers"),
        (-np.ones((4, 4), np.int16), "found label -1"),
        (np.zeros(4, np.uint8), "2D or 3D"),
        (np.zeros((2, 2, 2, 2), np.uint8), "2D or 3D"),
    ],
)
def test_bad_labels_are_rejected(bad, message):
    good = np.zeros(bad.shape if bad.ndim in (2, 3) else (4, 4), np.uint8)
    with pytest.raises(LabelError, match=message):
        matching(good, bad)
    with pytest.raises(LabelError, match="y_true"):
        matching(bad, good)


def test_bad_arguments_are_rejected():
    y, p = three_objects()
    with pytest.raises(LabelError, match="different shapes"):
        matching(y, p[:-1])
    with pytest.raises(ValueError, match="> 0"):
        matching(y, p, 0.0)
    with pytest.raises(ValueError, match="> 0"):
        matching(y, p, [0.5, -0.1])
    with pytest.raises(ValueError, match="criterion"):
        matching(y, p, 0.5, "dice")
    with pytest.raises(LabelError, match="ignore_label"):
        matching(y, p, ignore_label=-1)


# -------------------------------------------------------------------------- sparse overlap and matching


def dense_reference(y_true, y_pred, thr, criterion):
    """StarDist's definition, dense and direct: relabel, full overlap matrix, Hungarian on all objects."""
    t_ids, t = np.unique(y_true, return_inverse=True)
    p_ids, p = np.unique(y_pred, return_inverse=True)
    t = t.ravel() + (t_ids[0] != 0)  # keep 0 as background
    p = p.ravel() + (p_ids[0] != 0)
    overlap = np.zeros((t.max() + 1, p.max() + 1), np.int64)
    np.add.at(overlap, (t, p), 1)
    n_t, n_p = overlap.sum(axis=1, keepdims=True), overlap.sum(axis=0, keepdims=True)
    denom = {"iou": n_t + n_p - overlap, "iot": n_t + 0 * overlap, "iop": n_p + 0 * overlap}[criterion]
    scores = np.divide(overlap, denom, out=np.zeros(overlap.shape), where=denom > 0)[1:, 1:]
    n = min(scores.shape)
    if n == 0:
        return overlap, 0, 0.0, 0.0
    cost = -(scores >= thr).astype(float) - scores / (2 * n)
    r, c = linear_sum_assignment(cost)
    s = scores[r, c]
    return overlap, int(np.count_nonzero(s >= thr)), float(-cost[r, c].sum()), float(s[s >= thr].sum())


def sparse_result(y_true, y_pred, thr, criterion, dense_limit=None):
    ov = label_overlap(y_true, y_pred)
    scores = ov.scores(criterion)
    chosen = M._optimal_pairs(ov.rows, ov.cols, scores, thr, ov.n_true, ov.n_pred, dense_limit)
    s = scores[chosen]
    assert len(set(ov.rows[chosen])) == len(chosen) == len(set(ov.cols[chosen]))  # a matching
    n = min(ov.n_true, ov.n_pred)
    objective = float(np.count_nonzero(s >= thr) + s.sum() / (2 * n)) if n else 0.0
    return ov, int(np.count_nonzero(s >= thr)), objective, float(s[s >= thr].sum())


@st.composite
def label_images(draw):
    """Pairs of small 2D/3D label images: pixel noise (many ties) or upsampled blocks (object-like)."""
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.lists(st.integers(2, 6 if ndim == 2 else 3), min_size=ndim, max_size=ndim)))
    n_labels = draw(st.integers(1, 12))
    a, b = (draw(hnp.arrays(np.uint16, shape, elements=st.integers(0, n_labels))) for _ in range(2))
    if draw(st.booleans()):
        a, b = (x.repeat(2, axis=0).repeat(2, axis=1) for x in (a, b))
    return a, b


@settings(max_examples=150, deadline=None)
@given(
    label_images(),
    st.sampled_from([0.1, 0.25, 1 / 3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0]),
    st.sampled_from(M.CRITERIA),
)
def test_sparse_matching_equals_dense_hungarian(images, thr, criterion):
    y_true, y_pred = images
    dense_overlap, tp, objective, tp_sum = dense_reference(y_true, y_pred, thr, criterion)
    for limit in (None, 0):  # dense pieces, then the sparse LAPJVsp solver for every piece
        ov, tp2, objective2, tp_sum2 = sparse_result(y_true, y_pred, thr, criterion, limit)
        assert tp2 == tp
        assert objective2 == pytest.approx(objective, abs=1e-9)
        if criterion == "iou" and thr > 0.5:  # the matching is unique: the TP scores must agree too
            assert tp_sum2 == pytest.approx(tp_sum, abs=1e-9)
    np.testing.assert_array_equal(ov.dense(), dense_overlap)
    m = matching(y_true, y_pred, thr, criterion)
    assert (m.tp, m.fp, m.fn) == (tp, ov.n_pred - tp, ov.n_true - tp)


def test_chunked_and_compacted_overlaps_agree(monkeypatch):
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 9, (7, 11, 13)).astype(np.uint16)
    y_pred = rng.integers(0, 9, (7, 11, 13)).astype(np.int32)
    whole = label_overlap(y_true, y_pred, ignore_label=4)
    monkeypatch.setattr(M, "_CHUNK", 37)
    chunked = label_overlap(y_true, y_pred, ignore_label=4)
    np.testing.assert_array_equal(chunked.dense(), whole.dense())
    assert chunked.n_pixels == whole.n_pixels == np.count_nonzero(y_true != 4)
    big_t = y_true.astype(np.uint64) * np.uint64(10**12)  # labels far above the pixel count
    big_p = y_pred.astype(np.int64) * 10**9 + (y_pred > 0)
    compact = label_overlap(big_t, big_p, ignore_label=4 * 10**12)
    np.testing.assert_array_equal(compact.dense(), whole.dense())
    np.testing.assert_array_equal(compact.true_ids, whole.true_ids * 10**12)
    np.testing.assert_array_equal(compact.pred_ids, whole.pred_ids * 10**9 + 1)


def test_overlap_dense_sums_are_object_areas():
    y_true, y_pred = three_objects()
    o = label_overlap(y_true, y_pred).dense()
    assert o.sum() == y_true.size
    np.testing.assert_array_equal(o.sum(axis=1)[1:], [100, 100, 16])  # labels 3, 7, 42
    np.testing.assert_array_equal(o.sum(axis=0)[1:], [125, 100, 9])  # labels 1, 5, 9


def test_against_stardist_when_installed():
    """Optional cross-check with the reference implementation (not a project dependency)."""
    sd = pytest.importorskip("stardist.matching")
    rng = np.random.default_rng(7)
    for _ in range(10):
        y_true = rng.integers(0, 6, (12, 14)).repeat(2, axis=0).astype(np.uint16)
        y_pred = np.roll(y_true, rng.integers(0, 3), axis=1).astype(np.int32)
        y_pred[y_pred == 2] = 9
        for ours, ref in zip(
            matching(y_true, y_pred, [0.3, 0.5, 0.7]),
            sd.matching(y_true, y_pred, [0.3, 0.5, 0.7]),
            strict=True,
        ):
            for key in ("tp", "fp", "fn", "precision", "recall", "accuracy", "f1", "panoptic_quality"):
                assert getattr(ours, key) == pytest.approx(getattr(ref, key), abs=1e-6), key
