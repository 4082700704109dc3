"""How much memory a prediction needs, how much it may use, and the block size that keeps it there.

The numbers are measured, not guessed (``benchmarks/bench_memory.py stages``; results in
``benchmarks/results/memory_stages.md``): the resident set a stage adds, per pixel, on ONNX Runtime CPU with
the upstream BranchedERFNets. Whole-image mode holds image-wide arrays (the image as read, its float32
input, the raw output with its rounding padding, the labels and the clustering's per-pixel tables) and runs
the network on one tile at a time; the network's working memory scales with the tile. Block mode holds the
same per block region, plus the block's share of the memory-mapped output.

    peak ~ RSS now + image pixels x IMAGE_BYTES + network pixels x NETWORK_BYTES

A budget (default: half the memory available when the run starts; ``--memory-budget``) decides between
whole-image and block mode, and sizes the blocks so that each one fits it: peak memory then stays flat
however large the image (``benchmarks/results/memory_flat.md``).
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

# Bytes per pixel beyond the input as read, from benchmarks/results/memory_stages.md (ORT CPU, its arena
# shrunk after each run, glibc heap limited as below). IMAGE: the float32 input (4 per channel) and the raw
# output with its rounding padding (4 (2 ndim + 1)), +2 for the clustering's tables that outlive it.
# NETWORK: what ONNX Runtime adds while it runs, per pixel of one network input (measured 76-94 in 2D from
# 512^2 to 2560^2, 58-64 in 3D from 32x256^2 to 64x512^2). A tiled image also holds, per tile pixel, the
# batch and two tile outputs (the previous one is freed after the next run): TILE_IO.
IMAGE_BYTES = {2: 26, 3: 34}
NETWORK_BYTES = {2: 95, 3: 65}
TILE_IO_BYTES = {2: 4 + 2 * 20, 3: 4 + 2 * 28}
# Block mode adds per region pixel: the cropped labels, the output block read back and renumbered, and
# the memory-mapped output pages it touches (uint32).
BLOCK_EXTRA_BYTES = 16
# Test-time augmentation adds a padded copy of the input and two raw outputs (the sum and one transform).
TTA_EXTRA_BYTES = {2: 4 + 2 * 20, 3: 4 + 2 * 28}
MARGIN = 1.1
TILE_PASS_EXTRA_BYTES = {2: 0, 3: 28}  # block mode's network pass beyond whole-image mode, per tile pixel
DENSE_TILE_COUNTS = 32  # block mode's network tiles: every count up to this per axis, then +12.5 % steps
DEFAULT_FRACTION = 0.5

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 1 << 20
_heap_limited = False


def limit_heap_fragmentation() -> bool:
    """Serve allocations of 1 MiB and more from mmap, so that freed buffers go back to the system.

    glibc raises its mmap threshold to 32 MiB after the first large free, so ONNX Runtime's per-run
    buffers below that land on the heap, fragment it, and stay resident: a 1024^2 2D ERFNet run kept
    607 MiB, 119 MiB with a fixed 1 MiB threshold (benchmarks/results/memory_stages.md). Once per process;
    a no-op (False) where the C library is not glibc.
    """
    global _heap_limited
    if _heap_limited:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        _heap_limited = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False
    return _heap_limited


@dataclass(frozen=True)
class Budget:
    """A memory budget in bytes and where it came from (for messages)."""

    bytes: int
    source: str

    def __str__(self) -> str:
        return f"{format_bytes(self.bytes)} ({self.source})"


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def available_bytes() -> int | None:
    """Memory the system can give without swapping (Linux ``MemAvailable``; else total physical)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def rss_bytes() -> int:
    """This process's resident set size now (0 where the platform does not say)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError, AttributeError):
        return 0


def parse_budget(text: str | int | None) -> Budget:
    """``None`` -> half the available memory; ``"6G"``, ``"512M"``, ``"2.5GiB"`` or a byte count; or
    ``"40%"`` of the available memory."""
    avail = available_bytes()
    if text is None:
        if avail is None:
            return Budget(4 * 2**30, "default; available memory unknown")
        source = f"default: {DEFAULT_FRACTION:.0%} of the available memory"
        return Budget(int(avail * DEFAULT_FRACTION), source)
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"memory budget must be positive, got {text}")
        return Budget(text, "given")
    value = str(text).strip()
    if value.endswith("%"):
        try:
            pct = float(value[:-1])
        except ValueError:
            raise ValueError(f"memory budget {text!r}: give e.g. 50%, 6G or 512M") from None
        if not 0 < pct <= 100:
            raise ValueError(f"memory budget {text!r}: a percentage must be in (0, 100]")
        if avail is None:
            raise ValueError(f"memory budget {text!r}: available memory is unknown here; give a size (6G)")
        return Budget(int(avail * pct / 100), f"{value} of the available memory")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", value.lower())
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"memory budget {text!r}: give e.g. 6G, 512M, 2.5GiB or 50%")
    return Budget(int(float(m.group(1)) * _UNITS[m.group(2)]), "given")


def image_bytes_per_pixel(ndim: int, in_channels: int, in_itemsize: int, tta: bool = False) -> float:
    """Image-wide bytes per pixel of whole-image mode (the input as read included)."""
    extra = TTA_EXTRA_BYTES[ndim] if tta else 0
    return in_itemsize * in_channels + IMAGE_BYTES[ndim] + 4 * (in_channels - 1) + extra


def whole_image_peak(
    padded: Sequence[int], network: Sequence[int] | None, ndim: int, in_channels: int, in_itemsize: int,
    tta: bool = False, batch: int = 1,
) -> int:  # fmt: skip
    """Bytes whole-image mode adds to the resident set for an image of ``padded`` pixels whose network
    input is ``network`` (None: the whole padded image in one pass)."""
    px = math.prod(padded)
    net_px = px if network is None else min(px, math.prod(network) * batch)
    per_net_px = NETWORK_BYTES[ndim] + (TILE_IO_BYTES[ndim] if net_px < px else 0)
    per_px = image_bytes_per_pixel(ndim, in_channels, in_itemsize, tta)
    return int(MARGIN * (px * per_px + net_px * per_net_px))


def block_peak(region: Sequence[int], network: Sequence[int] | None, ndim: int, in_channels: int,
               in_itemsize: int, tta: bool = False, batch: int = 1) -> int:  # fmt: skip
    """Bytes block mode adds to the resident set with block regions of shape ``region``."""
    return whole_image_peak(region, network, ndim, in_channels, in_itemsize, tta, batch) + int(
        MARGIN * math.prod(region) * BLOCK_EXTRA_BYTES
    )


def block_core(
    budget: int,
    padded: Sequence[int],
    halo: Sequence[int],
    network: Sequence[int] | None,
    ndim: int,
    in_channels: int,
    in_itemsize: int,
    multiple: int = 8,
    tta: bool = False,
    batch: int = 1,
    network_halo: Sequence[int] | None = None,
) -> list[int]:
    """Block cores (array order, multiples of ``multiple``) that cost the least network work among those
    whose :func:`block_peak` fits ``budget`` bytes; the fewest blocks among equals. Below one minimal block
    per axis, the minimal block.

    The work is what the network computes: every block's region (core + ``halo`` on each side, clipped to
    the image) cut into tiles of at most ``network`` with ``network_halo`` of overlap, as
    :func:`embedseg_deploy.tiling.balanced_tile` cuts them. Cores share each axis evenly and need not be
    square (a thin axis is cut only where that saves work).
    """
    from .tiling import balanced_tile, tile_count

    args = (ndim, in_channels, in_itemsize, tta, batch)
    per_axis = []
    for i, (p, h) in enumerate(zip(padded, halo, strict=True)):
        options: dict[int, tuple[int, int, int, int]] = {}
        for k in range(1, math.ceil(p / multiple) + 1):
            core = math.ceil(math.ceil(p / k) / multiple) * multiple
            if core in options:
                continue
            region = min(p, core + 2 * h)
            tile, tiles = region, 1
            if network is not None:
                t, th = network[i], (network_halo[i] if network_halo else 0)
                tile = balanced_tile([region], [t], [th], multiple, "end")[0]
                tiles = tile_count(region, t, th)
            options[core] = (math.ceil(p / core), region, tile, tiles)
        per_axis.append(sorted(options.items()))
    best = None
    for combo in itertools.product(*per_axis):
        region = [o[1] for _, o in combo]
        tile = [o[2] for _, o in combo]
        if block_peak(region, None if network is None else tile, *args) > budget:
            continue
        count = math.prod(o[0] for _, o in combo)
        key = (math.prod(o[0] * o[3] * o[2] for _, o in combo), count)
        if best is None or key < best[0]:
            best = (key, [core for core, _ in combo])
    return best[1] if best else [min(multiple, p) for p in padded]


def network_tile_peak(tile: Sequence[int], ndim: int, in_channels: int, in_itemsize: int) -> int:
    """Bytes block mode's network pass adds with tiles of shape ``tile``: whole-image mode on an image of
    the tile's size, plus in 3D one more tile output (measured with the upstream ERFNets,
    ``benchmarks/results/memory_flat.md``: 2D tiles of 4.5 Mpx 120 B/px, within whole-image mode's 123;
    3D tiles of 7.5-12 Mvoxel 118-122 B/voxel, where whole-image mode counts 101)."""
    extra = MARGIN * math.prod(tile) * TILE_PASS_EXTRA_BYTES[ndim]
    return whole_image_peak(tile, None, ndim, in_channels, in_itemsize) + int(extra)


def network_tile(
    budget: int,
    padded: Sequence[int],
    halo: Sequence[int],
    ndim: int,
    in_channels: int,
    in_itemsize: int,
    multiple: int = 8,
    largest: Sequence[int] | None = None,
) -> list[int] | None:
    """The network tile for block mode's single pass over a whole ``padded`` image: of those whose run
    fits ``budget`` bytes (:func:`network_tile_peak`), the one that computes the fewest voxels (``k``
    tiles of size ``t`` per axis, overlapping by twice the ``halo``), the largest among equals; each axis
    at most ``largest``. None when none fits."""
    per_axis = []
    for i, (p, h) in enumerate(zip(padded, halo, strict=True)):
        options = {}
        k = 1
        while k <= p // multiple:
            t = max(multiple, math.ceil(math.ceil((p + 2 * h * (k - 1)) / k) / multiple) * multiple)
            if k > 1 and t <= 2 * h:
                break
            if (largest is None or t <= largest[i]) and t not in options:
                options[t] = k
            k = k + 1 if k < DENSE_TILE_COUNTS else math.ceil(k * 1.125)  # few options on long axes
        per_axis.append(sorted(options.items()))
    best = None
    for combo in itertools.product(*per_axis):
        tile = [t for t, _ in combo]
        if network_tile_peak(tile, ndim, in_channels, in_itemsize) > budget:
            continue
        key = (math.prod(t * k for t, k in combo), -math.prod(tile))
        if best is None or key < best[0]:
            best = (key, tile)
    return None if best is None else best[1]
