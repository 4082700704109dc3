"""Tiled prediction: exact reassembly, equality with whole-image prediction, stride-8 phase, padding."""

from __future__ import annotations

from itertools import product

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedseg_deploy.tiling import (
    pad_reflect,
    pad_widths,
    plan_tiles,
    predict_tiled,
    read_tile,
    reflect_indices,
)

from .conftest import UPSTREAM

FIXTURES = UPSTREAM
SETTINGS = settings(max_examples=100, deadline=None)


def pointwise(batch: np.ndarray, out: int = 3) -> np.ndarray:
    """A 'network' that maps each pixel on its own: tiling must reproduce it exactly."""
    return np.stack([np.sin((j + 1) * batch[:, 0]) + j * batch[:, -1] for j in range(out)], axis=1)


def phase_box(radius: int):
    """A 'network' with reach ``radius`` (zero padding at its input border) whose output also depends on
    the position modulo 8 within its input, like a stride-8 network: tiled == whole needs the phase."""

    def run(batch: np.ndarray) -> np.ndarray:
        ndim = batch.ndim - 2
        xp = np.pad(batch[:, :1], [(0, 0), (0, 0)] + [(radius, radius)] * ndim)
        box = np.zeros(batch[:, :1].shape, dtype=np.float32)
        for off in product(range(2 * radius + 1), repeat=ndim):
            box += xp[(Ellipsis, *(slice(o, o + n) for o, n in zip(off, batch.shape[2:], strict=True)))]
        phase = sum(np.indices(batch.shape[2:])) % 8 + 1.0
        return np.concatenate([box * phase.astype(np.float32), box, batch[:, :1]], axis=1)

    return run


def whole(image: np.ndarray, run, placement: str) -> np.ndarray:
    """Upstream's whole-image prediction: reflect-pad to a multiple of 8, run once, crop."""
    widths = pad_widths(image.shape[1:], 8, placement)
    raw = run(pad_reflect(image, widths)[None])[0]
    return raw[(slice(None), *(slice(b, b + n) for (b, _), n in zip(widths, image.shape[1:], strict=True)))]


@st.composite
def cases(draw, max_size: int = 40, min_halo: int = 0, max_halo: int = 2):
    """(shape, tile, halo, placement); 3D shapes are half as long so that 3D stays cheap."""
    ndim = draw(st.sampled_from([2, 3]))
    limit = max_size if ndim == 2 else max_size // 2
    size = st.integers(1, limit) | st.integers(limit // 2, limit)  # small shapes, and many tiles
    shape = tuple(draw(size) for _ in range(ndim))
    halo = tuple(8 * draw(st.integers(min_halo, max_halo)) for _ in range(ndim))
    tile = tuple(2 * h + 8 * draw(st.integers(1, 3)) for h in halo)
    placement = draw(st.sampled_from(["center", "end"]))
    return shape, tile, halo, placement


def test_pad_widths_match_upstream_fixture_conventions():
    assert pad_widths((237, 250), 8, "center") == [(1, 2), (3, 3)]
    assert pad_widths((30, 92, 90), 8, "end") == [(0, 2), (0, 4), (0, 6)]
    assert pad_widths((32, 96), 8, "center") == [(0, 0), (0, 0)]
    with pytest.raises(ValueError, match="placement"):
        pad_widths((10, 10), 8, "start")


@pytest.mark.parametrize(
    ("case", "crop", "placement"),
    [
        ("2d", (slice(1, 238), slice(3, 253)), "center"),
        ("3d", (slice(0, 30), slice(0, 92), slice(0, 90)), "end"),
    ],
)
def test_padding_reproduces_upstream_network_input(case, crop, placement):
    path = FIXTURES / case / "network_input.npy"
    if not path.exists():
        pytest.skip(f"upstream fixture {path} not available")
    net_in = np.load(path)
    inner = np.ascontiguousarray(net_in[(slice(None), *crop)])
    widths = pad_widths(inner.shape[1:], 8, placement)
    np.testing.assert_array_equal(pad_reflect(inner, widths), net_in)
    (only,) = plan_tiles(inner.shape[1:], 512, 32, 8, placement)
    np.testing.assert_array_equal(read_tile(inner, only), net_in)
    other = "end" if placement == "center" else "center"
    assert not np.array_equal(pad_reflect(inner, pad_widths(inner.shape[1:], 8, other)), net_in)


@given(n=st.integers(1, 12), before=st.integers(0, 30), after=st.integers(0, 30))
def test_reflect_indices_match_numpy_reflect(n, before, after):
    values = np.arange(n) * 10
    expected = np.pad(values, (before, after), mode="reflect")
    np.testing.assert_array_equal(values[reflect_indices(np.arange(-before, n + after), n)], expected)


@SETTINGS
@given(case=cases(max_size=90))
def test_plan_keeps_phase_context_and_partitions_output(case):
    shape, tile, halo, placement = case
    widths = pad_widths(shape, 8, placement)
    padded = [n + b + a for n, (b, a) in zip(shape, widths, strict=True)]
    plan = plan_tiles(shape, tile, halo, 8, placement)
    cover = np.zeros(shape, dtype=np.int32)
    for t in plan:
        assert t.shape == tuple(min(s, p) for s, p in zip(tile, padded, strict=True))
        for o, s, c, (b, _), p, h in zip(t.origin, t.shape, t.core, widths, padded, halo, strict=True):
            start = o + b  # in padded coordinates
            assert start % 8 == 0 and s % 8 == 0
            assert start >= 0 and start + s <= p
            assert start == 0 or c.start >= h  # real context before the core, or the padded border
            assert start + s == p or s - c.stop >= h
        assert [c.stop - c.start for c in t.core] == [d.stop - d.start for d in t.dest]
        cover[t.dest] += 1
    assert (cover == 1).all()


def test_single_tile_when_padded_image_fits():
    (t,) = plan_tiles((237, 250), (512, 512), (32, 32), 8, "center")
    assert t.origin == (-1, -3) and t.shape == (240, 256)
    assert t.core == (slice(1, 238), slice(3, 253)) and t.dest == (slice(0, 237), slice(0, 250))
    assert plan_tiles((237, 250), None, 0, 8, "center") == [t]
    assert len(plan_tiles((237, 250), (128, 512), (32, 32), 8, "center")) == 3


@SETTINGS
@given(case=cases(), batch_size=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_pointwise_network_reassembles_exactly(case, batch_size, seed):
    shape, tile, halo, placement = case
    image = np.random.default_rng(seed).normal(size=(2, *shape)).astype(np.float32)
    seen = set()

    def run(batch):
        seen.add(batch.shape)
        return pointwise(batch)

    out = predict_tiled(image, run, 3, tile, halo, batch_size=batch_size, placement=placement)
    np.testing.assert_array_equal(out, pointwise(image[None])[0])
    assert {s[2:] for s in seen} == {plan_tiles(shape, tile, halo, 8, placement)[0].shape}
    assert all(n % 8 == 0 for s in seen for n in s[2:])


@SETTINGS
@given(case=cases(max_size=80, min_halo=1, max_halo=1), radius=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_finite_reach_network_tiled_equals_whole_when_halo_covers_reach(case, radius, seed):
    shape, tile, halo, placement = case
    image = np.random.default_rng(seed).normal(size=(1, *shape)).astype(np.float32)
    run = phase_box(radius)
    out = predict_tiled(image, run, 3, tile, halo, batch_size=2, placement=placement)
    np.testing.assert_array_equal(out, whole(image, run, placement))


def test_finite_reach_network_differs_when_halo_is_too_small():
    image = np.random.default_rng(1).normal(size=(1, 16, 120)).astype(np.float32)
    run = phase_box(12)
    reference = whole(image, run, "center")
    good = predict_tiled(image, run, 3, (16, 48), (0, 16))
    bad = predict_tiled(image, run, 3, (16, 48), (0, 8))
    assert len(plan_tiles(image.shape[1:], (16, 48), (0, 16))) > 1
    np.testing.assert_array_equal(good, reference)
    assert not np.allclose(bad[:2], reference[:2])
    np.testing.assert_array_equal(bad[2], reference[2])  # the pointwise channel is always exact


def test_batching_progress_stats_and_input_untouched():
    image = np.random.default_rng(2).normal(size=(1, 40, 56)).astype(np.float32)
    before = image.copy()
    plan = plan_tiles(image.shape[1:], 24, 8)
    assert len(plan) == 15
    for pad_last, sizes in [(False, [4, 4, 4, 3]), (True, [4, 4, 4, 4])]:
        calls, ticks, stats = [], [], {}
        out = predict_tiled(
            image,
            lambda b, calls=calls: calls.append(len(b)) or pointwise(b),
            3,
            24,
            8,
            batch_size=4,
            progress=lambda done, total, ticks=ticks: ticks.append((done, total)),
            stats=stats,
            pad_last_batch=pad_last,
        )
        assert calls == sizes
        assert ticks == [(4, 15), (8, 15), (12, 15), (15, 15)]
        assert set(stats) == {"tile", "network", "stitch"} and min(stats.values()) >= 0
        np.testing.assert_array_equal(out, pointwise(image[None])[0])
    np.testing.assert_array_equal(image, before)


def test_bad_arguments_give_clear_errors():
    image = np.zeros((1, 40, 40), dtype=np.float32)
    with pytest.raises(ValueError, match="multiples of 8"):
        plan_tiles((40, 40), 20, 8)
    with pytest.raises(ValueError, match="twice the halo"):
        plan_tiles((40, 40), 16, 8)
    assert len(plan_tiles((14, 40), (16, 32), (8, 8))) == 2  # one tile along y: no core needed there
    with pytest.raises(ValueError, match="needs 2 sizes"):
        plan_tiles((40, 40), (16, 16, 16), 0)
    with pytest.raises(ValueError, match="network returned shape"):
        predict_tiled(image, lambda b: b, 3, 16, 0)


def test_asynchronous_backends_get_the_next_batch_while_one_runs():
    """With ``submit`` (a GPU backend with its own stream) batch k+1 is gathered and started before batch
    k is waited for and stitched; the output is the one of the synchronous loop, for any batch size."""
    rng = np.random.default_rng(5)
    image = rng.random((1, 70, 90), dtype=np.float32)

    def net(b: np.ndarray) -> np.ndarray:
        return np.concatenate([b * 2, b + 1, b - 3], axis=1)

    events: list[str] = []

    def submit(b: np.ndarray):
        k = len([e for e in events if e.startswith("submit")])
        events.append(f"submit {k}")
        out = net(b)

        def wait() -> np.ndarray:
            events.append(f"wait {k}")
            return out

        return wait

    for batch_size in (1, 2, 5):
        events.clear()
        expected = predict_tiled(image, net, 3, 32, 8, batch_size=batch_size)
        got = predict_tiled(image, net, 3, 32, 8, batch_size=batch_size, submit=submit)
        np.testing.assert_array_equal(got, expected)
        n = len([e for e in events if e.startswith("submit")])
        assert n > 2 and events[-1] == f"wait {n - 1}"
        for k in range(n - 1):  # batch k+1 started before batch k was waited for, every batch waited once
            assert events.index(f"submit {k + 1}") < events.index(f"wait {k}")
        assert sorted(e for e in events if e.startswith("wait")) == sorted(f"wait {k}" for k in range(n))
