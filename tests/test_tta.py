"""Test-time augmentation: group structure and the channel corrections, checked on analytic fields."""

from __future__ import annotations

from itertools import product

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedseg_deploy.contract import axis_of_dim
from embedseg_deploy.tiling import pad_reflect, pad_widths, predict_tiled
from embedseg_deploy.tta import Transform, forward, group, inverse_output, inverse_spatial, predict_tta

SPACING = {2: (0.02, 0.02), 3: (0.04, 0.02, 0.02)}  # array order; z coarser, as anisotropy gives


def labels_image(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Axis-aligned boxes with different extents per axis (anisotropic objects), ids 1..n, as (1, *shape)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.float32)
    for i in range(1, 6):
        lo = [rng.integers(0, n - 1) for n in shape]
        hi = [min(n, a + rng.integers(1, 9)) for a, n in zip(lo, shape, strict=True)]
        labels[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = i
    return labels[None]


def ideal_model(x: np.ndarray) -> np.ndarray:
    """The output an ideal network gives for a label image (1, *spatial): offsets with
    ``tanh(o_d) = (c - p)_d * spacing_d`` towards each object's centroid, sigma logits from each object's
    extent per axis, a seed logit from the distance to the centre. Equivariant by construction."""
    labels = np.rint(x[0]).astype(int)
    ndim = labels.ndim
    spacing = np.array(SPACING[ndim])[:, None]
    coords = np.indices(labels.shape, dtype=np.float64)
    out = np.zeros((2 * ndim + 1, *labels.shape))
    for label in np.unique(labels[labels > 0]):
        mask = labels == label
        pts = coords[:, mask]
        delta = (pts.mean(axis=1, keepdims=True) - pts) * spacing  # array order
        extent = np.log1p(pts.std(axis=1))
        for d in range(ndim):
            a = axis_of_dim(d, ndim)
            out[d][mask] = np.arctanh(delta[a])
            out[ndim + d][mask] = extent[a]
        out[-1][mask] = 1.0 - 100.0 * (delta**2).sum(axis=0)
    return out


def gradient_box(radius: int):
    """A finite-reach batch 'network' (N, 1, *s) -> (N, 2*ndim+1, *s): g = box filter (zero padding),
    offsets = central differences of g (a true vector field), sigmas = their squares, seed = g.
    Integer inputs keep every value exact, so TTA of this exactly equivariant net is exact too."""

    def run(batch: np.ndarray) -> np.ndarray:
        ndim = batch.ndim - 2
        shape = batch.shape[2:]
        xp = np.pad(batch[:, 0], [(0, 0)] + [(radius + 1, radius + 1)] * ndim)
        g = np.zeros((len(batch), *(n + 2 for n in shape)), dtype=np.float32)
        for off in product(range(2 * radius + 1), repeat=ndim):
            g += xp[(slice(None), *(slice(o, o + n + 2) for o, n in zip(off, shape, strict=True)))]
        inner = (slice(None),) + (slice(1, -1),) * ndim
        grads = []
        for d in range(ndim):
            a = axis_of_dim(d, ndim)
            hi = list(inner)
            lo = list(inner)
            hi[1 + a], lo[1 + a] = slice(2, None), slice(None, -2)
            grads.append(g[tuple(hi)] - g[tuple(lo)])
        return np.stack([*grads, *(v * v for v in grads), g[inner]], axis=1)

    return run


@pytest.mark.parametrize("ndim", [2, 3])
def test_group_has_upstream_size_order_and_is_closed(ndim):
    ts = group(ndim)
    assert len(ts) == (8 if ndim == 2 else 16) and len(set(ts)) == len(ts)
    assert ts[0] == Transform(ndim) and [t.k for t in ts[:4]] == [0, 1, 2, 3]
    assert ts[4] == Transform(ndim, 0, flip_y=True)
    if ndim == 3:
        assert ts[8] == Transform(3, 0, flip_z=True) and ts[12] == Transform(3, 0, True, True)
    x = np.arange(1 * 3 * 5 * 5).reshape((1, 3, 5, 5)[-ndim - 1 :]).astype(np.float32)
    images = [forward(x, t) for t in ts]
    for t1, t2 in product(ts, ts):
        composed = forward(forward(x, t1), t2)
        assert sum(np.array_equal(composed, im) for im in images) == 1


@settings(max_examples=30, deadline=None)
@given(
    ndim=st.sampled_from([2, 3]),
    shape=st.lists(st.integers(1, 9), min_size=3, max_size=3),
    lead=st.integers(1, 2),
)
def test_forward_then_inverse_is_identity_on_any_shape(ndim, shape, lead):
    x = np.random.default_rng(0).normal(size=(lead, 2, *shape[:ndim])).astype(np.float32)
    for t in group(ndim):
        y = forward(x, t)
        assert sorted(y.shape[-2:]) == sorted(x.shape[-2:])
        np.testing.assert_array_equal(inverse_spatial(y, t), x)


@pytest.mark.parametrize(("ndim", "shape"), [(2, (19, 27)), (3, (7, 12, 17))])
def test_inverse_output_recovers_ideal_field(ndim, shape):
    x = labels_image(shape, seed=ndim)
    expected = ideal_model(x)
    assert np.abs(expected[0]).max() > 0.05 and np.abs(expected[1]).max() > 0.05
    assert not np.allclose(expected[ndim], expected[ndim + 1])  # anisotropic sigmas: a swap shows
    for t in group(ndim):
        raw = ideal_model(forward(x[None], t)[0])[None]  # with a batch axis, as a backend returns
        np.testing.assert_allclose(inverse_output(raw, t)[0], expected, atol=1e-9, err_msg=str(t))
        if t != Transform(ndim):  # without the channel correction the field is wrong
            assert not np.allclose(inverse_spatial(raw, t)[0], expected, atol=1e-3), t


@pytest.mark.parametrize(("ndim", "shape"), [(2, (21, 35)), (3, (6, 13, 11))])
@pytest.mark.parametrize("placement", ["center", "end"])
def test_predict_tta_of_equivariant_model_equals_plain_prediction(ndim, shape, placement):
    x = labels_image(shape, seed=10 + ndim)
    widths = pad_widths(shape, 8, placement)
    crop = (slice(None), *(slice(b, b + n) for (b, _), n in zip(widths, shape, strict=True)))
    expected = ideal_model(pad_reflect(x, widths))[crop]
    calls = []

    def predict(image):
        calls.append(image.shape)
        return ideal_model(image)

    out = predict_tta(x, predict, 8, placement)
    assert out.dtype == np.float32 and out.shape == (2 * ndim + 1, *shape)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert len(calls) == len(group(ndim)) and all(n % 8 == 0 for s in calls for n in s[1:])
    assert {s[-2:] for s in calls} == {calls[0][-2:], calls[0][-2:][::-1]}  # rotations: non-square


@pytest.mark.parametrize("ndim", [2, 3])
def test_predict_tta_averages_a_non_equivariant_model(ndim):
    """A per-pixel model ignores the geometry, so the group average cancels its offsets exactly and
    averages its x and y sigmas; z sigma and seed are unchanged."""
    shape = (16, 24) if ndim == 2 else (8, 16, 24)
    x = np.random.default_rng(3).normal(size=(1, *shape)).astype(np.float32)
    weights = np.arange(1, 2 * ndim + 2, dtype=np.float32)[:, None]

    def predict(image):
        return (weights * image.reshape(1, -1)).reshape(2 * ndim + 1, *image.shape[1:])

    out = predict_tta(x, predict)
    plain = predict(x)
    np.testing.assert_allclose(out[:ndim], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[ndim], (plain[ndim] + plain[ndim + 1]) / 2, rtol=1e-6)
    np.testing.assert_allclose(out[ndim + 1], out[ndim], rtol=1e-6)
    np.testing.assert_allclose(out[2 * ndim :], plain[2 * ndim :], rtol=1e-6)


@pytest.mark.parametrize(
    ("shape", "tile", "halo"), [((37, 53), (24, 32), (8, 8)), ((11, 21, 19), (16, 24, 24), (8, 8, 8))]
)
def test_tta_over_tiled_prediction_is_exact_for_an_equivariant_network(shape, tile, halo):
    ndim = len(shape)
    x = np.random.default_rng(4).integers(0, 5, size=(1, *shape)).astype(np.float32)
    run = gradient_box(2)  # reach 3 < halo
    out_ch = 2 * ndim + 1

    def tiled(image):
        return predict_tiled(image, run, out_ch, tile, halo)

    plain = tiled(x)
    assert np.abs(plain[:ndim]).max() > 0
    np.testing.assert_array_equal(predict_tta(x, tiled), plain)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="2D and 3D"):
        group(4)
    with pytest.raises(ValueError, match="5 channels"):
        inverse_output(np.zeros((1, 4, 8, 8), np.float32), Transform(2, 1))
    with pytest.raises(ValueError, match="predict_fn returned shape"):
        predict_tta(np.zeros((1, 8, 16), np.float32), lambda im: np.zeros((5, 8, 16), np.float32))
