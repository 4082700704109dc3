"""Synthetic data generator (embedseg_deploy.synthetic)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from embedseg_deploy.io import read_tiff
from embedseg_deploy.synthetic import make_image, write_dataset


def _touching_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of distinct labels that are face neighbours somewhere."""
    pairs = set()
    for axis in range(labels.ndim):
        a = np.moveaxis(labels, axis, 0)
        lo, hi = a[:-1].ravel(), a[1:].ravel()
        sel = (lo > 0) & (hi > 0) & (lo != hi)
        pairs |= {(min(p, q), max(p, q)) for p, q in zip(lo[sel].tolist(), hi[sel].tolist(), strict=True)}
    return pairs


@pytest.mark.parametrize(("shape", "n"), [((128, 128), 25), ((24, 64, 64), 12)])
def test_make_image_labels_and_image(shape, n):
    image, labels = make_image(shape, n, np.random.default_rng(0), radius=(6, 10), touching_fraction=0.5)
    assert image.shape == labels.shape == shape
    assert image.dtype == np.uint16 and labels.dtype == np.uint16
    k = int(labels.max())
    assert 0.5 * n <= k <= n
    assert set(np.unique(labels)) == set(range(k + 1))  # consecutive ids
    for i, box in enumerate(ndimage.find_objects(labels), start=1):  # each object is one connected piece
        assert ndimage.label(labels[box] == i)[1] == 1
    touching = _touching_pairs(labels)
    in_pairs = {i for p in touching for i in p}
    assert touching, "some objects touch"
    assert len(in_pairs) < k, "some objects are separate"
    fg, bg = image[labels > 0].mean(), image[labels == 0].mean()
    assert fg > bg + 200  # objects are brighter than the background
    assert image[labels == 0].std() > 0  # noise


def test_anisotropy_flattens_objects_in_z():
    extents = {}
    for aniso in (1.0, 3.0):
        _, labels = make_image((48, 64, 64), 10, np.random.default_rng(5), radius=(8, 10), anisotropy=aniso)
        boxes = [b for b in ndimage.find_objects(labels) if b is not None]
        z = np.mean([b[0].stop - b[0].start for b in boxes])
        yx = np.mean([b[2].stop - b[2].start for b in boxes])
        extents[aniso] = z / yx
    assert extents[1.0] == pytest.approx(1.0, abs=0.25)
    assert extents[3.0] == pytest.approx(1 / 3, abs=0.12)


def test_write_dataset_layout_metadata_and_determinism(tmp_path):
    kwargs = dict(ndim=3, n_train=2, n_val=1, n_test=1, shape=(12, 40, 40), n_objects=(3, 6), anisotropy=2.5)
    a = write_dataset(tmp_path / "a", seed=7, pixel_size=0.4, **kwargs)
    b = write_dataset(tmp_path / "b", seed=7, pixel_size=0.4, **kwargs)
    c = write_dataset(tmp_path / "c", seed=8, pixel_size=0.4, **kwargs)
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*.tif"))
    assert files == [
        f"{s}/{sub}/img{i:03d}.tif"
        for s, n in (("test", 1), ("train", 2), ("val", 1))
        for sub in ("images", "masks")
        for i in range(n)
    ]
    for f in files:
        ta, tb, tc = read_tiff(a / f), read_tiff(b / f), read_tiff(c / f)
        np.testing.assert_array_equal(ta.data, tb.data)
        assert not np.array_equal(ta.data, tc.data)
        assert ta.data.shape == (12, 40, 40)
        assert ta.pixel_size == pytest.approx((1.0, 0.4, 0.4))
    with pytest.raises(FileExistsError):
        write_dataset(tmp_path / "a", seed=7, **kwargs)


def test_write_dataset_2d_defaults(tmp_path):
    root = write_dataset(tmp_path / "d", ndim=2, n_train=1, n_val=0, n_test=2)
    assert not (root / "val").exists()
    t = read_tiff(root / "test" / "masks" / "img001.tif")
    assert t.data.shape == (256, 256) and t.pixel_size == pytest.approx((1.0, 1.0))
    assert 20 <= t.data.max() <= 60
