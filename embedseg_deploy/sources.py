"""Image sources: a large image read region by region, whatever the format.

Block mode (:mod:`embedseg_deploy.bigimage`) reads through one interface, :class:`ImageSource`: the
source's ``shape``, ``dtype``, ``axes`` (upper-case letters as tifffile names them: ``ZYX``, ``CYX``),
``pixel_size`` (micrometres per spatial axis, or None) and ``read(index)``. Two formats provide it:

* TIFF (:class:`TiffSource`): memory-mapped where the data are uncompressed and contiguous, else page by
  page (one page per z-slice).
* OME-Zarr (:class:`ZarrSource`, NGFF 0.4 on Zarr v2 and 0.5 on Zarr v3; needs the ``zarr`` extra): one
  level of the multiscale pyramid (default 0, full resolution), axes from the NGFF ``axes``, pixel size
  from the level's ``scale`` transformations. Reads touch only the chunks of the region.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tifffile

from .io import InputError, series_note, tiff_pixel_size

ZARR_SUFFIXES = (".zarr",)
# NGFF unit names (UDUNITS-2) of length, in micrometres.
_UNITS_UM = {
    "angstrom": 1e-4,
    "nanometer": 1e-3,
    "micrometer": 1.0,
    "micron": 1.0,
    "millimeter": 1e3,
    "centimeter": 1e4,
    "meter": 1e6,
}
_AXIS_LETTERS = {"t": "T", "c": "C", "z": "Z", "y": "Y", "x": "X"}


class ImageSource(Protocol):
    """What block mode reads: a header and regions."""

    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    axes: str
    pixel_size: tuple[float, ...] | None
    note: str | None

    def read(self, index: Sequence[slice]) -> np.ndarray:
        """The region ``index`` (one slice per axis, steps of 1) as an in-memory array."""
        ...


def is_zarr(path: str | os.PathLike) -> bool:
    """A Zarr store on disk: a folder named ``*.zarr`` or holding Zarr metadata."""
    p = Path(path)
    if not p.is_dir():
        return False
    return p.suffix.lower() in ZARR_SUFFIXES or any(
        (p / name).is_file() for name in ("zarr.json", ".zgroup", ".zattrs")
    )


def open_source(path: str | os.PathLike, level: int = 0) -> ImageSource:
    """The image at ``path``: an OME-Zarr store (``level`` of its pyramid) or a TIFF file."""
    if is_zarr(path):
        return ZarrSource(path, level)
    if level != 0:
        raise InputError(f"{path}: --level applies to OME-Zarr images; a TIFF has one level")
    return TiffSource(path)


def _check_complete(path: Path, tif: tifffile.TiffFile, series: Any, dtype: np.dtype) -> None:
    """Every byte the header declares must be in the file (a memory map would fail or read past the end)."""
    size = path.stat().st_size
    offset = series.dataoffset
    if offset is not None:
        end = offset + math.prod(series.shape) * dtype.itemsize
        if end > size:
            raise InputError(
                f"{path}: truncated or corrupt TIFF (declared image {tuple(series.shape)} {dtype} ends at "
                f"byte {end}, the file has {size} bytes)"
            )
        return
    for page in series.pages:
        for off, count in zip(page.dataoffsets, page.databytecounts, strict=False):
            if count and off + count > size:
                raise InputError(
                    f"{path}: truncated or corrupt TIFF (pixel data end at byte {off + count}, "
                    f"the file has {size} bytes)"
                )


class TiffSource:
    """A TIFF's first series read region by region without loading the whole image.

    Memory-mapped when the file's data are uncompressed and contiguous; else page by page when every
    page holds one plane of the leading axes (a z-stack of compressed slices). Anything else (for example
    one huge compressed page) cannot be read lazily and raises, saying how to fix the file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(
                f"{self.path}: file not found" if not self.path.exists() else f"{self.path}: not a file"
            )
        try:
            with tifffile.TiffFile(self.path) as tif:
                if not tif.series:
                    raise InputError(f"{self.path}: TIFF holds no image data")
                series = tif.series[0]
                self.shape = tuple(int(s) for s in series.shape)
                self.dtype = np.dtype(series.dtype)
                self.axes = series.axes
                self.pixel_size = tiff_pixel_size(tif, series.axes)
                self.note = series_note(tif, self.path)
                self.n_pages = len(series.pages)
                offset = series.dataoffset
                _check_complete(self.path, tif, series, self.dtype)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(
                f"{self.path}: unreadable or corrupt TIFF ({type(exc).__name__}: {exc})"
            ) from None
        if self.dtype.kind not in "biuf" or 0 in self.shape:
            raise InputError(f"{self.path}: unsupported image {self.shape} {self.dtype}")
        self.mappable = offset is not None
        self.lead = 0
        if not self.mappable:
            n = 1
            for k, s in enumerate(self.shape):
                if n == self.n_pages:
                    self.lead = k
                    break
                n *= s
            if self.n_pages < 2 or self.lead == 0:
                raise InputError(
                    f"{self.path}: pixel data are compressed or not contiguous in one page, so the image "
                    "cannot be read block by block; save it as an uncompressed TIFF (or one page per "
                    "z-slice), or run without --block"
                )

    def read(self, index: Sequence[slice]) -> np.ndarray:
        """The region ``index`` (one slice per axis, steps of 1) as an in-memory array."""
        if self.mappable:
            mm = tifffile.memmap(self.path, mode="r")
            try:
                return np.array(mm[tuple(index)])
            finally:
                del mm
        lead_ranges = [
            range(*sl.indices(n)) for sl, n in zip(index[: self.lead], self.shape[: self.lead], strict=True)
        ]
        rest = tuple(index[self.lead :])
        out_shape = [len(r) for r in lead_ranges] + [
            len(range(*sl.indices(n))) for sl, n in zip(rest, self.shape[self.lead :], strict=True)
        ]
        out = np.empty(out_shape, self.dtype)
        with tifffile.TiffFile(self.path) as tif:
            pages = tif.series[0].pages
            for pos, lead_idx in enumerate(np.ndindex(*[len(r) for r in lead_ranges])):
                src = tuple(r[i] for r, i in zip(lead_ranges, lead_idx, strict=True))
                page = pages[int(np.ravel_multi_index(src, self.shape[: self.lead]))]
                out[np.unravel_index(pos, out.shape[: self.lead])] = page.asarray()[rest]
        return out


class ZarrSource:
    """One level of an OME-Zarr (NGFF 0.4 / 0.5) multiscale image.

    A time axis of length 1 is dropped; a longer one is refused (split the time points first). Only the
    first multiscale of the group is read, as viewers do.
    """

    def __init__(self, path: str | os.PathLike, level: int = 0):
        self.path = Path(path)
        try:
            import zarr
        except ImportError:
            raise InputError(
                f"{self.path}: reading OME-Zarr needs the zarr package: pip install 'embedseg-deploy[zarr]'"
            ) from None
        try:
            group = zarr.open_group(str(self.path), mode="r")
            attrs = dict(group.attrs)
        except Exception as exc:
            raise InputError(
                f"{self.path}: not a readable Zarr group ({type(exc).__name__}: {exc})"
            ) from None
        multiscale, self.version = ngff_multiscale(attrs, self.path)
        datasets = multiscale.get("datasets") or []
        if not datasets:
            raise InputError(f"{self.path}: NGFF multiscales lists no datasets (levels)")
        if not 0 <= level < len(datasets):
            raise InputError(
                f"{self.path}: level {level} does not exist; the image has levels 0 to {len(datasets) - 1}"
            )
        dataset = datasets[level]
        try:
            self._array = group[dataset["path"]]
        except Exception:
            raise InputError(
                f"{self.path}: level {level} ({dataset.get('path')!r}) is listed in the NGFF metadata but "
                "missing from the store"
            ) from None
        names, units = _axes(multiscale, self.path)
        shape = tuple(int(s) for s in self._array.shape)
        if len(names) != len(shape):
            raise InputError(
                f"{self.path}: NGFF axes {names} do not match the array's {len(shape)} dimensions {shape}"
            )
        scale = _scale(dataset, multiscale, len(shape), self.path)
        self._index: list[int | None] = []  # per array axis: None (kept) or the fixed index of a dropped one
        kept = []
        for name, n in zip(names, shape, strict=True):
            if name == "t":
                if n != 1:
                    raise InputError(
                        f"{self.path}: the image has {n} time points; segment one at a time (write each "
                        "time point as its own image)"
                    )
                self._index.append(0)
                continue
            self._index.append(None)
            kept.append(name)
        self.axes = "".join(_AXIS_LETTERS[n] for n in kept)
        self.shape = tuple(n for n, i in zip(shape, self._index, strict=True) if i is None)
        self.dtype = np.dtype(self._array.dtype)
        if self.dtype.kind not in "biuf" or 0 in self.shape:
            raise InputError(f"{self.path}: unsupported image {self.shape} {self.dtype}")
        self.level = level
        self.chunks = tuple(int(c) for c, i in zip(self._array.chunks, self._index, strict=True) if i is None)
        spatial = [k for k, name in enumerate(names) if name in "zyx"]
        self.pixel_size = _pixel_size([scale[k] for k in spatial], [units[k] for k in spatial])
        entries = (attrs.get("ome") or {}).get("multiscales") or attrs.get("multiscales") or []
        self.note = None
        if len(entries) > 1:
            self.note = f"{self.path}: the group holds several multiscale images; the first is used"

    def read(self, index: Sequence[slice]) -> np.ndarray:
        """The region ``index`` (over :attr:`shape`) as an in-memory array."""
        it = iter(index)
        full = tuple(next(it) if i is None else i for i in self._index)
        return np.asarray(self._array[full])


def ngff_multiscale(attrs: Mapping[str, Any], path: Path) -> tuple[dict[str, Any], str]:
    """The first multiscale entry of a group's attributes (NGFF 0.5 under ``ome``, 0.4 at the top) and
    its version."""
    ome = attrs.get("ome")
    if isinstance(ome, Mapping) and "multiscales" in ome:
        entries, version = ome["multiscales"], str(ome.get("version", "0.5"))
    elif "multiscales" in attrs:
        entries = attrs["multiscales"]
        version = str(entries[0].get("version", "0.4")) if entries else "0.4"
    else:
        what = "labels, not an image" if "image-label" in attrs or "labels" in attrs else "no NGFF metadata"
        raise InputError(
            f"{path}: not an OME-Zarr image ({what}: the group's attributes have no 'multiscales'); "
            "give the image group of an OME-NGFF store"
        )
    if not entries or not isinstance(entries[0], Mapping):
        raise InputError(f"{path}: NGFF 'multiscales' is empty")
    return dict(entries[0]), version


def _axes(multiscale: Mapping[str, Any], path: Path) -> tuple[list[str], list[str | None]]:
    axes = multiscale.get("axes")
    if not axes:
        raise InputError(f"{path}: NGFF multiscales have no 'axes' (NGFF 0.4 or later is needed)")
    names, units = [], []
    for a in axes:
        name, unit = (a.get("name"), a.get("unit")) if isinstance(a, Mapping) else (a, None)
        name = str(name).lower()
        if name not in _AXIS_LETTERS:
            raise InputError(
                f"{path}: axis {name!r} is not one of t, c, z, y, x; this reader takes those axes only"
            )
        names.append(name)
        units.append(unit)
    if len(set(names)) != len(names):
        raise InputError(f"{path}: NGFF axes {names} name an axis twice")
    return names, units


def _scale(dataset: Mapping[str, Any], multiscale: Mapping[str, Any], n: int, path: Path) -> list[float]:
    """The level's scale per axis: its own ``scale`` times the multiscale-wide one, if any."""
    out = [1.0] * n
    for transforms in (dataset.get("coordinateTransformations"), multiscale.get("coordinateTransformations")):
        for t in transforms or []:
            if t.get("type") == "scale" and "scale" in t:
                values = [float(v) for v in t["scale"]]
                if len(values) != n:
                    raise InputError(f"{path}: NGFF scale {values} does not have {n} entries")
                out = [a * b for a, b in zip(out, values, strict=True)]
    return out


def _pixel_size(scale: Sequence[float], units: Sequence[str | None]) -> tuple[float, ...] | None:
    """Micrometres per spatial axis; None where a unit is missing or not a length."""
    factors = [_UNITS_UM.get(str(u).lower()) if u is not None else None for u in units]
    if not scale or any(f is None for f in factors) or any(s <= 0 for s in scale):
        return None
    return tuple(float(s * f) for s, f in zip(scale, factors, strict=True))
