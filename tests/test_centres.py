"""Object centres (embedseg_training.centres): medoid against brute force, approximate medoid, centroid."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest

from embedseg_training.centres import approximate_medoid_index, medoid_index, object_centre


def _distance_sums(coords: np.ndarray, scale) -> np.ndarray:
    """Brute force: row sums of the full n x n scaled distance matrix (as upstream)."""
    x = coords * np.asarray(scale, dtype=np.float64)
    return np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=-1)).sum(axis=1)


def _random_object(rng, ndim):
    shape = rng.integers(2, 14, size=ndim)
    coords = np.argwhere(rng.random(shape) < rng.uniform(0.05, 0.9))
    return coords if len(coords) else np.zeros((1, ndim), dtype=np.int64)


@pytest.mark.parametrize("ndim", [2, 3])
def test_medoid_matches_brute_force(ndim):
    rng = np.random.default_rng(ndim)
    for _ in range(150):
        coords = _random_object(rng, ndim)
        scale = (rng.uniform(0.3, 4.0),) + (1.0,) * (ndim - 1)
        sums = _distance_sums(coords, scale)
        i = medoid_index(coords, scale)
        assert sums[i] <= sums.min() * (1 + 1e-12) + 1e-12
        # ties (equal up to rounding) go to the first pixel in C order
        assert i == np.flatnonzero(sums <= sums.min() * (1 + 1e-12) + 1e-12)[0]


def test_medoid_tie_goes_to_first_pixel():
    coords = np.argwhere(np.ones((2, 2), bool))  # all four pixels are medoids
    assert medoid_index(coords) == 0
    assert medoid_index(coords[::-1].copy()) == 0


def test_anisotropy_changes_the_medoid():
    # an L shape: along z (3 voxels) and along x (5 pixels); the corner wins only when z counts little
    coords = np.array([[z, 0, 0] for z in range(1, 4)] + [[0, 0, x] for x in range(6)])
    assert tuple(coords[medoid_index(coords, (0.1, 1, 1))]) == (0, 0, 1)
    heavy = medoid_index(coords, (10.0, 1, 1))
    sums = _distance_sums(coords, (10.0, 1, 1))
    assert heavy == int(np.argmin(sums)) and tuple(coords[heavy]) != (0, 0, 1)


@pytest.mark.parametrize("ndim", [2, 3])
def test_approximate_medoid_is_nearest_to_median(ndim):
    rng = np.random.default_rng(10 + ndim)
    for _ in range(50):
        coords = _random_object(rng, ndim)
        scale = np.array((rng.uniform(0.3, 4.0),) + (1.0,) * (ndim - 1))
        d = (((coords - np.median(coords, axis=0)) * scale) ** 2).sum(axis=1)
        assert approximate_medoid_index(coords, scale) == int(np.argmin(d))


def test_centroid_is_rounded_mean_and_may_lie_outside():
    ring = np.zeros((9, 9), bool)
    ring[1:8, 1:8] = True
    ring[3:6, 3:6] = False
    coords = np.argwhere(ring)
    centre = object_centre(coords, "centroid")
    assert tuple(centre) == (4, 4) and not ring[4, 4]
    for method in ("medoid", "approximate-medoid"):
        assert ring[tuple(object_centre(coords, method))]


def test_object_centre_returns_object_pixel_coordinates():
    rng = np.random.default_rng(3)
    coords = _random_object(rng, 3)
    c = object_centre(coords, "medoid", (2.0, 1.0, 1.0))
    assert c.dtype == np.int64 and tuple(c) == tuple(coords[medoid_index(coords, (2.0, 1.0, 1.0))])


def test_bad_arguments():
    with pytest.raises(ValueError, match="non-empty"):
        object_centre(np.zeros((0, 2), int))
    with pytest.raises(ValueError, match="centre method"):
        object_centre(np.zeros((1, 2), int), "mean")
    with pytest.raises(ValueError, match="scale"):
        object_centre(np.zeros((3, 2), int), "medoid", (1.0, 0.0))


def test_medoid_of_a_54k_voxel_object_without_the_matrix():
    """An organoid-sized cell (upstream needs a 54k x 54k matrix, ~23 GB): bounded memory, exact minimum."""
    z, y, x = np.ogrid[:32, :72, :72]
    cell = ((z - 15.5) / 15) ** 2 + ((y - 35.2) / 35) ** 2 + ((x - 36.1) / 26) ** 2 < 1
    cell[20:, :30, :30] = False  # break the symmetry
    coords = np.argwhere(cell)
    assert 50_000 < len(coords) < 60_000
    scale = (2.0, 1.0, 1.0)
    tracemalloc.start()
    start = time.perf_counter()
    i = medoid_index(coords, scale)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"medoid of {len(coords)} voxels: {elapsed:.2f} s, peak {peak / 2**20:.0f} MiB")
    assert peak < 1 * 2**30  # the n x n matrix would need ~23 GB
    # exact minimum among the pixels near it, by direct O(n) sums
    x = coords * np.array(scale)

    def total(j):
        return np.sqrt(((x - x[j]) ** 2).sum(axis=1)).sum()

    near = np.flatnonzero(np.abs(coords - coords[i]).max(axis=1) <= 2)
    assert total(i) <= min(total(j) for j in near) * (1 + 1e-12)
    assert total(i) <= total(approximate_medoid_index(coords, scale))
