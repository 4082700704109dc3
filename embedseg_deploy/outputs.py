"""Where label images go and in what form: TIFF or an OME-Zarr label image, dtype, pixel size.

Shared by whole-image prediction (:mod:`embedseg_deploy.predict`) and block mode
(:mod:`embedseg_deploy.bigimage`); it depends on neither.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .io import write_tiff_atomic
from .sources import ZARR_SUFFIXES


def label_dtype(n_objects: int) -> np.dtype:
    """uint16 while ids fit (Fiji/napari read it everywhere), uint32 beyond 65535 objects."""
    return np.dtype(np.uint16) if n_objects <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def output_pixel_size(pixel_size: Sequence[float] | None, ndim: int) -> list[float] | None:
    """The input's pixel size when it covers every spatial axis (TIFF cannot store a partial one)."""
    if pixel_size is None or len(pixel_size) != ndim:
        return None
    values = [float(p) for p in pixel_size]
    return values if all(math.isfinite(v) and v > 0 for v in values) else None


def is_zarr_output(path: str | os.PathLike) -> bool:
    """Labels go to an OME-Zarr store when the output path ends in ``.zarr``."""
    return Path(path).suffix.lower() in ZARR_SUFFIXES


def write_labels_file(
    path: Path,
    labels: np.ndarray,
    pixel_size: Sequence[float] | None,
    provenance: dict[str, Any] | None,
    source_image: Path | None = None,
) -> None:
    """Labels to ``path`` atomically: an OME-Zarr label image for ``*.zarr``, else a TIFF."""
    if not is_zarr_output(path):
        write_tiff_atomic(path, labels, pixel_size=pixel_size, overwrite=True, provenance=provenance)
        return
    from .ngff import write_labels

    source = None
    if source_image is not None:
        source = os.path.relpath(source_image.resolve(), path.resolve().parent)
    write_labels(
        path, lambda index: labels[index], labels.shape, labels.dtype, pixel_size, provenance, source,
        overwrite=True,
    )  # fmt: skip
