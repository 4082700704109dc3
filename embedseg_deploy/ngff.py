"""OME-NGFF metadata and images: the attributes that make a Zarr group an OME-Zarr image (0.4 or 0.5).

Pure metadata builders plus :func:`write_image`, which the tests and benchmarks use to make OME-Zarr inputs
and users can call to convert a TIFF. Reading is :class:`embedseg_deploy.sources.ZarrSource`.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

VERSIONS = ("0.4", "0.5")
_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


def axes_entries(axes: str) -> list[dict[str, str]]:
    """NGFF ``axes`` for tifffile-style letters (``CZYX``); space axes in micrometres."""
    out = []
    for letter in axes.lower():
        if letter not in _TYPES:
            raise ValueError(f"axes {axes!r}: NGFF images take t, c, z, y, x only")
        entry = {"name": letter, "type": _TYPES[letter]}
        if entry["type"] == "space":
            entry["unit"] = "micrometer"
        out.append(entry)
    return out


def multiscale(
    axes: str,
    pixel_size: Sequence[float] | None,
    levels: int = 1,
    downscale: Sequence[int] | None = None,
    version: str = "0.5",
    name: str = "image",
) -> dict[str, Any]:
    """One NGFF ``multiscales`` entry: levels ``"0"``, ``"1"``, ... each ``downscale`` times coarser in
    space (default 2 in y and x); ``pixel_size`` in micrometres per spatial axis (default 1)."""
    if version not in VERSIONS:
        raise ValueError(f"NGFF version {version!r}: this writer makes {' or '.join(VERSIONS)}")
    letters = axes.lower()
    spatial = [k for k, a in enumerate(letters) if _TYPES.get(a) == "space"]
    px = list(pixel_size) if pixel_size is not None else [1.0] * len(spatial)
    if len(px) != len(spatial):
        raise ValueError(f"pixel size {px} does not match the {len(spatial)} spatial axes of {axes!r}")
    step = list(downscale) if downscale is not None else [1 if a == "z" else 2 for a in letters if a in "zyx"]
    datasets = []
    for level in range(levels):
        scale = [1.0] * len(letters)
        for k, size, f in zip(spatial, px, step, strict=True):
            scale[k] = float(size * f**level)
        datasets.append(
            {"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        )
    entry: dict[str, Any] = {"name": name, "axes": axes_entries(axes), "datasets": datasets}
    if version == "0.4":
        entry["version"] = "0.4"
    return entry


def group_attrs(entry: dict[str, Any], version: str = "0.5") -> dict[str, Any]:
    """Group attributes holding ``entry``: under ``ome`` in 0.5, at the top in 0.4."""
    if version == "0.5":
        return {"ome": {"version": "0.5", "multiscales": [entry]}}
    return {"multiscales": [entry]}


def write_image(
    path: str | os.PathLike,
    data: np.ndarray,
    axes: str,
    pixel_size: Sequence[float] | None = None,
    chunks: Sequence[int] | None = None,
    version: str = "0.5",
    levels: int = 1,
) -> None:
    """Write ``data`` as an OME-Zarr image (level 0 full resolution; ``levels - 1`` coarser levels made by
    striding, enough for tests and previews). Zarr v3 for NGFF 0.5, v2 for 0.4."""
    import zarr

    if len(axes) != data.ndim:
        raise ValueError(f"axes {axes!r} do not match data of {data.ndim} dimensions")
    entry = multiscale(axes, pixel_size, levels, version=version)
    fmt = 3 if version == "0.5" else 2
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    step = [2 if a in "yx" else 1 for a in axes.lower()]
    for level in range(levels):
        level_data = data[tuple(slice(None, None, s**level) for s in step)]
        kwargs: dict[str, Any] = {}
        if fmt == 3:
            kwargs["dimension_names"] = list(axes.lower())
        group.create_array(
            str(level),
            data=np.ascontiguousarray(level_data),
            chunks=tuple(chunks) if chunks is not None else "auto",
            **kwargs,
        )
    group.attrs.update(group_attrs(entry, version))


LABELS_KEY = "embedseg-deploy"  # our provenance in the labels' attributes (model sha256, settings)


def label_chunks(shape: Sequence[int]) -> tuple[int, ...]:
    """Chunks of about 1 M labels: 1024^2 in 2D, 64 x 128^2 in 3D (clipped to the image)."""
    target = (1024, 1024) if len(shape) == 2 else (64, 128, 128)
    return tuple(min(int(n), t) for n, t in zip(shape, target, strict=True))


def write_labels(
    path: str | os.PathLike,
    read: Any,
    shape: Sequence[int],
    dtype: Any,
    pixel_size: Sequence[float] | None = None,
    provenance: dict[str, Any] | None = None,
    source_image: str | None = None,
    version: str = "0.5",
    overwrite: bool = False,
) -> None:
    """Write labels as an OME-Zarr label image at ``path``, atomically: into a hidden folder beside it,
    renamed onto ``path`` when complete (a reader never sees half a store).

    ``read(index)`` gives the labels of ``index`` (a slice for each axis but the last, which it reads
    whole), so the labels need not fit in memory. The image carries NGFF ``image-label`` metadata
    (background transparent, ``source`` pointing at ``source_image``), the pixel size, and
    ``provenance`` under :data:`LABELS_KEY`. Chunked and compressed (Zarr's default codec).
    """
    import shutil
    import uuid
    from pathlib import Path

    import zarr

    from .io import DiskFullError, is_disk_full

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists (pass overwrite=True to replace it)")
    axes = "YX" if len(shape) == 2 else "ZYX"
    entry = multiscale(axes, pixel_size, 1, version=version, name=path.name)
    label_meta: dict[str, Any] = {"colors": [{"label-value": 0, "rgba": [0, 0, 0, 0]}]}
    if source_image is not None:
        label_meta["source"] = {"image": source_image}
    attrs = group_attrs(entry, version)
    if version == "0.5":
        attrs["ome"]["image-label"] = label_meta
    else:
        attrs["image-label"] = {"version": "0.4", **label_meta}
    if provenance is not None:
        attrs[LABELS_KEY] = provenance
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    old = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.old.tmp"
    moved = False
    try:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3 if version == "0.5" else 2)
        chunks = label_chunks(shape)
        kwargs: dict[str, Any] = {"dimension_names": list(axes.lower())} if version == "0.5" else {}
        array = group.create_array("0", shape=tuple(shape), dtype=np.dtype(dtype), chunks=chunks, **kwargs)
        # a row of chunks at a time along every axis but the last: ~100 MB whatever the image's size
        rows = [range(0, n, c) for n, c in zip(shape[:-1], chunks[:-1], strict=True)]
        for starts in itertools.product(*rows):
            index = tuple(slice(a, min(a + c, n)) for a, c, n in zip(starts, chunks, shape, strict=False))
            array[index] = read(index)
        group.attrs.update(attrs)
        # a folder cannot be renamed over a non-empty one: the old store steps aside first, and comes
        # back if the new one cannot take its place
        if path.exists():
            os.replace(path, old)
            moved = True
        os.replace(tmp, path)
    except BaseException as exc:
        if moved and not path.exists():
            os.replace(old, path)
            moved = False
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise DiskFullError(path) from None
        raise
    finally:
        if moved:
            shutil.rmtree(old, ignore_errors=True)


def read_labels_info(path: str | os.PathLike) -> tuple[tuple[int, ...], dict[str, Any] | None] | None:
    """(shape, provenance) of a label image written by :func:`write_labels`; None when ``path`` is not a
    complete one."""
    try:
        import zarr

        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
        shape = tuple(int(s) for s in group["0"].shape)
    except Exception:
        return None
    if "image-label" not in attrs and "image-label" not in (attrs.get("ome") or {}):
        return None
    provenance = attrs.get(LABELS_KEY)
    return shape, provenance if isinstance(provenance, dict) else None
