"""Tiled prediction that reproduces whole-image prediction.

Whole-image prediction (upstream EmbedSeg): reflect-pad the image up to a multiple of 8
(:func:`pad_widths`), run the network once, cluster the whole padded output, then crop the labels (so
``crop=False`` keeps the padding in the output for the clustering). BranchedERFNet has a total stride of 8
and pads its convolutions with zeros, so its output is shift-equivariant only for shifts by multiples of
8, and it sees zeros beyond the padded image. A tile plan keeps both properties:

* **Phase.** Tile origins are multiples of 8 in the coordinates of the padded image: the tile grid is
  anchored at ``-pad_before`` in image coordinates. Tile sizes and halos are multiples of 8.
* **Borders.** A tile never reaches beyond the padded image. Border tiles are shifted inwards instead
  of being padded further. Their cores then have at least ``halo`` pixels of real context on every
  inner side and more on the border side. At the border itself the network sees the same zero padding
  as in whole-image prediction. So no halo is ever invented by reflection, and when the halo covers the
  network's effective reach, tiled prediction equals whole-image prediction exactly.
* **One tile.** Where the padded image fits into one tile along an axis, that axis has one tile equal to
  the padded image. A small image is therefore predicted exactly as upstream does.

Cores partition the padded image: tile ``i`` starts at ``min(i * (tile - 2 * halo), padded - tile)``
and keeps ``[start + halo, start + tile - halo)``, extended to the padded border for the first and
the last tile. That needs ``1 + ceil((padded - tile) / (tile - 2 * halo))`` tiles per axis.

All tiles of one image share one shape, ``min(tile, padded shape)`` per axis. A backend such as
TensorRT then needs one shape profile per image size, not one per border case. The last batch may be
short (``pad_last_batch`` fills it for backends with a fixed batch size).

Reflect padding is numpy's ``mode="reflect"``, which is torch's ``F.pad(mode="reflect")``: the edge
value is not repeated. Tiles gather it index by index from the unpadded image (:func:`reflect_indices`),
so the padded image is never built. Only the rounding padding (fewer than ``multiple`` pixels per side)
is ever reflected. Where that padding is not smaller than the axis (an axis shorter than 8 pixels),
torch's reflect is undefined and upstream would fail. Here numpy's repeated reflection is used
(period ``2 * (n - 1)``; an axis of length 1 repeats its value).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np

from .contract import PADDING_PLACEMENTS, TILE_MULTIPLE

RunFn = Callable[[np.ndarray], np.ndarray]
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class Tile:
    """One network input and the part of its output that is kept.

    ``origin`` is the first pixel of the input in image coordinates. It is negative or reaches past the
    image where the input includes reflect padding, and ``origin + pad_before`` is a multiple of 8.
    ``shape`` is the input's spatial shape. ``core`` selects the kept part of the tile's output, and
    ``dest`` says where that part goes in the (unpadded) output image.
    """

    origin: tuple[int, ...]
    shape: tuple[int, ...]
    core: tuple[slice, ...]
    dest: tuple[slice, ...]


def pad_widths(
    shape: Sequence[int], multiple: int = TILE_MULTIPLE, placement: str = "center"
) -> list[tuple[int, int]]:
    """(before, after) per axis rounding ``shape`` up to a multiple of ``multiple``.

    ``"center"`` puts ``d // 2`` before and the rest after (upstream 2D ``predict``). ``"end"`` puts
    everything after (upstream 3D ``pad_3d``).
    """
    if placement not in PADDING_PLACEMENTS:
        raise ValueError(f"padding placement must be one of {PADDING_PLACEMENTS}, got {placement!r}")
    if multiple < 1:
        raise ValueError(f"multiple must be positive, got {multiple}")
    widths = []
    for n in shape:
        if n < 1:
            raise ValueError(f"cannot pad an empty axis (shape {tuple(shape)})")
        d = -n % multiple
        widths.append((d // 2, d - d // 2) if placement == "center" else (0, d))
    return widths


def reflect_indices(index: np.ndarray, n: int) -> np.ndarray:
    """Map indices (possibly outside ``[0, n)``) into an axis of length ``n`` as numpy's reflect pad does."""
    index = np.asarray(index)
    if n == 1:
        return np.zeros_like(index)
    r = np.mod(index, 2 * n - 2)
    return np.where(r < n, r, 2 * n - 2 - r)


def pad_reflect(image: np.ndarray, widths: Sequence[tuple[int, int]]) -> np.ndarray:
    """Reflect-pad the trailing ``len(widths)`` (spatial) axes of ``image``; leading axes are kept."""
    lead = [(0, 0)] * (image.ndim - len(widths))
    return np.pad(image, lead + [tuple(w) for w in widths], mode="reflect")


def _per_axis(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    values = (value,) * ndim if isinstance(value, int | np.integer) else tuple(value)
    if len(values) != ndim:
        raise ValueError(f"{name} needs {ndim} sizes (array order), got {list(values)}")
    return tuple(int(v) for v in values)


def _axis_plan(
    n: int, before: int, after: int, tile: int, halo: int, least: int = 0
) -> list[tuple[int, int, int, int]]:
    """Tiles along one axis as (start in padded coordinates, core start, core stop, size), cores in padded
    coordinates. ``least``: the smallest input the network takes (a static-shape model); a shorter axis
    gets one tile of that size, reflect-padded past the image's end and cropped away after."""
    padded = n + before + after
    tile = max(tile, least)
    size = min(tile, padded)
    if size == padded:
        return [(0, 0, padded, max(size, least))]
    step = tile - 2 * halo
    count = 1 + -(-(padded - size) // step)
    starts = [min(i * step, padded - size) for i in range(count)]
    plan = []
    for i, start in enumerate(starts):
        lo = 0 if i == 0 else starts[i - 1] + size - halo
        hi = padded if i == count - 1 else start + size - halo
        plan.append((start, lo, hi, size))
    return plan


def plan_tiles(
    shape: Sequence[int],
    tile: int | Sequence[int] | None,
    halo: int | Sequence[int] = 0,
    multiple: int = TILE_MULTIPLE,
    placement: str = "center",
    crop: bool = True,
    least: Sequence[int] | None = None,
) -> list[Tile]:
    """Tiles covering an image of spatial ``shape`` (array order), in C order of their positions.

    ``tile=None`` means one tile: whole-image prediction. Sizes and halos must be multiples of
    ``multiple``. Along an axis cut into several tiles, a tile must be larger than twice its halo.
    ``crop=False`` keeps the rounding padding in the cores: ``dest`` then indexes the padded image (the
    output that upstream clusters). ``least``: per axis, the smallest tile the network takes (a
    static-shape model's size): tiles are never smaller. See the module docstring for the plan.
    """
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    widths = pad_widths(shape, multiple, placement)
    padded = [n + b + a for n, (b, a) in zip(shape, widths, strict=True)]
    tiles = tuple(padded) if tile is None else _per_axis(tile, ndim, "tile")
    halos = _per_axis(halo, ndim, "halo")
    for t, h, p in zip(tiles, halos, padded, strict=True):
        if t < 1 or t % multiple or h % multiple or h < 0:
            raise ValueError(f"tile {list(tiles)} and halo {list(halos)} must be multiples of {multiple}")
        if t < p and t <= 2 * h:  # only an axis cut into several tiles needs a core
            raise ValueError(f"tile {list(tiles)} must be larger than twice the halo {list(halos)}")
    mins = _per_axis(0, ndim, "least") if least is None else _per_axis(least, ndim, "least")
    axes = [
        _axis_plan(n, b, a, t, h, k)
        for n, (b, a), t, h, k in zip(shape, widths, tiles, halos, mins, strict=True)
    ]
    plan = []
    for combo in product(*axes):
        origin, core, dest, size = [], [], [], []
        for (start, lo, hi, s), (b, _), n in zip(combo, widths, shape, strict=True):
            first = 0 if crop else b  # index of the image's first pixel in the output
            if crop:
                lo, hi = max(lo, b), min(hi, b + n)  # drop the rounding padding from the kept part
            origin.append(start - b)
            core.append(slice(lo - start, hi - start))
            dest.append(slice(lo - b + first, hi - b + first))
            size.append(s)
        plan.append(Tile(tuple(origin), tuple(size), tuple(core), tuple(dest)))
    return plan


def tile_count(length: int, tile: int, halo: int) -> int:
    """Tiles of ``tile`` px overlapping by ``2 * halo`` that cover ``length`` px (one axis)."""
    return 1 if length <= tile else 1 + -(-(length - tile) // (tile - 2 * halo))


def balanced_tile(
    shape: Sequence[int],
    tile: Sequence[int],
    halo: Sequence[int],
    multiple: int = TILE_MULTIPLE,
    placement: str = "center",
) -> list[int]:
    """The smallest tile, per axis, that covers ``shape`` with no more tiles than ``tile`` needs.

    ``tile`` bounds memory; its count of tiles per axis is kept and their size shrunk to fit, so that an
    image just past the tile (2056 px with a 2048 px tile: two tiles) is not paid as two full tiles.
    """
    out = []
    for n, (b, a), t, h in zip(shape, pad_widths(shape, multiple, placement), tile, halo, strict=True):
        padded = n + b + a
        if padded > t and t <= 2 * h:
            raise ValueError(f"tile {list(tile)} must be larger than twice the halo {list(halo)}")
        count = tile_count(padded, t, h)
        # count tiles of size s cover the padded axis when count * s - 2 * h * (count - 1) >= padded
        size = -(-(padded + 2 * h * (count - 1)) // count)
        out.append(min(t, -(-size // multiple) * multiple))
    return out


def read_tile(image: np.ndarray, tile: Tile) -> np.ndarray:
    """Network input for ``tile`` from ``image`` (C, *spatial), reflect-padded where it leaves the image.

    A view where the tile lies inside the image; else only the axes that leave it are gathered (a
    border tile of a large image is a cheap copy, not a gather along every axis).
    """
    window: list[slice] = [slice(None)]
    gathers = []
    for axis, (o, s, n) in enumerate(zip(tile.origin, tile.shape, image.shape[1:], strict=True), start=1):
        if o >= 0 and o + s <= n:
            window.append(slice(o, o + s))
        else:
            window.append(slice(None))
            gathers.append((axis, reflect_indices(np.arange(o, o + s), n)))
    x = image[tuple(window)]
    for axis, index in gathers:
        x = np.take(x, index, axis=axis)
    return x


def _add(stats: dict[str, float] | None, key: str, since: float) -> float:
    now = time.perf_counter()
    if stats is not None:
        stats[key] = stats.get(key, 0.0) + now - since
    return now


def predict_tiled(
    image: np.ndarray,
    run: RunFn,
    out_channels: int,
    tile: int | Sequence[int] | None,
    halo: int | Sequence[int] = 0,
    batch_size: int = 1,
    placement: str = "center",
    multiple: int = TILE_MULTIPLE,
    progress: ProgressFn | None = None,
    stats: dict[str, float] | None = None,
    pad_last_batch: bool = False,
    crop: bool = True,
    least: Sequence[int] | None = None,
    submit: Callable[[np.ndarray], Callable[[], np.ndarray]] | None = None,
) -> np.ndarray:
    """Raw network output (out_channels, *spatial) float32 for ``image`` (C, *spatial), tile by tile.

    ``crop=False`` returns the output of the padded image, rounding padding included (the shape
    :func:`pad_widths` gives), which is what upstream clusters before it crops the labels.

    ``run`` maps a float32 batch (N, C, *tile) to raw outputs (N, out_channels, *tile). ``progress(done,
    total)`` is called after each batch with tile counts. ``stats`` accumulates seconds under ``'tile'``
    (gathering inputs), ``'network'`` and ``'stitch'``. ``pad_last_batch`` fills a short last batch with
    zeros so that ``run`` always gets ``batch_size`` tiles. ``least``: the smallest input the network takes
    per axis (:func:`plan_tiles`). ``submit``, for a backend that runs on its own stream, starts a batch and
    returns a function that waits for its output: the next batch is then gathered while this one runs (one
    batch in flight; without it each batch is run and stitched before the next is gathered, so that no
    two outputs are alive at once on the CPU). A single tile that needs no cropping is
    returned as the network's own output buffer, not copied (whole-volume 3D outputs are ~0.5 GB).
    """
    if image.ndim < 2:
        raise ValueError(f"image must be (C, *spatial), got shape {image.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    plan = plan_tiles(image.shape[1:], tile, halo, multiple, placement, crop, least)
    widths = [(0, 0)] * (image.ndim - 1) if crop else pad_widths(image.shape[1:], multiple, placement)
    out_shape = (out_channels, *(n + b + a for n, (b, a) in zip(image.shape[1:], widths, strict=True)))
    out = None

    def gather(group: list[Tile]) -> np.ndarray:
        n_fill = batch_size - len(group) if pad_last_batch else 0
        batch = np.zeros((len(group) + n_fill, image.shape[0], *group[0].shape), dtype=np.float32)
        for i, t in enumerate(group):
            batch[i] = read_tile(image, t)
        return batch

    def stitch(first: int, group: list[Tile], n_batch: int, raw: np.ndarray) -> None:
        nonlocal out
        t0 = time.perf_counter()
        expected = (n_batch, out_channels, *group[0].shape)
        if raw.shape != expected:
            raise ValueError(
                f"network returned shape {raw.shape} for a batch of {n_batch}, expected {expected}"
            )
        if (
            len(plan) == 1
            and raw.shape[1:] == out_shape
            and raw.dtype == np.float32
            and raw.flags.c_contiguous
        ):
            out = raw[0]
        else:
            if out is None:
                out = np.empty(out_shape, dtype=np.float32)
            for i, t in enumerate(group):
                out[(slice(None), *t.dest)] = raw[(i, slice(None), *t.core)]
        _add(stats, "stitch", t0)
        if progress is not None:
            progress(first + len(group), len(plan))

    def finish(first: int, group: list[Tile], n_batch: int, wait: Callable[[], np.ndarray]) -> None:
        t0 = time.perf_counter()
        raw = np.asarray(wait())
        _add(stats, "network", t0)
        stitch(first, group, n_batch, raw)

    pending = None  # (first, group, batch size, wait) of the batch in flight (``submit`` only)
    for first in range(0, len(plan), batch_size):
        t0 = time.perf_counter()
        group = plan[first : first + batch_size]
        batch = gather(group)
        t0 = _add(stats, "tile", t0)
        if submit is None:
            raw = np.asarray(run(batch))
            _add(stats, "network", t0)
            stitch(first, group, len(batch), raw)
            continue
        wait = submit(batch)
        _add(stats, "network", t0)
        if pending is not None:
            finish(*pending)
        pending = (first, group, len(batch), wait)
    if pending is not None:
        finish(*pending)
    return out


def per_axis(value: int | Sequence[int] | None, ndim: int, name: str) -> list[int] | None:
    """One size per axis from an int, one value or ``ndim`` values (None stays None)."""
    if value is None:
        return None
    values = [int(value)] * ndim if isinstance(value, int | np.integer) else [int(v) for v in value]
    if len(values) == 1:
        values = values * ndim
    if len(values) != ndim or any(v < 0 for v in values):
        raise ValueError(f"{name} needs 1 or {ndim} non-negative sizes (array order), got {value}")
    return values


def round_up(values: Sequence[int], multiple: int) -> list[int]:
    return [-(-int(v) // multiple) * multiple for v in values]
