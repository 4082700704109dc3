"""Images too large for memory: read lazily, predict and cluster block by block, write block-wise.

The rule for objects at block borders (as StarDist's big-image prediction):

* The padded image (rounded up to a multiple of 8 as whole-image prediction pads it) is cut into block
  *cores* that partition it. Each block is predicted on its core plus a context *halo* (clipped at the
  image), so the network sees the same neighbourhood as in whole-image prediction and the stride-8 phase
  is kept (block origins are multiples of 8 in padded coordinates).
* The block is clustered as one image, with pixel coordinates in the global system. An object is kept by
  the block whose **core holds its seed** (cores partition the image, so exactly one block keeps it) and
  gets the next global id. Its pixels, which may reach into the halo, are written where the output is
  still 0: an object already written by an earlier block is never overwritten.
* An object more than half of whose pixels another block already wrote is that object seen twice (its
  seed crossed a core border through a tie or a last-bit difference between blocks) and is dropped.
* The halo must exceed the largest object (its extent from the seed) plus the network's reach, or
  objects cut by the halo's edge lose pixels. The default halo is the tile halo; set it per data set
  (``--block-halo``) to at least the largest object diameter. Regions all have one shape; by default the
  blocks are those that fit the memory budget with the least network work
  (:func:`embedseg_deploy.memory.block_core`), so memory stays flat as the image grows.

Memory is bounded by one block: the input is a memory map of the TIFF (uncompressed, contiguous data) or
is read page by page (one page per z-slice), the output is a memory-mapped TIFF opened per block, and
normalisation statistics are gathered in chunks (exact percentiles for 8/16-bit integers through
histograms; float images use all values up to 2^25 per channel, a strided sample beyond).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tifffile

from . import memory
from .contract import Normalization, check_pixel_size
from .io import (
    DiskFullError,
    InputError,
    atomic_write_json,
    channel_axis_of,
    is_disk_full,
    temp_file_beside,
    tiff_write_args,
)
from .ngff import write_labels
from .normalize import percentiles_from_histogram, scale
from .outputs import is_zarr_output, label_dtype, output_pixel_size
from .sources import ImageSource, open_source
from .tiling import balanced_tile, pad_widths, per_axis, plan_tiles, reflect_indices, round_up

if TYPE_CHECKING:
    from .predict import Predictor

EXACT_FLOAT_VALUES = 2**25
CHUNK_BYTES = 64 * 2**20
SLAB_BYTES = 8 * 2**20  # memory-mapped reads and writes of the network output, per map


@dataclass
class BigResult:
    n_objects: int
    shape: tuple[int, ...]
    dtype: np.dtype
    blocks: int
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    pixel_size: tuple[float, ...] | None = None
    network_tiles: int = 0  # tiles of the one network pass over the whole image (0: per block)


def _chunks(lazy: ImageSource) -> list[tuple[slice, ...]]:
    """Slabs along axis 0 of about CHUNK_BYTES each."""
    plane = math.prod(lazy.shape[1:]) * lazy.dtype.itemsize
    step = max(1, CHUNK_BYTES // max(plane, 1))
    return [
        (slice(i, min(i + step, lazy.shape[0])),) + (slice(None),) * (len(lazy.shape) - 1)
        for i in range(0, lazy.shape[0], step)
    ]


def norm_stats(
    lazy: ImageSource, caxis: int | None, norm: Normalization
) -> tuple[np.ndarray, np.ndarray] | None:
    """Global (lo, scale-base) statistics per channel, shaped (C,): percentiles or mean/std; None if none."""
    if norm.kind in ("none", "absolute"):
        return None
    n_ch = lazy.shape[caxis] if (caxis is not None and norm.per_channel) else 1

    def per_channel(chunk: np.ndarray) -> list[np.ndarray]:
        if n_ch == 1:
            return [chunk.ravel()]
        return [np.take(chunk, c, axis=caxis).ravel() for c in range(n_ch)]

    chunks = _chunks(lazy)
    if norm.kind == "mean-std":
        s = np.zeros(n_ch)
        s2 = np.zeros(n_ch)
        count = np.zeros(n_ch)
        for sl in chunks:
            for c, v in enumerate(per_channel(lazy.read(sl))):
                v = v.astype(np.float64)
                _check_finite(v, lazy.path)
                s[c] += v.sum()
                s2[c] += (v * v).sum()
                count[c] += v.size
        mean = s / count
        return mean, np.sqrt(np.maximum(s2 / count - mean**2, 0.0))
    lo, hi = np.zeros(n_ch), np.zeros(n_ch)
    if lazy.dtype.kind in "bui" and lazy.dtype.itemsize <= 2:
        base = int(np.iinfo(lazy.dtype).min) if lazy.dtype.kind == "i" else 0
        size = 2 ** (8 * lazy.dtype.itemsize)
        hist = np.zeros((n_ch, size), np.int64)
        for sl in chunks:
            for c, v in enumerate(per_channel(lazy.read(sl))):
                hist[c] += np.bincount((v.astype(np.int64) - base), minlength=size)
        for c in range(n_ch):
            nz = np.flatnonzero(hist[c])
            lo[c], hi[c] = percentiles_from_histogram(hist[c][nz], nz + base, [norm.pmin, norm.pmax])
        return lo, hi
    total = math.prod(lazy.shape) // n_ch
    stride = max(1, math.ceil(total / EXACT_FLOAT_VALUES))
    values: list[list[np.ndarray]] = [[] for _ in range(n_ch)]
    for sl in chunks:
        for c, v in enumerate(per_channel(lazy.read(sl))):
            _check_finite(v, lazy.path)
            values[c].append(v[::stride].astype(np.float64))
    for c in range(n_ch):
        lo[c], hi[c] = np.percentile(np.concatenate(values[c]), [norm.pmin, norm.pmax])
    return lo, hi


def _check_finite(v: np.ndarray, path: Path) -> None:
    if v.dtype.kind == "f" and not np.isfinite(v).all():
        raise InputError(f"{path}: image has NaN or infinite values")


def apply_norm(
    x: np.ndarray, norm: Normalization, stats: tuple[np.ndarray, np.ndarray] | None, path: Any = "?"
) -> np.ndarray:
    """Normalise ``x`` (C, *spatial) with the whole image's statistics (per channel, shaped (C,))."""
    _check_finite(x, path)
    shape = (-1,) + (1,) * (x.ndim - 1)
    return scale(x, norm, stats and tuple(np.asarray(s, np.float64).reshape(shape) for s in stats))


def plan_blocks(
    shape: Sequence[int], block: Sequence[int], halo: Sequence[int], multiple: int, placement: str
) -> list[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """(core, region) per block in padded coordinates; cores partition the padded image.

    Every region has the same shape, ``core + 2 * halo`` clipped to the image, shifted inwards at the
    borders (more context on the inner side): the backend sees one input shape, so ONNX Runtime keeps one
    memory plan and peak memory stays flat however many blocks the image has.
    """
    widths = pad_widths(shape, multiple, placement)
    padded = [n + b + a for n, (b, a) in zip(shape, widths, strict=True)]
    axes = []
    for p, bl, h in zip(padded, block, halo, strict=True):
        size = min(bl + 2 * h, p)
        axis = []
        for start in range(0, p, bl):
            first = min(max(start - h, 0), p - size)
            axis.append((slice(start, min(start + bl, p)), slice(first, first + size)))
        axes.append(axis)
    return [(tuple(c for c, _ in combo), tuple(r for _, r in combo)) for combo in itertools.product(*axes)]


def _read_region(
    lazy: ImageSource,
    caxis: int | None,
    region: Sequence[slice],
    before: Sequence[int],
    spatial: Sequence[int],
) -> np.ndarray:
    """Channels-first input of ``region`` (padded coordinates), reflect-padded outside the image."""
    index = [
        reflect_indices(np.arange(r.start - b, r.stop - b), n)
        for r, b, n in zip(region, before, spatial, strict=True)
    ]
    box = [slice(int(i.min()), int(i.max()) + 1) for i in index]
    file_index = list(box)
    if caxis is not None:
        file_index.insert(caxis, slice(None))
    data = lazy.read(file_index)
    data = data[np.newaxis] if caxis is None else np.moveaxis(data, caxis, 0)
    local = [i - sl.start for i, sl in zip(index, box, strict=True)]
    return data[(slice(None), *np.ix_(*local))]


@dataclass(frozen=True)
class BlockTask:
    """One block of a plan, self-contained so that any process (a dask worker) can compute it."""

    index: int
    path: str
    level: int
    caxis: int | None
    core: tuple[slice, ...]  # padded coordinates; cores partition the padded image
    region: tuple[slice, ...]  # core plus halo, clipped: what is clustered (and predicted, per block)
    before: tuple[int, ...]  # padding before the image on each axis
    spatial: tuple[int, ...]
    stats: tuple[np.ndarray, np.ndarray] | None  # whole-image normalisation statistics
    raw: str | None = None  # the network output of the whole padded image (.npy), when computed once


@dataclass(frozen=True)
class NetworkTask:
    """One network tile of the whole padded image (the tiling of whole-image prediction)."""

    index: int
    path: str
    level: int
    caxis: int | None
    region: tuple[slice, ...]  # the tile's input, padded coordinates
    core: tuple[slice, ...]  # the kept part of its output, tile coordinates
    dest: tuple[slice, ...]  # where that part goes, padded coordinates
    before: tuple[int, ...]
    spatial: tuple[int, ...]
    stats: tuple[np.ndarray, np.ndarray] | None


def tile_output(predictor: Predictor, task: NetworkTask) -> tuple[tuple[slice, ...], np.ndarray, dict]:
    """The network output of one tile's core: (padded-image slices, raw (C, *core), timings)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    lazy = open_source(task.path, task.level)
    x = _read_region(lazy, task.caxis, task.region, task.before, task.spatial)
    t0 = _tick(timings, "read", t0)
    x = apply_norm(x, predictor.contract.normalization, task.stats, lazy.path)
    t0 = _tick(timings, "normalize", t0)
    raw = np.asarray(predictor.backend.run(np.ascontiguousarray(x[np.newaxis], np.float32)))
    _tick(timings, "predict", t0)
    # a view: a copy of the core would add ~20 B/voxel to the peak (a dask worker copies it to send it)
    return task.dest, raw[(0, slice(None), *task.core)], timings


def segment_block(predictor: Predictor, task: BlockTask) -> tuple[tuple[slice, ...], np.ndarray, dict]:
    """Labels of the objects whose seed lies in ``task``'s core: (image slices, labels 1..k over them,
    timings). Clusters the network output of the block's region, rounding padding included, as
    whole-image prediction does, then crops to the image. The output is read from ``task.raw`` when the
    network ran once over the whole image, else computed here from the region's input."""
    c = predictor.contract
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if task.raw is not None:
        raw = _raw_region(task.raw, task.region)
        t0 = _tick(timings, "read", t0)
    else:
        lazy = open_source(task.path, task.level)
        x = _read_region(lazy, task.caxis, task.region, task.before, task.spatial)
        t0 = _tick(timings, "read", t0)
        x = apply_norm(x, c.normalization, task.stats, lazy.path)
        t0 = _tick(timings, "normalize", t0)
        raw = predictor.predict_raw(x)
        del x
        t0 = _tick(timings, "predict", t0)
    inside, local = _inside(task.region, task.before, task.spatial)
    labels, seeds = predictor.cluster(raw, [r.start for r in task.region], return_seeds=True)
    del raw
    starts, stops = [sl.start for sl in task.core], [sl.stop for sl in task.core]
    kept = np.all((seeds >= starts) & (seeds < stops), axis=1)  # row k - 1 is label k's seed
    lut = np.zeros(len(seeds) + 1, np.uint32)
    lut[1:][kept] = np.arange(1, int(kept.sum()) + 1)
    out = lut[labels[local]].astype(label_dtype(int(kept.sum())))
    _tick(timings, "cluster", t0)
    return inside, out, timings


def predict_big(
    predictor: Predictor,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    block: int | Sequence[int] | None = None,
    block_halo: int | Sequence[int] | None = None,
    channel_axis: int | None = None,
    progress: Any = None,
    provenance: dict[str, Any] | None = None,
    memory_budget: int | str | None = None,
    level: int = 0,
    executor: Any = None,
    resume: bool = True,
    network_once: bool | None = None,
    network_tile: int | Sequence[int] | None = None,
) -> BigResult:
    """Segment ``input_path`` block by block into ``output_path`` (written atomically, with
    ``provenance`` in its tags). Without ``block``, the
    blocks fit ``memory_budget`` (as ``--memory-budget``: bytes, "6G", "40%"; default half the available
    memory). An OME-Zarr input is read at pyramid ``level``; an output path ending in ``.zarr`` gets an
    OME-Zarr label image instead of a TIFF.

    The network runs once over the whole image, tiled as in whole-image prediction, and its output is
    kept on disk beside the output (20 B/px in 2D, 28 B/voxel in 3D); the blocks then cluster it, each
    with ``block_halo`` of context. So the network work is that of whole-image mode, not that of every
    block's region. Its tiles are those that fit the memory budget with the least work
    (:func:`embedseg_deploy.memory.network_tile`; on a GPU at most the predictor's tile), or
    ``network_tile``. ``network_once=False`` (or test-time augmentation, ``tile=0``, or too little free
    disk) runs the network per block instead, on the block plus its halo.

    ``executor`` (:class:`embedseg_deploy.dask_run.DaskExecutor`) computes tiles and blocks on a dask
    cluster; they are written here in plan order, so the labels equal a single-process run's. Finished
    steps are journaled beside the output: a killed run, started again with the same settings, goes on at
    the first unfinished one (``resume=False`` starts afresh). ``progress(done, total)`` counts network
    tiles and then blocks.
    """
    c = predictor.contract
    m = c.tile_multiple
    lazy = open_source(input_path, level)
    output_path = Path(output_path)
    target, source = output_path.resolve(), lazy.path.resolve()
    if target == source or source in target.parents:
        where = "overwrite" if target == source else "be written inside"
        raise InputError(f"{lazy.path}: the output would {where} the input; choose another output path")
    caxis = channel_axis_of(lazy.shape, c.ndim, c.in_channels, channel_axis, lazy.path, lazy.axes)
    spatial = tuple(s for i, s in enumerate(lazy.shape) if i != caxis)
    if caxis is None and c.in_channels != 1:
        raise InputError(f"{lazy.path}: image has 1 channel(s), the model takes {c.in_channels}")
    halo_v = round_up(per_axis(block_halo, c.ndim, "block halo") or predictor.halo, m)
    padded = [n + b + a for n, (b, a) in zip(spatial, pad_widths(spatial, m, c.padding), strict=True)]
    block_v = per_axis(block, c.ndim, "block")
    if not block_v:
        channels = 1 if caxis is None else lazy.shape[caxis]
        room = memory.parse_budget(memory_budget).bytes - memory.rss_bytes()
        block_v = memory.block_core(room, padded, halo_v, predictor.tile, c.ndim, channels,
                                    lazy.dtype.itemsize, m, predictor.tta, predictor.batch_size,
                                    predictor.halo)  # fmt: skip
    if any(b < 1 for b in block_v):
        raise InputError(f"{lazy.path}: block sizes must be at least {m} pixels, got {block_v}")
    block_v = round_up(block_v, m)
    notes = [lazy.note] if lazy.note else []
    warn = check_pixel_size(lazy.pixel_size, c, f"{lazy.path}: ")
    if warn:
        notes.append(warn)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    stats = norm_stats(lazy, caxis if c.normalization.per_channel else None, c.normalization)
    t0 = _tick(timings, "statistics", t0)
    before = tuple(b for b, _ in pad_widths(spatial, m, c.padding))
    plan = plan_blocks(spatial, block_v, halo_v, m, c.padding)
    raw_shape = (c.out_channels, *padded)
    # the network's tiles: the least work within the memory budget (on a GPU no larger than the
    # contract's tile, which the GPU's memory limits)
    tile = predictor.tile
    if tile is not None and network_tile is not None:
        tile = round_up(per_axis(network_tile, c.ndim, "network tile"), m)
    elif tile is not None:
        room = memory.parse_budget(memory_budget).bytes - memory.rss_bytes()
        channels = 1 if caxis is None else lazy.shape[caxis]
        largest = tile if predictor.backend.kind != "cpu" else None
        tile = memory.network_tile(room, padded, predictor.halo, c.ndim, channels, lazy.dtype.itemsize, m,
                                   largest)  # fmt: skip
        tile = tile and predictor.backend.shapes.fit_tile(tile)
    once, why = _network_once(predictor, network_once, output_path, raw_shape, len(plan), tile, padded)
    if why:
        notes.append(f"{lazy.path}: {why}")
    tiles = []
    if once:
        tile = balanced_tile(spatial, tile, predictor.halo, m, c.padding)
        for i, t in enumerate(plan_tiles(spatial, tile, predictor.halo, m, c.padding, crop=False)):
            region = tuple(slice(o + b, o + b + n) for o, b, n in zip(t.origin, before, t.shape, strict=True))
            tiles.append(NetworkTask(i, str(lazy.path), level, caxis, region, t.core, t.dest, before, spatial,
                                     stats))  # fmt: skip
    px = output_pixel_size(lazy.pixel_size, c.ndim)
    key = {
        "input": str(source),
        "level": level,
        "shape": list(spatial),
        "block": list(block_v),
        "block_halo": list(halo_v),
        "network_tiles": len(tiles),
        "statistics": None if stats is None else [np.asarray(s).tolist() for s in stats],
        "settings": provenance,
    }
    partial = PartialLabels(output_path, spatial, px, provenance, key, resume, raw_shape if once else None)
    raw = None if partial.raw is None else str(partial.raw)
    blocks = [
        BlockTask(i, str(lazy.path), level, caxis, core, region, before, spatial, stats, raw)
        for i, (core, region) in enumerate(plan)
    ]
    total = len(tiles) + len(blocks)

    def steps(fn: Any, todo: list, write: Any, before: int) -> None:
        """Compute ``fn`` for each task (here or on the cluster) and ``write`` the results in order.

        Results are taken with next(), not zip(): zip would keep the last one alive while the next is
        computed (two tiles' network outputs at once)."""
        results = executor.ordered(fn, todo) if executor else (fn(predictor, t) for t in todo)
        for task in todo:
            where, data, step = next(results)
            for k, v in step.items():
                timings[k] = timings.get(k, 0.0) + v
            t0 = time.perf_counter()
            write(task.index, where, data)
            del data
            _tick(timings, "write", t0)
            if progress is not None:
                progress(before + task.index + 1, total)

    try:
        steps(tile_output, tiles[partial.tiles_done :], partial.write_tile, 0)
        steps(segment_block, blocks[partial.blocks_done :], partial.write, len(tiles))
        t0 = time.perf_counter()
        partial.finish(output_path, lazy.path)
        _tick(timings, "write", t0)
    except BaseException as exc:  # the partial image stays for a resume
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise DiskFullError(output_path) from None
        raise
    dtype = np.dtype(label_dtype(partial.next_id))
    result = BigResult(partial.next_id, spatial, dtype, len(plan), timings, notes, lazy.pixel_size,
                       len(tiles))  # fmt: skip
    if partial.resumed:
        result.warnings.append(
            f"{lazy.path}: resumed an interrupted run; {partial.resumed} of {total} steps were done"
        )
    return result


def _network_once(
    predictor: Predictor,
    wanted: bool | None,
    output: Path,
    raw_shape: Sequence[int],
    blocks: int,
    tile: Sequence[int] | None,
    padded: Sequence[int],
) -> tuple[bool, str]:
    """Whether the network runs once over the whole image in tiles of ``tile`` (its output kept on disk
    beside the output, then clustered block by block), and a note when it cannot although that was
    wanted or the default."""
    if wanted is False or blocks == 1:
        return False, ""
    if predictor.tta or predictor.tile is None:
        why = "test-time augmentation" if predictor.tta else "whole-image tiles (tile 0)"
        return False, f"the network runs per block (its halo computed again) with {why}" if wanted else ""
    if tile is None:
        return False, "the network runs per block (its halo computed again): no tile fits the memory budget"
    halo = predictor.halo
    if any(t <= 2 * h and t < p for t, h, p in zip(tile, halo, padded, strict=True)):
        return False, (
            f"the network runs per block (its halo computed again): tiles that fit the memory budget "
            f"({tile}) leave no core inside the tile halo {halo}"
        )
    need = 4 * math.prod(raw_shape)
    try:
        free = shutil.disk_usage(output.parent).free
    except OSError:
        free = 0
    if need > free // 2:
        return False, (
            f"the network runs per block (its halo computed again): its output for the whole image "
            f"({memory.format_bytes(need)}) would take more than half the free space beside the output"
        )
    return True, ""


class PartialLabels:
    """The label image while tiles and blocks arrive, kept beside the output for a resume.

    ``.<name>.partial.tif`` is the uint32 label image (memory-mapped), ``.<name>.partial.raw.npy`` the
    network output of the whole padded image when the network runs once, and ``.<name>.partial.json``
    the journal of finished steps. The journal is rewritten atomically after each step's data are in the
    map, so it never claims one that is not there. A network tile written again gives the same values.
    Blocks are written in plan order and take the next ids; when a run resumes, the ids above the
    journal's last id are what an interrupted block had begun to write, and are cleared before that block
    is done again. Any difference in ``key`` (input, plan, label settings) discards the partial image.
    """

    def __init__(
        self,
        output: Path,
        spatial: Sequence[int],
        pixel_size: Sequence[float] | None,
        provenance: dict[str, Any] | None,
        key: dict[str, Any],
        resume: bool = True,
        raw_shape: Sequence[int] | None = None,
    ):
        self.spatial, self.pixel_size, self.provenance, self.key = tuple(spatial), pixel_size, provenance, key
        self.path = output.with_name(f".{output.name}.partial.tif")
        self.journal = output.with_name(f".{output.name}.partial.json")
        self.raw = output.with_name(f".{output.name}.partial.raw.npy") if raw_shape else None
        self.raw_shape = tuple(raw_shape) if raw_shape else None
        self.tiles_done = self.blocks_done = self.next_id = self.resumed = 0
        state = self._load() if resume else None
        if state is None:
            self.remove()
            _create_memmap(self.path, self.spatial, np.uint32, pixel_size, provenance)
            if self.raw is not None:
                _create_npy(self.raw, self.raw_shape)
            self._save()
        else:
            self.tiles_done, self.blocks_done = state["tiles_done"], state["blocks_done"]
            self.next_id = state["next_id"]
            self.resumed = self.tiles_done + self.blocks_done

    def _load(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.journal.read_text())
            mm = tifffile.memmap(self.path, mode="r")
            ok = tuple(mm.shape) == self.spatial and mm.dtype == np.uint32
            del mm
            if self.raw is not None:
                raw = np.load(self.raw, mmap_mode="r")
                ok = ok and raw.shape == self.raw_shape and raw.dtype == np.float32
                del raw
        except (OSError, ValueError):
            return None
        return state if ok and state.get("key") == json.loads(json.dumps(self.key, default=str)) else None

    def _save(self) -> None:
        state = {
            "key": self.key,
            "tiles_done": self.tiles_done,
            "blocks_done": self.blocks_done,
            "next_id": self.next_id,
        }
        atomic_write_json(self.journal, state)

    def write_tile(self, index: int, dest: Sequence[slice], raw: np.ndarray) -> None:
        """Store network tile ``index``'s output (C, *core) at ``dest`` of the padded image."""
        if index != self.tiles_done or self.raw is None:
            raise ValueError(f"network tile {index} written out of order (next is {self.tiles_done})")
        _raw_region(self.raw, dest, raw)
        self.tiles_done += 1
        self._save()

    def write(self, index: int, inside: Sequence[slice], labels: np.ndarray) -> None:
        """Add block ``index``'s objects (ids 1..k over the image slices ``inside``) with new ids."""
        if index != self.blocks_done:
            raise ValueError(f"block {index} written out of order (next is {self.blocks_done})")
        self.next_id += _write_block(self.path, labels, inside, self.next_id)
        self.blocks_done += 1
        self._save()

    def finish(self, output: Path, image: Path) -> None:
        """Move the finished image to ``output`` (a TIFF of the smallest label dtype, or OME-Zarr)."""
        dtype = label_dtype(self.next_id)
        if is_zarr_output(output):
            _to_zarr(self.path, output, self.spatial, dtype, self.pixel_size, self.provenance, image)
        elif dtype == np.uint32:
            os.replace(self.path, output)
        else:
            tmp = temp_file_beside(output, "tmp")
            try:
                _convert(self.path, tmp, self.spatial, dtype, self.pixel_size, self.provenance)
                os.replace(tmp, output)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        self.remove()

    def remove(self) -> None:
        """Delete the partial image and its journal."""
        for p in (self.journal, self.path, self.raw):
            if p is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)


def _raw_region(path: Path | str, region: Sequence[slice], data: np.ndarray | None = None) -> np.ndarray:
    """Read ``raw[:, region]`` from the ``.npy`` at ``path``, or write ``data`` there.

    A few MiB at a time, each through a memory map opened for it and closed: the file pages a map has
    touched count in the resident set until it is closed, so one map over a whole region would add a
    second copy of the region to the peak.
    """
    mm = np.load(path, mmap_mode="r")
    shape, row_bytes = mm.shape, mm[(0, 0)].nbytes
    del mm
    first, rest = region[0], tuple(region[1:])
    out = np.empty((shape[0], first.stop - first.start, *[r.stop - r.start for r in rest]), np.float32)
    step = max(1, SLAB_BYTES // max(row_bytes, 1))
    for c in range(shape[0]):
        for i in range(first.start, first.stop, step):
            j = min(i + step, first.stop)
            mm = np.load(path, mmap_mode="r" if data is None else "r+")
            try:
                if data is None:
                    out[c, i - first.start : j - first.start] = mm[(c, slice(i, j), *rest)]
                else:
                    mm[(c, slice(i, j), *rest)] = data[c, i - first.start : j - first.start]
                    mm.flush()
            finally:
                del mm
    return out if data is None else data


def _create_npy(path: Path, shape: Sequence[int]) -> None:
    """A float32 ``.npy`` of ``shape`` for memory-mapped writes, its space reserved (see _create_memmap)."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=tuple(shape))
    del mm
    _reserve_space(path)


def _tick(timings: dict[str, float], key: str, since: float) -> float:
    now = time.perf_counter()
    timings[key] = timings.get(key, 0.0) + now - since
    return now


def _create_memmap(
    path: Path,
    shape: Sequence[int],
    dtype: Any,
    pixel_size: Sequence[float] | None,
    provenance: dict[str, Any] | None = None,
) -> None:
    """An all-zero TIFF of ``shape`` whose pixel data can be memory-mapped, with the pixel size.

    Its space is reserved on disk up front: writing into a sparse memory map on a full disk would kill
    the process with SIGBUS instead of raising an error.
    """
    axes = "YX" if len(shape) == 2 else "ZYX"
    _, kwargs = tiff_write_args(np.empty((1,) * len(shape), dtype), axes, pixel_size, path, provenance)
    mm = tifffile.memmap(path, shape=tuple(shape), dtype=dtype, photometric="minisblack", **kwargs)
    mm.flush()
    del mm
    _reserve_space(path)


def _reserve_space(path: Path) -> None:
    """Allocate a file's blocks now, so that a full disk is an error here and not a SIGBUS later."""
    if hasattr(os, "posix_fallocate"):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        finally:
            os.close(fd)


def _inside(
    region: Sequence[slice], before: Sequence[int], spatial: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """The part of ``region`` (padded coordinates) inside the image: in image coordinates, and as slices
    into the region."""
    inside = tuple(
        slice(max(r.start - b, 0), min(r.stop - b, n))
        for r, b, n in zip(region, before, spatial, strict=True)
    )
    local = tuple(
        slice(s.start + b - r.start, s.stop + b - r.start)
        for s, r, b in zip(inside, region, before, strict=True)
    )
    return inside, local


def _write_block(path: Path, new: np.ndarray, inside: Sequence[slice], next_id: int) -> int:
    """Write the objects of ``new`` (ids 1..k over the image slices ``inside``) as ``next_id + 1, ...``.

    Pixels already owned by an earlier block are kept. An object more than half of whose pixels are already
    owned is the same object seen again (its seed moved across a block border by a last-bit difference or
    a tie): it is dropped, so no object is counted twice. Ids above ``next_id`` can only be what an
    interrupted write of this block left: they are cleared first. Returns the number of new ids.
    """
    inside = tuple(inside)
    k = int(new.max()) if new.size else 0
    mm = tifffile.memmap(path, mode="r+")
    try:
        out = np.array(mm[inside])
        out[out > next_id] = 0
        total = np.bincount(new.ravel().astype(np.intp), minlength=k + 1)
        taken = np.bincount(new[out > 0].astype(np.intp), minlength=k + 1)
        survive = (total > 0) & (2 * taken <= total)
        survive[0] = False
        ids = np.zeros(k + 1, np.uint32)
        ids[survive] = np.arange(next_id + 1, next_id + 1 + int(survive.sum()), dtype=np.uint32)
        mapped = ids[new]
        free = (out == 0) & (mapped > 0)
        out[free] = mapped[free]
        mm[inside] = out
        mm.flush()
    finally:
        del mm
    return int(survive.sum())


def _to_zarr(
    src: Path,
    dst: Path,
    shape: Sequence[int],
    dtype: Any,
    pixel_size: Sequence[float] | None,
    provenance: dict[str, Any] | None,
    image: Path,
) -> None:
    """The uint32 label memmap ``src`` as an OME-Zarr label image at ``dst`` (replacing an old one)."""

    def read(index: tuple[slice, ...]) -> np.ndarray:
        mm = tifffile.memmap(src, mode="r")  # a map per read: its touched pages leave with it
        try:
            return np.asarray(mm[index], dtype)
        finally:
            del mm

    source = os.path.relpath(image.resolve(), dst.resolve().parent)
    write_labels(dst, read, shape, dtype, pixel_size, provenance, source, overwrite=True)


def _convert(
    src: Path,
    dst: Path,
    shape: Sequence[int],
    dtype: Any,
    pixel_size: Sequence[float] | None,
    provenance: dict[str, Any] | None = None,
) -> None:
    """Copy a uint32 label memmap into a new one of ``dtype``, slab by slab."""
    _create_memmap(dst, shape, dtype, pixel_size, provenance)
    step = max(1, CHUNK_BYTES // max(1, math.prod(shape[1:]) * 4))
    for i in range(0, shape[0], step):  # maps opened per slab keep the resident set at one slab
        a = tifffile.memmap(src, mode="r")
        b = tifffile.memmap(dst, mode="r+")
        try:
            b[i : i + step] = a[i : i + step]
            b.flush()
        finally:
            del a, b
