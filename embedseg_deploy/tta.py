"""Test-time augmentation: upstream's rotation/flip group, with exact corrections of the output channels.

The group (upstream ``apply_tta_2d``/``apply_tta_3d``, same order) has 4 rotations by 90° in the YX plane,
``np.rot90(x, k, axes=(Y, X))``, each followed by a flip: none or Y in 2D (8 elements), and none, Y, Z
or Z and Y in 3D (16 elements). Element ``i`` is ``k = i % 4`` with flip combination ``i // 4``.

Why the channel corrections are what they are (first principles; the tests check them on an analytic
field). ``np.rot90(a, 1, axes=(Y, X))`` sends the pixel at ``(y, x)`` to ``(W - 1 - x, y)``, so a
displacement ``(dx, dy)`` becomes ``(dy, -dx)``. torch's ``rot90`` turns the same way: from the first
axis towards the second. An equivariant network fed the rotated image predicts offsets
``o' = (o_y, -o_x)``, so ``o_x = -o'_y`` and ``o_y = o'_x``. That is upstream's k=1 rule. k=2 negates
both, and k=3 is the transpose of k=1. A flip along an axis negates the displacement along it. The
forward transform flips after it rotates, so the inverse first negates the flipped components, then
undoes the rotation. Odd rotations swap the x and y extents, so they swap ``s_x`` and ``s_y``. The offset
channels are raw (pre-tanh) logits; negating them is exact because tanh is odd.

A rotation changes the shape of a non-square image, and the network's stride-8 phase depends on
where the rounding padding sits. :func:`predict_tta` therefore reflect-pads once, as whole-image
prediction does, and transforms the *padded* image, as upstream does. Every transformed input is then a
multiple of 8, and ``predict_fn`` (for example a tiled predictor) adds no padding of its own. Padding
each transformed image separately would move an odd centre padding by one pixel under a flip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .contract import TILE_MULTIPLE
from .tiling import pad_reflect, pad_widths

PredictFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Transform:
    """``np.rot90`` by ``k`` quarter turns in the YX plane, then the flips (Y, then Z)."""

    ndim: int
    k: int = 0
    flip_y: bool = False
    flip_z: bool = False


def group(ndim: int) -> list[Transform]:
    """The TTA transforms in upstream's order: 8 in 2D, 16 in 3D; the identity comes first."""
    if ndim not in (2, 3):
        raise ValueError(f"TTA is defined for 2D and 3D images, got ndim={ndim}")
    flips = [(False, False), (True, False)] + ([(False, True), (True, True)] if ndim == 3 else [])
    return [Transform(ndim, k, fy, fz) for fy, fz in flips for k in range(4)]


def forward(x: np.ndarray, t: Transform) -> np.ndarray:
    """Transform the trailing ``t.ndim`` (spatial, array-order) axes of ``x``; returns a contiguous copy."""
    y = np.rot90(x, t.k, axes=(-2, -1))
    if t.flip_y:
        y = np.flip(y, -2)
    if t.flip_z:
        y = np.flip(y, -3)
    return np.array(y, order="C", copy=True)


def inverse_spatial(y: np.ndarray, t: Transform) -> np.ndarray:
    """Undo :func:`forward` on the spatial axes only (no channel correction); returns a contiguous copy."""
    if t.flip_z:
        y = np.flip(y, -3)
    if t.flip_y:
        y = np.flip(y, -2)
    return np.array(np.rot90(y, -t.k, axes=(-2, -1)), order="C", copy=True)


def inverse_output(y: np.ndarray, t: Transform) -> np.ndarray:
    """Map raw network outputs ``(..., 2*ndim+1, *spatial)`` of a transformed input back to the original.

    Channels are offsets x, y[, z], sigmas x, y[, z], seed (upstream order). The spatial inverse is
    followed by the channel corrections (see the module docstring).
    """
    n = t.ndim
    if y.ndim < n + 1 or y.shape[-n - 1] != 2 * n + 1:
        raise ValueError(f"raw outputs need {2 * n + 1} channels before {n} spatial axes, got {y.shape}")
    out = inverse_spatial(y, t)

    def ch(i: int) -> tuple:
        return (Ellipsis, i) + (slice(None),) * n

    ox, oy, sx, sy = ch(0), ch(1), ch(n), ch(n + 1)
    if t.flip_y:
        out[oy] *= -1
    if t.flip_z:
        out[ch(2)] *= -1
    a, b = out[ox].copy(), out[oy].copy()
    if t.k == 1:
        out[ox], out[oy] = -b, a
    elif t.k == 2:
        out[ox], out[oy] = -a, -b
    elif t.k == 3:
        out[ox], out[oy] = b, -a
    if t.k % 2:
        out[sx], out[sy] = out[sy].copy(), out[sx].copy()
    return out


def predict_tta(
    image: np.ndarray,
    predict_fn: PredictFn,
    multiple: int = TILE_MULTIPLE,
    placement: str = "center",
    transforms: Sequence[Transform] | None = None,
    progress: Callable[[int, int], None] | None = None,
    crop: bool = True,
) -> np.ndarray:
    """Raw outputs (out, *spatial) float32 for ``image`` (C, *spatial), averaged over the TTA group.

    The image is reflect-padded to ``multiple`` as ``placement`` says (``multiple=1``: no padding). Each
    transform of the padded image goes through ``predict_fn`` ((C, *s) -> (out, *s)) and back through
    :func:`inverse_output`. The raw (pre-activation) outputs are averaged with equal weights, as
    upstream does, and the padding is cropped unless ``crop=False``. ``progress(done, total)`` is called
    after each transform.
    """
    ndim = image.ndim - 1
    transforms = group(ndim) if transforms is None else list(transforms)
    widths = pad_widths(image.shape[1:], multiple, placement)
    padded = pad_reflect(image, widths)
    total = None
    for i, t in enumerate(transforms):
        x = forward(padded, t)
        raw = np.asarray(predict_fn(x))
        if raw.ndim != ndim + 1 or raw.shape[1:] != x.shape[1:]:
            raise ValueError(f"predict_fn returned shape {raw.shape} for input {x.shape}")
        raw = inverse_output(raw.astype(np.float32, copy=False), t)
        if total is None:
            total = raw
        else:
            total += raw
        if progress is not None:
            progress(i + 1, len(transforms))
    if total is None:
        raise ValueError("no transforms given")
    total /= np.float32(len(transforms))
    if not crop:
        return total
    keep = tuple(slice(b, b + n) for (b, _), n in zip(widths, image.shape[1:], strict=True))
    return np.ascontiguousarray(total[(slice(None), *keep)])
