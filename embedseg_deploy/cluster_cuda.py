"""The clustering of embedseg_deploy.cluster on the GPU (numba CUDA): the same labels, bit for bit.

The greedy loop is sequential by nature (each seed sees what the previous ones clustered), so the work is
split so:

* per pixel, in parallel: seediness and foreground, compaction of the foreground in C order (an
  exclusive scan, so positions match the CPU path), embeddings, bounds, grid cells, counting sort;
* on the host: the seed candidates' order (the CPU radix sort on N float32 values copied back) and the
  grid geometry (a few numbers);
* one block runs the greedy loop: its threads find the next unclustered candidate together (one block
  of candidates per step) and test a seed's proposal together (the points of the cells its box touches).

The kernels call the scalar functions of embedseg_deploy.cluster (numba compiles them for the GPU too):
tanh, exp and the sigmoid's exp in float64 rounded to float32, as on the CPU. The proposal test's
products go through ``fmul_rn`` so that the compiler cannot fuse them with the sum into FMAs (which
round differently). Under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) the same kernels run in
Python with numpy float32 scalars.

Importing this module needs no GPU; numba compiles the kernels at their first launch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numba import config, cuda, float32, float64, int64

from .cluster import (
    BOX_SLACK,
    PHI_BOUND,
    RADIUS_SAMPLE,
    bandwidth,
    candidate_order,
    check_params,
    check_raw_shape,
    coordinate_table,
    grid_cell,
    grid_geometry,
    logit_floor,
    seediness,
    seeds_to_global,
    tanh32,
)

SIMULATOR = bool(config.ENABLE_CUDASIM)
MAX_THREADS = 1024  # static size of the shared scan buffer: the largest block
_BIG = np.iinfo(np.int64).max

if SIMULATOR:

    def _mul(a: np.float32, b: np.float32) -> np.float32:  # numpy float32 product: rounded once
        return a * b

else:
    from numba.cuda import libdevice

    @cuda.jit(device=True)
    def _mul(a, b):
        return libdevice.fmul_rn(a, b)


# ------------------------------------------------------------------------------------------------------
# kernels


@cuda.jit
def _k_fill(out, value):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = value


@cuda.jit
def _k_foreground(q, q_floor, fg_thresh, seed, flag):
    """Per pixel: seediness (for foreground pixels) and the foreground flag."""
    i = cuda.grid(1)
    if i < q.size:
        s = np.float32(-1.0)
        if q[i] > q_floor:
            s = seediness(q[i])
        seed[i] = s
        flag[i] = 1 if s > fg_thresh else 0


@cuda.jit
def _k_block_scan(x, out, sums):
    """Exclusive scan inside each block (its values staged in shared memory and summed up by one thread:
    two barriers instead of a tree's 2 log2(threads)); block totals to ``sums``."""
    buf = cuda.shared.array(MAX_THREADS, int64)
    tid = cuda.threadIdx.x
    i = cuda.grid(1)
    v = np.int64(x[i]) if i < x.size else np.int64(0)
    buf[tid] = v
    cuda.syncthreads()
    if tid == 0:
        total = np.int64(0)
        for k in range(cuda.blockDim.x):
            total += buf[k]
            buf[k] = total
        sums[cuda.blockIdx.x] = total
    cuda.syncthreads()
    if i < x.size:
        out[i] = buf[tid] - v


@cuda.jit
def _k_add_block_offsets(out, offsets):
    i = cuda.grid(1)
    if i < out.size:
        out[i] += offsets[cuda.blockIdx.x]


@cuda.jit
def _k_gather(raw2, shape3, coords, seed, flag, pos, fg, seed_fg, emb):
    """Per foreground pixel, at its C-order slot: flat index, seediness, ``f32(tanh(o) + coord)``."""
    p = cuda.grid(1)
    if p < flag.size and flag[p]:
        k = pos[p]
        fg[k] = p
        seed_fg[k] = seed[p]
        ndim = coords.shape[0]
        for d in range(ndim):
            axis = ndim - 1 - d
            if axis + 3 - ndim == 0:
                index = p // (shape3[1] * shape3[2])
            elif axis + 3 - ndim == 1:
                index = (p // shape3[2]) % shape3[1]
            else:
                index = p % shape3[2]
            emb[k, d] = tanh32(raw2[d, p]) + coords[axis, index]


@cuda.jit
def _k_bounds(emb, lo, hi):
    """Per-dim min and max of the finite embeddings (block reduction in shared memory, then atomics)."""
    b_lo = cuda.shared.array(3, float64)
    b_hi = cuda.shared.array(3, float64)
    tid = cuda.threadIdx.x
    if tid < 3:
        b_lo[tid] = math.inf
        b_hi[tid] = -math.inf
    cuda.syncthreads()
    k = cuda.grid(1)
    if k < emb.shape[0]:
        for d in range(emb.shape[1]):
            v = np.float64(emb[k, d])
            if math.isfinite(v):
                cuda.atomic.min(b_lo, d, v)
                cuda.atomic.max(b_hi, d, v)
    cuda.syncthreads()
    if tid < emb.shape[1]:
        cuda.atomic.min(lo, tid, b_lo[tid])
        cuda.atomic.max(hi, tid, b_hi[tid])


@cuda.jit
def _k_take_sigma(raw2, fg, positions, out):
    """Raw sigmas (ndim, m) of the foreground points at ``positions``."""
    m = cuda.grid(1)
    if m < positions.size:
        for d in range(out.shape[0]):
            out[d, m] = raw2[out.shape[0] + d, fg[positions[m]]]


@cuda.jit
def _k_cells(emb, lo, inv_h, ncell, cell_of, count, rank_in_cell):
    """Grid cell of every point (x fastest) and its arrival rank in that cell."""
    k = cuda.grid(1)
    if k < emb.shape[0]:
        c = np.int64(0)
        for d in range(emb.shape[1] - 1, -1, -1):
            c = c * ncell[d] + grid_cell(np.float64(emb[k, d]), lo[d], inv_h[d], ncell[d])
        cell_of[k] = c
        rank_in_cell[k] = cuda.atomic.add(count, c, 1)


@cuda.jit
def _k_scatter(emb, fg, cell_of, rank_in_cell, start, emb_sorted, flat_sorted, rank):
    """Counting sort, last step: every point to its slot in cell order."""
    k = cuda.grid(1)
    if k < emb.shape[0]:
        pos = start[cell_of[k]] + rank_in_cell[k]
        rank[k] = pos
        flat_sorted[pos] = fg[k]
        for d in range(emb.shape[1]):
            emb_sorted[pos, d] = emb[k, d]


@cuda.jit
def _k_greedy(
    emb,
    flat,
    raw2,
    start,
    lo,
    inv_h,
    ncell,
    order,
    rank,
    min_object_size,
    min_unclustered_sum,
    unclustered,
    proposal,
    labels,
    seed_of,
    out,
):
    """Upstream's greedy loop in one block (embedseg_deploy.cluster._greedy is the sequential version).

    Writes ``labels`` (flat image) and ``seed_of``; ``out[0]`` receives the number of labels.
    """
    NEXT, N_FREE, COUNT, SIZE, FREE = 0, 1, 2, 3, 4  # slots of the shared state
    state = cuda.shared.array(5, int64)
    box = cuda.shared.array(6, int64)
    centre = cuda.shared.array(3, float32)
    bw = cuda.shared.array(3, float32)
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    ndim = emb.shape[1]
    bound = PHI_BOUND
    if tid == 0:
        state[N_FREE] = emb.shape[0]
        state[COUNT] = 0
        for d in range(3):
            box[d] = 0
            box[3 + d] = 0
    t = 0
    while t < order.size:
        if tid == 0:
            state[NEXT] = _BIG
        cuda.syncthreads()
        k = t + tid
        if k < order.size and unclustered[rank[order[k]]]:
            cuda.atomic.min(state, NEXT, k)
        cuda.syncthreads()
        nxt = state[NEXT]
        stop = state[N_FREE] <= min_unclustered_sum
        cuda.syncthreads()
        if nxt == _BIG:
            t += threads
            continue
        if stop:
            break
        t = nxt + 1
        j = rank[order[nxt]]
        if tid == 0:
            unclustered[j] = 0
            state[N_FREE] -= 1
            state[SIZE] = 0
            state[FREE] = 0
            for d in range(ndim):
                centre[d] = emb[j, d]
                bw[d] = bandwidth(raw2[ndim + d, flat[j]])
                r = math.sqrt(bound / np.float64(bw[d])) * BOX_SLACK
                box[d] = grid_cell(np.float64(centre[d]) - r, lo[d], inv_h[d], ncell[d])
                box[3 + d] = grid_cell(np.float64(centre[d]) + r, lo[d], inv_h[d], ncell[d])
        cuda.syncthreads()
        for c2 in range(box[2], box[5] + 1):
            for c1 in range(box[1], box[4] + 1):
                row = (c2 * ncell[1] + c1) * ncell[0]
                for i in range(start[row + box[0]] + tid, start[row + box[3] + 1], threads):
                    total = np.float32(0.0)
                    for d in range(ndim):
                        diff = emb[i, d] - centre[d]
                        total = total + _mul(_mul(diff, diff), bw[d])
                    if total < bound:
                        proposal[cuda.atomic.add(state, SIZE, 1)] = i
                        if unclustered[i]:
                            cuda.atomic.add(state, FREE, 1)
        cuda.syncthreads()
        size = state[SIZE]
        free = state[FREE]
        accept = size > min_object_size and 2 * free > size
        label = state[COUNT] + 1
        for m in range(tid, size, threads):
            i = proposal[m]
            if accept:
                labels[flat[i]] = label
            unclustered[i] = 0
        cuda.syncthreads()
        if tid == 0:
            if accept:
                seed_of[state[COUNT]] = flat[j]
                state[COUNT] += 1
            state[N_FREE] -= free
    if tid == 0:
        out[0] = state[COUNT]


# ------------------------------------------------------------------------------------------------------
# orchestration


def _blocks(n: int, threads: int) -> int:
    return max(1, (n + threads - 1) // threads)


def _exclusive_scan(values: Any, threads: int) -> tuple[Any, int]:
    """Exclusive prefix sum (int64) of a device array, and its total."""
    n = values.size
    out = cuda.device_array(n, np.int64)
    sums = cuda.device_array(_blocks(n, threads), np.int64)
    _k_block_scan[_blocks(n, threads), threads](values, out, sums)
    totals = sums.copy_to_host()
    offsets = np.cumsum(totals) - totals
    _k_add_block_offsets[_blocks(n, threads), threads](out, cuda.to_device(offsets))
    return out, int(totals.sum())


def _as_device(raw: Any) -> Any:
    if hasattr(raw, "copy_to_host"):  # a numba device array (also the simulator's, which has no CAI)
        return raw
    if hasattr(raw, "__cuda_array_interface__"):  # CuPy, torch CUDA, ...
        return cuda.as_cuda_array(raw)
    return cuda.to_device(np.ascontiguousarray(raw, dtype=np.float32))


def cluster_cuda(
    raw: Any,
    spacing: Sequence[float],
    *,
    seed_thresh: float = 0.9,
    fg_thresh: float = 0.5,
    min_object_size: int = 36,
    min_mask_sum: int = 0,
    min_unclustered_sum: int = 0,
    origin: Sequence[int] | None = None,
    coords: Sequence[np.ndarray] | None = None,
    return_seeds: bool = False,
    to_host: bool = True,
    threads: int = 256,
) -> Any:
    """:func:`embedseg_deploy.cluster.cluster` on the GPU: the same labels.

    ``raw``: a C-contiguous float32 array on the GPU (anything with ``__cuda_array_interface__``: numba,
    CuPy, torch CUDA) or a host array (copied over). Returns int32 labels on the host (numpy), or a numba
    device array with ``to_host=False``; seeds (``return_seeds``) always on the host. ``threads``: block
    size (small blocks keep the CUDA simulator fast).
    """
    if not 32 <= threads <= MAX_THREADS:
        raise ValueError(f"threads must be in [32, {MAX_THREADS}] (a warp at least), got {threads}")
    d_raw = _as_device(raw)
    ndim = check_raw_shape(d_raw.shape, spacing)
    check_params(fg_thresh, origin, ndim)
    if d_raw.dtype != np.float32 or not d_raw.is_c_contiguous():
        raise ValueError(
            f"raw on the GPU must be C-contiguous float32, got {d_raw.dtype} strides {d_raw.strides}"
        )
    shape = tuple(d_raw.shape[1:])
    n_pix = math.prod(shape)
    raw2 = d_raw.reshape(d_raw.shape[0], n_pix)
    table = coordinate_table(shape, spacing, coords)
    labels = cuda.device_array(n_pix, np.int32)
    _k_fill[_blocks(n_pix, threads), threads](labels, 0)
    seeds = np.empty(0, np.int64)

    seed = cuda.device_array(n_pix, np.float32)
    flag = cuda.device_array(n_pix, np.int32)
    _k_foreground[_blocks(n_pix, threads), threads](
        raw2[-1], logit_floor(fg_thresh), np.float32(fg_thresh), seed, flag
    )
    pos, n = _exclusive_scan(flag, threads)
    if n > min_mask_sum:
        shape3 = np.ones(3, np.int64)
        shape3[3 - ndim :] = shape
        fg = cuda.device_array(n, np.int64)
        seed_fg = cuda.device_array(n, np.float32)
        emb = cuda.device_array((n, ndim), np.float32)
        _k_gather[_blocks(n_pix, threads), threads](
            raw2, cuda.to_device(shape3), cuda.to_device(table), seed, flag, pos, fg, seed_fg, emb
        )
        order = candidate_order(seed_fg.copy_to_host(), float(seed_thresh))
        d_order = cuda.to_device(order)

        sample = cuda.to_device(order[:: max(1, order.size // RADIUS_SAMPLE)])
        sigma = cuda.device_array((ndim, sample.size), np.float32)
        _k_take_sigma[_blocks(sample.size, threads), threads](raw2, fg, sample, sigma)
        lo = cuda.to_device(np.full(ndim, np.inf))
        hi = cuda.to_device(np.full(ndim, -np.inf))
        _k_bounds[_blocks(n, threads), threads](emb, lo, hi)
        lo_h, hi_h = lo.copy_to_host(), hi.copy_to_host()
        empty = lo_h > hi_h
        lo_h[empty] = hi_h[empty] = 0.0
        inv_h, ncell = grid_geometry(lo_h, hi_h, sigma.copy_to_host(), n)
        d_lo, d_inv_h, d_ncell = cuda.to_device(lo_h), cuda.to_device(inv_h), cuda.to_device(ncell)

        cell_of = cuda.device_array(n, np.int64)
        rank_in_cell = cuda.device_array(n, np.int32)
        count = cuda.device_array(int(np.prod(ncell)) + 1, np.int32)
        _k_fill[_blocks(count.size, threads), threads](count, 0)
        _k_cells[_blocks(n, threads), threads](emb, d_lo, d_inv_h, d_ncell, cell_of, count, rank_in_cell)
        start, _ = _exclusive_scan(count, threads)
        emb_sorted = cuda.device_array((n, ndim), np.float32)
        flat = cuda.device_array(n, np.int64)
        rank = cuda.device_array(n, np.int64)
        _k_scatter[_blocks(n, threads), threads](
            emb, fg, cell_of, rank_in_cell, start, emb_sorted, flat, rank
        )

        unclustered = cuda.device_array(n, np.uint8)
        _k_fill[_blocks(n, threads), threads](unclustered, 1)
        seed_of = cuda.device_array(max(order.size, 1), np.int64)
        out = cuda.device_array(1, np.int64)
        _k_greedy[1, threads](
            emb_sorted,
            flat,
            raw2,
            start,
            d_lo,
            d_inv_h,
            d_ncell,
            d_order,
            rank,
            int(min_object_size),
            int(min_unclustered_sum),
            unclustered,
            cuda.device_array(n, np.int64),
            labels,
            seed_of,
            out,
        )
        seeds = seed_of.copy_to_host()[: int(out.copy_to_host()[0])]
    labels = labels.reshape(shape)
    if to_host:
        labels = labels.copy_to_host()
    if return_seeds:
        return labels, seeds_to_global(seeds, shape, origin)
    return labels
