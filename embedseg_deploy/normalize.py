"""Image normalisation, shared by training and the runtime so both see the same numbers.

Upstream EmbedSeg normalises the whole image before cropping (training) or predicting:
``(x - P_pmin) / (P_pmax - P_pmin + 1e-20)`` in float64, not clipped, default percentiles 1 and 99.8;
``x / 255`` or ``x / 65535`` ("absolute"); or ``(x - mean) / std``. The result is cast to float32.
"""

from __future__ import annotations

import numpy as np

from .contract import Normalization

EPS = 1e-20


class NormalizationError(ValueError):
    """The image cannot be normalised (NaN/inf values, wrong channel layout)."""


def normalize(image: np.ndarray, norm: Normalization, channel_axis: int | None = None) -> np.ndarray:
    """Return ``image`` normalised as ``norm`` says, as float32 of the same shape.

    ``channel_axis`` is the axis holding channels (``None`` for a single-channel image). With
    ``norm.per_channel`` the statistics are taken per channel, else over the whole array.
    """
    x = np.asarray(image)
    if x.dtype.kind not in "biuf":
        raise NormalizationError(f"cannot normalise an image of dtype {x.dtype}")
    x = x.astype(np.float64, copy=False)
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise NormalizationError(f"image has {bad} NaN or infinite values")
    axes = _stat_axes(x.ndim, channel_axis if norm.per_channel else None)
    stats = None
    if norm.kind == "percentile":
        stats = tuple(np.percentile(x, p, axis=axes, keepdims=True) for p in (norm.pmin, norm.pmax))
    elif norm.kind == "mean-std":
        stats = (x.mean(axis=axes, keepdims=True), x.std(axis=axes, keepdims=True))
    return scale(x, norm, stats)


def scale(x: np.ndarray, norm: Normalization, stats: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """``x`` (float64) scaled as ``norm`` says with given statistics, as float32.

    ``stats`` is (low, high percentile) or (mean, std), broadcastable against ``x``; None for the kinds
    that need none. Shared with block-wise prediction, whose statistics cover the whole image.
    """
    if norm.kind == "none":
        return x.astype(np.float32)
    if norm.kind == "absolute":
        return (x / float(norm.divisor)).astype(np.float32)
    if norm.kind not in ("percentile", "mean-std"):
        raise NormalizationError(f"unknown normalization kind {norm.kind!r}")
    a, b = stats
    if norm.kind == "percentile":
        out = (x - a) / (b - a + EPS)
        return (np.clip(out, 0.0, 1.0) if norm.clip else out).astype(np.float32)
    return ((x - a) / (b + EPS)).astype(np.float32)


def _stat_axes(ndim: int, channel_axis: int | None) -> tuple[int, ...]:
    if channel_axis is None:
        return tuple(range(ndim))
    channel_axis %= ndim
    return tuple(a for a in range(ndim) if a != channel_axis)
