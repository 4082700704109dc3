"""Training data: discovery, validation, data properties and on-the-fly crops (embedseg_training.data)."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from embedseg_deploy.contract import Normalization
from embedseg_deploy.io import InputError, write_tiff_atomic
from embedseg_deploy.normalize import normalize
from embedseg_deploy.synthetic import write_dataset
from embedseg_training.centres import object_centre
from embedseg_training.data import (
    CropDataset,
    Sample,
    compute_properties,
    crop_size_rule,
    discover_split,
    grow_crop_to_images,
    load_split,
    round_up_8,
    worker_init_fn,
)

from .conftest import UPSTREAM

FIXTURES = UPSTREAM


def _write(path: Path, array, pixel_size=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_tiff_atomic(path, np.asarray(array), pixel_size, overwrite=True)


def _pair(root: Path, split: str, name: str, image, mask, pixel_size=None, suffix=".tif"):
    _write(root / split / "images" / f"{name}{suffix}", image, pixel_size)
    if mask is not None:
        _write(root / split / "masks" / f"{name}{suffix}", mask, pixel_size)


def _blobs(shape, boxes, dtype=np.uint16):
    """A mask with one rectangular object per box (tuple of (start, stop) per axis), ids 1..n."""
    mask = np.zeros(shape, dtype)
    for k, box in enumerate(boxes, start=1):
        mask[tuple(slice(a, b) for a, b in box)] = k
    return mask


def _img(mask, seed=0):
    rng = np.random.default_rng(seed)
    return (100 + 500 * (mask > 0) + rng.normal(0, 5, mask.shape)).astype(np.uint16)


@pytest.fixture(scope="module")
def data2d(tmp_path_factory) -> Path:
    return write_dataset(
        tmp_path_factory.mktemp("d2") / "data",
        ndim=2,
        n_train=3,
        n_val=1,
        n_test=1,
        shape=(96, 80),
        n_objects=(8, 14),
        seed=1,
    )


@pytest.fixture(scope="module")
def data3d(tmp_path_factory) -> Path:
    return write_dataset(
        tmp_path_factory.mktemp("d3") / "data",
        ndim=3,
        n_train=2,
        n_val=1,
        n_test=1,
        shape=(16, 48, 48),
        n_objects=(5, 8),
        anisotropy=2.0,
        pixel_size=0.5,
        seed=2,
    )


# ------------------------------------------------------------------------------------------- discovery


def test_pairs_by_name_not_by_order(tmp_path):
    m_a = _blobs((20, 30), [((2, 6), (2, 6))])
    m_b = _blobs((30, 20), [((2, 6), (2, 6)), ((10, 14), (10, 14))])
    _pair(tmp_path, "train", "b", _img(m_b), None)
    _pair(tmp_path, "train", "a", _img(m_a), None)
    _write(tmp_path / "train" / "masks" / "a.tiff", m_a)  # other suffix: sorts elsewhere, same stem
    _write(tmp_path / "train" / "masks" / "b.tif", m_b)
    samples = {s.name: s for s in load_split(tmp_path, "train")}
    assert samples["a"].mask.shape == (20, 30) and samples["a"].n_objects == 1
    assert samples["b"].mask.shape == (30, 20) and samples["b"].n_objects == 2
    assert samples["a"].mask_path.name == "a.tiff"


def test_unpaired_files_are_all_listed(tmp_path):
    m = _blobs((16, 16), [((2, 6), (2, 6))])
    for name in ("a", "b", "c"):
        _write(tmp_path / "train" / "images" / f"{name}.tif", _img(m))
    for name in ("a", "x", "y"):
        _write(tmp_path / "train" / "masks" / f"{name}.tif", m)
    with pytest.raises(InputError) as err:
        discover_split(tmp_path, "train")
    msg = str(err.value)
    assert "4 unpaired" in msg
    for name in ("images/b.tif", "images/c.tif", "masks/x.tif", "masks/y.tif"):
        assert name in msg
    assert "images/a.tif" not in msg


def test_missing_split_folders_and_files(tmp_path):
    with pytest.raises(InputError, match="missing train split folder"):
        load_split(tmp_path, "train")
    with pytest.raises(InputError, match=r"missing val split folder.*15%"):
        load_split(tmp_path, "val")
    (tmp_path / "train" / "images").mkdir(parents=True)
    with pytest.raises(InputError, match=r"train/images: no \.tif/\.tiff images"):
        load_split(tmp_path, "train")
    _write(tmp_path / "train" / "images" / "a.tif", np.ones((8, 8), np.uint8))
    with pytest.raises(InputError, match=r"train/masks: no \.tif/\.tiff masks"):
        load_split(tmp_path, "train")
    (tmp_path / "val").mkdir()
    with pytest.raises(InputError, match="val/images: missing images folder"):
        load_split(tmp_path, "val")


def test_test_split_needs_no_masks(tmp_path):
    _write(tmp_path / "test" / "images" / "t.tif", np.ones((2, 8, 8), np.uint16), (2.0, 1.0, 1.0))
    (samples,) = load_split(tmp_path, "test")
    assert samples.mask is None and samples.ndim == 3 and samples.pixel_size == (2.0, 1.0, 1.0)
    other = tmp_path / "other"
    (other / "test" / "images").mkdir(parents=True)
    tifffile.imwrite(
        other / "test" / "images" / "u.tif", np.ones((3, 8, 8), np.uint16), photometric="minisblack"
    )  # CYX or ZYX?
    with pytest.raises(InputError, match=r"u\.tif: cannot tell 2D with channels from 3D.*pass ndim"):
        load_split(other, "test")
    assert load_split(other, "test", ndim=3)[0].shape == (3, 8, 8)
    assert load_split(other, "test", ndim=2)[0].image.shape == (3, 8, 8)  # CYX by the channel rule


def test_duplicate_stem(tmp_path):
    m = _blobs((8, 8), [((1, 3), (1, 3))])
    _pair(tmp_path, "train", "a", _img(m), m)
    _write(tmp_path / "train" / "images" / "a.tiff", _img(m))
    with pytest.raises(InputError, match=r"a\.tiff: same name as .*a\.tif"):
        load_split(tmp_path, "train")


# ------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (np.full((16, 16), 1.5, np.float32), "non-integer"),
        (np.where(np.eye(16) > 0, np.nan, 1).astype(np.float32), "non-integer"),
        (np.full((16, 16), -1, np.int16), "negative"),
        (np.ones((16, 16), bool), "boolean"),
        (np.ones((16, 18), np.uint16), "differs from its mask"),
        (np.ones((2, 2, 16, 16), np.uint16), "wrong number of dimensions"),
    ],
)
def test_bad_masks(tmp_path, mask, match):
    _pair(tmp_path, "train", "a", np.ones((16, 16), np.uint16), None)
    (tmp_path / "train" / "masks").mkdir()
    tifffile.imwrite(tmp_path / "train" / "masks" / "a.tif", mask, photometric="minisblack")
    with pytest.raises(InputError, match=match) as err:
        load_split(tmp_path, "train")
    assert "a.tif" in str(err.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_image(tmp_path, bad):
    image = np.ones((16, 16), np.float32)
    image[3, 4] = bad
    _pair(tmp_path, "train", "a", image, _blobs((16, 16), [((1, 5), (1, 5))]))
    with pytest.raises(InputError, match=r"images/a\.tif: image has 1 NaN or infinite"):
        load_split(tmp_path, "train")


def test_mixed_2d_and_3d(tmp_path):
    _pair(tmp_path, "train", "a", np.ones((16, 16), np.uint16), _blobs((16, 16), [((1, 5), (1, 5))]))
    m3 = _blobs((4, 16, 16), [((0, 2), (1, 5), (1, 5))])
    _pair(tmp_path, "train", "b", np.ones((4, 16, 16), np.uint16), m3)
    with pytest.raises(InputError, match=r"masks/b\.tif: mask is 3D .* this split is 2D; 2D and 3D"):
        load_split(tmp_path, "train")


@pytest.mark.parametrize("which", ["images", "masks"])
def test_truncated_tiff(tmp_path, which):
    m = _blobs((64, 64), [((1, 5), (1, 5))])
    _pair(tmp_path, "train", "a", _img(m), m)
    path = tmp_path / "train" / which / "a.tif"
    path.write_bytes(path.read_bytes()[:-3000])
    with pytest.raises(InputError, match=rf"{which}/a\.tif: (truncated|unreadable)"):
        load_split(tmp_path, "train")


def test_float_integral_mask_background_id_and_relabelling(tmp_path):
    mask = np.ones((16, 16), np.float32)  # background id 1
    mask[2:5, 2:5] = 7
    mask[8:12, 8:12] = 300
    mask[13:15, 1:3] = 0  # 0 is not an object either
    _pair(tmp_path, "train", "a", np.ones((16, 16), np.uint16), mask)
    (s,) = load_split(tmp_path, "train", bg_id=1)
    assert s.mask.dtype == np.int32
    assert set(np.unique(s.mask)) == {0, 1, 2}
    assert (s.mask == 1).sum() == 9 and (s.mask == 2).sum() == 16


def test_holes_filled_only_in_background(tmp_path):
    mask = np.zeros((12, 12), np.uint16)
    mask[1:10, 1:10] = 1
    mask[3:5, 3:5] = 0  # a hole
    mask[6:8, 6:8] = 2  # an object inside object 1
    _pair(tmp_path, "train", "a", np.ones((12, 12), np.uint16), mask)
    (s,) = load_split(tmp_path, "train")
    assert (s.mask[3:5, 3:5] == 1).all() and (s.mask[6:8, 6:8] == 2).all()
    (raw,) = load_split(tmp_path, "train", fill_holes=False)
    assert (raw.mask[3:5, 3:5] == 0).all()


def test_channels(tmp_path):
    m = _blobs((16, 20), [((1, 5), (1, 5))])
    _pair(tmp_path, "train", "a", np.stack([_img(m), _img(m, 1)]), m)  # CYX
    (s,) = load_split(tmp_path, "train")
    assert s.image.shape == (2, 16, 20) and s.in_channels == 2
    _pair(tmp_path, "train", "b", np.stack([_img(m)] * 3, axis=-1), m)  # YXC with 3 channels
    with pytest.raises(InputError, match=r"b\.tif: 3 channel\(s\)"):
        load_split(tmp_path, "train")


# ------------------------------------------------------------------------------------------- properties


def test_properties_2d_by_hand(tmp_path):
    boxes = [((2, 6), (3, 13)), ((20, 31), (20, 28)), ((40, 43), (40, 46))]  # extents (3,9), (10,7), (2,5)
    m = _blobs((64, 64), boxes)
    _pair(tmp_path, "train", "a", _img(m), m, (0.5, 0.5))
    p = compute_properties(load_split(tmp_path, "train"))
    ext = np.array([[3, 9], [10, 7], [2, 5]], float)
    assert p.avg_extent == pytest.approx(ext.mean(0).tolist())
    assert p.std_extent == pytest.approx(ext.std(0).tolist())
    expected = max(round_up_8(a + 5 * s) for a, s in zip(ext.mean(0), ext.std(0), strict=True))
    assert p.crop_size == [expected, expected]
    assert p.foreground_weight == 10.0
    assert (p.min_object_size, p.max_object_size) == (18, 88)
    assert p.mean_object_size == pytest.approx((40 + 88 + 18) / 3)
    assert p.avg_background_intensity[0] == pytest.approx(_img(m)[m == 0].mean())
    assert p.pixel_size == [0.5, 0.5] and p.anisotropy == 1.0
    assert json.loads(json.dumps(p.to_dict())) == p.to_dict()


def test_properties_3d_foreground_weight_and_anisotropy(tmp_path):
    m1 = _blobs((8, 16, 16), [((1, 3), (2, 6), (2, 6))])  # 32 voxels of 2048
    m2 = _blobs((8, 16, 16), [((0, 4), (0, 8), (0, 8)), ((5, 7), (9, 12), (9, 12))])  # 256 + 18
    _pair(tmp_path, "train", "a", _img(m1), m1, (1.5, 0.5, 0.5))
    _pair(tmp_path, "train", "b", _img(m2), m2, (1.5, 0.5, 0.5))
    samples = load_split(tmp_path, "train")
    p = compute_properties(samples, n_sigma=1)
    assert p.foreground_weight == pytest.approx(((2048 - 32) / 32 + (2048 - 274) / 274) / 2)
    assert p.anisotropy == pytest.approx(3.0) and p.pixel_size == [1.5, 0.5, 0.5]
    assert p.crop_size[1] == p.crop_size[2] and all(c % 8 == 0 for c in p.crop_size)
    with pytest.warns(UserWarning, match="using the option"):
        q = compute_properties(samples, pixel_size=(2.0, 0.5, 0.5))
    assert q.anisotropy == pytest.approx(4.0)
    assert compute_properties(samples, anisotropy=5.0).anisotropy == 5.0


def test_pixel_size_disagreement_warns(tmp_path):
    m = _blobs((16, 16), [((1, 5), (1, 5))])
    _pair(tmp_path, "train", "a", _img(m), m, (0.5, 0.5))
    _pair(tmp_path, "train", "b", _img(m), m, (0.5, 0.5))
    _pair(tmp_path, "train", "c", _img(m), m, (0.7, 0.7))
    with pytest.warns(UserWarning, match="disagree"):
        p = compute_properties(load_split(tmp_path, "train"))
    assert p.pixel_size == [0.5, 0.5]


def test_crop_grows_to_images_little_larger_than_it():
    assert grow_crop_to_images([64, 64], [96, 96]) == [96, 96]  # DSB tiles: 1.5x, trained whole
    assert grow_crop_to_images([64, 64], [97, 97]) == [64, 64]  # beyond 1.5x: the crop stays
    assert grow_crop_to_images([40, 40], [256, 256]) == [40, 40]
    assert grow_crop_to_images([64, 64], [90, 60]) == [96, 96]  # y and x stay equal, rounded up to 8
    assert grow_crop_to_images([64, 64], [50, 40]) == [64, 64]  # smaller images are padded, never shrunk
    assert grow_crop_to_images([16, 32, 32], [20, 96, 96]) == [24, 32, 32]  # each of z and yx on its own
    assert grow_crop_to_images([16, 32, 32], [32, 40, 48]) == [16, 48, 48]


def test_crop_rule_reproduces_upstream_fixtures():
    for case, expected in (("2d", [40, 40]), ("3d", [16, 32, 32])):
        props = json.loads((FIXTURES / case / "data_properties.json").read_text())
        axes = "yx" if case == "2d" else "zyx"
        avg = [props[f"avg_object_size_{a}"] for a in axes]
        std = [props[f"stdev_object_size_{a}"] for a in axes]
        assert crop_size_rule(avg, std, 5) == expected


# ------------------------------------------------------------------------------------------- crops


def _dataset(root, **kwargs):
    samples = load_split(root, "train")
    props = compute_properties(samples)
    kwargs.setdefault("anisotropy", props.anisotropy)
    return samples, CropDataset(samples, kwargs.pop("crop_size", props.crop_size), **kwargs)


@pytest.mark.parametrize("which", ["data2d", "data3d"])
def test_crop_items(request, which):
    samples, ds = _dataset(request.getfixturevalue(which), augment=False, sampling="all")
    assert len(ds) == sum(s.n_objects for s in samples) == ds.n_objects
    for i in range(0, len(ds), 3):
        item = ds[i]
        crop = ds.crop_size
        assert item["image"].shape == (1, *crop) and item["image"].dtype == torch.float32
        assert item["instance"].shape == tuple(crop) and item["instance"].dtype == torch.int64
        assert item["center"].shape == tuple(crop) and item["center"].dtype == torch.bool
        inst, centre = item["instance"].numpy(), item["center"].numpy()
        m = int(inst.max())
        assert set(np.unique(inst)) == set(range(m + 1))  # relabelled 1..m
        assert sorted(inst[centre].tolist()) == list(range(1, m + 1))  # one centre per visible object
        for k in range(1, m + 1):  # the medoid of the visible part
            expected = object_centre(np.argwhere(inst == k), "medoid", ds.scale)
            assert centre[tuple(expected)]
        # the window: centred on the object's centroid, shifted inside, from the whole-image normalisation
        s = samples[ds.object_image[i]]
        window = ds.window(i)
        centroid = np.argwhere(s.mask == ds.object_id[i]).mean(axis=0)
        for sl, c, k, n in zip(window, centroid, crop, s.shape, strict=True):
            assert sl.start == int(np.clip(c - k / 2, 0, n - k))
        whole = normalize(s.image, Normalization(), channel_axis=0)
        np.testing.assert_array_equal(item["image"].numpy(), whole[(slice(None), *window)])
        assert item["name"] == s.name


def test_3d_centres_use_anisotropy(data3d):
    _, ds = _dataset(data3d, augment=False, sampling="all")
    assert ds.scale == (2.0, 1.0, 1.0)


def test_image_smaller_than_crop_is_padded_not_dropped(tmp_path):
    m = _blobs((20, 12), [((2, 8), (2, 8)), ((12, 18), (4, 10))])
    _pair(tmp_path, "train", "a", _img(m), m)
    samples = load_split(tmp_path, "train")
    ds = CropDataset(samples, [24, 24], augment=False, sampling="all")
    assert len(ds) == 2
    item = ds[0]
    inst = item["instance"].numpy()
    assert inst.shape == (24, 24) and inst.max() == 2 and item["center"].sum() == 2
    pad = inst[:, :6]  # columns 0..5 are padding (12 -> 24: 6 before, 6 after)
    assert (pad == 0).all()
    image = item["image"].numpy()[0]
    background = normalize(samples[0].image, Normalization(), channel_axis=0)[0][m == 0].mean()
    assert image[:, :6] == pytest.approx(background, rel=1e-5)


def test_samples_built_by_hand_may_have_any_ids(tmp_path):
    mask = np.zeros((32, 32), np.int32)
    mask[2:8, 2:8] = 9
    mask[20:26, 20:30] = 5
    sample = Sample("x", _img(mask)[np.newaxis], mask, tmp_path / "x.tif", tmp_path / "m.tif")
    ds = CropDataset([sample], [16, 16], augment=False, sampling="all")
    assert ds.n_objects == 2 and mask.max() == 9  # the caller's mask is not modified
    sizes = sorted(int(ds[i]["instance"].numpy()[ds[i]["center"].numpy()].size) for i in range(2))
    assert sizes == [1, 1]
    assert {int((ds[i]["instance"] > 0).sum()) for i in range(2)} == {36, 60}


def test_objects_larger_than_crop_warn(tmp_path):
    m = _blobs((64, 64), [((2, 40), (2, 10)), ((50, 54), (50, 54))])
    _pair(tmp_path, "train", "a", _img(m), m)
    with pytest.warns(UserWarning, match="1 object.*larger than the crop"):
        ds = CropDataset(load_split(tmp_path, "train"), [16, 16])
    assert ds[0]["image"].shape == (1, 16, 16)


def _symmetries(ndim):
    """All symmetries the augmentation may apply, as functions on spatial arrays."""
    ops = []
    for k in range(4):
        for fy in (False, True):
            for fz in (False, True) if ndim == 3 else (False,):
                axes = [a for a, f in ((-2, fy), (-3, fz)) if f]  # negative: works with a channel axis
                ops.append(
                    lambda a, k=k, axes=axes: (
                        np.flip(np.rot90(a, k, axes=(-2, -1)), axis=axes)
                        if axes
                        else np.rot90(a, k, axes=(-2, -1))
                    )
                )
    return ops


@pytest.mark.parametrize(("which", "n_ops"), [("data2d", 8), ("data3d", 16)])
def test_augmentation_is_one_symmetry_for_all_targets(request, which, n_ops):
    _, plain = _dataset(request.getfixturevalue(which), augment=False, seed=4, length=60)
    _, aug = _dataset(request.getfixturevalue(which), augment=True, seed=4, length=60)
    ndim = plain.ndim
    ops = _symmetries(ndim)
    assert len(ops) == n_ops
    seen = set()
    for i in range(60):
        a, b = plain[i], aug[i]
        assert a["object"] == b["object"]  # the augmentation does not change which object is drawn
        matches = [
            j
            for j, op in enumerate(ops)
            if np.array_equal(op(a["image"].numpy()), b["image"].numpy())
            and np.array_equal(op(a["center"].numpy()), b["center"].numpy())
            and np.array_equal(op(a["instance"].numpy()), b["instance"].numpy())
        ]
        assert matches, f"item {i}: image, instance and centre were not transformed alike"
        seen.add(matches[0])
    assert len(seen) >= n_ops // 2 + 2  # many different elements are drawn


def test_sampling_is_seeded_per_epoch_and_item(data2d):
    _, ds = _dataset(data2d, seed=1)
    first = [ds[i]["object"] for i in range(30)]
    again = [ds[i]["object"] for i in range(30)]
    assert first == again
    ds.set_epoch(1)
    assert [ds[i]["object"] for i in range(30)] != first
    _, other = _dataset(data2d, seed=2)
    assert [other[i]["object"] for i in range(30)] != first
    counts = np.bincount([ds[i]["object"] for i in range(len(ds))], minlength=ds.n_objects)
    assert (counts > 0).sum() > ds.n_objects / 2  # spread over the objects (uniform with replacement)


@pytest.mark.parametrize("which", ["data2d", "data3d"])
def test_jittered_crops_move_around_their_object(request, which):
    """With ``jitter`` a crop moves off its object's centroid by up to that share of the crop, differently
    per item and epoch, reproducibly; the object's centroid stays inside, and the targets are those of the
    window actually cut."""
    _, fixed = _dataset(request.getfixturevalue(which), augment=False, sampling="all")
    _, ds = _dataset(request.getfixturevalue(which), augment=False, sampling="all", jitter=0.25)
    starts = set()
    for epoch in (0, 1, 2):
        ds.set_epoch(epoch)
        for i in range(ds.n_objects):
            item = ds[i]
            np.testing.assert_array_equal(item["image"].numpy(), ds[i]["image"].numpy())  # reproducible
            image = ds.images[ds.object_image[i]]
            # find the window the item was cut from, and check it against the object and the fixed one
            hits = [
                w
                for w in _windows(image.shape[1:], ds.crop_size)
                if np.array_equal(image[(slice(None), *w)], item["image"].numpy())
            ]
            assert hits, "the crop is a window of its image"
            window = hits[0]
            starts.add((i, tuple(w.start for w in window)))
            centroid = ds.object_centroid[i]
            for w, c, k, f in zip(window, centroid, ds.crop_size, fixed.window(i), strict=True):
                assert w.start <= c < w.stop and abs(w.start - f.start) <= 0.25 * k + 1
            labels = ds.masks[ds.object_image[i]][window]
            ids = np.unique(labels[labels > 0])
            assert item["instance"].numpy().max() == len(ids)
            assert int(item["center"].sum()) == len(ids)  # one centre per visible object
    assert len(starts) > 1.5 * ds.n_objects  # the windows do move
    with pytest.raises(ValueError, match="jitter"):
        _dataset(request.getfixturevalue(which), jitter=0.6)


def _windows(shape, crop):
    ranges = [range(n - k + 1) for n, k in zip(shape, crop, strict=True)]
    for tops in np.ndindex(*[len(r) for r in ranges]):
        yield tuple(slice(t, t + k) for t, k in zip(tops, crop, strict=True))


def test_dataloader_workers_reproduce_single_process(data2d):
    _, ds = _dataset(data2d, seed=3)

    def run(workers):
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=8,
            num_workers=workers,
            worker_init_fn=worker_init_fn,
            persistent_workers=workers > 0,
            drop_last=True,
        )
        out = []
        for epoch in range(2):
            ds.set_epoch(epoch)
            out.append(torch.cat([b["instance"].flatten(1).sum(1) * 1000 + b["object"] for b in loader]))
        return out

    single, multi = run(0), run(2)
    assert all(torch.equal(a, b) for a, b in zip(single, multi, strict=True))
    assert not torch.equal(single[0], single[1])  # a new epoch draws new crops
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 1, *ds.crop_size) and len(batch["name"]) == 4


def test_normalisation_options(data2d):
    samples = load_split(data2d, "train")
    for norm in (Normalization("absolute", divisor=65535), Normalization("mean-std")):
        ds = CropDataset(samples, [32, 32], norm=norm, augment=False, sampling="all")
        window = ds.window(0)
        whole = normalize(samples[ds.object_image[0]].image, norm, channel_axis=0)
        np.testing.assert_array_equal(ds[0]["image"].numpy(), whole[(slice(None), *window)])


def test_crop_dataset_rejects_bad_input(data2d, tmp_path):
    samples = load_split(data2d, "train")
    with pytest.raises(ValueError, match="crop_size"):
        CropDataset(samples, [32, 32, 32])
    with pytest.raises(ValueError, match="center"):
        CropDataset(samples, 32, center="middle")
    _write(tmp_path / "test" / "images" / "t.tif", np.ones((16, 16), np.uint16))
    with pytest.raises(InputError, match="needs masks"):
        CropDataset(load_split(tmp_path, "test"), 32)
    with pytest.raises(IndexError):
        CropDataset(samples, 32)[10_000]


def test_item_cost_and_target_cache(data3d):
    """Per-item cost (printed; compare with a network step) and exactness of the cached targets."""
    _, ds = _dataset(data3d, crop_size=[16, 32, 32])
    for label, epoch in (("first epoch (centres computed)", 0), ("later epoch (centres cached)", 1)):
        ds.set_epoch(epoch)
        start = time.perf_counter()
        items = [ds[i] for i in range(len(ds))]
        print(f"3D crop {ds.crop_size}, {label}: {(time.perf_counter() - start) / len(ds) * 1e3:.2f} ms/item")
    drawn = {it["object"] for it in items}
    assert drawn <= {obj for obj, _ in ds._targets}
    fresh = CropDataset(
        load_split(data3d, "train"), [16, 32, 32], anisotropy=2.0, augment=False, sampling="all"
    )
    for obj in sorted(drawn)[:5]:
        cached = ds.crop(obj)
        assert obj not in {o for o, _ in fresh._targets}
        for a, b in zip(cached, fresh.crop(obj), strict=True):
            np.testing.assert_array_equal(a, b)


def test_no_warnings_on_clean_data(data2d):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        samples = load_split(data2d, "train") + load_split(data2d, "val")
        CropDataset(samples, compute_properties(samples).crop_size)
        assert tifffile.imread(samples[0].image_path).shape == samples[0].shape


def test_rgb_or_channel_masks_are_reported_as_a_problem_of_the_mask(tmp_path):
    labels = _blobs((16, 20), [((1, 5), (1, 5)), ((8, 12), (8, 14))])
    _pair(tmp_path, "train", "a", _img(labels), None)
    rgb = np.stack([labels * 80, labels * 40, labels * 20], axis=-1).astype(np.uint8)  # a coloured rendering
    (tmp_path / "train" / "masks").mkdir()
    tifffile.imwrite(tmp_path / "train" / "masks" / "a.tif", rgb, photometric="rgb")
    for ndim in (None, 2):
        with pytest.raises(
            InputError, match=r"masks/a\.tif: mask has a colour/channel axis \(axes 'YXS'"
        ) as e:
            load_split(tmp_path, "train", ndim=ndim)
        assert "images/a.tif" not in str(e.value) and "instance id" in str(e.value)
    tifffile.imwrite(
        tmp_path / "train" / "masks" / "a.tif",
        np.stack([labels, labels]),
        imagej=True,
        metadata={"axes": "CYX"},
    )
    with pytest.raises(InputError, match=r"masks/a\.tif: mask has a colour/channel axis \(axes 'CYX'"):
        load_split(tmp_path, "train")


def test_a_three_slice_stack_written_as_planar_rgb_is_3d_with_ndim_3(tmp_path):
    labels = _blobs((3, 16, 20), [((0, 2), (1, 5), (1, 5))])
    _pair(tmp_path, "train", "a", _img(labels), None)
    (tmp_path / "train" / "masks").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # tifffile: (3, y, x) taken as planar RGB
        tifffile.imwrite(tmp_path / "train" / "masks" / "a.tif", labels)
    with pytest.raises(InputError, match=r"masks/a\.tif: .*3D mask of 3 slices: give --ndim 3"):
        load_split(tmp_path, "train")
    (s,) = load_split(tmp_path, "train", ndim=3)
    assert s.mask.shape == (3, 16, 20) and s.n_objects == 1


def test_binary_semantic_masks_warn_naming_the_file(tmp_path):
    instances = _blobs((24, 24), [((1, 5), (1, 5)), ((8, 12), (8, 14)), ((16, 20), (2, 6))])
    _pair(tmp_path, "train", "a", _img(instances), np.where(instances > 0, 255, 0).astype(np.uint8))
    with pytest.warns(UserWarning, match=r"masks/a\.tif: one id \(255\) covers all 3 separate objects") as w:
        (s,) = load_split(tmp_path, "train")
    assert "instance labels" in str(w[0].message) and s.n_objects == 1
    _pair(tmp_path, "train", "a", _img(instances), instances)  # the same objects as instances: silent
    _pair(tmp_path, "train", "b", _img(instances), _blobs((24, 24), [((1, 9), (1, 9))]))  # one object
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [s.n_objects for s in load_split(tmp_path, "train")] == [3, 1]
