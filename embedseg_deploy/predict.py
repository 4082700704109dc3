"""The Python API of the runtime: a :class:`Predictor` that turns images into instance labels.

    >>> p = Predictor("model.onnx", backend="onnx-cpu", tta=False)
    >>> labels = p.predict(image)                        # numpy array in, int32 labels out
    >>> summary = p.predict_files(["a.tif", "imgs/"], "out/")

The pipeline is the same for 2D and 3D and for every backend: the one channel rule
(:func:`embedseg_deploy.io.to_channels_first`), the contract's normalisation, tiled prediction with a halo
(or whole-image when the padded image fits one tile), optional test-time augmentation, and clustering
with pixel coordinates in one global system. The origin of that system is the first pixel of the
padded image (the rounding padding that whole-image prediction adds), exactly as upstream EmbedSeg's grid,
so small images reproduce upstream's labels bit for bit.

The CLI (``embedseg-run``) is a thin layer over this module.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

import numpy as np

from .backends import Backend, create_backend
from .contract import Contract, Thresholds, check_pixel_size
from .io import (
    TIFF_SUFFIXES,
    DiskFullError,
    InputError,
    TiffImage,
    atomic_write_json,
    channel_axis_of,
    read_provenance,
    read_tiff,
    sha256_file,
    tiff_stem,
    to_channels_first,
    write_tiff_atomic,
)
from .machine import versions
from .memory import limit_heap_fragmentation
from .normalize import normalize
from .outputs import is_zarr_output, label_dtype, output_pixel_size, write_labels_file
from .sources import ZARR_SUFFIXES, is_zarr, open_source
from .tiling import balanced_tile, pad_widths, per_axis, plan_tiles, predict_tiled, round_up
from .tta import predict_tta

SUMMARY_NAME = "summary.json"
SEEDS_FOLDER = "seeds"
THRESHOLD_NAMES = tuple(Thresholds.__dataclass_fields__)


class PixelSizeWarning(UserWarning):
    """The image's pixel size differs from the one the model was trained on."""


@dataclass
class Result:
    """Labels of one image plus what happened on the way."""

    labels: np.ndarray
    seeds: np.ndarray | None = None
    n_objects: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def check_thresholds(thresholds: Mapping[str, Any]) -> None:
    """Refuse clustering parameters that cannot mean anything (a seediness is a probability)."""
    for name in ("seed_thresh", "fg_thresh"):
        value = thresholds.get(name)
        if value is not None and not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
            raise ValueError(f"{name} must be between 0 and 1 (a seediness), got {value!r}")
    for name in ("min_object_size", "min_mask_sum", "min_unclustered_sum"):
        value = thresholds.get(name)
        if value is not None and not (float(value).is_integer() and value >= 0):
            raise ValueError(f"{name} must be a whole number of pixels >= 0, got {value!r}")


def settings_differences(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """What differs between the label settings an output was made with and this run's, in words."""
    if old is None:
        return ["it records no settings (made by another program or an older embedseg-deploy)"]
    out = []
    for key, value in new.items():
        before = old.get(key)
        if before == value or (isinstance(value, list | tuple) and list(value) == before):
            continue
        if key == "model_sha256":
            out.append(f"another model (sha256 {str(before)[:12]}…, this run {str(value)[:12]}…)")
        else:
            out.append(f"{key} {before} (this run {value})")
    return out


class Predictor:
    """Segment images with one model on one backend.

    ``tile``/``halo`` (array order, or one int for every axis) default to the contract's recommendation
    for the backend's device; ``tile=0`` predicts the whole image in one pass. ``tile`` is the largest
    network input: an image that needs several tiles gets as many as that size needs, each shrunk to fit
    (:func:`embedseg_deploy.tiling.balanced_tile`; 1100 x 1100 px with 1024 px tiles: 3x faster).
    ``thresholds`` override the contract's clustering defaults (``seed_thresh``, ``fg_thresh``,
    ``min_object_size``, ``min_mask_sum``, ``min_unclustered_sum``). ``model`` is a path or an already
    created backend. Creating one pins glibc's mmap threshold for the process
    (:func:`embedseg_deploy.memory.limit_heap_fragmentation`), so freed image-sized buffers go back to
    the system. ``cluster_device``: ``"cuda"`` clusters on the GPU (numba CUDA, the same labels),
    ``"cpu"`` on the CPU, ``"auto"`` on the GPU when the backend runs there and numba sees a CUDA GPU.
    """

    def __init__(
        self,
        model: str | os.PathLike | Backend,
        backend: str = "auto",
        device: str | int | None = None,
        tile: int | Sequence[int] | None = None,
        halo: int | Sequence[int] | None = None,
        tta: bool = False,
        batch_size: int = 1,
        threads: int | None = None,
        engine_cache: str | os.PathLike | None = None,
        thresholds: Mapping[str, float] | None = None,
        progress: Callable[[int, int], None] | None = None,
        cluster_device: str = "auto",
    ):
        t0 = time.perf_counter()
        limit_heap_fragmentation()
        self.threads = threads
        if threads:
            _set_numba_threads(threads)
        self.backend = (
            model
            if isinstance(model, Backend)
            else create_backend(model, backend, device=device, threads=threads, engine_cache=engine_cache)
        )
        self.load_seconds = time.perf_counter() - t0
        self.contract: Contract = self.backend.contract
        c = self.contract
        rec_tile, rec_halo = c.recommended_tile(self.backend.kind)
        m = c.tile_multiple
        tile_v = per_axis(tile, c.ndim, "tile")
        if tile_v is None:
            tile_v = rec_tile
        self.tile: list[int] | None = (
            None if all(t == 0 for t in tile_v) else self.backend.shapes.fit_tile(tile_v)
        )
        halo_v = per_axis(halo, c.ndim, "halo")
        self.halo: list[int] = round_up(rec_halo if halo_v is None else halo_v, m)
        if halo_v is None and self.tile is not None:  # a small tile shrinks the default halo to fit
            self.halo = [min(h, (t - 1) // 2 // m * m) for h, t in zip(self.halo, self.tile, strict=True)]
        if self.tile is not None and any(t <= 2 * h for t, h in zip(self.tile, self.halo, strict=True)):
            raise ValueError(f"tile {self.tile} must be larger than twice the halo {self.halo}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.tta = bool(tta)
        self.batch_size = int(batch_size)
        unknown = set(thresholds or {}) - set(THRESHOLD_NAMES)
        if unknown:
            raise ValueError(f"unknown clustering parameters {sorted(unknown)}; known: {THRESHOLD_NAMES}")
        self.thresholds = {
            **vars(c.thresholds),
            **{k: v for k, v in (thresholds or {}).items() if v is not None},
        }
        check_thresholds(self.thresholds)
        self.progress = progress
        self.cluster_device, self.cluster_note = _cluster_device(cluster_device, self.backend.kind)
        self._sha256: str | None = None
        self._engine_cache = engine_cache

    def spec(self, threads: int | None = None) -> dict[str, Any]:
        """Arguments that make the same predictor in another process (a dask worker): the backend as
        resolved here, the tile and halo as decided here; ``threads`` for that process."""
        path = self.backend.model_path
        if path is None:
            raise ValueError("a predictor built from a backend object cannot be recreated elsewhere")
        return {
            "model": str(Path(path).resolve()),
            "backend": self.backend.name,
            "device": self.backend.device,
            "tile": self.tile or 0,
            "halo": self.halo,
            "tta": self.tta,
            "batch_size": self.batch_size,
            "threads": threads or self.threads,
            "engine_cache": None if self._engine_cache is None else str(self._engine_cache),
            "thresholds": dict(self.thresholds),
            "cluster_device": self.cluster_device,
        }

    @property
    def model_sha256(self) -> str | None:
        """SHA-256 of the model file (computed once), None for a backend built without a file."""
        path = self.backend.model_path
        if self._sha256 is None and path is not None and Path(path).is_file():
            self._sha256 = sha256_file(path)
        return self._sha256

    def label_settings(self) -> dict[str, Any]:
        """What decides the labels besides the image: stored in every label file, compared on resume."""
        return {
            "model_sha256": self.model_sha256,
            **{k: self.thresholds[k] for k in THRESHOLD_NAMES},
            "tta": self.tta,
            "tile": self.tile,
            "halo": self.halo,
        }

    # ----------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            **self.backend.describe(),
            "tile": self.tile,
            "halo": self.halo,
            "tta": self.tta,
            "batch_size": self.batch_size,
            "thresholds": self.thresholds,
            "cluster_device": self.cluster_device,
            "load_seconds": round(self.load_seconds, 4),
        }

    def prepare(
        self, image: np.ndarray, channel_axis: int | None = None, axes: str | None = None, path: Any = None
    ) -> np.ndarray:
        """``image`` as normalised float32 ``(C, *spatial)`` (the one channel rule, then the contract)."""
        c = self.contract
        x = to_channels_first(image, c.ndim, c.in_channels, channel_axis, path=path, axes=axes)
        if x.shape[0] != c.in_channels:
            where = f"{path}: " if path is not None else ""
            raise InputError(f"{where}image has {x.shape[0]} channel(s), the model takes {c.in_channels}")
        try:
            return normalize(x, c.normalization, channel_axis=0)
        except ValueError as exc:
            where = f"{path}: " if path is not None else ""
            raise InputError(f"{where}{exc}") from None

    def predict_raw(self, x: np.ndarray, stats: dict[str, float] | None = None) -> np.ndarray:
        """Raw network output ``(2*ndim+1, *padded)`` for a prepared image ``(C, *spatial)``.

        The output covers the image reflect-padded to the tile multiple, padding included: upstream
        clusters that whole output and crops the labels afterwards (a seed in the padding can start an
        object that reaches into the image). :meth:`crop` selects the image in it.
        """
        c = self.contract

        def tiled(img: np.ndarray) -> np.ndarray:
            tile = self.tile and balanced_tile(
                img.shape[1:], self.tile, self.halo, c.tile_multiple, c.padding
            )
            return predict_tiled(
                img,
                self.backend.run,
                c.out_channels,
                tile,
                self.halo if tile else 0,
                batch_size=self.batch_size,
                placement=c.padding,
                multiple=c.tile_multiple,
                progress=None if self.tta else self.progress,
                stats=stats,
                crop=False,
                least=self.backend.shapes.min_spatial,
                submit=self.backend.submit if self.backend.asynchronous else None,
            )

        if not self.tta:
            return tiled(x)
        return predict_tta(
            x, tiled, multiple=c.tile_multiple, placement=c.padding, progress=self.progress, crop=False
        )

    def crop(self, spatial: Sequence[int]) -> tuple[slice, ...]:
        """Where an image of shape ``spatial`` lies in :meth:`predict_raw`'s padded output."""
        widths = pad_widths(spatial, self.contract.tile_multiple, self.contract.padding)
        return tuple(slice(b, b + n) for (b, _), n in zip(widths, spatial, strict=True))

    def cluster(
        self, raw: np.ndarray, origin: Sequence[int] | None = None, return_seeds: bool = False
    ) -> np.ndarray | tuple[np.ndarray, Any]:
        """Labels of a raw output with this predictor's thresholds (``origin`` shifts returned seeds), on
        :attr:`cluster_device` (labels come back to the host either way)."""
        from .cluster import cluster, cluster_cuda

        return (cluster_cuda if self.cluster_device == "cuda" else cluster)(
            raw,
            self.contract.spacing,
            origin=None if origin is None else list(origin),
            return_seeds=return_seeds,
            **self.thresholds,
        )

    def run(
        self,
        image: np.ndarray,
        channel_axis: int | None = None,
        axes: str | None = None,
        pixel_size: Sequence[float] | None = None,
        want_seeds: bool = False,
        path: Any = None,
    ) -> Result:
        """Segment one image; returns labels (int32, ids 1..n_objects), the seed map if asked, timings and
        warnings. Upstream's order: the padded output is clustered, then the labels are cropped."""
        timings: dict[str, float] = {}
        notes: list[str] = []
        where = f"{path}: " if path is not None else ""
        warn = check_pixel_size(pixel_size, self.contract, where)
        if warn:
            notes.append(warn)
            warnings.warn(warn, PixelSizeWarning, stacklevel=2)
        t0 = time.perf_counter()
        x = self.prepare(image, channel_axis, axes, path)
        if float(np.ptp(x)) == 0.0:
            notes.append(f"{where}image is constant; no objects can be found")
        t1 = time.perf_counter()
        timings["normalize"] = t1 - t0
        stats: dict[str, float] = {}
        keep = self.crop(x.shape[1:])
        raw = self.predict_raw(x, stats)
        del x  # the input is not needed any more: its memory goes before the clustering needs some
        t2 = time.perf_counter()
        timings.update(stats)
        timings["predict"] = t2 - t1
        from .cluster import consecutive_labels, seediness_map  # numba loads in the CLI's warm-up thread

        seeds = seediness_map(raw[-1][keep]) if want_seeds else None
        labels, n = consecutive_labels(np.asarray(self.cluster(raw))[keep])
        timings["cluster"] = time.perf_counter() - t2
        return Result(labels=labels, seeds=seeds, n_objects=n, timings=timings, warnings=notes)

    def predict(self, image: np.ndarray, channel_axis: int | None = None) -> np.ndarray:
        """Instance labels (int32, 0 = background) of ``image`` (spatial, or with one channel axis)."""
        return self.run(image, channel_axis=channel_axis).labels

    def predict_files(
        self,
        inputs: Iterable[str | os.PathLike],
        out_dir: str | os.PathLike,
        **options: Any,
    ) -> dict[str, Any]:
        """Segment files, folders and globs into ``out_dir``; see :func:`predict_files`."""
        return predict_files(self, inputs, out_dir, **options)


def _cluster_device(choice: str, backend_kind: str) -> tuple[str, str | None]:
    """Where to cluster ('cpu' or 'cuda') and, when auto mode stays on the CPU beside a GPU backend, why."""
    choice = choice.lower()
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"cluster_device must be auto, cpu or cuda, got {choice!r}")
    if choice == "cpu" or (choice == "auto" and backend_kind != "gpu"):
        return "cpu", None
    why = _cuda_clustering_problem()
    if why is None:
        return "cuda", None
    if choice == "cuda":
        raise ValueError(f"cannot cluster on the GPU: {why}")
    return "cpu", f"clustering on the CPU: {why}"


def _cuda_clustering_problem() -> str | None:
    """None when numba can run the CUDA clustering here, else what is missing."""
    try:
        from numba import cuda

        if cuda.is_available():
            return None
        return "numba sees no CUDA GPU (numba.cuda.is_available() is False)"
    except Exception as exc:  # numba-cuda absent, a broken driver, ...
        return f"numba CUDA is unusable: {type(exc).__name__}: {exc}"


def _set_numba_threads(threads: int) -> None:
    with contextlib.suppress(Exception):
        import numba

        numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))


# ---------------------------------------------------------------------------------------------------
# Files


@dataclass
class Job:
    """One input file and where its outputs go, or why it cannot be processed."""

    input: Path
    output: Path | None = None
    seeds: Path | None = None
    error: str | None = None


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[Job]]:
    """Images from files, OME-Zarr stores, folders (their *.tif/*.tiff files and *.zarr stores, sorted)
    and glob patterns; plus failed items."""
    import glob

    def image(p: Path) -> bool:
        if p.name.startswith("."):
            return False
        if p.is_dir():
            return p.suffix.lower() in ZARR_SUFFIXES and is_zarr(p)
        return p.is_file() and p.suffix.lower() in TIFF_SUFFIXES

    files: list[Path] = []
    failed: list[Job] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if is_zarr(path):
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if image(p))
            if not found:
                failed.append(Job(path, error=f"{path}: folder holds no .tif/.tiff files or .zarr images"))
            files.extend(found)
        elif path.exists():
            files.append(path)
        elif glob.has_magic(text):
            found = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file() or is_zarr(p))
            if not found:
                failed.append(Job(path, error=f"{text}: pattern matches no file"))
            files.extend(found)
        else:
            failed.append(Job(path, error=f"{path}: file not found"))
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, failed


def plan_jobs(files: Sequence[Path], out_dir: Path, save_seeds: bool) -> list[Job]:
    """Output paths ``out_dir/<stem>.tif`` for TIFF inputs, ``out_dir/<stem>.ome.zarr`` (an OME-Zarr label
    image) for OME-Zarr inputs (seeds as TIFF under ``seeds/``); refuses clashes and overwriting inputs."""
    inputs = {f.resolve() for f in files}
    taken: dict[Path, Path] = {}
    jobs = []
    for f in files:
        out = out_dir / f"{tiff_stem(f)}{'.ome.zarr' if is_zarr(f) else '.tif'}"
        seeds = out_dir / SEEDS_FOLDER / f"{tiff_stem(f)}.tif" if save_seeds else None
        job = Job(f, out, seeds)
        for target in (out, seeds):
            if target is not None and target.resolve() in inputs:
                job.error = (
                    f"{f}: output {target} would overwrite an input file; choose another output folder"
                )
        if job.error is None and out.resolve() in taken:
            job.error = f"{f}: output name {out.name} clashes with the output of {taken[out.resolve()]}"
        taken.setdefault(out.resolve(), f)
        jobs.append(job)
    return jobs


def spatial_shape_of(
    path: Path, contract: Contract, channel_axis: int | None = None
) -> tuple[tuple[int, ...], str | None]:
    """Spatial shape of a TIFF from its header alone (no pixel data read)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        shape, axes = tuple(series.shape), series.axes
    caxis = channel_axis_of(shape, contract.ndim, contract.in_channels, channel_axis, path, axes)
    return tuple(s for i, s in enumerate(shape) if i != caxis), axes


def output_is_complete(output: Path, spatial: Sequence[int]) -> bool:
    """A finished label file: a readable TIFF of the right shape and a label dtype, with all its data."""
    import tifffile

    if not output.is_file():
        return False
    try:
        size = output.stat().st_size
        with tifffile.TiffFile(output) as tif:
            series = tif.series[0]
            if tuple(series.shape) != tuple(spatial) or np.dtype(series.dtype) not in (np.uint16, np.uint32):
                return False
            for page in tif.pages:
                for off, count in zip(page.dataoffsets, page.databytecounts, strict=False):
                    if off + count > size:
                        return False
    except Exception:
        return False
    return True


STATUSES = ("ok", "skipped", "failed", "not run")
SUMMARY_EVERY_S = 2.0  # summary.json is rewritten after a file at most this often (and at the end)


@dataclass
class FilePlan:
    """How one file will be processed, decided from its header before any pixel is read."""

    spatial: tuple[int, ...]
    mode: str  # "whole image" or "blocks"
    units: int  # network tiles (whole image) or blocks
    estimate: int  # bytes the mode is expected to add to the resident set
    block: list[int] | None = None  # block core size (block mode)
    reason: str = ""

    def describe(self) -> str:
        shape = "x".join(map(str, self.spatial))
        mpx = math.prod(self.spatial) / 1e6
        unit = ("tile" if self.mode == "whole image" else "block") + ("s" if self.units != 1 else "")
        size = f"{mpx:.1f} M{'px' if len(self.spatial) == 2 else 'vox'}"
        text = f"{shape} ({size}), {self.mode}, {self.units} {unit}"
        return text + (f" ({self.reason})" if self.reason else "")


@dataclass
class Reporter:
    """What a batch run tells its caller while it works (all optional): ``start(path, plan, i, n)``
    before a file, ``step(done, total, unit)`` inside it, ``end(record, i, n)`` after it."""

    start: Callable[[Path, FilePlan, int, int], None] | None = None
    step: Callable[[int, int, str], None] | None = None
    end: Callable[[dict[str, Any], int, int], None] | None = None


def predict_files(
    predictor: Predictor,
    inputs: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    save_seeds: bool = False,
    overwrite: bool = False,
    channel_axis: int | None = None,
    block: int | Sequence[int] | None = None,
    block_halo: int | Sequence[int] | None = None,
    memory_budget: str | int | None = None,
    level: int = 0,
    on_file: Callable[[dict[str, Any], int, int], None] | None = None,
    reporter: Reporter | None = None,
    summary_name: str | None = SUMMARY_NAME,
    executor: Any = None,
) -> dict[str, Any]:
    """Segment many images; one failing file never stops the others (a full disk stops the run).

    Outputs are ``out_dir/<stem>.tif`` (``.ome.zarr`` for OME-Zarr inputs; uint16 labels, uint32 past
    65535 objects, ids 1..n, with the input's pixel size and the label settings:
    :meth:`Predictor.label_settings`) and, with ``save_seeds``,
    ``out_dir/seeds/<stem>.tif`` (float32 seediness). An existing complete output made with the same
    settings is skipped (resume); one made otherwise is reported, not touched, unless ``overwrite``.
    ``memory_budget`` (bytes, ``"6G"``, ``"40%"``; default half the available memory) chooses between
    whole-image and block mode per file and sizes the blocks; ``block`` forces block mode with that core
    size (:mod:`embedseg_deploy.bigimage`). OME-Zarr inputs are read at pyramid ``level`` (default 0, full
    resolution) and get ``out_dir/<stem>.ome.zarr`` label images. ``reporter`` hears about each file
    before, during and after it; ``on_file(record, done, total)`` after each file. ``executor``
    (:class:`embedseg_deploy.dask_run.DaskExecutor`) runs whole-image files as tasks on a dask cluster
    and spreads block-mode files' blocks over it; ``memory_budget`` is then per worker. Returns the run
    summary, also written to ``out_dir/summary.json`` as the run goes; ``summary['failed']`` counts failures.
    """
    from .memory import parse_budget

    started = time.time()
    out_dir = Path(out_dir)
    budget = parse_budget(memory_budget)
    inputs = list(inputs)
    refuse_output_among_inputs(inputs, out_dir)
    prepare_output_dir(out_dir)
    if save_seeds:
        prepare_output_dir(out_dir / SEEDS_FOLDER)
    files, failed = expand_inputs(inputs)
    jobs = failed + plan_jobs(files, out_dir, save_seeds)
    reporter = reporter or Reporter()
    records: list[dict[str, Any]] = []
    stopped: str | None = None
    last_write = 0.0

    def summary() -> dict[str, Any]:
        done = {r["input"] for r in records}
        pending = [{"input": str(j.input), "status": "not run"} for j in jobs if str(j.input) not in done]
        rows = records + pending
        return {
            "embedseg_run": "predict",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "seconds": round(time.time() - started, 3),
            "finished": len(records) == len(jobs) and stopped is None,
            "stopped": stopped,
            "out_dir": str(out_dir),
            "predictor": predictor.describe(),
            "label_settings": predictor.label_settings(),
            "memory_budget": {"bytes": budget.bytes, "source": budget.source},
            "versions": versions(),
            "counts": {s: sum(r["status"] == s for r in rows) for s in STATUSES},
            "failed": sum(r["status"] == "failed" for r in rows),
            "objects": sum(r.get("objects") or 0 for r in rows),
            "timings": _sum_timings(records),
            "files": rows,
        }

    def finished(record: dict[str, Any], i: int) -> None:
        nonlocal stopped, last_write
        records.append(record)
        if record.pop("disk_full", False):
            stopped = record["error"]
        if reporter.end is not None:
            reporter.end(record, i, len(jobs))
        if on_file is not None:
            on_file(record, len(records), len(jobs))
        last = len(records) == len(jobs)
        if summary_name and (time.time() - last_write >= SUMMARY_EVERY_S or last or stopped):
            try:
                atomic_write_json(out_dir / summary_name, summary())
            except DiskFullError as exc:
                stopped = stopped or f"{out_dir / summary_name}: cannot write the summary: {exc}"
            last_write = time.time()

    # on a dask cluster, whole-image files are tasks (a few per worker in flight); block-mode files are
    # run from here with their blocks spread over the workers
    in_flight: list[tuple[Any, int]] = []

    def collect(wait_for: int) -> None:
        """Report the files that workers finished, waiting until at most ``wait_for`` are in flight."""
        while in_flight and (len(in_flight) > wait_for or in_flight[0][0].done()):
            future, i = in_flight.pop(0)
            finished(future.result(), i)

    args = (save_seeds, overwrite, channel_axis, block, block_halo, budget.bytes)
    for i, job in enumerate(jobs, 1):
        if executor is not None and job.error is None:
            plan = _plan_job(predictor, job, channel_axis, level, block, block_halo, budget.bytes)
            if plan is not None and plan.mode == "whole image":
                if reporter.start is not None:
                    reporter.start(job.input, plan, i, len(jobs))
                # the worker runs the plan reported here: no budget, so whole image whatever its RSS
                in_flight.append((executor.submit(_file_task, (job, *args[:-1], None, level)), i))
                collect(wait_for=2 * executor.workers)
                if stopped:
                    break
                continue
        record = process_job(predictor, job, *args, reporter, i, len(jobs), level, executor)
        finished(record, i)
        collect(wait_for=2 * executor.workers if executor is not None else 0)
        if stopped:
            break
    if not stopped:
        collect(wait_for=0)
    result = summary()
    if summary_name and not stopped:
        atomic_write_json(out_dir / summary_name, result)
    return result


def _plan_job(
    predictor: Predictor,
    job: Job,
    channel_axis: int | None,
    level: int,
    block: int | Sequence[int] | None,
    block_halo: int | Sequence[int] | None,
    budget: int | None,
) -> FilePlan | None:
    """The job's plan from its header, or None when the header cannot be read (the run reports why)."""
    header = _header(job.input, predictor.contract, channel_axis, level)
    try:
        return plan_file(predictor, header, block, block_halo, budget) if header is not None else None
    except ValueError:
        return None


def _file_task(predictor: Predictor, args: tuple) -> dict[str, Any]:
    """One whole file on a dask worker (:func:`process_job` with the worker's predictor)."""
    job, save_seeds, overwrite, channel_axis, block, block_halo, budget, level = args
    return process_job(
        predictor, job, save_seeds, overwrite, channel_axis, block, block_halo, budget, level=level
    )


def refuse_output_among_inputs(inputs: Sequence[str | os.PathLike], out_dir: Path) -> None:
    """Labels written among the images would be read as images by the next run: refuse up front."""
    target = out_dir.resolve()
    for item in inputs:
        path = Path(item)
        if not path.exists():
            path = Path(os.path.dirname(str(item)) or ".")  # a glob pattern: its folder
        folder = path if path.is_dir() and not is_zarr(path) else path.parent
        if folder.resolve() == target:
            raise InputError(
                f"{out_dir}: the output folder holds input images ({item}); labels written there would be "
                "read as images by the next run: choose another output folder"
            )


def prepare_output_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and prove it is writable, with a clear message when not."""
    import tempfile

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".embedseg-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(
            f"{out_dir}: output folder cannot be created or written ({exc.strerror or exc})"
        ) from None


def process_job(
    predictor: Predictor,
    job: Job,
    save_seeds: bool,
    overwrite: bool,
    channel_axis: int | None,
    block: int | Sequence[int] | None,
    block_halo: int | Sequence[int] | None,
    budget: int | None = None,
    reporter: Reporter | None = None,
    index: int = 1,
    total: int = 1,
    level: int = 0,
    executor: Any = None,
) -> dict[str, Any]:
    """Run one file; every expected failure becomes ``status='failed'`` with the reason (a full disk also
    sets ``disk_full``). ``executor`` spreads a block-mode file's blocks over a dask cluster."""
    record: dict[str, Any] = {"input": str(job.input), "output": str(job.output) if job.output else None}
    if job.error:
        return {**record, "status": "failed", "error": job.error}
    assert job.output is not None
    reporter = reporter or Reporter()
    t0 = time.perf_counter()
    settings = predictor.label_settings()
    try:
        header = _header(job.input, predictor.contract, channel_axis, level)
        if header is not None and not overwrite and job.output.exists():
            done = _resume_check(job, header[0], settings)
            if done is not None:
                return {**record, **done}
        plan = plan_file(predictor, header, block, block_halo, budget) if header is not None else None
        notes = []
        if plan is not None and plan.mode == "blocks" and job.seeds is not None:
            notes.append(f"{job.input}: seeds are not saved in block mode")
            job.seeds = None
        for target in (job.output, job.seeds):
            if target is not None:
                remove_stale_temps(target)
        if plan is not None and reporter.start is not None:
            reporter.start(job.input, plan, index, total)
        if plan is not None and plan.mode == "blocks":
            from .bigimage import predict_big

            big = predict_big(
                predictor, job.input, job.output, plan.block, block_halo, channel_axis=channel_axis,
                progress=reporter.step and (lambda d, n: reporter.step(d, n, "tiles+blocks")),
                provenance=settings, memory_budget=budget, level=level, executor=executor,
                resume=not overwrite,
            )  # fmt: skip
            timings = {**big.timings, "total": time.perf_counter() - t0}
            return {
                **record,
                "status": "ok",
                "objects": big.n_objects,
                "shape": list(big.shape),
                "dtype": str(big.dtype),
                "pixel_size": output_pixel_size(big.pixel_size, predictor.contract.ndim),
                "mode": f"blocks ({plan.units}, core {'x'.join(map(str, plan.block))})",
                "timings": _rounded(timings),
                "warnings": notes + big.warnings,
            }
        t_read = time.perf_counter()
        img = read_image(job.input, level)
        read_s = time.perf_counter() - t_read
        unit = "TTA passes" if predictor.tta else "tiles"
        predictor.progress = reporter.step and (lambda d, n: reporter.step(d, n, unit))
        try:
            result = predictor.run(
                img.data, channel_axis, img.axes, img.pixel_size, save_seeds, path=job.input
            )
        finally:
            predictor.progress = None
        t_write = time.perf_counter()
        px = output_pixel_size(img.pixel_size, predictor.contract.ndim)
        labels = result.labels.astype(label_dtype(result.n_objects), copy=False)
        write_labels_file(job.output, labels, px, settings, job.input)
        if job.seeds is not None and result.seeds is not None:
            write_tiff_atomic(job.seeds, result.seeds, pixel_size=px, overwrite=True, provenance=settings)
        timings = {"read": read_s, **result.timings, "write": time.perf_counter() - t_write}
        timings["total"] = time.perf_counter() - t0
        return {
            **record,
            "status": "ok",
            "objects": result.n_objects,
            "shape": list(labels.shape),
            "dtype": str(labels.dtype),
            "pixel_size": px,
            "mode": "whole image" if plan is None or plan.units == 1 else f"whole image ({plan.units} tiles)",
            "timings": _rounded(timings),
            "warnings": notes + list(img.notes) + result.warnings,
        }
    except Exception as exc:  # one bad file must not stop the batch; the reason is reported
        if isinstance(exc, DiskFullError):
            return {
                **record,
                "status": "failed",
                "error": f"{job.input}: cannot write output: {exc}",
                "disk_full": True,
            }
        message = str(exc) or type(exc).__name__
        if not isinstance(exc, InputError | ValueError | OSError | MemoryError | RuntimeError):
            message = f"{type(exc).__name__}: {message}"
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            message = f"{job.input}: cannot write output: {exc.strerror or exc}" if exc.errno else message
        if str(job.input) not in message:
            message = f"{job.input}: {message}"
        return {**record, "status": "failed", "error": message}


def read_image(path: Path, level: int = 0) -> TiffImage:
    """A whole image in memory: a TIFF, or ``level`` of an OME-Zarr image."""
    if not is_zarr(path):
        if level:
            raise InputError(f"{path}: --level applies to OME-Zarr images; a TIFF has one level")
        return read_tiff(path)
    source = open_source(path, level)
    data = source.read([slice(None)] * len(source.shape))
    return TiffImage(data, source.pixel_size, source.axes, Path(path), (source.note,) if source.note else ())


def _resume_check(job: Job, spatial: Sequence[int], settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """``skipped`` for a finished output made with these settings, ``failed`` (saying what differs) for one
    made otherwise; None when the file must be (re)made."""
    if not _finished(job, spatial):
        return None
    differences = settings_differences(_output_provenance(job.output), settings)
    if not differences:
        return {"status": "skipped", "reason": "output exists and is complete, made with the same settings"}
    return {
        "status": "failed",
        "error": (
            f"{job.input}: output {job.output} exists but was made with other settings: "
            f"{'; '.join(differences)}. Use --overwrite to redo it, or choose another output folder"
        ),
    }


def plan_file(
    predictor: Predictor,
    header: tuple[tuple[int, ...], int, int],
    block: int | Sequence[int] | None,
    block_halo: int | Sequence[int] | None,
    budget: int | None,
) -> FilePlan:
    """Whole image or blocks for an image of this header, from the memory budget (see
    :mod:`embedseg_deploy.memory`); block mode gets the blocks that fit it with the least network work."""
    from . import memory

    c = predictor.contract
    spatial, itemsize, channels = header
    m = c.tile_multiple
    padded = [n + b + a for n, (b, a) in zip(spatial, pad_widths(spatial, m, c.padding), strict=True)]
    args = (c.ndim, channels, itemsize, predictor.tta, predictor.batch_size)
    tile = predictor.tile and balanced_tile(spatial, predictor.tile, predictor.halo, m, c.padding)
    whole = memory.rss_bytes() + memory.whole_image_peak(padded, tile, *args)
    halo = round_up(per_axis(block_halo, c.ndim, "block halo") or predictor.halo, m)
    if block is not None:
        core = check_block(per_axis(block, c.ndim, "block"), m)
        return FilePlan(tuple(spatial), "blocks", _count_blocks(padded, core), whole, core, "--block given")
    if budget is None or whole <= budget:
        units = len(plan_tiles(spatial, tile, predictor.halo if tile else 0, m, c.padding))
        return FilePlan(tuple(spatial), "whole image", units, whole)
    core = memory.block_core(budget - memory.rss_bytes(), padded, halo, predictor.tile, *args[:3], m,
                             predictor.tta, predictor.batch_size, predictor.halo)  # fmt: skip
    reason = (
        f"whole image would need ~{memory.format_bytes(whole)}, more than the memory budget of "
        f"{memory.format_bytes(budget)}"
    )
    return FilePlan(tuple(spatial), "blocks", _count_blocks(padded, core), whole, core, reason)


def check_block(block: Sequence[int] | None, multiple: int) -> list[int]:
    """Block core sizes: positive, rounded up to the tile multiple."""
    if block is None or any(b < 1 for b in block):
        raise ValueError(f"--block needs sizes of at least {multiple} pixels, got {block}")
    return round_up(block, multiple)


def _count_blocks(padded: Sequence[int], core: Sequence[int]) -> int:
    return math.prod(-(-p // c) for p, c in zip(padded, core, strict=True))


def remove_stale_temps(output: Path) -> None:
    """Delete temp files an interrupted run left for ``output`` (``.<name>.*.tmp`` beside it; folders for
    OME-Zarr outputs)."""
    import shutil

    for tmp in output.parent.glob(f".{glob_escape(output.name)}.*.tmp"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()


def _header(
    path: Path, contract: Contract, channel_axis: int | None, level: int = 0
) -> tuple[tuple[int, ...], int, int] | None:
    """(spatial shape, bytes per value, channels) from the image's header (TIFF tags or OME-Zarr
    metadata), or None when the header cannot be read (the reader reports why later)."""
    try:
        if is_zarr(path):
            source = open_source(path, level)
            shape, axes, itemsize = source.shape, source.axes, source.dtype.itemsize
        else:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, axes, itemsize = tuple(series.shape), series.axes, np.dtype(series.dtype).itemsize
        caxis = channel_axis_of(shape, contract.ndim, contract.in_channels, channel_axis, path, axes)
    except Exception:
        return None
    spatial = tuple(n for i, n in enumerate(shape) if i != caxis)
    return spatial, itemsize, 1 if caxis is None else shape[caxis]


def _finished(job: Job, spatial: Sequence[int]) -> bool:
    """True when the job's outputs already exist and are complete."""
    if job.output is None or not job.output.exists():
        return False
    if job.seeds is not None and not job.seeds.is_file():
        return False
    if is_zarr_output(job.output):
        from .ngff import read_labels_info

        info = read_labels_info(job.output)
        return info is not None and info[0] == tuple(spatial)
    return output_is_complete(job.output, spatial)


def _output_provenance(path: Path) -> dict | None:
    if is_zarr_output(path):
        from .ngff import read_labels_info

        info = read_labels_info(path)
        return info[1] if info else None
    return read_provenance(path)


def _rounded(timings: Mapping[str, float]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in timings.items()}


def _sum_timings(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for r in records:
        for k, v in (r.get("timings") or {}).items():
            total[k] = total.get(k, 0.0) + v
    return _rounded(total)
