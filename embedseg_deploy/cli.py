"""``embedseg-run``: the runtime's command line, a thin layer over :mod:`embedseg_deploy.predict`.

Commands: ``predict`` (files, folders, globs -> label TIFFs + summary.json; resumable), ``evaluate``
(predicted vs ground-truth labels), ``info`` (a model's contract and backend), ``demo`` (offline
synthetic example). Exit codes: 0 success, 1 some files failed, 2 bad usage or a model/backend that
cannot run.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from . import __version__
from .backends import ALIASES, BACKENDS, BackendError, engine_build_pending
from .contract import ContractError, describe_contract
from .io import DiskFullError, InputError

BACKEND_CHOICES = ["auto", *BACKENDS, *ALIASES]


def _sizes(value: str | None, name: str) -> list[int] | None:
    """'256' or '32,256,256' (array order) -> list of ints."""
    if value is None:
        return None
    try:
        sizes = [int(v) for v in value.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: give one integer or comma-separated integers (z,y,x)", param_hint=name
        ) from None
    if not sizes or any(s < 0 for s in sizes):
        raise click.BadParameter(f"{value!r}: sizes must be non-negative integers", param_hint=name)
    return sizes


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def _warm_up_clustering() -> threading.Thread:
    """Compile/load the numba clustering kernels in the background while the model loads."""

    def work() -> None:
        try:
            from .cluster import warm_up

            warm_up()
        except Exception:  # the real call reports problems
            pass

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


class ConsoleReporter:
    """Tells the user what is about to happen to each file and how far it got (stderr).

    On a terminal the progress line updates in place; in a log (not a terminal) a line is written at
    most every :attr:`EVERY_S` seconds. ``quiet`` keeps only failures and warnings.
    """

    EVERY_S = 10.0

    def __init__(self, quiet: bool = False, stream: Any = None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.failed: list[str] = []
        self.t0 = self.last = 0.0
        self.voxels = 0

    def reporter(self) -> Any:
        from .predict import Reporter

        if self.quiet:
            return Reporter(end=self.end)
        return Reporter(start=self.start, step=self.step, end=self.end)

    def _echo(self, text: str, nl: bool = True) -> None:
        click.echo(text, file=self.stream, nl=nl)

    def start(self, path: Path, plan: Any, index: int, total: int) -> None:
        self.t0 = self.last = time.perf_counter()
        self.voxels = math.prod(plan.spatial)
        self._echo(f"[{index}/{total}] {path.name}: {plan.describe()}")

    def step(self, done: int, total: int, unit: str) -> None:
        now = time.perf_counter()
        if total <= 1 or (not self.tty and now - self.last < self.EVERY_S and done < total):
            return
        self.last = now
        elapsed = now - self.t0
        each = elapsed / max(done, 1)
        line = (
            f"  {done}/{total} {unit}, {elapsed:.0f} s, {each:.1f} s each, ETA {each * (total - done):.0f} s"
        )
        if unit.endswith("blocks"):  # steps are nearly equal parts of the image
            line += f", {self.voxels * done / total / max(elapsed, 1e-9) / 1e6:.2f} MVoxel/s"
        if self.tty:
            self._echo("\r" + line.ljust(78), nl=done >= total)
        else:
            self._echo(line)

    def end(self, record: dict[str, Any], index: int, total: int) -> None:
        if record["status"] == "failed":
            self.failed.append(record["error"])
            self._echo(f"FAILED {record['error']}")
        for warning in record.get("warnings") or []:
            self._echo(f"WARNING {warning}")
        if self.quiet:
            return
        if record["status"] == "ok":
            seconds = (record.get("timings") or {}).get("total", 0.0)
            self._echo(f"  done: {record['objects']} objects in {seconds:.1f} s -> {record['output']}")
        elif record["status"] == "skipped":
            self._echo(f"[{index}/{total}] {Path(record['input']).name}: skipped ({record['reason']})")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="embedseg-run")
def main() -> None:
    """Torch-free EmbedSeg inference: ONNX Runtime (CPU/CUDA/TensorRT EP), TensorRT, or torch checkpoints."""


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--out-dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option(
    "--backend",
    type=click.Choice(BACKEND_CHOICES, case_sensitive=False),
    default="auto",
    show_default=True,
    help="Inference backend; auto picks the fastest that really runs here and says which.",
)
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: the backend's).")
@click.option(
    "--tile", default=None, help="Tile size, one int or z,y,x; 0 = whole image [default: contract]."
)
@click.option("--halo", default=None, help="Tile halo, one int or z,y,x [default: contract].")
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="Tiles per network call."
)
@click.option(
    "--tta/--no-tta", default=False, show_default=True, help="Test-time augmentation (8x in 2D, 16x in 3D)."
)
@click.option(
    "--seed-thresh",
    type=click.FloatRange(0, 1),
    default=None,
    help="Clustering: seediness to start an object, 0-1 [contract].",
)
@click.option(
    "--fg-thresh",
    type=click.FloatRange(0, 1),
    default=None,
    help="Clustering: seediness of foreground [contract].",
)
@click.option(
    "--min-object-size",
    type=click.IntRange(min=0),
    default=None,
    help="Clustering: smallest object in pixels [contract].",
)
@click.option(
    "--min-mask-sum",
    type=click.IntRange(min=0),
    default=None,
    help="Clustering: least foreground to cluster [contract].",
)
@click.option(
    "--min-unclustered-sum",
    type=click.IntRange(min=0),
    default=None,
    help="Clustering: stop when fewer left [contract].",
)
@click.option(
    "--cluster-device",
    type=click.Choice(["auto", "cpu", "cuda"], case_sensitive=False),
    default="auto",
    show_default=True,
    help="Where to cluster; auto: on the GPU when the backend runs there and numba sees it.",
)
@click.option("--save-seeds", is_flag=True, help="Also write the seediness map to OUT_DIR/seeds/.")
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="CPU threads (ORT intra-op, numba)."
)
@click.option("--channel-axis", type=int, default=None, help="Axis of the channels in the input files.")
@click.option(
    "--memory-budget",
    default=None,
    help="Memory this run may use (6G, 512M, 40%); larger images go block by block [50% of available].",
)
@click.option(
    "--level",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="OME-Zarr inputs: pyramid level to segment (0 = full resolution).",
)
@click.option("--block", default=None, help="Force block mode with this block core size (z,y,x; >= 8).")
@click.option("--block-halo", default=None, help="Big images: context around each block; > largest object.")
@click.option(
    "--engine-cache", type=click.Path(path_type=Path), default=None, help="TensorRT engine cache folder."
)
@click.option(
    "--overwrite", is_flag=True, help="Redo files whose outputs exist (default: skip them, resume)."
)
@click.option(
    "--dask",
    "dask_address",
    is_flag=False,
    flag_value="local",
    default=None,
    metavar="[ADDRESS]",
    help="Run on dask.distributed: a local cluster of worker processes, or the scheduler at ADDRESS.",
)
@click.option(
    "--dask-workers",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes of the local dask cluster [half the CPU cores, at least 2].",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def predict(
    model: Path,
    inputs: Sequence[str],
    out_dir: Path,
    backend: str,
    device: str | None,
    tile: str | None,
    halo: str | None,
    batch_size: int,
    tta: bool,
    seed_thresh: float | None,
    fg_thresh: float | None,
    min_object_size: int | None,
    min_mask_sum: int | None,
    min_unclustered_sum: int | None,
    cluster_device: str,
    save_seeds: bool,
    threads: int | None,
    channel_axis: int | None,
    memory_budget: str | None,
    level: int,
    block: str | None,
    block_halo: str | None,
    engine_cache: Path | None,
    overwrite: bool,
    dask_address: str | None,
    dask_workers: int | None,
    quiet: bool,
) -> None:
    """Segment INPUT files, folders or globs with MODEL (.onnx, .engine, a .pth checkpoint or a bioimage.io
    .zip package).

    INPUT may be TIFF files or OME-Zarr images (NGFF 0.4/0.5 stores). Outputs go to OUT_DIR/<name>.tif
    (OUT_DIR/<name>.ome.zarr label images for OME-Zarr inputs) with a summary.json that grows as files
    finish. Rerunning the same command resumes: outputs made with the same model and settings are skipped,
    and a big image interrupted in block mode goes on at its first unfinished block.
    With --dask, files (whole-image) or blocks (big images) are tasks on a dask cluster; the labels are
    the same as without it, and --memory-budget is per worker.
    """
    from .memory import Budget, parse_budget
    from .predict import (
        PixelSizeWarning,
        Predictor,
        predict_files,
        prepare_output_dir,
        refuse_output_among_inputs,
    )

    thresholds = {
        "seed_thresh": seed_thresh,
        "fg_thresh": fg_thresh,
        "min_object_size": min_object_size,
        "min_mask_sum": min_mask_sum,
        "min_unclustered_sum": min_unclustered_sum,
    }
    block_sizes = _sizes(block, "--block")
    if block_sizes is not None and any(b < 1 for b in block_sizes):
        raise click.BadParameter(f"{block!r}: block sizes must be at least 8 pixels", param_hint="--block")
    try:
        budget = parse_budget(memory_budget)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--memory-budget") from None
    try:
        refuse_output_among_inputs(inputs, out_dir)
        prepare_output_dir(out_dir)
    except InputError as exc:
        _fail(str(exc))
    warm = _warm_up_clustering()
    if not quiet and engine_build_pending(model, backend, device, engine_cache):
        click.echo(f"building a TensorRT engine for {model} on this GPU (once; minutes)", err=True)
    try:
        predictor = Predictor(
            model,
            backend=backend,
            device=device,
            tile=_sizes(tile, "--tile"),
            halo=_sizes(halo, "--halo"),
            tta=tta,
            batch_size=batch_size,
            threads=threads,
            engine_cache=engine_cache,
            thresholds=thresholds,
            cluster_device=cluster_device,
        )
    except (BackendError, ContractError, InputError, ValueError) as exc:
        _fail(str(exc))
    ndim = predictor.contract.ndim
    if channel_axis is not None and not -(ndim + 1) <= channel_axis <= ndim:
        _fail(
            f"--channel-axis {channel_axis}: a {ndim}D image with channels has {ndim + 1} axes (0 to {ndim})"
        )
    described = predictor.backend.describe()
    auto = described.get("auto")
    if not quiet:
        click.echo(
            f"model {model} ({predictor.contract.ndim}D, {predictor.contract.in_channels} channel(s))",
            err=True,
        )
        line = f"backend {described['backend']} on {described['device']} ({described['precision']})"
        if auto:
            line += " [auto]" + "".join(f"; skipped {s['backend']}: {s['reason']}" for s in auto["skipped"])
        if "engine_built_seconds" in described:
            built = described["engine_built_seconds"]
            line += f"; engine built in {built} s, cached as {described['engine']}"
        line += f"; clustering on {predictor.cluster_device}"
        if predictor.cluster_note:
            line += f" ({predictor.cluster_note})"
        click.echo(line, err=True)
        click.echo(
            f"tile {predictor.tile or 'whole image'}, halo {predictor.halo}, tta {predictor.tta}; "
            f"memory budget {budget}",
            err=True,
        )
    warm.join()
    executor = None
    if dask_address is not None:
        from .dask_run import DaskExecutor, looks_like_address

        if dask_address != "local" and not looks_like_address(dask_address):
            _fail(
                f"--dask {dask_address}: not a scheduler address (tcp://host:8786). Alone, --dask starts "
                "a local cluster: put it after the inputs, or give the address as --dask=ADDRESS"
            )

        try:
            executor = DaskExecutor(
                predictor, None if dask_address == "local" else dask_address, dask_workers, threads
            )
        except (ImportError, OSError, TimeoutError, ValueError) as exc:
            _fail(f"--dask: {exc}")
        if memory_budget is None:
            budget = Budget(executor.worker_budget(), "default: half a worker's memory")
        if not quiet:
            click.echo(f"{executor.describe()}; memory budget per worker {budget}", err=True)
    console = ConsoleReporter(quiet)

    # tifffile's parse warnings repeat our per-file messages; keep them off the terminal (a NullHandler,
    # not a level: embedseg_deploy.io listens to tifffile's warnings to detect broken files)
    logging.getLogger("tifffile").addHandler(logging.NullHandler())
    warnings.simplefilter("ignore", PixelSizeWarning)  # reported per file through the summary instead
    try:
        summary = predict_files(
            predictor,
            inputs,
            out_dir,
            save_seeds=save_seeds,
            overwrite=overwrite,
            channel_axis=channel_axis,
            block=block_sizes,
            block_halo=_sizes(block_halo, "--block-halo"),
            memory_budget=budget.bytes,
            level=level,
            reporter=console.reporter(),
            executor=executor,
        )
    except InputError as exc:
        _fail(str(exc))
    except DiskFullError as exc:
        _fail(f"{exc}; the finished outputs are kept: free some space and run the same command to resume", 1)
    finally:
        if executor is not None:
            executor.close()
    counts = summary["counts"]
    line = (
        f"{counts['ok']} segmented, {counts['skipped']} skipped (done before), {counts['failed']} failed; "
        f"{summary['objects']} objects; summary in {out_dir / 'summary.json'}"
    )
    if summary["stopped"]:
        line = f"stopped: {summary['stopped']}; {counts['not run']} file(s) not run. " + line
        line += "\nThe finished outputs are kept: free some space and run the same command to resume."
    click.echo(line)
    if console.failed:
        click.echo(f"{len(console.failed)} file(s) failed:", err=True)
        for message in console.failed:
            click.echo(f"  {message}", err=True)
    if console.failed or summary["stopped"]:
        sys.exit(1)


@main.command()
@click.argument("pred", type=click.Path(path_type=Path))
@click.argument("gt", type=click.Path(path_type=Path))
@click.option("-o", "--out-dir", type=click.Path(path_type=Path), default=None, help="Write CSV + JSON here.")
@click.option("--thresholds", default=None, help="IoU thresholds, comma-separated (default: evaluate's).")
def evaluate(pred: Path, gt: Path, out_dir: Path | None, thresholds: str | None) -> None:
    """Compare predicted labels PRED with ground truth GT (files or folders matched by name)."""
    from .evaluate import evaluate_paths, format_table

    kwargs: dict[str, Any] = {}
    if thresholds:
        try:
            kwargs["thresholds"] = [float(t) for t in thresholds.split(",") if t.strip()]
        except ValueError:
            _fail(f"--thresholds {thresholds!r}: give comma-separated numbers")
    try:
        report = evaluate_paths(pred, gt, out_dir=out_dir, **kwargs)
    except (InputError, ValueError, OSError) as exc:
        _fail(str(exc))
    click.echo(format_table(report))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--backend", type=click.Choice(BACKEND_CHOICES, case_sensitive=False), default="auto", show_default=True
)
@click.option("--device", default=None)
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def info(model: Path, backend: str, device: str | None, as_json: bool) -> None:
    """Show MODEL's contract and the backend that would run it."""
    from .backends import create_backend

    try:
        b = create_backend(model, backend, device=device)
    except (BackendError, ContractError, ValueError) as exc:
        _fail(str(exc))
    doc = {"backend": b.describe(), "contract": b.contract.to_dict()}
    if as_json:
        click.echo(json.dumps(doc, indent=1, default=str))
        return
    click.echo(f"model       {model} ({b.precision})")
    click.echo(f"backend     {b.name} on {b.device}")
    for line in describe_contract(b.contract):
        click.echo(line)


@main.command()
@click.option(
    "--model", type=click.Path(path_type=Path), default=None, help="2D ONNX model [bundled demo2d.onnx]."
)
@click.option(
    "-o", "--out-dir", type=click.Path(path_type=Path), default=Path("embedseg-demo"), show_default=True
)
@click.option(
    "--backend", type=click.Choice(BACKEND_CHOICES, case_sensitive=False), default="auto", show_default=True
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed of the synthetic image.")
@click.option("--threads", type=click.IntRange(min=1), default=None)
def demo(model: Path | None, out_dir: Path, backend: str, seed: int, threads: int | None) -> None:
    """Segment a synthetic image offline and report objects, AP against the truth, and timings."""
    from .demo import DemoError, run_demo

    try:
        result = run_demo(out_dir, model=model, backend=backend, seed=seed, threads=threads)
    except (DemoError, BackendError, ContractError, InputError, ValueError) as exc:
        _fail(str(exc))
    click.echo(f"backend  {result.backend['backend']} on {result.backend['device']}")
    click.echo(f"objects  {result.n_objects} found, {result.n_true} in the synthetic truth")
    click.echo(f"AP@0.5   {result.ap50:.3f}")
    click.echo("timings  " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.timings.items()))
    for name, path in result.files.items():
        click.echo(f"{name:<8} {path}")


from .bench import bench_command  # noqa: E402  (embedseg-run bench, benchmarks: H8)

main.add_command(bench_command)

if __name__ == "__main__":  # pragma: no cover
    main()
