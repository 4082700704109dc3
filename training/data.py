"""Training data: discover and validate TIFF pairs, compute data properties, sample object-centred crops.

The reading and validation half (``discover_split``, ``load_split``, ``compute_properties``) is numpy only;
:class:`CropDataset` is the torch ``Dataset`` the training loop consumes. No crop is ever written to disk:
images are normalised once (whole image, as upstream) and held in memory, and each item cuts one crop
around one object on the fly.

Differences from upstream EmbedSeg, on purpose:

* images and masks pair by file name (:func:`embedseg_deploy.io.tiff_stem`), not by sorted order, and
  every unpaired file is reported;
* an image smaller than the crop is padded (image: the mean normalised background intensity per channel,
  mask: 0) instead of silently dropping its objects; reflection would show unlabelled copies of objects;
* holes are filled only where the mask is background (upstream's fill_label_holes also overwrites an
  object enclosed by another);
* 3D augmentation draws uniformly from the 16 symmetries that keep the z axis (90 degree turns in YX,
  flips of y and z); upstream draws from the same set with unequal probabilities;
* the exact medoid is computed for every object (no y/x subsampling), see ``centres.py``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from embedseg_deploy.contract import Normalization
from embedseg_deploy.io import DEFAULT_MAX_BYTES, InputError, read_tiff, tiff_files, to_channels_first
from embedseg_deploy.normalize import normalize

from .centres import CENTRE_METHODS, object_centre

SPLITS = ("train", "val", "test")
SAMPLING_MODES = ("random", "all")


def round_up_8(x: float) -> int:
    """Upstream's crop rounding: ``(int(x) + 7) & -8``."""
    return (int(x) + 7) & -8


# ----------------------------------------------------------------------------------------------------
# discovery and validation (torch-free)


@dataclass
class Sample:
    """One image (``(C, *spatial)``, dtype as read) and its mask (``int32``, 0 = background, 1..K)."""

    name: str
    image: np.ndarray
    mask: np.ndarray | None
    image_path: Path
    mask_path: Path | None
    pixel_size: tuple[float, ...] | None = None

    @property
    def ndim(self) -> int:
        return self.image.ndim - 1

    @property
    def in_channels(self) -> int:
        return self.image.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[1:])

    @property
    def n_objects(self) -> int:
        return 0 if self.mask is None else int(self.mask.max(initial=0))


def discover_split(
    root: str | os.PathLike, split: str, require_masks: bool | None = None
) -> list[tuple[str, Path, Path | None]]:
    """``(name, image_path, mask_path)`` for ``root/split/{images,masks}/*.tif[f]``, paired by stem.

    Masks are required except for ``test`` (``require_masks`` overrides). Raises :class:`InputError`
    for a missing or empty folder and lists every unpaired file in both directions.
    """
    root = Path(root)
    require_masks = (split != "test") if require_masks is None else require_masks
    split_dir = root / split
    if not split_dir.is_dir():
        hint = ""
        if split == "val":
            hint = (
                f"; create {split_dir}/images and {split_dir}/masks, e.g. by moving about 15% of the "
                f"train image/mask pairs there (upstream's split_train_val default)"
            )
        raise InputError(f"{split_dir}: missing {split} split folder{hint}")
    images_dir, masks_dir = split_dir / "images", split_dir / "masks"
    if not images_dir.is_dir():
        raise InputError(f"{images_dir}: missing images folder")
    images = tiff_files(images_dir)
    if not images:
        raise InputError(f"{images_dir}: no .tif/.tiff images")
    masks = tiff_files(masks_dir) if masks_dir.is_dir() else {}
    if not masks:
        if require_masks:
            raise InputError(f"{masks_dir}: no .tif/.tiff masks (the {split} split needs one mask per image)")
        return [(name, path, None) for name, path in images.items()]
    no_mask = [str(images[n]) for n in images if n not in masks]
    no_image = [str(masks[n]) for n in masks if n not in images]
    if no_mask or no_image:
        lines = [f"{p}: no mask with this name in {masks_dir}" for p in no_mask]
        lines += [f"{p}: no image with this name in {images_dir}" for p in no_image]
        raise InputError(f"{split_dir}: {len(lines)} unpaired file(s):\n  " + "\n  ".join(lines))
    return [(name, images[name], masks[name]) for name in images]


def load_split(
    root: str | os.PathLike,
    split: str,
    ndim: int | None = None,
    in_channels: int | None = None,
    channel_axis: int | None = None,
    bg_id: int = 0,
    require_masks: bool | None = None,
    fill_holes: bool = True,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> list[Sample]:
    """Read and validate one split into memory; masks relabelled to 1..K (pixels == ``bg_id`` -> 0).

    ``ndim`` (2 or 3) is taken from the masks when not given; every sample of a split must agree, and so
    must the number of channels. Channels follow :func:`embedseg_deploy.io.to_channels_first`.
    """
    samples = []
    for name, image_path, mask_path in discover_split(root, split, require_masks):
        mask = None
        if mask_path is not None:
            mask_tif = read_tiff(mask_path, max_bytes=max_bytes)
            _refuse_channel_axis(mask_tif.data, mask_tif.axes, mask_path, ndim)
            if ndim is None:
                ndim = mask_tif.data.ndim
            mask = _validate_mask(mask_tif.data, mask_path, ndim, bg_id, fill_holes)
        tif = read_tiff(image_path, max_bytes=max_bytes)
        if ndim is None:
            ndim = _guess_ndim(tif.data, tif.axes, image_path)
        image = to_channels_first(tif.data, ndim, in_channels, channel_axis, image_path, tif.axes)
        _check_finite(image, image_path)
        if mask is not None and mask.shape != image.shape[1:]:
            raise InputError(
                f"{image_path}: image spatial shape {image.shape[1:]} differs from its mask "
                f"{mask_path} {mask.shape}"
            )
        if samples and image.shape[0] != samples[0].in_channels:
            raise InputError(
                f"{image_path}: {image.shape[0]} channel(s), but {samples[0].image_path} has "
                f"{samples[0].in_channels}; pass channel_axis/in_channels or fix the files"
            )
        pixel_size = tif.pixel_size if tif.pixel_size is not None and len(tif.pixel_size) == ndim else None
        samples.append(Sample(name, image, mask, image_path, mask_path, pixel_size))
    return samples


def _guess_ndim(data: np.ndarray, axes: str | None, path: Path) -> int:
    if data.ndim == 2:
        return 2
    if axes is not None and "Z" in axes:
        return 3
    raise InputError(
        f"{path}: cannot tell 2D with channels from 3D for shape {data.shape} (axes {axes!r}) without "
        f"masks; pass ndim"
    )


def _refuse_channel_axis(data: np.ndarray, axes: str | None, path: Path, ndim: int | None) -> None:
    """A mask whose TIFF declares a colour or channel axis (an RGB rendering of labels, a ``CYX`` stack)
    is the mask's problem; without this it would pass as a 3D mask and its 2D image would be blamed.

    tifffile also writes a 3- or 4-slice ``ZYX`` array as planar RGB; ``ndim=3`` (``--ndim 3``) keeps it.
    """
    named = [a for a in (axes or "").upper() if a in "CS"]
    if not named or (ndim == 3 and data.ndim == 3):
        return
    hint = ""
    if data.ndim == 3 and ndim is None:
        hint = f" (if it is a 3D mask of {data.shape[axes.upper().index(named[0])]} slices: give --ndim 3)"
    raise InputError(
        f"{path}: mask has a colour/channel axis (axes {axes!r}, shape {data.shape}); masks hold one "
        f"integer instance id per pixel, without channels: save the label image itself, not a coloured "
        f"rendering of it{hint}"
    )


def _warn_if_semantic(labels: np.ndarray, data: np.ndarray, path: Path) -> None:
    """Warn when one id covers several separate objects: a binary (semantic) mask, e.g. 0/1 or 0/255,
    would train all objects as one instance."""
    if labels.max(initial=0) != 1:
        return
    full = ndimage.generate_binary_structure(labels.ndim, labels.ndim)  # diagonal contact joins
    _, n_parts = ndimage.label(labels > 0, structure=full)
    if n_parts > 1:
        value = data.flat[int(np.argmax(labels))]
        warnings.warn(
            f"{path}: one id ({value}) covers all {n_parts} separate objects: a binary (semantic) mask? "
            f"Masks must be instance labels, one id per object (label them first, e.g. "
            f"scipy.ndimage.label); as it is, the objects train as a single instance",
            stacklevel=4,
        )


def _validate_mask(data: np.ndarray, path: Path, ndim: int, bg_id: int, fill_holes: bool) -> np.ndarray:
    """int32 labels 0..K from a raw mask; refuses bool, non-integral, negative and wrongly shaped masks."""
    if data.ndim not in (2, 3):
        raise InputError(f"{path}: wrong number of dimensions: masks are 2D or 3D, got shape {data.shape}")
    if data.ndim != ndim:
        raise InputError(
            f"{path}: mask is {data.ndim}D (shape {data.shape}) but this split is {ndim}D; "
            f"2D and 3D data cannot be mixed, and masks have no channel axis"
        )
    if data.dtype == np.bool_:
        raise InputError(
            f"{path}: mask is boolean (semantic); instance masks need one integer id per object "
            f"(label connected components first, e.g. scipy.ndimage.label)"
        )
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all() or not np.array_equal(data, np.round(data)):
            raise InputError(
                f"{path}: float mask with non-integer (or NaN/inf) values; masks hold integer ids"
            )
    if data.min() < 0:
        raise InputError(f"{path}: mask has negative values (min {data.min()}); ids must be >= 0")
    labels = _relabel(np.where(data == bg_id, 0, data))
    _warn_if_semantic(labels, data, path)
    return _fill_holes(labels) if fill_holes else labels


def _relabel(mask: np.ndarray) -> np.ndarray:
    """Ids 0 (background) and 1..K in increasing order of the original ids, int32."""
    if mask.dtype.kind in "iu" and mask.max(initial=0) < 2**24:
        present = np.bincount(mask.ravel().astype(np.int64)) > 0
        present[0] = False
        lut = np.zeros(len(present), dtype=np.int32)
        lut[present] = np.arange(1, int(present.sum()) + 1, dtype=np.int32)
        return lut[mask.astype(np.int64)]
    ids, inverse = np.unique(mask, return_inverse=True)
    inverse = inverse.reshape(mask.shape).astype(np.int32)
    return inverse if ids[0] == 0 else inverse + 1


def _fill_holes(labels: np.ndarray) -> np.ndarray:
    """Fill background holes inside each object (per object, on its box grown by one)."""
    out = labels.copy()
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        region = out[grown]
        filled = ndimage.binary_fill_holes(region == k)
        region[filled & (region == 0)] = k
    return out


def _check_finite(image: np.ndarray, path: Path) -> None:
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        bad = int(image.size - np.count_nonzero(np.isfinite(image)))
        raise InputError(f"{path}: image has {bad} NaN or infinite value(s)")


# ----------------------------------------------------------------------------------------------------
# data properties (upstream get_data_properties + the crop rule of the notebooks)


@dataclass
class DataProperties:
    """What training needs to know about the data; all vectors in array order ``(z,) y, x``."""

    ndim: int
    in_channels: int
    n_images: int
    n_objects: int
    crop_size: list[int]
    crop_n_sigma: float
    foreground_weight: float
    min_object_size: int
    mean_object_size: float
    max_object_size: int
    avg_extent: list[float]
    std_extent: list[float]
    max_extent: list[int]
    avg_background_intensity: list[float]
    anisotropy: float = 1.0
    pixel_size: list[float] | None = None
    max_image_shape: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def crop_size_rule(
    avg_extent: Sequence[float], std_extent: Sequence[float], n_sigma: float = 5.0
) -> list[int]:
    """Upstream notebooks' crop: ``round_up_8(mean + n_sigma * std)`` per axis, y = x = the larger one."""
    crop = [round_up_8(a + n_sigma * s) for a, s in zip(avg_extent, std_extent, strict=True)]
    crop[-2:] = [max(crop[-2:])] * 2
    return crop


# Images at most this many times the crop along an axis are trained whole along it (grow_crop_to_images).
WHOLE_IMAGE_FACTOR = 1.5


def grow_crop_to_images(crop: Sequence[int], max_image_shape: Sequence[int]) -> list[int]:
    """The training crop: ``crop`` grown to the largest image (rounded up to 8) along the axes where that
    image is at most :data:`WHOLE_IMAGE_FACTOR` times the crop; y and x together, so they stay equal.

    A network trained on crops a little smaller than the images meets, in every image it segments, wider
    context than it ever saw. On DSB tiles (64 px crops of 96 px images) the outer taps dilated 4 at 1/8
    read image data at 50 % of the positions in a crop and 67 % in an image, too close for
    ``dilation.py`` to switch them off, and one seed in twenty learned seeds with bandwidths of hundreds
    of pixels on background that only the whole tiles show (test AP@0.5 0.526; segmented in 64 px tiles,
    0.800). Trained on the whole 96 px tiles instead, that seed gave 0.867, none of the 20 seeds grew such
    labels, and the mean over the 20 rose from 0.803 to 0.861 (benchmarks/results/train_seeds_crop96.md).
    The cost is at most 1.5^2 = 2.25 times the pixels per step in 2D (measured on DSB: 2.1x the time).
    Larger images keep the crop; there ``dilation.py`` switches off the taps that differ.
    """
    out = [int(c) for c in crop]
    image = [int(n) for n in max_image_shape]
    if max(image[-2:]) <= WHOLE_IMAGE_FACTOR * out[-1]:
        out[-2:] = [max(out[-1], round_up_8(max(image[-2:])))] * 2
    if len(out) == 3 and image[0] <= WHOLE_IMAGE_FACTOR * out[0]:
        out[0] = max(out[0], round_up_8(image[0]))
    return out


def compute_properties(
    samples: Sequence[Sample],
    n_sigma: float = 5.0,
    pixel_size: Sequence[float] | None = None,
    anisotropy: float | None = None,
    foreground_weight: float | None = None,
) -> DataProperties:
    """Data properties as upstream computes them, from the annotated samples (train + val).

    * extents: per object ``max - min`` per axis; crop per axis ``round_up_8(mean + n_sigma * std)``;
      2D square (max of y, x); 3D ``y = x`` = max of the two, z on its own;
    * ``foreground_weight``: 10 in 2D, in 3D the mean over masks of ``#background / #foreground``;
    * ``pixel_size``/``anisotropy`` (z / x): the arguments win over the files' metadata; a warning when
      the files disagree with each other or with the arguments. Unknown anisotropy is 1.
    """
    samples = [s for s in samples if s.mask is not None]
    if not samples:
        raise InputError("no annotated images to compute data properties from")
    ndim = samples[0].ndim
    extents, sizes, fg_ratios, bg_means = [], [], [], []
    for s in samples:
        boxes = [b for b in ndimage.find_objects(s.mask) if b is not None]
        extents += [[sl.stop - sl.start - 1 for sl in b] for b in boxes]
        counts = np.bincount(s.mask.ravel())
        sizes += [int(c) for c in counts[1:] if c > 0]
        n_fg = int(counts[1:].sum())
        if n_fg:
            fg_ratios.append((s.mask.size - n_fg) / n_fg)
        bg = s.mask == 0
        if bg.any():
            bg_means.append([float(ch[bg].mean()) for ch in s.image])
    if not sizes:
        raise InputError(f"no objects in the masks of {len(samples)} image(s), e.g. {samples[0].mask_path}")
    ext = np.asarray(extents, dtype=np.float64)
    avg, std = ext.mean(axis=0), ext.std(axis=0)
    crop = crop_size_rule(avg, std, n_sigma)
    if foreground_weight is None:
        foreground_weight = 10.0 if ndim == 2 else float(np.mean(fg_ratios))
    px = _common_pixel_size(samples, ndim, pixel_size)
    if anisotropy is None:
        anisotropy = px[0] / px[-1] if (px is not None and ndim == 3) else 1.0
        if ndim == 3 and px is None:
            warnings.warn(
                "3D data without pixel size: assuming isotropic voxels (anisotropy 1)", stacklevel=2
            )
    return DataProperties(
        ndim=ndim,
        in_channels=samples[0].in_channels,
        n_images=len(samples),
        n_objects=len(sizes),
        crop_size=crop,
        crop_n_sigma=float(n_sigma),
        foreground_weight=float(foreground_weight),
        min_object_size=int(min(sizes)),
        mean_object_size=float(np.mean(sizes)),
        max_object_size=int(max(sizes)),
        avg_extent=avg.tolist(),
        std_extent=std.tolist(),
        max_extent=ext.max(axis=0).astype(int).tolist(),
        avg_background_intensity=np.mean(bg_means, axis=0).tolist() if bg_means else [],
        anisotropy=float(anisotropy),
        pixel_size=None if px is None else [float(p) for p in px],
        max_image_shape=np.max([s.shape for s in samples], axis=0).tolist(),
    )


def _common_pixel_size(samples: Sequence[Sample], ndim: int, option: Sequence[float] | None) -> tuple | None:
    """The option when given, else the pixel size most files state; warns about disagreements."""
    found = Counter(tuple(round(p, 9) for p in s.pixel_size) for s in samples if s.pixel_size is not None)
    if option is not None:
        option = tuple(float(p) for p in option)
        if len(option) != ndim or not all(math.isfinite(p) and p > 0 for p in option):
            raise InputError(f"pixel_size needs {ndim} positive values in array order, got {list(option)}")
        others = [p for p in found if not np.allclose(p, option)]
        if others:
            warnings.warn(
                f"pixel size {list(option)} given; the files say {others} (using the option)", stacklevel=3
            )
        return option
    if not found:
        return None
    common = found.most_common(1)[0][0]
    if len(found) > 1:
        warnings.warn(f"images disagree on the pixel size {dict(found)}; using {list(common)}", stacklevel=3)
    return common


# ----------------------------------------------------------------------------------------------------
# crops on the fly


def worker_init_fn(worker_id: int) -> None:
    """DataLoader workers: one torch thread each (items draw their own seeded generators)."""
    torch.set_num_threads(1)
    # forked workers inherit one global numpy state; reseed it for any code that still uses it
    np.random.seed((torch.initial_seed() + worker_id) % 2**32)  # noqa: NPY002


class CropDataset(torch.utils.data.Dataset):
    """Object-centred crops cut on the fly from images held in memory (normalised once, whole image).

    Item ``i`` of epoch ``e`` draws its own generator from ``(seed, e, i)``: reproducible for a seed and
    independent of the number of workers. It picks an object (``sampling="random"``: uniformly over all
    objects, with replacement, as upstream; ``"all"``: object ``i``), cuts ``crop_size`` around the
    object's centroid, shifted to stay inside the image (``top = int(clip(c - crop/2, 0, size - crop))``;
    with ``jitter`` the centroid first moves by up to that share of the crop per axis, drawn per item),
    and returns a dict of tensors:

    * ``image`` float32 ``(C, *crop)``; ``instance`` int64 ``(*crop)``, 0 background, objects 1..m;
    * ``center`` bool ``(*crop)``: one pixel per object visible in the crop, the centre (``center``
      method) of its visible part, anisotropy-aware;
    * ``name`` (image stem) and ``object`` (global object index).

    With ``augment`` one symmetry is applied to all three: 2D the dihedral group D4 (8 elements); 3D
    90 degree turns in YX and flips of y and z (16 elements; only 180 degree turns when crop y != x).
    Call :meth:`set_epoch` before each epoch (the value is shared with persistent workers).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        crop_size: int | Sequence[int],
        norm: Normalization | None = None,
        center: str = "medoid",
        augment: bool = True,
        seed: int = 0,
        anisotropy: float = 1.0,
        length: int | None = None,
        sampling: str = "random",
        jitter: float = 0.0,
    ) -> None:
        samples = list(samples)
        if not samples:
            raise InputError("CropDataset needs at least one sample")
        unlabelled = [str(s.image_path) for s in samples if s.mask is None]
        if unlabelled:
            raise InputError(f"CropDataset needs masks; none for: {', '.join(unlabelled)}")
        self.ndim = samples[0].ndim
        if any(s.ndim != self.ndim for s in samples) or any(
            s.in_channels != samples[0].in_channels for s in samples
        ):
            raise InputError("CropDataset samples must share ndim and the number of channels")
        if center not in CENTRE_METHODS:
            raise ValueError(f"center must be one of {CENTRE_METHODS}, got {center!r}")
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        crop = [int(crop_size)] * self.ndim if np.isscalar(crop_size) else [int(c) for c in crop_size]
        if len(crop) != self.ndim or min(crop) < 1:
            raise ValueError(f"crop_size needs {self.ndim} positive sizes (array order), got {crop_size}")
        self.crop_size = crop
        self.in_channels = samples[0].in_channels
        self.norm = norm or Normalization()
        self.center = center
        self.augment = augment
        self.seed = int(seed)
        self.sampling = sampling
        if not 0.0 <= jitter <= 0.5:
            raise ValueError(f"jitter must be within [0, 0.5] of the crop, got {jitter}")
        self.jitter = float(jitter)
        self.scale = (float(anisotropy), 1.0, 1.0)[-self.ndim :]  # z (3D only), y, x
        self.names = [s.name for s in samples]
        self.images, self.masks = [], []
        image_of, id_of, centroids, boxes = [], [], [], []
        self.first_object = []  # object index of label 1 of each image (masks hold labels 1..K)
        for i, s in enumerate(samples):
            image, mask = _pad_to(normalize(s.image, self.norm, channel_axis=0), _relabel(s.mask), crop)
            self.images.append(image)
            self.masks.append(mask)
            self.first_object.append(len(id_of))
            n = int(mask.max(initial=0))
            if n:
                ids = np.arange(1, n + 1)
                centroids += ndimage.center_of_mass(mask > 0, mask, ids)
                boxes += [[(b.start, b.stop) for b in box] for box in ndimage.find_objects(mask, n)]
                image_of += [i] * n
                id_of += ids.tolist()
        if not id_of:
            raise InputError(
                f"no objects in the masks of {len(samples)} image(s), e.g. {samples[0].mask_path}"
            )
        self.object_image = np.array(image_of, dtype=np.int64)
        self.object_id = np.array(id_of, dtype=np.int64)
        self.object_centroid = np.array(centroids, dtype=np.float64)
        self.object_box = np.array(boxes, dtype=np.int64)  # (n, ndim, 2): start, stop per axis
        self.length = len(id_of) if length is None else int(length)
        self._warn_large_objects(samples)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        # (object, window start) -> (visible ids, centres)
        self._targets: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._full_centres: dict[int, np.ndarray] = {}  # object -> centre of the whole object (image coords)

    @property
    def n_objects(self) -> int:
        return len(self.object_id)

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def _warn_large_objects(self, samples: Sequence[Sample]) -> None:
        extent = self.object_box[:, :, 1] - self.object_box[:, :, 0]
        large = np.flatnonzero((extent > self.crop_size).any(axis=1))
        if len(large):
            obj = large[0]
            where = f"{samples[self.object_image[obj]].mask_path} id {self.object_id[obj]}"
            warnings.warn(
                f"{len(large)} object(s) larger than the crop {self.crop_size}; training sees parts of "
                f"them (e.g. {where} box {extent[obj].tolist()})",
                stacklevel=3,
            )

    def window(self, obj: int, shift: Sequence[float] | None = None) -> tuple[slice, ...]:
        """The crop window of object ``obj``: centred on its centroid moved by ``shift`` (fractions of the
        crop per axis), shifted to stay inside the image."""
        shape = self.masks[self.object_image[obj]].shape
        shift = [0.0] * self.ndim if shift is None else shift
        tops = [
            int(np.clip(c - k / 2 + f * k, 0, n - k))
            for c, k, n, f in zip(self.object_centroid[obj], self.crop_size, shape, shift, strict=True)
        ]
        return tuple(slice(t, t + k) for t, k in zip(tops, self.crop_size, strict=True))

    def crop(
        self, obj: int, shift: Sequence[float] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image, relabelled instance and centre image of object ``obj``'s crop (moved by ``shift``, see
        :meth:`window`), before augmentation."""
        window = self.window(obj, shift)
        image_index = self.object_image[obj]
        image = self.images[image_index][(slice(None), *window)]
        labels = self.masks[image_index][window]
        key = (obj, tuple(w.start for w in window))
        cached = self._targets.get(key)  # a window's targets never change: cache them
        if cached is None:
            ids = np.unique(labels)
            ids = ids[ids > 0]
            instance = _relabel_with(labels, ids)
            cached = self._targets[key] = (ids, self._visible_centres(instance, ids, image_index, window))
        else:
            instance = _relabel_with(labels, cached[0])
        centres = cached[1]
        centre = np.zeros(self.crop_size, dtype=bool)
        if len(centres):
            centre[tuple(centres.T)] = True
        return image, instance, centre

    def _visible_centres(
        self, instance: np.ndarray, ids: np.ndarray, image_index: int, window: tuple[slice, ...]
    ) -> np.ndarray:
        """Centre of the visible part of each object of the crop (crop coordinates, ordered as ``ids``).

        An object wholly inside the window is its own visible part: its centre is computed once for all
        the crops it appears in.
        """
        top = np.array([w.start for w in window])
        stop = np.array([w.stop for w in window])
        out = []
        for k, box in enumerate(ndimage.find_objects(instance, len(ids)), start=1):
            obj = self.first_object[image_index] + int(ids[k - 1]) - 1
            full = self.object_box[obj]
            if np.all(full[:, 0] >= top) and np.all(full[:, 1] <= stop):
                if obj not in self._full_centres:
                    coords = np.argwhere(instance[box] == k) + [b.start for b in box] + top
                    self._full_centres[obj] = object_centre(coords, self.center, self.scale)
                out.append(self._full_centres[obj] - top)
            else:
                coords = np.argwhere(instance[box] == k) + [b.start for b in box]
                out.append(object_centre(coords, self.center, self.scale))
        return np.array(out, dtype=np.int64).reshape(-1, self.ndim)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        rng = np.random.default_rng([self.seed, int(self._epoch), int(index)])
        obj = int(rng.integers(self.n_objects)) if self.sampling == "random" else index % self.n_objects
        shift = rng.uniform(-self.jitter, self.jitter, self.ndim) if self.jitter else None
        image, instance, centre = self.crop(obj, shift)
        if self.augment:
            image, instance, centre = _augment(rng, self.ndim, image, instance, centre)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "instance": torch.from_numpy(np.ascontiguousarray(instance)),
            "center": torch.from_numpy(np.ascontiguousarray(centre)),
            "name": self.names[self.object_image[obj]],
            "object": obj,
        }


def _relabel_with(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``labels`` with ``ids[j]`` -> ``j + 1`` and everything else -> 0, as int64."""
    lut = np.zeros(int(ids[-1]) + 1 if len(ids) else 1, dtype=np.int64)
    lut[ids] = np.arange(1, len(ids) + 1)
    return lut[labels]


def _pad_to(image: np.ndarray, mask: np.ndarray, crop: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Pad (split around the image) so every spatial axis is at least the crop; image with background."""
    pads = [
        ((max(k - n, 0)) // 2, max(k - n, 0) - max(k - n, 0) // 2)
        for n, k in zip(mask.shape, crop, strict=True)
    ]
    if not any(a or b for a, b in pads):
        return image, mask
    bg = mask == 0
    fill = [float(ch[bg].mean()) if bg.any() else 0.0 for ch in image]
    padded = np.stack([np.pad(ch, pads, constant_values=v) for ch, v in zip(image, fill, strict=True)])
    return padded.astype(np.float32), np.pad(mask, pads)


def _augment(
    rng: np.random.Generator, ndim: int, image: np.ndarray, instance: np.ndarray, centre: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One random symmetry, applied alike to ``image`` (C, *S) and the spatial maps."""
    square = instance.shape[-1] == instance.shape[-2]
    k = int(rng.integers(4)) if square else 2 * int(rng.integers(2))
    flips = [ndim - 2] if rng.random() < 0.5 else []  # y
    if ndim == 3 and rng.random() < 0.5:
        flips.append(0)  # z

    def apply(a: np.ndarray, offset: int) -> np.ndarray:
        a = np.rot90(a, k, axes=(offset + ndim - 2, offset + ndim - 1))
        return np.flip(a, axis=[offset + f for f in flips]) if flips else a

    return apply(image, 1), apply(instance, 0), apply(centre, 0)
