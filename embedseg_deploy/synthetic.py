"""Synthetic microscopy-like images with instance labels, 2D and 3D through one code path (numpy + scipy).

Objects are ellipses/ellipsoids of random size, elongation, orientation and brightness; some are placed
against an existing object (touching, with a shared boundary) and the rest apart. Pixels where objects
overlap go to the object whose normalised distance ``|A (x - c)|`` is smaller, so touching objects meet
along a clean boundary. The image adds dim rims, a smooth texture, a background gradient, Gaussian blur
and Poisson + Gaussian noise. ``anisotropy`` is the z voxel size in units of the y/x pixel: objects are
round in physical space and therefore look flattened along z in voxels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from .io import write_tiff_atomic

SPLIT_SIZES = {"train": 12, "val": 3, "test": 2}


def make_image(
    shape: Sequence[int],
    n_objects: int,
    rng: np.random.Generator,
    radius: tuple[float, float] = (7.0, 13.0),
    anisotropy: float = 1.0,
    touching_fraction: float = 0.4,
    rim: float = 0.4,
    texture: float = 0.2,
    gradient: float = 0.5,
    blur: float = 1.0,
    background: float = 100.0,
    brightness: float = 1500.0,
    read_noise: float = 5.0,
    min_pixels: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint16) and its instance labels (uint16, 0 background, objects 1..K).

    ``radius`` bounds the semi-axes in y/x pixels; ``touching_fraction`` of the objects are placed against
    an earlier one. ``rim`` dims the object border (0..1), ``texture`` is the relative amplitude of a
    smooth intensity texture, ``gradient`` the relative change of the background across the image.
    Fewer than ``n_objects`` may result when the image is crowded (separate objects need free space).
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if ndim not in (2, 3):
        raise ValueError(f"shape must be 2D or 3D, got {shape}")
    spacing = np.array([anisotropy, 1.0, 1.0][-ndim:])  # physical size of a voxel step: z, y, x
    extent = np.array(shape) * spacing  # physical size
    labels = np.zeros(shape, dtype=np.int32)
    best = np.full(shape, np.inf, dtype=np.float32)  # normalised squared distance of the current owner
    placed: list[tuple[np.ndarray, np.ndarray]] = []  # (centre, A) with q(x) = |A (x - c)|^2
    for k in range(1, n_objects + 1):
        a_inv = _shape_matrix(rng, ndim, radius)
        touching = placed and rng.random() < touching_fraction
        for _ in range(20):
            if touching:
                c_other, a_other = placed[int(rng.integers(len(placed)))]
                u = _unit(rng, ndim)
                reach = 1 / np.linalg.norm(a_other @ u) + 1 / np.linalg.norm(a_inv @ u)
                centre = c_other + u * reach * rng.uniform(0.75, 0.95)
                if np.all((centre >= 0) & (centre < extent)):
                    break
            else:
                centre = rng.uniform(0, extent)
                box, q = _quadric(centre, a_inv, spacing, shape, grow=1.4)
                if not np.any(labels[box][q < 1.0]):
                    break
        else:
            continue
        box, q = _quadric(centre, a_inv, spacing, shape)
        take = (q < 1.0) & (q < best[box])
        labels[box][take] = k
        best[box][take] = q[take]
        placed.append((centre, a_inv))
    labels = _clean(labels, min_pixels)
    image = _render(
        labels, best, rng, spacing, rim, texture, gradient, blur, background, brightness, read_noise
    )
    return image, labels.astype(np.uint16)


def _unit(rng: np.random.Generator, ndim: int) -> np.ndarray:
    v = rng.normal(size=ndim)
    return v / np.linalg.norm(v)


def _shape_matrix(rng: np.random.Generator, ndim: int, radius: tuple[float, float]) -> np.ndarray:
    """``A = diag(1/semi-axes) R^T`` for a random rotation R (physical units)."""
    axes = rng.uniform(radius[0], radius[1], size=ndim)
    q, r = np.linalg.qr(rng.normal(size=(ndim, ndim)))
    rot = q * np.sign(np.diag(r))
    return np.diag(1.0 / axes) @ rot.T


def _quadric(
    centre: np.ndarray, a_inv: np.ndarray, spacing: np.ndarray, shape: tuple[int, ...], grow: float = 1.0
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Bounding box (voxels) of the ellipsoid grown by ``grow`` and ``|A (x - c)|^2`` on it."""
    half = grow * np.linalg.norm(np.linalg.inv(a_inv), axis=1) / spacing  # semi-extent per axis, voxels
    c_vox = centre / spacing
    lo = np.clip(np.floor(c_vox - half).astype(int), 0, shape)
    hi = np.clip(np.ceil(c_vox + half).astype(int) + 1, 0, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    grids = np.meshgrid(
        *[np.arange(a, b) * s - c for a, b, s, c in zip(lo, hi, spacing, centre, strict=True)], indexing="ij"
    )
    d = np.stack(grids, axis=-1) @ a_inv.T
    return box, ((d * d).sum(axis=-1) / grow**2).astype(np.float32)


def _clean(labels: np.ndarray, min_pixels: int) -> np.ndarray:
    """Keep each object's largest connected part, drop tiny ones, renumber 1..K."""
    out = np.zeros_like(labels)
    n = 0
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        parts, count = ndimage.label(labels[box] == k)
        if count == 0:
            continue
        sizes = np.bincount(parts.ravel())[1:]
        if sizes.max() < min_pixels:
            continue
        n += 1
        out[box][parts == 1 + int(np.argmax(sizes))] = n
    return out


def _render(
    labels: np.ndarray,
    q: np.ndarray,
    rng: np.random.Generator,
    spacing: np.ndarray,
    rim: float,
    texture: float,
    gradient: float,
    blur: float,
    background: float,
    brightness: float,
    read_noise: float,
) -> np.ndarray:
    shape = labels.shape
    level = np.concatenate([[0.0], rng.uniform(0.35, 1.0, size=int(labels.max()))])
    inside = labels > 0
    signal = np.zeros(shape, dtype=np.float32)
    signal[inside] = level[labels[inside]] * (1.0 - rim * np.clip(q[inside], 0, 1) ** 2)
    if texture:
        noise = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 2.0 / spacing)
        signal *= 1.0 + texture * noise / (noise.std() + 1e-12)
    coords = np.meshgrid(*[np.linspace(-0.5, 0.5, n) for n in shape], indexing="ij")
    ramp = sum(u * c for u, c in zip(_unit(rng, labels.ndim), coords, strict=True))
    image = background * (1.0 + gradient * ramp) + brightness * signal
    if blur:
        image = ndimage.gaussian_filter(image, blur / spacing)
    image = rng.poisson(np.clip(image, 0, None)) + rng.normal(0.0, read_noise, size=shape)
    return np.clip(np.round(image), 0, 65535).astype(np.uint16)


def write_dataset(
    root: str | os.PathLike,
    ndim: int = 2,
    n_train: int = SPLIT_SIZES["train"],
    n_val: int = SPLIT_SIZES["val"],
    n_test: int = SPLIT_SIZES["test"],
    shape: Sequence[int] | None = None,
    n_objects: tuple[int, int] | None = None,
    seed: int = 0,
    anisotropy: float = 1.0,
    pixel_size: float = 1.0,
    radius: tuple[float, float] | None = None,
    overwrite: bool = False,
    **image_options,
) -> Path:
    """Write ``root/{train,val,test}/{images,masks}/imgNNN.tif`` (the EmbedSeg layout); same seed, same files.

    Defaults follow the upstream fixtures: 2D 256 x 256 with 20-60 objects of semi-axis 7-13 px; 3D
    32 x 96 x 96 with 10-20 objects of semi-axis 7-11 px. ``pixel_size`` is the y/x pixel in microns;
    the z voxel is ``pixel_size * anisotropy``. Both go into the files' metadata.
    """
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    root = Path(root)
    shape = tuple(shape) if shape is not None else ((256, 256) if ndim == 2 else (32, 96, 96))
    if len(shape) != ndim:
        raise ValueError(f"shape {shape} is not {ndim}D")
    n_objects = n_objects or ((20, 60) if ndim == 2 else (10, 20))
    radius = radius or ((7.0, 13.0) if ndim == 2 else (7.0, 11.0))
    px = (pixel_size * anisotropy, pixel_size, pixel_size)[-ndim:]
    for split_index, (split, count) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        if count <= 0:
            continue
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = np.random.default_rng([seed, split_index, i])
            n = int(rng.integers(n_objects[0], n_objects[1] + 1))
            image, labels = make_image(shape, n, rng, radius=radius, anisotropy=anisotropy, **image_options)
            name = f"img{i:03d}.tif"
            write_tiff_atomic(root / split / "images" / name, image, px, overwrite=overwrite)
            write_tiff_atomic(root / split / "masks" / name, labels, px, overwrite=overwrite)
    return root


def ideal_output(
    shape: Sequence[int],
    n_objects: int,
    radius: float,
    spacing: float = 1 / 1023,
    *,
    jitter_px: float = 0.3,
    rng: np.random.Generator | int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic "ideal" raw network output and its ground-truth labels (int32).

    Objects are discs (2D) or balls (3D) of ``radius`` px at random, non-overlapping places (cells of a
    jittered grid). Offsets point every object pixel to its centre (``atanh`` of the needed shift, plus
    ``jitter_px`` Gaussian noise), the sigma logits put phi = 0.5 at 1.5 radii, and the seed logits are
    high near centres, positive on the object and -6 on the background.
    """
    rng = np.random.default_rng(rng)
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    pitch = 2 * radius + 2
    cells = [int(s // pitch) for s in shape]
    if n_objects > int(np.prod(cells)):
        raise ValueError(f"{n_objects} objects of radius {radius} do not fit in {shape}")
    pick = rng.choice(int(np.prod(cells)), n_objects, replace=False)
    centres = (np.stack(np.unravel_index(pick, cells), 1) + 0.5) * pitch + rng.uniform(
        -1, 1, (n_objects, ndim)
    )
    raw = np.zeros((2 * ndim + 1, *shape), np.float32)
    raw[-1] = -6.0
    sigma_logit = np.log(np.log(2) / (1.5 * radius * spacing) ** 2) / 10
    raw[ndim : 2 * ndim] = sigma_logit
    labels = np.zeros(shape, np.int32)
    r = int(np.ceil(radius))
    offs = np.stack(np.meshgrid(*[np.arange(-r, r + 1)] * ndim, indexing="ij"), 0).reshape(ndim, -1)
    for k, c in enumerate(centres, start=1):
        p = np.round(c).astype(int)[:, None] + offs  # pixels of the bounding box, array order
        d2 = ((p - c[:, None]) ** 2).sum(0)
        keep = (d2 <= radius**2) & np.all((p >= 0) & (p < np.array(shape)[:, None]), 0)
        p, d2 = p[:, keep], d2[keep]
        target = c[:, None] + rng.normal(0, jitter_px, p.shape)
        shift = (target - p) * spacing  # array order
        idx = tuple(p)
        for d in range(ndim):  # offset channel d pairs with array axis ndim-1-d
            raw[(d, *idx)] = np.arctanh(shift[ndim - 1 - d])
        raw[(-1, *idx)] = 6.0 * (1 - d2 / radius**2) + 0.5
        labels[idx] = k
    return raw, labels
