"""Image normalisation, shared by training and the runtime so both see the same numbers.

Upstream EmbedSeg normalises the whole image before cropping (training) or predicting:
``(x - P_pmin) / (P_pmax - P_pmin + 1e-20)`` in float64, not clipped, default percentiles 1 and 99.8;
``x / 255`` or ``x / 65535`` ("absolute"); or ``(x - mean) / std``. The result is cast to float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .contract import NORMALIZATION_KINDS, Normalization

EPS = 1e-20


class NormalizationError(ValueError):
    """The image cannot be normalised (NaN/inf values, wrong channel layout)."""


CHUNK_VALUES = 1 << 20
"""Values per chunk of the element-wise scaling and the histograms: float64 temporaries stay ~24 MiB."""


def normalize(image: np.ndarray, norm: Normalization, channel_axis: int | None = None) -> np.ndarray:
    """Return ``image`` normalised as ``norm`` says, as float32 of the same shape.

    ``channel_axis`` is the axis holding channels (``None`` for a single-channel image). With
    ``norm.per_channel`` the statistics are taken per channel, else over the whole array.

    The numbers are upstream's (float64 arithmetic, then float32), but memory stays near the float32
    result: percentiles of 8/16-bit images come from a histogram and the scaling runs chunk by chunk
    (a float64 copy of a 16384^2 image alone would be 2 GiB).
    """
    x = np.asarray(image)
    if x.dtype.kind not in "biuf":
        raise NormalizationError(f"cannot normalise an image of dtype {x.dtype}")
    if x.dtype.kind == "f" and not _all_finite(x):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise NormalizationError(f"image has {bad} NaN or infinite values")
    axes = _stat_axes(x.ndim, channel_axis if norm.per_channel else None)
    stats = None
    if norm.kind == "percentile":
        stats = percentiles(x, (norm.pmin, norm.pmax), axes)
    elif norm.kind == "mean-std":
        x64 = x.astype(np.float64, copy=False)
        stats = (x64.mean(axis=axes, keepdims=True), x64.std(axis=axes, keepdims=True))
    return scale(x, norm, stats)


def percentiles(
    x: np.ndarray, q: tuple[float, float], axes: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """``np.percentile(x as float64, q, axis=axes, keepdims=True)``, bit for bit, with less memory.

    8/16-bit integers (and bool) go through a histogram, so no copy of the image is made; other types
    are copied one channel at a time.
    """
    shape = [1 if a in axes else n for a, n in enumerate(x.shape)]
    kept = [a for a in range(x.ndim) if a not in axes]  # at most the channel axis
    lo, hi = np.empty(shape), np.empty(shape)
    for index in np.ndindex(*[x.shape[a] for a in kept]):
        part = x[tuple(index[kept.index(a)] if a in kept else slice(None) for a in range(x.ndim))]
        at = tuple(index[kept.index(a)] if a in kept else 0 for a in range(x.ndim))
        if x.dtype.kind in "bui" and x.dtype.itemsize <= 2:
            lo[at], hi[at] = _histogram_percentiles(part, q)
        else:
            lo[at], hi[at] = np.percentile(part.astype(np.float64).ravel(), q)
    return lo, hi


def _histogram_percentiles(x: np.ndarray, q: Sequence[float]) -> list[float]:
    base = int(np.iinfo(x.dtype).min) if x.dtype.kind == "i" else 0
    size = 2 if x.dtype.kind == "b" else 2 ** (8 * x.dtype.itemsize)
    flat = x.reshape(-1)  # a view when x is contiguous; else one copy of the small integer type
    hist = np.zeros(size, np.int64)
    for i in range(0, flat.size, CHUNK_VALUES):
        hist += np.bincount(flat[i : i + CHUNK_VALUES].astype(np.int64) - base, minlength=size)
    nz = np.flatnonzero(hist)
    return percentiles_from_histogram(hist[nz], nz + base, q)


def percentiles_from_histogram(counts: np.ndarray, values: np.ndarray, q: Sequence[float]) -> list[float]:
    """np.percentile (linear method) of the data whose sorted distinct ``values`` occur ``counts`` times.

    Mirrors numpy's virtual index and interpolation so integer images get bit-identical statistics.
    """
    n = int(counts.sum())
    cum = np.cumsum(counts)
    out = []
    for pct in q:
        virtual = (n - 1) * np.true_divide(pct, 100)  # numpy's "linear" virtual index
        prev = np.floor(virtual)
        gamma = virtual - prev
        i = int(np.clip(prev, 0, n - 1))
        j = int(np.clip(prev + 1, 0, n - 1))
        a = float(values[np.searchsorted(cum, i, side="right")])
        b = float(values[np.searchsorted(cum, j, side="right")])
        diff = b - a
        value = b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma
        out.append(float(value))
    return out


def scale(x: np.ndarray, norm: Normalization, stats: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """``x`` scaled as ``norm`` says with given statistics, computed in float64, returned as float32.

    ``stats`` is (low, high percentile) or (mean, std), broadcastable against ``x``; None for the kinds
    that need none. Computed chunk by chunk, so float64 temporaries stay small. Shared with
    block-wise prediction, whose statistics cover the whole image.
    """
    if norm.kind not in NORMALIZATION_KINDS:
        raise NormalizationError(f"unknown normalization kind {norm.kind!r}")
    x = np.asarray(x)
    out = np.empty(x.shape, np.float32)
    for index in _chunks(x.shape):
        part = stats and tuple(_broadcast_index(s, index) for s in stats)
        out[index] = _scale64(x[index].astype(np.float64), norm, part)
    return out


def _chunks(shape: tuple[int, ...]) -> list[tuple]:
    """Index tuples that cut an array of ``shape`` into C-order pieces of at most ~CHUNK_VALUES values."""
    if not shape:
        return [()]
    k = 0  # the axis to slice: the first whose trailing block is small enough
    while k < len(shape) - 1 and math.prod(shape[k + 1 :]) > CHUNK_VALUES:
        k += 1
    step = max(1, CHUNK_VALUES // max(1, math.prod(shape[k + 1 :])))
    return [
        (*lead, slice(i, i + step))
        for lead in np.ndindex(*shape[:k])
        for i in range(0, max(shape[k], 1), step)
    ]


def _broadcast_index(stat: np.ndarray, index: tuple) -> np.ndarray:
    """The part of a keepdims statistic that broadcasts against ``x[index]``."""
    stat = np.asarray(stat)
    if stat.ndim == 0:
        return stat
    picked = tuple(
        (0 if isinstance(i, int | np.integer) else slice(None)) if n == 1 else i
        for i, n in zip(index, stat.shape, strict=False)
    )
    return stat[picked]


def _scale64(x: np.ndarray, norm: Normalization, stats: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    if norm.kind == "none":
        return x
    if norm.kind == "absolute":
        return x / float(norm.divisor)
    a, b = stats
    if norm.kind == "percentile":
        out = (x - a) / (b - a + EPS)
        return np.clip(out, 0.0, 1.0) if norm.clip else out
    return (x - a) / (b + EPS)


def _all_finite(x: np.ndarray) -> bool:
    flat = x.reshape(-1)
    return all(np.isfinite(flat[i : i + CHUNK_VALUES]).all() for i in range(0, flat.size, CHUNK_VALUES))


def _stat_axes(ndim: int, channel_axis: int | None) -> tuple[int, ...]:
    if channel_axis is None:
        return tuple(range(ndim))
    channel_axis %= ndim
    return tuple(a for a in range(ndim) if a != channel_axis)
