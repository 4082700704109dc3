"""Files shared by training, export and the runtime (torch-free): TIFFs and atomic writes.

One reader (:func:`read_tiff`) that turns every way a file can be broken into an :class:`InputError`
naming the file, one channel rule (:func:`to_channels_first`), one pairing rule for TIFF folders
(:func:`tiff_stem`, :func:`tiff_files`), and one way to write any output atomically
(:func:`atomic_writer` and the ``atomic_write_*`` helpers, which :func:`write_tiff_atomic` uses).
Pixel sizes are in microns and in array order ``(z,) y, x``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import secrets
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import tifffile

DEFAULT_MAX_BYTES = 16 * 2**30
"""Refuse files whose declared pixel data exceed this (16 GiB) unless the caller raises the limit."""

# Length units as TIFF/ImageJ/OME write them, in microns.
_UNITS_UM = {
    "micron": 1.0,
    "microns": 1.0,
    "um": 1.0,
    "µm": 1.0,
    "μm": 1.0,
    "\\u00b5m": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "mm": 1e3,
    "millimeter": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "m": 1e6,
    "meter": 1e6,
    "inch": 25400.0,
    "in": 25400.0,
}
# Resolutions that generic writers put in by default (72/96/300 dpi, 1 pixel per inch): not a pixel size.
_DEFAULT_DPI = (1.0, 72.0, 96.0, 300.0)
_IMAGEJ_DTYPES = ("uint8", "uint16", "int16", "float32")
TIFF_SUFFIXES = (".tif", ".tiff")
_STEM_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".ome.zarr", ".zarr")
PROVENANCE_TAG = 65117
"""Private TIFF tag (ASCII JSON) holding what made a label file: model sha256 and label settings."""


class InputError(ValueError):
    """An input file or array is missing, broken or not what the caller needs; the message names it."""


class DiskFullError(OSError):
    """An output could not be written because its file system is full; the message names the folder."""

    def __init__(self, path: str | os.PathLike):
        folder = Path(path).parent
        super().__init__(errno.ENOSPC, f"no space left on {folder} (writing {Path(path).name})")
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.strerror)


def is_disk_full(exc: BaseException) -> bool:
    """True for the ways a full disk surfaces: ENOSPC/EDQUOT, or numpy's short write without an errno."""
    if not isinstance(exc, OSError):
        return False
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return exc.errno is None and " requested and " in str(exc) and str(exc).endswith(" written")


@dataclass
class TiffImage:
    """Pixels of a TIFF's first series plus what the file says about them.

    ``pixel_size`` (microns, array order) has one value per spatial axis the file names: ``(z, y, x)``
    when the file declares a Z axis with its spacing, else ``(y, x)``; ``None`` when unknown.
    ``axes`` is tifffile's series axes string (e.g. ``'YX'``, ``'ZYX'``, ``'CYX'``, ``'QYX'``).
    ``notes`` are warnings for the user, naming the file (e.g. :func:`series_note`).
    """

    data: np.ndarray
    pixel_size: tuple[float, ...] | None
    axes: str | None
    path: Path
    notes: tuple[str, ...] = ()


def read_tiff(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> TiffImage:
    """Read the first series of a TIFF file, refusing broken, empty, complex or huge data."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    file_size = path.stat().st_size
    try:
        with _TiffLog() as log, tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise InputError(f"{path}: TIFF holds no image data (empty or truncated file)")
            series = tif.series[0]
            shape, dtype, axes = tuple(series.shape), np.dtype(series.dtype), series.axes
            _check_declared(path, shape, dtype, max_bytes)
            _check_not_truncated(path, tif, series, file_size, log.messages)
            data = series.asarray()
            pixel_size = tiff_pixel_size(tif, axes)
            note = series_note(tif, path)
    except InputError:
        raise
    except MemoryError:
        raise InputError(f"{path}: not enough memory to read the image") from None
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error, OSError, ...
        raise InputError(f"{path}: unreadable or corrupt TIFF ({type(exc).__name__}: {exc})") from None
    if data.size == 0:
        raise InputError(f"{path}: image is empty (shape {data.shape})")
    notes = () if note is None else (note,)
    return TiffImage(data=data, pixel_size=pixel_size, axes=axes, path=path, notes=notes)


# Series that some formats (SVS, NDPI, ...) list beside the image: not images of their own.
_AUXILIARY_SERIES = ("thumbnail", "label", "macro", "map")


def series_note(tif: tifffile.TiffFile, path: str | os.PathLike) -> str | None:
    """A warning naming ``path`` when the open ``tif`` holds images besides its first series, which alone
    is read; None when it holds one.

    Pyramid levels of a series are not separate images, nor are reduced-resolution copies, thumbnails,
    slide labels and macro photos, which tifffile lists as series of their own in some formats.
    """
    others = [s for s in tif.series[1:] if _is_separate_image(s)]
    if not others:
        return None
    first = tif.series[0]
    return (
        f"{path}: holds {1 + len(others)} separate images (TIFF series); only the first "
        f"(shape {tuple(first.shape)}, axes {first.axes}) is used"
    )


def _is_separate_image(series: tifffile.TiffPageSeries) -> bool:
    name = (series.name or "").strip().lower()
    if name.split(" ")[0] in _AUXILIARY_SERIES:
        return False
    return not series.keyframe.is_reduced


def _check_declared(path: Path, shape: tuple[int, ...], dtype: np.dtype, max_bytes: int) -> None:
    if dtype.kind not in "biuf":
        raise InputError(f"{path}: unsupported pixel type {dtype} (need integer, float or bool)")
    if not shape or 0 in shape:
        raise InputError(f"{path}: image is empty (shape {shape})")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise InputError(
            f"{path}: declared image {shape} {dtype} needs {_size(nbytes)}, more than the "
            f"limit of {_size(max_bytes)} (raise max_bytes to read it)"
        )


def _size(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


class _TiffLog(logging.Handler):
    """Collects what tifffile logs while a file is read: it reports a broken page chain only there.

    Only this thread's records count: a file read at the same time in another thread is not this one.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())

    def __enter__(self) -> _TiffLog:
        logging.getLogger("tifffile").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("tifffile").removeHandler(self)


def _check_not_truncated(
    path: Path, tif: tifffile.TiffFile, series, file_size: int, messages: Sequence[str]
) -> None:
    """Refuse files whose pages or pixel data reach past the end (tifffile may silently read less)."""
    broken = [m for m in messages if "invalid page offset" in m or "invalid offset to first page" in m]
    if broken:
        raise InputError(f"{path}: truncated or corrupt TIFF ({broken[0].split('> ')[-1]})")
    images = (tif.imagej_metadata or {}).get("images")
    planes = math.prod(series.shape) // math.prod(series.shape[-2:]) if len(series.shape) >= 2 else 1
    if images is not None and int(images) > planes and "S" not in (series.axes or ""):
        raise InputError(f"{path}: truncated or corrupt TIFF (ImageJ says {images} images, found {planes})")
    offset = getattr(series, "dataoffset", None)
    if offset is not None and offset + series.nbytes > file_size:
        raise InputError(
            f"{path}: truncated or corrupt TIFF (pixel data end at byte {offset + series.nbytes}, "
            f"file has {file_size} bytes)"
        )
    for page in tif.pages:
        offsets = getattr(page, "dataoffsets", ()) or ()
        counts = getattr(page, "databytecounts", ()) or ()
        for offset, count in zip(offsets, counts, strict=False):
            if count and offset + count > file_size:
                raise InputError(
                    f"{path}: truncated or corrupt TIFF (pixel data end at byte {offset + count}, "
                    f"file has {file_size} bytes)"
                )


def tiff_pixel_size(tif: tifffile.TiffFile, axes: str) -> tuple[float, ...] | None:
    """Pixel size in microns of an open TIFF (OME, ImageJ, or the resolution tags), in array order.

    ``axes`` is the series' axes string; the result has a z value only when it names ``Z``.
    """
    if tif.is_ome:
        size = _ome_pixel_size(tif.ome_metadata, axes)
        if size is not None:
            return size
    page = tif.pages.first
    xres, yres = page.tags.get("XResolution"), page.tags.get("YResolution")
    ij = tif.imagej_metadata or {}
    unit = ij.get("unit")
    if unit is not None:
        unit_um = _UNITS_UM.get(str(unit).strip().lower())
    else:
        res_unit = page.tags.get("ResolutionUnit")
        res_unit = int(res_unit.value) if res_unit is not None else 2
        unit_um = {3: 1e4, 2: 25400.0}.get(res_unit)
    if unit_um is None or xres is None or yres is None:
        return None
    px_per_unit = [_rational(yres.value), _rational(xres.value)]  # (pixels, units)
    if None in px_per_unit:
        return None
    if unit is None and unit_um == 25400.0 and any(n / d in _DEFAULT_DPI for n, d in px_per_unit):
        return None
    # units * unit_um / pixels in one division: 1/0.65 stored as 20/13 reads back as 0.65 exactly
    yx = tuple(d * unit_um / n for n, d in px_per_unit)
    if "Z" in axes:
        spacing = ij.get("spacing")
        if spacing is None or not float(spacing) > 0:
            return None
        return (float(spacing) * unit_um, *yx)
    return yx


def _rational(value) -> tuple[float, float] | None:
    """A TIFF RATIONAL ``(numerator, denominator)`` as two positive floats; None for anything else."""
    try:
        num, den = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (num, den) if num > 0 and den > 0 else None


def _ome_pixel_size(xml: str | None, axes: str) -> tuple[float, ...] | None:
    if not xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next((el for el in root.iter() if el.tag.endswith("}Pixels") or el.tag == "Pixels"), None)
    if pixels is None:
        return None
    names = ("Z", "Y", "X") if "Z" in axes else ("Y", "X")
    out = []
    for a in names:
        value = pixels.get(f"PhysicalSize{a}")
        scale = _UNITS_UM.get(pixels.get(f"PhysicalSize{a}Unit", "µm").strip().lower())
        if value is None or scale is None:
            return None
        out.append(float(value) * scale)
    return tuple(out)


def to_channels_first(
    data: np.ndarray,
    ndim: int,
    in_channels: int | None = None,
    channel_axis: int | None = None,
    path: str | os.PathLike | None = None,
    axes: str | None = None,
) -> np.ndarray:
    """Return ``data`` as ``(C, *spatial)`` with ``ndim`` spatial axes: the one channel rule.

    * ``data.ndim == ndim``: a single channel, ``C = 1`` is added.
    * ``data.ndim == ndim + 1``: the channel axis is ``channel_axis`` when given; else the file's ``C``
      (or ``S``) axis when ``axes`` (tifffile's series axes) names exactly one; else the only axis whose
      size equals ``in_channels``; else the smallest axis when it is the first or the last one and has at
      most 4 entries (CYX / YXC, CZYX / ZYXC). Anything else is ambiguous and raises, asking for
      ``channel_axis``.
    * any other number of dimensions raises.

    Errors speak of dimensions where the file's ``axes`` do: a stack (``ZYX``, ``TYX``) for a 2D model whose
    slices do not fit as channels is "3D, the model is 2D"; an RGB ``YXS`` image for a 3D model is 2D.

    Returns a view when possible; the input is never modified.
    """
    data = np.asarray(data)
    axis = channel_axis_of(data.shape, ndim, in_channels, channel_axis, path, axes)
    return data[np.newaxis] if axis is None else np.moveaxis(data, axis, 0)


def channel_axis_of(
    shape: Sequence[int],
    ndim: int,
    in_channels: int | None = None,
    channel_axis: int | None = None,
    path: str | os.PathLike | None = None,
    axes: str | None = None,
) -> int | None:
    """The axis of an array of ``shape`` that :func:`to_channels_first` takes as channels (None: none);
    from the shape alone, so a file's header is enough."""
    where = f"{path}: " if path is not None else ""
    shape = tuple(int(s) for s in shape)
    named = axes.upper() if axes is not None and len(axes) == len(shape) else None
    if len(shape) == ndim:
        if ndim == 3 and named == "YXS":
            raise InputError(
                f"{where}the image is 2D with {shape[2]} samples per pixel (RGB, axes YXS, shape {shape}) "
                f"but the model is 3D; use a 2D model"
            )
        return None
    if len(shape) < ndim:
        use = "; use a 2D model" if len(shape) == 2 else ""
        raise InputError(
            f"{where}wrong number of dimensions: the image is {len(shape)}D (shape {shape}) but the model "
            f"is {ndim}D{use}"
        )
    too_deep = _stack_error(shape, ndim, named, where) if channel_axis is None else None
    if len(shape) != ndim + 1:
        raise too_deep or InputError(
            f"{where}wrong number of dimensions: shape {shape} is neither {ndim}D nor {ndim}D "
            f"with one channel axis"
        )
    if channel_axis is None and named is not None:
        declared = [a for a, name in enumerate(named) if name in "CS"]
        channel_axis = declared[0] if len(declared) == 1 else None
    try:
        axis = _channel_axis(shape, in_channels, channel_axis, where)
        if in_channels is not None and shape[axis] != in_channels:
            raise InputError(
                f"{where}channel axis {axis} of shape {shape} has {shape[axis]} channels, "
                f"expected {in_channels}"
            )
    except InputError:
        if too_deep is not None:
            raise too_deep from None
        raise
    return axis


_STACK_AXES = {"Z": "z slices", "T": "time points"}


def _stack_error(shape: tuple[int, ...], ndim: int, named: str | None, where: str) -> InputError | None:
    """The error for an image whose own axes name more stack axes (``Z``, ``T``) than a ``ndim`` model has.

    A Z-stack for a 2D model used to get channel-axis advice, then "has 32 channels, expected 1". It is
    raised only where the channel rule fails: this package's writer and others declare ``ZYX`` for any
    3D array, so a declared Z whose size fits as channels does not prove a stack. A 3D model takes a
    ``TYX`` file as a volume (stacks saved as frames are common).
    """
    if named is None:
        return None
    stacks = [(name, n) for name, n in zip(named, shape, strict=True) if name in _STACK_AXES]
    if 2 + len(stacks) <= ndim:
        return None
    what = " of ".join(f"{n} {_STACK_AXES[name]}" for name, n in stacks)
    use = " or use a 3D model" if len(stacks) == 1 else ""
    return InputError(
        f"{where}the image is {2 + len(stacks)}D ({what}; axes {named}, shape {shape}) but the model is "
        f"{ndim}D: split it into {ndim}D images{use}"
    )


def _channel_axis(
    shape: tuple[int, ...], in_channels: int | None, channel_axis: int | None, where: str
) -> int:
    n = len(shape)
    if channel_axis is not None:
        if not -n <= channel_axis < n:
            raise InputError(f"{where}channel_axis {channel_axis} is out of range for shape {shape}")
        return channel_axis % n
    if in_channels is not None:
        matches = [a for a, s in enumerate(shape) if s == in_channels]
        if len(matches) == 1:
            return matches[0]
    smallest = min(shape)
    candidates = [a for a in (0, n - 1) if shape[a] == smallest and shape[a] <= 4]
    if len(candidates) == 1 and shape.count(smallest) == 1:
        return candidates[0]
    raise InputError(
        f"{where}cannot tell which axis of shape {shape} holds the channels "
        f"(in_channels={in_channels}); pass channel_axis (e.g. 0 for CYX/CZYX, -1 for YXC/ZYXC)"
    )


def write_tiff_atomic(
    path: str | os.PathLike,
    array: np.ndarray,
    pixel_size: Sequence[float] | None = None,
    overwrite: bool = False,
    axes: str | None = None,
    compression: str | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``array`` to ``path`` atomically (see :func:`atomic_writer`) with its pixel size.

    uint8, uint16, int16 and float32 (and bool, written as uint8 0/1) go to an ImageJ hyperstack with
    the pixel size as resolution + ``spacing`` + unit ``micron``, which Fiji and napari show. Other dtypes
    (int32, uint32, int64, float64, ...) cannot be stored in ImageJ files without loss, so they are written
    as OME-TIFF with ``PhysicalSize*`` in microns plus the resolution tags (Fiji reads it through
    Bio-Formats). ``pixel_size`` is in microns, array order, one value per spatial axis (the last
    ``len(pixel_size)`` axes). ``axes`` defaults to ``YX`` / ``ZYX`` (``C`` first when there is one more
    axis). ``provenance`` (JSON-able) is stored in a private tag (:func:`read_provenance`). Refuses to
    replace an existing file unless ``overwrite``; never leaves a partial file.
    """
    path = Path(path)
    array = np.asarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype.kind not in "iuf":
        raise InputError(f"{path}: cannot write pixel type {array.dtype}")
    if not path.parent.is_dir():
        raise InputError(f"{path}: folder {path.parent} does not exist")
    axes = axes or _default_axes(array.ndim, pixel_size)
    if len(axes) != array.ndim:
        raise InputError(f"{path}: axes {axes!r} do not match array shape {array.shape}")
    array, kwargs = tiff_write_args(array, axes, pixel_size, path, provenance)
    if compression is not None:
        kwargs["compression"] = compression
    with atomic_writer(path, overwrite=overwrite) as fh:
        tifffile.imwrite(fh, array, photometric="minisblack", **kwargs)
    return path


def _default_axes(ndim: int, pixel_size: Sequence[float] | None) -> str:
    n_spatial = len(pixel_size) if pixel_size is not None else min(ndim, 3)
    if ndim == 2:
        return "YX"
    if ndim == 3:
        return "ZYX" if n_spatial == 3 else "CYX"
    if ndim == 4:
        return "CZYX"
    raise InputError(f"cannot choose axes for a {ndim}D array; pass axes")


def tiff_write_args(
    array: np.ndarray,
    axes: str,
    pixel_size: Sequence[float] | None,
    path: str | os.PathLike,
    provenance: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, dict]:
    """The array as :func:`write_tiff_atomic` stores it and tifffile's keyword arguments for it.

    The one encoding of pixel sizes (ImageJ for its dtypes, else OME); ImageJ wants TZCYXS order, so a
    ``C`` before ``Z`` is moved after it. ``path`` only names the file in errors.
    """
    array, kwargs = _encode_pixel_size(array, axes, pixel_size, path)
    if provenance is not None:
        text = json.dumps(provenance, sort_keys=True, default=_json_default)
        kwargs["extratags"] = [(PROVENANCE_TAG, "s", 0, text, True)]
    return array, kwargs


def read_provenance(path: str | os.PathLike) -> dict | None:
    """The ``provenance`` a label file was written with (:func:`write_tiff_atomic`); None if it has none
    or cannot be read."""
    try:
        with tifffile.TiffFile(path) as tif:
            tag = tif.pages.first.tags.get(PROVENANCE_TAG)
            value = None if tag is None else tag.value
        doc = json.loads(value) if isinstance(value, str) else None
    except Exception:
        return None
    return doc if isinstance(doc, dict) else None


def _encode_pixel_size(
    array: np.ndarray, axes: str, pixel_size: Sequence[float] | None, path: str | os.PathLike
) -> tuple[np.ndarray, dict]:
    spatial = [a for a in axes if a in "ZYX"]
    if pixel_size is not None:
        pixel_size = [float(p) for p in pixel_size]
        if len(pixel_size) != len(spatial) or not all(math.isfinite(p) and p > 0 for p in pixel_size):
            raise InputError(f"{path}: pixel_size {pixel_size} needs one positive value per axis of {axes!r}")
    if array.dtype.name in _IMAGEJ_DTYPES:
        if "Z" in axes and "C" in axes and axes.index("C") < axes.index("Z"):
            order = [axes.index(a) for a in "ZCYX" if a in axes]
            array, axes = np.transpose(array, order), "".join(axes[i] for i in order)
        metadata: dict = {"axes": axes}
        kwargs: dict = {"imagej": True, "metadata": metadata}
        if pixel_size is not None:
            metadata["unit"] = "micron"
            kwargs["resolution"] = (1.0 / pixel_size[-1], 1.0 / pixel_size[-2])
            if len(pixel_size) == 3:
                metadata["spacing"] = pixel_size[0]
        return array, kwargs
    metadata = {"axes": axes}
    kwargs = {"ome": True, "metadata": metadata}
    if pixel_size is not None:
        for a, p in zip(spatial, pixel_size, strict=True):
            metadata[f"PhysicalSize{a}"] = p
            metadata[f"PhysicalSize{a}Unit"] = "µm"
        kwargs["resolution"] = (1e4 / pixel_size[-1], 1e4 / pixel_size[-2])
        kwargs["resolutionunit"] = "CENTIMETER"
    return array, kwargs


# ----------------------------------------------------------------------------------------------------
# TIFF folders


def tiff_stem(path: str | os.PathLike) -> str:
    """The name that pairs files across folders: the name without ``.ome.tif(f)``, ``.tif(f)``,
    ``.ome.zarr`` or ``.zarr``."""
    name = Path(path).name
    lower = name.lower()
    for suffix in _STEM_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def tiff_files(folder: str | os.PathLike) -> dict[str, Path]:
    """The TIFF files of ``folder`` by :func:`tiff_stem`, in name order; hidden files are skipped.

    Two files with one stem (``a.tif`` and ``a.tiff``) cannot be paired by name, so they raise.
    """
    files: dict[str, Path] = {}
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in TIFF_SUFFIXES:
            continue
        stem = tiff_stem(path)
        if stem in files:
            other = files[stem]
            raise InputError(
                f"{path}: same name as {other} (both {other.name} and {path.name} exist; keep one)"
            )
        files[stem] = path
    return files


# ----------------------------------------------------------------------------------------------------
# atomic writes


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, overwrite: bool = True) -> Iterator[BinaryIO]:
    """A binary file that becomes ``path`` only when the block ends without an error.

    Readers never see a partial file and a failed write leaves ``path`` as it was: the data go to a
    hidden temp file in the same folder, are flushed to disk, then renamed over ``path``. The file gets
    the permissions of any new file (the umask applies). Raises :class:`FileExistsError` for an
    existing ``path`` unless ``overwrite``, :class:`FileNotFoundError` when its folder is missing, and
    :class:`DiskFullError` ("no space left on <folder>") when the file system is full.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path}: exists (pass overwrite=True to replace it)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: folder {path.parent} does not exist")
    try:
        tmp = temp_file_beside(path)
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(path) from None
        raise
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise DiskFullError(path) from None
        raise
    _fsync_dir(path.parent)


def temp_file_beside(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A new empty hidden file in ``path``'s folder, for data that will be renamed onto ``path``.

    Same folder, so ``os.replace`` is atomic; created with the permissions of any new file (the umask
    applies), unlike ``tempfile.mkstemp``'s 0600, which a rename would pass on to the output.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.{tag}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_writer`)."""
    with atomic_writer(path, overwrite) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically; line endings are written as given."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite)


def atomic_write_json(
    path: str | os.PathLike, obj: Any, indent: int | None = 1, overwrite: bool = True
) -> Path:
    """Write ``obj`` as JSON (plus a final newline) to ``path`` atomically.

    numpy scalars and arrays become numbers and lists; anything else JSON lacks (paths) its ``str``.
    """
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=_json_default) + "\n", overwrite)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic | np.ndarray):
        return obj.tolist()
    return str(obj)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (where the platform allows opening a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's content (provenance of checkpoints and models; any file size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
