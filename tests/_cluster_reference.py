"""Upstream EmbedSeg 0.2.5 ``Cluster.cluster`` re-stated in plain numpy, step by step, for tests only.

It keeps upstream's structure on purpose (gather the foreground, then a loop of argmax over
``seediness * unclustered``, a proposal over ALL foreground pixels, the acceptance test, overwrite on
overlap), so that it is an independent check of the fast implementation in embedseg_deploy.cluster.
The float32 arithmetic follows upstream's torch ops one by one. The transcendental functions are
computed in float64 and rounded to float32 (correctly rounded, hence the same in every implementation);
``activations`` lets a test pass other values (e.g. torch's) for tanh(offsets), exp(10 sigma) and the
seediness.

Also here: random raw outputs for the clustering tests. The "ideal" synthetic output that the tests and
benchmarks share is :func:`embedseg_deploy.synthetic.ideal_output`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from embedseg_deploy.synthetic import ideal_output

F32 = np.float32


def activations(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tanh(offsets), exp(10 * sigma), sigmoid(seed)) in float32, as the implementation defines them."""
    ndim = raw.ndim - 1
    raw64 = raw.astype(np.float64)
    tanh_o = np.tanh(raw64[:ndim]).astype(F32)
    sigma10 = raw[ndim : 2 * ndim] * F32(10)  # float32 product, as torch does
    exp_s = np.exp(sigma10.astype(np.float64)).astype(F32)
    # torch: 1 / (1 + exp(-q)), rounded to float32 after each step
    t = F32(1) + np.exp(-raw64[-1]).astype(F32)
    seed = (1.0 / t.astype(np.float64)).astype(F32)
    return tanh_o, exp_s, seed


def grid_from_coords(coords: Sequence[np.ndarray], shape: Sequence[int]) -> np.ndarray:
    """Upstream's coordinate buffer (x, y[, z]) for ``shape`` from per-axis vectors (array order)."""
    ndim = len(shape)
    grid = np.empty((ndim, *shape), F32)
    for d in range(ndim):
        axis = ndim - 1 - d
        view = [1] * ndim
        view[axis] = shape[axis]
        grid[d] = np.asarray(coords[axis], F32).reshape(view)
    return grid


def cluster_reference(
    raw: np.ndarray,
    coords: Sequence[np.ndarray],
    *,
    seed_thresh: float = 0.9,
    fg_thresh: float = 0.5,
    min_mask_sum: int = 0,
    min_unclustered_sum: int = 0,
    min_object_size: int = 36,
    acts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Labels (int32, raw's spatial shape) exactly as upstream's greedy clustering assigns them."""
    ndim = raw.ndim - 1
    shape = raw.shape[1:]
    tanh_o, exp_s, seed_map = activations(raw) if acts is None else acts
    spatial_emb = tanh_o + grid_from_coords(coords, shape)
    instance_map = np.zeros(shape, np.int32)
    count = 1
    mask = seed_map > F32(fg_thresh)
    if mask.sum() > min_mask_sum:
        emb_masked = spatial_emb[:, mask]  # (ndim, N), C order
        s_masked = exp_s[:, mask]
        seed_masked = seed_map[mask]
        unclustered = np.ones(mask.sum(), np.int16)
        instance_map_masked = np.zeros(mask.sum(), np.int32)
        while unclustered.sum() > min_unclustered_sum:
            score = seed_masked * unclustered.astype(F32)
            seed = int(np.argmax(score))  # first index on ties, as torch
            if float(score[seed]) < seed_thresh:  # upstream compares score.item(), a Python float
                break
            center = emb_masked[:, seed : seed + 1]
            unclustered[seed] = 0
            s = s_masked[:, seed : seed + 1]
            terms = (emb_masked - center) ** 2 * s
            total = terms[0]
            for d in range(1, ndim):  # torch.sum over dim 0: accumulated row by row in float32
                total = total + terms[d]
            dist = np.exp(-total.astype(np.float64)).astype(F32)
            proposal = dist > F32(0.5)
            if proposal.sum() > min_object_size:  # noqa: SIM102 (upstream's two tests, as written)
                if unclustered[proposal].sum() / proposal.sum() > 0.5:
                    instance_map_masked[proposal] = count
                    count += 1
            unclustered[proposal] = 0
        instance_map[mask] = instance_map_masked
    return instance_map


def random_output(rng: np.random.Generator, ndim: int, shape: tuple[int, ...]) -> np.ndarray:
    """Raw outputs with structure (a few ideal blobs at spacing 0.05) plus noise; bandwidths from under a
    pixel to the whole image; sometimes saturated seediness (float32 sigmoid == 1.0: ties everywhere) and
    non-finite values."""
    room = int(np.prod([s // 5.2 for s in shape]))  # ideal_output's grid cells for radius 1.6
    raw, _ = ideal_output(shape, min(int(rng.integers(0, 6)), room), 1.6, spacing=0.05, rng=rng)
    raw += rng.normal(0, rng.choice([0.01, 0.05, 0.3]), raw.shape).astype(np.float32)
    raw[ndim : 2 * ndim] = rng.uniform(0.0, 0.5) + rng.normal(0, 0.1, (ndim, *shape))
    raw[-1] += rng.normal(rng.uniform(0, 6), 1.5, shape)
    if rng.random() < 0.3:
        raw[-1] = np.where(raw[-1] > 1, 40.0, raw[-1])
    if rng.random() < 0.1:
        raw.reshape(-1)[rng.integers(0, raw.size, 3)] = [np.nan, np.inf, -np.inf]
    return raw


def two_overlapping_objects() -> np.ndarray:
    """A 1 x 40 raw output (spacing 0.01) with two seed candidates whose proposals overlap.

    Foreground x = 0..34, zero offsets, phi = 0.5 at 19.5 px. The first seed (x = 0) proposes x = 0..19;
    then 15 pixels are unclustered, and the second seed (x = 34) proposes x = 15..34 (15 of 20 unclustered).
    So min_object_size 19 accepts both (the second overwrites x = 15..19), 20 rejects both, and
    min_unclustered_sum 15 stops before the second seed while 14 does not.
    """
    raw = np.zeros((5, 1, 40), F32)
    raw[-1] = -10
    raw[-1, 0, 0:35] = 5.0
    raw[-1, 0, 0] = 9.0
    raw[-1, 0, 34] = 8.0
    raw[2:4] = np.log(np.log(2) / (19.5 * 0.01) ** 2) / 10
    return raw
