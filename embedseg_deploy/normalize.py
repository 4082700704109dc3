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
    if norm.kind == "none":
        return x.astype(np.float32)
    if norm.kind == "absolute":
        return (x / float(norm.divisor)).astype(np.float32)
    axes = _stat_axes(x.ndim, channel_axis if norm.per_channel else None)
    if norm.kind == "percentile":
        lo = np.percentile(x, norm.pmin, axis=axes, keepdims=True)
        hi = np.percentile(x, norm.pmax, axis=axes, keepdims=True)
        out = (x - lo) / (hi - lo + EPS)
        if norm.clip:
            out = np.clip(out, 0.0, 1.0)
        return out.astype(np.float32)
    if norm.kind == "mean-std":
        mean = x.mean(axis=axes, keepdims=True)
        std = x.std(axis=axes, keepdims=True)
        return ((x - mean) / (std + EPS)).astype(np.float32)
    raise NormalizationError(f"unknown normalization kind {norm.kind!r}")


def _stat_axes(ndim: int, channel_axis: int | None) -> tuple[int, ...]:
    if channel_axis is None:
        return tuple(range(ndim))
    channel_axis %= ndim
    return tuple(a for a in range(ndim) if a != channel_axis)
