"""napari reader for the label images `embedseg-run predict` writes: TIFFs carrying its provenance tag.

Other TIFFs are left to napari's own readers (``get_reader`` returns None for them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io import read_provenance, read_tiff, tiff_stem


def get_reader(path: str | list[str]):
    """The reader for ``path`` when it is a label image of ours, else None."""
    if isinstance(path, list | tuple):
        if len(path) != 1:
            return None
        path = path[0]
    if Path(path).suffix.lower() not in (".tif", ".tiff") or read_provenance(path) is None:
        return None
    return read_labels


def read_labels(path: str | list[str]) -> list[tuple[Any, dict[str, Any], str]]:
    """A Labels layer with the file's pixel size as scale and the settings it was made with as metadata."""
    path = Path(path[0] if isinstance(path, list | tuple) else path)
    tif = read_tiff(path)
    meta: dict[str, Any] = {
        "name": f"{tiff_stem(path)} labels",
        "metadata": {"embedseg": read_provenance(path)},
    }
    if tif.pixel_size:
        meta["scale"] = list(tif.pixel_size)
    return [(tif.data, meta, "labels")]
