"""Greedy seed clustering of EmbedSeg network outputs: upstream's labels, exactly, in about linear time.

Upstream EmbedSeg (``Cluster.cluster``, "fast" mode) turns the raw output into instance labels so:

* embedding ``e = tanh(offset) + coordinate``, bandwidth ``exp(10 * sigma)``, seediness ``sigmoid(seed)``;
* foreground = ``seediness > fg_thresh``;
* repeatedly take the unclustered foreground pixel with the highest seediness (first flat index on ties)
  until it is below ``seed_thresh``; its proposal is every foreground pixel ``i`` with
  ``phi_i = exp(-sum_d (e_id - c_d)^2 exp(10 s_d)) > 0.5`` (``c``, ``s``: the seed's embedding and raw
  sigma); accept when the proposal has more than ``min_object_size`` pixels and more than half of them are
  unclustered; accepted proposals get the next id (overwriting earlier ids); every proposal is then marked
  clustered, accepted or not.

Upstream evaluates ``phi`` for every foreground pixel for every seed. Here ``phi > 0.5`` is read as
``sum_d (e_d - c_d)^2 exp(10 s_d) < ln 2``, which bounds ``|e_d - c_d| < sqrt(ln 2 / exp(10 s_d))`` on
every axis, so the foreground embeddings are bucketed once in a uniform grid (a counting sort) and each
seed visits only the cells its box touches. Sorting the seed candidates once by (seediness desc, index)
replaces the repeated argmax (a stable LSD radix sort of the float32 bits). The proposal test itself is
upstream's, term by term in float32. The kernels are serial: the greedy loop is sequential, and
``parallel=True`` on the per-pixel stages (about half of the time) halved them when the second core was
idle but made them 2.5-6x slower when other processes loaded the cores (benchmarks/bench_cluster.py
measures it), so the clustering leaves the other cores to the network's threads. ``cache=True`` keeps
compilation to the first run; :func:`warm_up` loads or compiles the kernels ahead (e.g. in a background
thread).

Exactness, decided and tested (tests/test_cluster.py):

* float32 arithmetic in upstream's order: ``e = f32(tanh + coord)``, ``f32(f32(e_i - c)^2 * exp(10 s))``
  summed over x, y[, z] in that order; no FMA contraction.
* tanh, exp and sigmoid are computed in float64 and rounded to float32 (sigmoid as torch does it,
  ``1 / (1 + exp(-q))`` rounded after each step). Correct rounding makes them the same on every CPU, in
  the CUDA kernels and in the simulator; torch's own SIMD functions differ from it in the last bit for
  ~0.1-7 % of the entries, but give the same seed order on the upstream fixtures.
* ``phi > 0.5`` in float32 is exactly ``total < PHI_BOUND`` (one float32 step below ln 2).
* ``seed_thresh`` is compared in float64 (upstream reads the score with ``.item()``), ``fg_thresh`` in
  float32 (a tensor comparison), the acceptance ratio as integers (same as upstream's float32 division for
  proposals below 2**24 pixels).

Coordinates: the embedding is ``tanh(o) + p * spacing`` with ``p`` the global pixel index, but only
differences of embeddings enter the clustering, so the kernels use ``p - origin`` (the index inside
``raw``). That keeps float32 embeddings as precise as upstream's (coordinates below ``shape * spacing``)
wherever the array sits in a large image, and makes the labels exactly independent of ``origin``; global
float32 coordinates would add a rounding error growing with the offset (~6e-8 px per px: 0.006 px at
100 000 px) and origin-dependent borderline pixels. ``origin`` only shifts the returned seed positions.
``coords`` gives explicit per-axis coordinate vectors instead (upstream's ``torch.linspace`` grid, for
the parity tests).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numba
import numpy as np

__all__ = [
    "PHI_BOUND",
    "cluster",
    "cluster_cuda",
    "cluster_from_contract",
    "consecutive_labels",
    "on_gpu",
    "seediness_map",
    "warm_up",
]

F32 = np.float32


def _phi_bound() -> np.float32:
    """Smallest float32 ``x`` with ``f32(exp(-x)) <= 0.5``: ``phi > 0.5`` iff ``x < PHI_BOUND``."""
    x = F32(math.log(2.0))
    while F32(math.exp(-float(x))) > 0.5:
        x = np.nextafter(x, F32(np.inf))
    while F32(math.exp(-float(np.nextafter(x, F32(-np.inf))))) <= 0.5:
        x = np.nextafter(x, F32(-np.inf))
    return x


PHI_BOUND = _phi_bound()
BOX_SLACK = 1.0 + 1e-5  # widens the per-axis search box beyond float32 rounding of the exact test
_MAX_CELLS_PER_POINT = 4  # bounds the grid's memory when sigmas are tiny
RADIUS_SAMPLE = 1024  # seed candidates sampled to size the grid cells
_ONE_BITS = 0x3F800000  # float32 1.0 as uint32: 1.0 - seediness orders like ONE_BITS - bits(seediness)

_jit = numba.njit(cache=True, error_model="numpy")


# ------------------------------------------------------------------------------------------------------
# numba kernels (CPU); the scalar functions are also called by the CUDA kernels (cluster_cuda.py)


@_jit
def seediness(q: np.float32) -> np.float32:
    """Seediness as torch computes it in float32, with a correctly rounded exp."""
    t = np.float32(1.0) + np.float32(math.exp(-np.float64(q)))
    return np.float32(np.float32(1.0) / t)


@_jit
def bandwidth(s: np.float32) -> np.float32:
    """``exp(10 s)`` as torch computes it in float32, with a correctly rounded exp."""
    return np.float32(math.exp(np.float64(s * np.float32(10.0))))


@_jit
def tanh32(o: np.float32) -> np.float32:
    """tanh in float64 rounded to float32; the expm1 form costs half of math.tanh and is as exact here."""
    a = abs(np.float64(o))
    e = math.expm1(2.0 * min(a, 20.0))  # tanh(20) rounds to 1.0 in float32 and in float64
    return np.float32(math.copysign(e / (e + 2.0), o))


@_jit
def _seediness_flat(q: np.ndarray) -> np.ndarray:
    out = np.empty_like(q)
    for i in range(q.size):
        out[i] = seediness(q[i])
    return out


def seediness_map(seed_logits: np.ndarray) -> np.ndarray:
    """Seediness (float32) of every pixel, bit for bit the values the clustering thresholds."""
    q = np.ascontiguousarray(seed_logits, dtype=F32)
    return _seediness_flat(q.ravel()).reshape(q.shape)


@_jit
def _foreground(q: np.ndarray, q_floor: np.float32, fg_thresh: np.float32) -> tuple:
    """Flat indices (C order) and seediness of the pixels with ``seediness > fg_thresh``.

    ``q_floor``: logits at or below it are background for sure (skips the exp for most background).
    """
    n = 0
    for i in range(q.size):
        n += q[i] > q_floor
    fg = np.empty(n, np.int64)
    seed = np.empty(n, np.float32)
    m = 0
    for i in range(q.size):
        if q[i] > q_floor:
            s = seediness(q[i])
            if s > fg_thresh:
                fg[m] = i
                seed[m] = s
                m += 1
    return fg[:m], seed[:m]


@_jit
def _embed(raw2: np.ndarray, shape3: np.ndarray, coords: np.ndarray, fg: np.ndarray) -> tuple:
    """Embeddings ``f32(tanh(o) + coord)`` (N, ndim) of the pixels ``fg`` (dim 0 = x), and per dim the
    min and max of the finite ones (0 where there are none)."""
    ndim = coords.shape[0]
    emb = np.empty((fg.size, ndim), np.float32)
    lo = np.full(ndim, np.inf)
    hi = np.full(ndim, -np.inf)
    for k in range(fg.size):
        p = fg[k]
        idx = (p // (shape3[1] * shape3[2]), (p // shape3[2]) % shape3[1], p % shape3[2])
        for d in range(ndim):
            axis = ndim - 1 - d  # embedding dim d (0 = x) runs along array axis ndim-1-d
            e = tanh32(raw2[d, p]) + coords[axis, idx[axis + 3 - ndim]]
            emb[k, d] = e
            if math.isfinite(e):
                lo[d] = min(lo[d], e)
                hi[d] = max(hi[d], e)
    for d in range(ndim):
        if lo[d] > hi[d]:
            lo[d] = hi[d] = 0.0
    return emb, lo, hi


@_jit
def _radix_order(keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``ids`` stably sorted by ``keys`` (uint32, ascending): LSD radix sort with 11-bit digits."""
    a_k, a_i = keys.copy(), ids.copy()
    b_k, b_i = np.empty_like(a_k), np.empty_like(a_i)
    top = np.int64(a_k.max()) if a_k.size else np.int64(0)
    shift = 0
    while shift == 0 or top >> shift > 0:
        start = np.zeros(2049, np.int64)
        for k in range(a_k.size):
            start[((a_k[k] >> shift) & 0x7FF) + 1] += 1
        for b in range(1, 2049):
            start[b] += start[b - 1]
        for k in range(a_k.size):
            b = (a_k[k] >> shift) & 0x7FF
            b_k[start[b]] = a_k[k]
            b_i[start[b]] = a_i[k]
            start[b] += 1
        a_k, b_k, a_i, b_i = b_k, a_k, b_i, a_i
        shift += 11
    return a_i


@_jit
def candidate_order(seed: np.ndarray, seed_thresh: float) -> np.ndarray:
    """Positions with ``seediness >= seed_thresh`` (float64 compare, as upstream's ``.item()``), in
    upstream's argmax order: seediness descending, then position (= flat index order)."""
    n = 0
    for k in range(seed.size):
        n += np.float64(seed[k]) >= seed_thresh
    keys = np.empty(n, np.uint32)
    ids = np.empty(n, np.int64)
    bits = seed.view(np.uint32)
    m = 0
    for k in range(seed.size):
        if np.float64(seed[k]) >= seed_thresh:
            keys[m] = _ONE_BITS - bits[k]  # seediness <= 1; float32 bits of values >= 0 order like values
            ids[m] = k
            m += 1
    return _radix_order(keys, ids)


@_jit
def grid_cell(v: float, lo: float, inv_h: float, n: int) -> int:
    """Grid cell of coordinate ``v`` along one dim, clamped to ``[0, n)``; NaN goes to cell 0."""
    x = (v - lo) * inv_h
    if not x >= 0.0:
        return 0
    if x >= n:
        return n - 1
    return int(x)


@_jit
def _bucket(emb: np.ndarray, fg: np.ndarray, lo: np.ndarray, inv_h: np.ndarray, ncell: np.ndarray) -> tuple:
    """Counting sort of the points into grid cells (x fastest).

    Returns the embeddings and flat pixel indices in cell order, each point's position in that order, and
    the start of each cell.
    """
    n, ndim = emb.shape
    cell_of = np.empty(n, np.int64)
    start = np.zeros(ncell[0] * ncell[1] * ncell[2] + 1, np.int64)
    for k in range(n):
        c = 0
        for d in range(ndim - 1, -1, -1):
            c = c * ncell[d] + grid_cell(emb[k, d], lo[d], inv_h[d], ncell[d])
        cell_of[k] = c
        start[c + 1] += 1
    for c in range(1, start.size):
        start[c] += start[c - 1]
    fill = start[:-1].copy()
    emb_sorted = np.empty_like(emb)
    fg_sorted = np.empty_like(fg)
    rank = np.empty(n, np.int64)
    for k in range(n):
        pos = fill[cell_of[k]]
        fill[cell_of[k]] += 1
        rank[k] = pos
        emb_sorted[pos] = emb[k]
        fg_sorted[pos] = fg[k]
    return emb_sorted, fg_sorted, rank, start


@_jit
def _greedy(
    emb: np.ndarray,
    flat: np.ndarray,
    raw2: np.ndarray,
    start: np.ndarray,
    lo: np.ndarray,
    inv_h: np.ndarray,
    ncell: np.ndarray,
    order: np.ndarray,
    rank: np.ndarray,
    min_object_size: int,
    min_unclustered_sum: int,
    labels: np.ndarray,
) -> np.ndarray:
    """Upstream's greedy loop over bucketed points; writes ``labels`` (flat image), returns seed pixels.

    ``emb``/``flat``: the points' embeddings and flat pixel indices in cell order; ``order``: the seed
    candidates (as foreground positions) in processing order; ``rank``: foreground position -> cell order.
    """
    n, ndim = emb.shape
    bound = PHI_BOUND
    unclustered = np.ones(n, np.bool_)
    n_unclustered = n
    proposal = np.empty(n, np.int64)
    seed_of = np.empty(order.size, np.int64)
    count = 0
    centre = np.zeros(3, np.float32)
    bw = np.zeros(3, np.float32)
    box_lo = np.zeros(3, np.int64)
    box_hi = np.zeros(3, np.int64)
    for o in order:
        j = rank[o]
        if n_unclustered <= min_unclustered_sum:
            break
        if not unclustered[j]:
            continue
        unclustered[j] = False
        n_unclustered -= 1
        for d in range(ndim):
            centre[d] = emb[j, d]
            bw[d] = bandwidth(raw2[ndim + d, flat[j]])
            r = math.sqrt(bound / np.float64(bw[d])) * BOX_SLACK
            box_lo[d] = grid_cell(centre[d] - r, lo[d], inv_h[d], ncell[d])
            box_hi[d] = grid_cell(centre[d] + r, lo[d], inv_h[d], ncell[d])
        size = 0
        free = 0
        for c2 in range(box_lo[2], box_hi[2] + 1):
            for c1 in range(box_lo[1], box_hi[1] + 1):
                row = (c2 * ncell[1] + c1) * ncell[0]
                for i in range(start[row + box_lo[0]], start[row + box_hi[0] + 1]):
                    total = np.float32(0.0)
                    for d in range(ndim):  # upstream: sum over x, y[, z] of (e - c)^2 * exp(10 s)
                        diff = emb[i, d] - centre[d]
                        total = total + diff * diff * bw[d]
                    if total < bound:
                        proposal[size] = i
                        size += 1
                        free += unclustered[i]
        accept = size > min_object_size and 2 * free > size
        if accept:
            seed_of[count] = flat[j]
            count += 1
        for k in range(size):
            i = proposal[k]
            if accept:
                labels[flat[i]] = count
            unclustered[i] = False
        n_unclustered -= free
    return seed_of[:count]


# ------------------------------------------------------------------------------------------------------
# orchestration (numpy around the kernels; the helpers are shared with the CUDA path)


def check_raw_shape(shape: Sequence[int], spacing: Sequence[float]) -> int:
    """Validate ``raw``'s shape against ``spacing``; return ndim."""
    ndim = len(shape) - 1
    if ndim not in (2, 3) or shape[0] != 2 * ndim + 1:
        raise ValueError(
            f"raw network output must have shape (2*ndim+1, *spatial) with ndim 2 or 3 "
            f"(offsets x,y[,z], sigmas x,y[,z], seed), got {tuple(shape)}"
        )
    if len(spacing) != ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing needs {ndim} positive numbers in array order, got {list(spacing)}")
    return ndim


def coordinate_table(
    shape: Sequence[int], spacing: Sequence[float], coords: Sequence[np.ndarray] | None
) -> np.ndarray:
    """Per-axis coordinates (ndim, max extent) in float32, array order: ``index * spacing`` or ``coords``."""
    ndim = len(shape)
    table = np.zeros((ndim, max(shape)), F32)
    for a in range(ndim):
        if coords is None:
            table[a, : shape[a]] = np.arange(shape[a], dtype=np.float64) * float(spacing[a])
            continue
        vec = np.asarray(coords[a])
        if vec.ndim != 1 or vec.size != shape[a]:
            raise ValueError(f"coords[{a}] must be a vector of length {shape[a]}, got shape {vec.shape}")
        table[a, : shape[a]] = vec
    return table


def logit_floor(fg_thresh: float) -> np.float32:
    """A float32 logit at or below which the seediness is surely ``<= fg_thresh`` (sigmoid is monotone)."""
    thr = F32(fg_thresh)
    if thr >= 1:
        return F32(np.inf)
    if thr <= 0:
        return F32(-np.inf)
    x = F32(math.log(thr / (1 - thr)))
    while seediness(x) > thr:
        x = np.nextafter(x, F32(-np.inf))
    return x


def grid_geometry(
    lo: np.ndarray, hi: np.ndarray, sigma_logits: np.ndarray, n_points: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cells of the uniform grid over the embeddings: (1 / cell size, cells per dim padded to 3 dims).

    ``sigma_logits`` (ndim, m): raw sigmas of some seed candidates. The cell size is their median search
    radius ``sqrt(ln 2 / exp(10 s))``, so a typical query touches about 3 cells per dim; it grows when that
    would make more than a few cells per point. Any geometry gives the same labels: it only decides which
    points are tested.
    """
    ndim = lo.size
    extent = np.maximum(hi - lo, 1e-12)
    with np.errstate(over="ignore", invalid="ignore"):
        radius = math.sqrt(float(PHI_BOUND)) * np.exp(-5.0 * sigma_logits.astype(np.float64))
    h = np.empty(ndim)
    for d in range(ndim):
        r = radius[d][np.isfinite(radius[d]) & (radius[d] > 0)]
        h[d] = np.median(r) if r.size else extent[d]
    h = np.maximum(h, extent / (_MAX_CELLS_PER_POINT * max(n_points, 1)))
    while np.prod(np.floor(extent / h) + 1) > _MAX_CELLS_PER_POINT * n_points + 64:
        h *= 1.5
    ncell = np.ones(3, np.int64)
    ncell[:ndim] = (np.floor(extent / h) + 1).astype(np.int64)
    return 1.0 / h, ncell


def seeds_to_global(flat: np.ndarray, shape: Sequence[int], origin: Sequence[int] | None) -> np.ndarray:
    """Flat indices inside ``raw`` -> global multi-indices (n, ndim) int64."""
    idx = np.stack(np.unravel_index(flat.astype(np.int64), tuple(shape)), axis=1).astype(np.int64)
    if origin is not None:
        idx += np.asarray(origin, np.int64)
    return idx.reshape(-1, len(shape))


def check_params(fg_thresh: float, origin: Sequence[int] | None, ndim: int) -> None:
    if not fg_thresh >= 0.0:  # also rejects NaN
        raise ValueError(f"fg_thresh must be >= 0 (seediness is a probability), got {fg_thresh}")
    if origin is not None and len(origin) != ndim:
        raise ValueError(f"origin needs {ndim} integers in array order, got {list(origin)}")


def on_gpu(raw: Any) -> bool:
    """True for arrays on the GPU: ``__cuda_array_interface__`` (CuPy, torch, numba) or a numba device array
    (the CUDA simulator's have no interface)."""
    return hasattr(raw, "__cuda_array_interface__") or hasattr(raw, "copy_to_host")


def _shape3(shape: Sequence[int]) -> np.ndarray:
    """A 2D or 3D spatial shape as three axes (leading 1 in 2D), the kernels' view of it."""
    shape3 = np.ones(3, np.int64)
    shape3[3 - len(shape) :] = shape
    return shape3


def decode(raw: np.ndarray, spacing: Sequence[float], fg_thresh: float = 0.5) -> tuple[np.ndarray, ...]:
    """The clustering's first step alone: (foreground pixels, their seediness, their embeddings (n, ndim;
    dim 0 = x), per-dim bounds lo, hi). For profiling (``embedseg-run bench`` times it apart);
    :func:`cluster` runs the same kernels."""
    raw = np.asarray(raw)
    check_raw_shape(raw.shape, spacing)
    raw2 = np.ascontiguousarray(raw, dtype=F32).reshape(raw.shape[0], -1)
    fg, seed = _foreground(raw2[-1], logit_floor(fg_thresh), F32(fg_thresh))
    table = coordinate_table(raw.shape[1:], spacing, None)
    return (fg, seed, *_embed(raw2, _shape3(raw.shape[1:]), table, fg))


def cluster(
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
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Instance labels (int32, raw's spatial shape) from a raw network output, as upstream clusters it.

    ``raw``: (2*ndim+1, *spatial) float32, channels offsets x,y[,z], sigmas x,y[,z], seed logit; an
    object with ``__cuda_array_interface__`` (numba, CuPy, torch CUDA) runs on the GPU (:func:`cluster_cuda`).
    ``spacing``: embedding units per pixel, array order. ``origin``: global index of raw's first pixel
    (only shifts the returned seeds). ``coords``: explicit per-axis coordinate vectors (array order).
    With ``return_seeds`` also returns the seeds' global indices (n_labels, ndim), row ``k - 1`` for label
    ``k`` (a label may be absent from the image when a later object overwrote all of its pixels).
    """
    if on_gpu(raw):
        return cluster_cuda(
            raw,
            spacing,
            seed_thresh=seed_thresh,
            fg_thresh=fg_thresh,
            min_object_size=min_object_size,
            min_mask_sum=min_mask_sum,
            min_unclustered_sum=min_unclustered_sum,
            origin=origin,
            coords=coords,
            return_seeds=return_seeds,
        )
    raw = np.asarray(raw)
    ndim = check_raw_shape(raw.shape, spacing)
    check_params(fg_thresh, origin, ndim)
    shape = raw.shape[1:]
    raw2 = np.ascontiguousarray(raw, dtype=F32).reshape(raw.shape[0], -1)
    labels = np.zeros(raw2.shape[1], np.int32)
    seeds = np.empty(0, np.int64)
    table = coordinate_table(shape, spacing, coords)

    fg, seed = _foreground(raw2[-1], logit_floor(fg_thresh), F32(fg_thresh))
    if fg.size > min_mask_sum:
        emb, lo, hi = _embed(raw2, _shape3(shape), table, fg)
        order = candidate_order(seed, float(seed_thresh))
        sample = fg[order[:: max(1, order.size // RADIUS_SAMPLE)]]
        inv_h, ncell = grid_geometry(lo, hi, raw2[ndim : 2 * ndim, sample], fg.size)
        emb, flat, rank, start = _bucket(emb, fg, lo, inv_h, ncell)
        seeds = _greedy(
            emb,
            flat,
            raw2,
            start,
            lo,
            inv_h,
            ncell,
            order,
            rank,
            int(min_object_size),
            int(min_unclustered_sum),
            labels,
        )
    labels = labels.reshape(shape)
    if return_seeds:
        return labels, seeds_to_global(seeds, shape, origin)
    return labels


@numba.njit(cache=True)
def _consecutive(flat: np.ndarray) -> int:
    k = 0
    for v in flat:
        k = max(k, v)
    lut = np.zeros(k + 1, np.int32)
    for v in flat:
        lut[v] = 1
    lut[0] = 0
    n = 0
    for i in range(1, k + 1):
        if lut[i]:
            n += 1
            lut[i] = n
    for i in range(flat.size):
        flat[i] = lut[flat[i]]
    return n


def consecutive_labels(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """``labels`` renumbered 1..n in the order of their ids (0 stays background), and n, the number of
    objects.

    The clustering's ids have gaps: an object whose pixels a later object overwrote, or that lay in the
    rounding padding cropped away, leaves its id unused. Renumbering makes the largest id the object count.
    Renumbers a C-contiguous int32 ``labels`` IN PLACE (anything else is copied first), so a whole-image
    label array costs no second copy; needs one id table beyond it.
    """
    out = np.ascontiguousarray(labels, dtype=np.int32)
    if out.size and int(out.min()) < 0:
        raise ValueError("labels must be non-negative")
    n = _consecutive(out.reshape(-1)) if out.size else 0
    return out, int(n)


def cluster_cuda(raw: Any, spacing: Sequence[float], **kwargs: Any) -> Any:
    """:func:`cluster` on the GPU with numba CUDA (same labels); see embedseg_deploy.cluster_cuda."""
    from .cluster_cuda import cluster_cuda as run

    return run(raw, spacing, **kwargs)


def cluster_from_contract(raw: Any, contract: Any, **overrides: Any) -> Any:
    """:func:`cluster` with the spacing and default thresholds of a model contract; keywords override."""
    return cluster(raw, contract.spacing, **{**vars(contract.thresholds), **overrides})


def warm_up() -> None:
    """Compile (or load from the cache) every CPU kernel; cheap to call again, safe in a background thread."""
    raw = np.zeros((5, 8, 8), F32)
    raw[4, 2:6, 2:6] = 10.0
    raw[2:4] = -0.5
    cluster(raw, (0.01, 0.01), min_object_size=1)
