"""``embedseg-export``: checkpoints to verified ONNX models and TensorRT engines.

    embedseg-export onnx CHECKPOINT -o model.onnx [--precision fp16|int8 [--calibrate DIR]] [--force]
    embedseg-export trt model.onnx -o model.engine [--tile 256x256/512x512/512x512] [--precision fp16|int8]
    embedseg-export bioimageio MODEL -o model.zip [--name ...] [--author ...] [--test-image image.tif]
    embedseg-export info MODEL

Every command fails with a one-line reason and exit status 1 on bad input; outputs are never overwritten
without ``--force`` and are written through a temp file. Heavy imports (torch, onnx, tensorrt) happen
inside the commands that need them, so ``--help`` works on a runtime-only install, and a command whose
extra is missing says which one to install (exit status 2).
"""

from __future__ import annotations

import contextlib
import importlib
import json
from pathlib import Path

import click

from embedseg_deploy.contract import ContractError
from embedseg_deploy.engine_cache import EngineError
from embedseg_deploy.io import atomic_write_json
from embedseg_training.extras import require

from . import __version__
from .choices import DEFAULT_KEEP, KEEP_CHOICES
from .info import ModelFileError, describe, detect_kind, expect_kind, format_info
from .verify import MIN_IMAGE_AP, TOLERANCES, VerificationError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ContractError,
    EngineError,
    ModelFileError,
    VerificationError,
)


def _user_errors() -> tuple[type[BaseException], ...]:
    """USER_ERRORS plus those of the modules that import here (they need torch or onnx)."""
    errors = USER_ERRORS
    for module, name in (
        ("embedseg_training.checkpoint", "CheckpointError"),
        ("embedseg_exporters.onnx_export", "ExportError"),
        ("embedseg_exporters.fp16", "Fp16Error"),
        ("embedseg_exporters.bioimageio", "BioimageioError"),
        ("embedseg_exporters.int8", "Int8Error"),
        ("embedseg_deploy.backends", "BackendError"),
        ("embedseg_deploy.io", "InputError"),
    ):
        with contextlib.suppress(ImportError):  # its extra is missing: the command that needs it says so
            errors += (getattr(importlib.import_module(module), name),)
    return errors


def _limits(name: str) -> str:
    """Default verification limits as --tolerance takes them, and how they are applied."""
    t = TOLERANCES[name]
    per = "as means" if t.statistic == "mean" else "per pixel"
    return f"{t.offset_px:g},{t.sigma_rel:g},{t.seed_abs:g} {per}"


def _keep(text: str) -> list[str]:
    keep = [k.strip() for k in text.split(",") if k.strip() and k.strip() != "none"]
    bad = [k for k in keep if k not in KEEP_CHOICES]
    if bad:
        raise click.BadParameter(f"unknown {bad}; choose from {', '.join(KEEP_CHOICES)} or none")
    return keep


def _save_report(path: Path | None, report: dict | None) -> None:
    if path is not None and report is not None:
        atomic_write_json(path, report)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="embedseg-export")
def main() -> None:
    """Export EmbedSeg models: checkpoint -> ONNX (fp32/fp16) -> TensorRT engine, each verified."""


def _tolerance(text: str | None, precision: str):
    """``--tolerance PX,REL,ABS`` -> a Tolerance keeping the precision's statistic and label rule; None for
    the default."""
    if text is None:
        return None
    from .verify import TOLERANCES, Tolerance

    try:
        px, rel, seed = (float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r}: give three numbers, e.g. 0.01,0.001,0.001") from None
    if min(px, rel, seed) <= 0:
        raise click.BadParameter(f"{text!r}: limits must be positive")
    default = TOLERANCES[precision]
    return Tolerance(px, rel, seed, default.min_label_ap, default.statistic)


def _is_tile(path: Path | None) -> bool:
    return path is not None and path.suffix == ".npy"


@main.command("onnx")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="ONNX file to write.")
@click.option(
    "--upstream-json",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder with an upstream checkpoint's data_properties.json etc. (default: the checkpoint's folder).",
)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True)
@click.option(
    "--calibrate",
    type=click.Path(path_type=Path),
    help="int8: folder of images like the user's (the training data folder, an images/ folder or TIFFs) "
    "[the training data the checkpoint records].",
)
@click.option(
    "--calibration-tiles",
    type=click.IntRange(min=1),
    default=None,
    help="int8: calibration tiles [16; fewer when the images are few and no larger than a tile].",
)
@click.option(
    "--int8-target",
    type=click.Choice(["cpu", "tensorrt"]),
    default="cpu",
    show_default=True,
    help="int8: the runtime the activations are quantized for: cpu (uint8 with zero points, ONNX Runtime "
    "CPU) or tensorrt (symmetric int8, TensorRT and its ONNX Runtime EP; slow on the CPU).",
)
@click.option(
    "--keep-fp32",
    default=",".join(DEFAULT_KEEP),
    show_default=True,
    help=f"fp16 only: parts kept in fp32, comma separated from {', '.join(KEEP_CHOICES)} (or none).",
)
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--exporter", type=click.Choice(["legacy", "dynamo"]), default="legacy", show_default=True)
@click.option(
    "--verify/--no-verify", default=True, show_default=True, help="Compare with torch before writing."
)
@click.option(
    "--verify-input",
    type=click.Path(path_type=Path),
    help="Images to judge fp16/int8 labels on: a .tif or a data folder (its val/, else test/ images) "
    "[the --calibrate or training data folder's]; or a C x spatial .npy tile for the torch check.",
)
@click.option(
    "--tolerance",
    metavar="PX,REL,ABS",
    help="Verification limits: offsets in pixels, sigma relative, seed absolute "
    f"[fp32: {_limits('fp32')}, labels identical; fp16 on images like yours: {_limits('fp16')}, labels "
    f"pooled AP@0.5 >= {MIN_IMAGE_AP:g}; fp16 on tiles alone: {_limits('fp16-tiles')}].",
)
@click.option(
    "--report", type=click.Path(path_type=Path, dir_okay=False), help="Write the verification JSON."
)
@click.option("--threads", type=int, default=2, show_default=True, help="torch CPU threads.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
def onnx_command(
    checkpoint,
    output,
    upstream_json,
    precision,
    calibrate,
    calibration_tiles,
    int8_target,
    keep_fp32,
    opset,
    exporter,
    verify,
    verify_input,
    tolerance,
    report,
    threads,
    force,
):
    """Export CHECKPOINT (ours, or upstream EmbedSeg with its JSON files) to an ONNX model."""
    limits = _tolerance(tolerance, "fp32" if precision == "int8" else precision)  # int8: the fp32 check
    if report is not None and not report.parent.is_dir():  # before the export, not after it
        raise click.ClickException(f"{report}: folder {report.parent} does not exist")
    try:
        expect_kind(checkpoint, "checkpoint", "embedseg-export onnx")
        require("embedseg-export onnx", "export", "torch", "onnx")
        import torch

        from .onnx_export import export_checkpoint

        torch.set_num_threads(threads)
        exported = export_checkpoint(
            checkpoint,
            output,
            upstream_json_dir=upstream_json,
            force=force,
            fixture=verify_input if _is_tile(verify_input) else None,
            verify_images=None if _is_tile(verify_input) else verify_input,
            opset=opset,
            exporter=exporter,
            precision=precision,
            keep_fp32=_keep(keep_fp32),
            verify=verify,
            tolerance=limits,
            calibrate=calibrate,
            calibration_tiles=calibration_tiles,
            int8_target=int8_target,
        )
    except _user_errors() as exc:
        raise click.ClickException(str(exc)) from None
    for note in exported.contract.provenance.get("notes", []):
        click.echo(f"note: {note}")
    if exported.report is not None:
        click.echo("\n".join(exported.report.lines()))
        _save_report(report, exported.report.to_dict())
    c, seconds = exported.contract, exported.seconds
    click.echo(
        f"wrote {output} ({c.ndim}D, {precision}, opset {c.provenance['export']['opset']}, {seconds:.1f} s)"
    )


@main.command("trt")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Engine file to write.")
@click.option(
    "--tile",
    "tiles",
    multiple=True,
    help="Spatial profile OPT or MIN/OPT/MAX, e.g. 512x512 or 16x64x64/32x128x128/48x160x160; repeat for "
    "more profiles. Default: the contract's GPU tile (min 8s, opt tile, max tile + 2 halo).",
)
@click.option("--batch", default="1", show_default=True, help="Batch size B or MIN/OPT/MAX.")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "tf32", "fp16", "int8"]),
    help="Default: the ONNX model's. fp16 from an fp32 model writes OUTPUT-stem.fp16.onnx, then builds; "
    "int8 needs an int8 model exported with --int8-target tensorrt.",
)
@click.option(
    "--keep-fp32", default=",".join(DEFAULT_KEEP), show_default=True, help="For the fp16 conversion."
)
@click.option("--workspace-mb", type=int, help="TensorRT workspace limit in MiB.")
@click.option(
    "--timing-cache", type=click.Path(path_type=Path, dir_okay=False), help="Read and update this file."
)
@click.option("--verify/--no-verify", default=True, show_default=True, help="Compare with ONNX Runtime CPU.")
@click.option(
    "--verify-input", type=click.Path(path_type=Path, dir_okay=False), help="C x spatial .npy tile."
)
@click.option("--device", type=int, default=0, show_default=True, help="CUDA device index.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@click.option("--verbose", is_flag=True, help="TensorRT's verbose log.")
def trt_command(
    model,
    output,
    tiles,
    batch,
    precision,
    keep_fp32,
    workspace_mb,
    timing_cache,
    verify,
    verify_input,
    device,
    force,
    verbose,
):
    """Build a TensorRT engine (+ OUTPUT.json sidecar) from an ONNX MODEL made by `embedseg-export onnx`."""
    try:
        expect_kind(model, "onnx", "embedseg-export trt")
        require("embedseg-export trt", "export", "onnx")
        from .tensorrt_build import build_trt

        path, sidecar = build_trt(
            model,
            output,
            tiles=tiles,
            batch=batch,
            precision=precision,
            workspace_mb=workspace_mb,
            timing_cache=timing_cache,
            keep_fp32=_keep(keep_fp32),
            verify=verify,
            fixture=verify_input,
            force=force,
            device_id=device,
            verbose=verbose,
        )
    except _user_errors() as exc:
        raise click.ClickException(str(exc)) from None
    facts = sidecar["engine"]
    if "verification" in sidecar:
        click.echo(f"verification: passed, largest errors {sidecar['verification']['max_errors']}")
    click.echo(
        f"wrote {path} + {path.name}.json (TensorRT {facts['tensorrt_version']}, {facts['gpu_name']}, "
        f"sm {facts['compute_capability']}, {facts['precision']}, {facts['build_seconds']} s)"
    )


@main.command("bioimageio")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), required=True, help="Package (.zip) to write."
)
@click.option("--name", default=None, help="Model name [EmbedSeg <n>D <model file stem>].")
@click.option("--description", default=None, help="One-paragraph description.")
@click.option("--author", "authors", multiple=True, help="Author name; repeat for several.")
@click.option("--license", "license_id", default="CC-BY-4.0", show_default=True, help="SPDX license id.")
@click.option("--tag", "tags", multiple=True, help="Extra tag; repeat for several.")
@click.option(
    "--test-image",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TIFF for the test tensors and cover (cropped to multiples of 8) [a synthetic image].",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16"]),
    default="fp32",
    show_default=True,
    help="From a checkpoint: the ONNX weights' precision.",
)
@click.option(
    "--validate/--no-validate",
    default=True,
    show_default=True,
    help="bioimageio.spec validation and bioimageio.core's model test, where installed.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
def bioimageio_command(
    model, output, name, description, authors, license_id, tags, test_image, precision, validate, force
):
    """Package MODEL (an ONNX model from `embedseg-export onnx`, or a checkpoint) for bioimage.io."""
    import tempfile

    try:
        kind = detect_kind(model)
        if kind == "engine":
            expect_kind(model, "onnx", "embedseg-export bioimageio")
        image = None
        if test_image is not None:
            from embedseg_deploy.io import read_tiff

            image = read_tiff(test_image).data
        from .bioimageio import export_bioimageio

        with tempfile.TemporaryDirectory() as folder:
            onnx = model
            if kind == "checkpoint":
                require("embedseg-export bioimageio CHECKPOINT", "export", "torch", "onnx")
                from .onnx_export import export_checkpoint

                onnx = Path(folder) / f"{model.stem}.onnx"
                exported = export_checkpoint(model, onnx, precision=precision)
                click.echo("\n".join(exported.report.lines()) if exported.report else f"exported {onnx.name}")
            package = export_bioimageio(
                onnx,
                output,
                name=name,
                description=description,
                authors=list(authors) or None,
                license=license_id,
                tags=list(tags),
                image=image,
                force=force,
                validate=validate,
            )
    except _user_errors() as exc:
        raise click.ClickException(str(exc)) from None
    for check, verdict in package.validation.items():
        click.echo(f"{check}: {verdict}")
    click.echo(
        f"wrote {package.path} (bioimage.io {package.description['format_version']}, "
        f"{package.n_objects} objects in the test image, {package.seconds:.1f} s)"
    )


@main.command("info")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--upstream-json", type=click.Path(path_type=Path, file_okay=False), help="For upstream checkpoints."
)
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
def info_command(model, upstream_json, as_json):
    """Print the contract of a checkpoint, ONNX model or engine; check an engine against this machine."""
    try:
        if detect_kind(model) == "checkpoint":
            require("embedseg-export info CHECKPOINT", "export", "torch")
        info = describe(model, upstream_json)
    except _user_errors() as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(info, indent=1) if as_json else format_info(info))
    if info["problems"]:
        raise click.ClickException("; ".join(info["problems"]))
