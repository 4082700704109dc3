"""``embedseg-train``: training and checkpoint tools.

The commands need torch (the ``train`` extra); it is imported inside them, so ``--help`` and ``--version``
work on a runtime-only install, and a command there stops with one line naming the extra (exit 2).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import click

from embedseg_deploy.contract import ContractError
from embedseg_deploy.io import InputError

from . import __version__
from .extras import require

UPSTREAM_NORMS = ("min-max-percentile", "mean-std", "absolute")  # as in checkpoint.py, which needs torch


def _errors() -> tuple[type[BaseException], ...]:
    """The user errors that become one-line messages (torch is installed when this is called)."""
    from .checkpoint import CheckpointError
    from .train import TrainError

    return (CheckpointError, ContractError, InputError, TrainError)


class _TrainByDefault(click.Group):
    """``embedseg-train DATA_DIR --out RUN`` means ``embedseg-train train DATA_DIR --out RUN``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["train", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_TrainByDefault, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="embedseg-train")
def main() -> None:
    """Train EmbedSeg models and convert upstream EmbedSeg checkpoints.

    Without a command the arguments go to train: embedseg-train DATA_DIR --out RUN_DIR.
    """


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


def _floats(text: str | None, option: str | None = None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise click.BadParameter(
            f"expected numbers separated by commas, got {text!r}", param_hint=option
        ) from None
    return values


@main.command("import-upstream")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Our checkpoint file to write.",
)
@click.option(
    "--data-properties",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Upstream data_properties.json (default: beside the checkpoint).",
)
@click.option(
    "--normalization",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Upstream normalization.json (default: beside the checkpoint).",
)
@click.option(
    "--norm",
    type=click.Choice(UPSTREAM_NORMS),
    help="Upstream's normalisation (normalization.json's 'norm'); overrides the file's.",
)
@click.option(
    "--data-type", type=click.Choice(["8-bit", "16-bit"]), help="For --norm absolute (x/255 or x/65535)."
)
@click.option(
    "--test-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON with upstream create_test_configs_dict values (n_*, l_*, thresholds) that override.",
)
@click.option("--grid", help="Upstream grid (n_z,)n_y,n_x in array order, e.g. '32,96,96'.")
@click.option("--pixel", help="Upstream pixel extents (l_z,)l_y,l_x in array order.")
@click.option("--anisotropy", type=float, help="z/x voxel size ratio (3D; default from data_properties).")
@click.option("--seed-thresh", type=float)
@click.option("--fg-thresh", type=float)
@click.option("--min-object-size", type=int)
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
def import_upstream_cmd(checkpoint, out, data_properties, normalization, test_config, grid, pixel, anisotropy,
                        norm, data_type, seed_thresh, fg_thresh, min_object_size, force) -> None:  # fmt: skip
    """Convert an upstream EmbedSeg CHECKPOINT (best_iou_model.pth) into a self-describing checkpoint."""
    require("embedseg-train import-upstream", "train", "torch")
    from .checkpoint import convert_upstream

    try:
        contract = convert_upstream(
            checkpoint,
            out,
            data_properties,
            normalization,
            test_config,
            force=force,
            grid=_floats(grid, option="--grid"),
            pixel=_floats(pixel, option="--pixel"),
            anisotropy=anisotropy,
            norm=norm,
            data_type=data_type,
            seed_thresh=seed_thresh,
            fg_thresh=fg_thresh,
            min_object_size=min_object_size,
        )
    except _errors() as exc:
        raise click.ClickException(str(exc)) from None
    for note in contract.provenance.get("notes", []):
        click.echo(f"note: {note}")
    click.echo(
        f"wrote {out}: {contract.ndim}D, {contract.in_channels} channel(s), spacing {contract.spacing}, "
        f"normalization {contract.normalization.kind}, min_object_size {contract.thresholds.min_object_size}"
    )


def _ints(text: str | None, option: str | None = None) -> list[int] | None:
    values = _floats(text, option)
    if values is None:
        return None
    if any(v != int(v) for v in values):
        raise click.BadParameter(f"expected whole numbers, got {text!r}", param_hint=option)
    return [int(v) for v in values]


def omp_wait_policy(load: float, cores: int, env: Mapping[str, str]) -> str | None:
    """``PASSIVE`` when the machine is already busy (1-min load above half its cores) and the user has
    not chosen a policy; else None (OpenMP's default). Measured (benchmarks/results/train_threads.md): a
    2-thread step beside one busy process per core took 1.45 s with the default, 1.96 s spinning, 0.92 s
    passive; on an idle machine passive was 18 % slower (0.456 vs 0.386 s; 48 % in an earlier run), so it
    is not the default there."""
    if "OMP_WAIT_POLICY" in env or load <= 0.5 * cores:
        return None
    return "PASSIVE"


@main.command("train")
@click.argument("data_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder: config.json, best.pth, last.pth, log.csv, loss.png.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A run's config.json; options given here override its values.",
)
@click.option("--ndim", type=click.IntRange(2, 3), help="2 or 3 (default: from the masks).")
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs [200].")
@click.option(
    "--steps", type=click.IntRange(min=1), help="Optimizer steps in all: epochs = ceil(steps / iterations)."
)
@click.option("--batch-size", type=click.IntRange(min=1), help="Crops per batch [2D 16, 3D 4].")
@click.option(
    "--crop-size",
    help="Crop in array order, e.g. 96 or 32,128,128 [upstream's rule from the object sizes; the whole "
    "image along axes where the images are at most 1.5 times that].",
)
@click.option(
    "--crop-jitter",
    type=click.FloatRange(0, 0.5),
    help="Move each training crop off its object's centroid by up to this share of the crop per axis, "
    "drawn anew for every crop (0: upstream's fixed object-centred windows). 0.25 trained worse on DSB "
    "nuclei (10 seeds, benchmarks/results/train_seeds_jitter.md) [0].",
)
@click.option(
    "--ema",
    type=click.FloatRange(0, 1, max_open=True),
    help="Validate and keep an exponential moving average of the weights with this decay per step, e.g. "
    "0.99 (warmed up as (1 + n) / (10 + n) over the first steps); 0: the trained weights themselves. On "
    "DSB nuclei 0.99 halved the late epochs' jitter but left the kept models' test AP where it was "
    "(benchmarks/results/train_seeds_dsb_t9_ema.md) [0].",
)
@click.option("--iterations", type=click.IntRange(min=1), help="Batches per epoch [objects / batch].")
@click.option("--val-crops", type=click.IntRange(min=1), help="Validation crops [one per val object].")
@click.option("--lr", type=float, help="Adam learning rate [5e-4], poly schedule over the epochs.")
@click.option("--device", help="auto, cpu, cuda or cuda:N [auto].")
@click.option("--workers", type=click.IntRange(min=0), help="DataLoader workers [0 on CPU, 4 on CUDA].")
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads [torch default].")
@click.option("--seed", type=int, help="Seed of model init and crop sampling [0].")
@click.option("--amp/--no-amp", default=None, help="Mixed precision on CUDA [on].")
@click.option("--center", type=click.Choice(["medoid", "approximate-medoid", "centroid"]), help="[medoid]")
@click.option("--bg-id", type=click.IntRange(min=0), help="Mask value of the background [0].")
@click.option("--channel-axis", type=int, help="Channel axis of multi-channel images [from the files].")
@click.option(
    "--norm",
    type=click.Choice(["percentile", "absolute", "mean-std", "none"]),
    help="Image normalisation [percentile 1-99.8].",
)
@click.option("--pmin", type=float, help="Lower percentile [1].")
@click.option("--pmax", type=float, help="Upper percentile [99.8].")
@click.option("--divisor", type=float, help="Divisor of 'absolute' normalisation (255, 65535).")
@click.option("--anisotropy", type=float, help="z/x voxel size (3D) [from the files, else 1].")
@click.option("--pixel-size", help="Pixel size in array order, e.g. 2,0.5,0.5 [from the files].")
@click.option("--foreground-weight", type=float, help="[2D 10, 3D #bg/#fg]")
@click.option("--spacing", type=float, help="Embedding units per y/x pixel [1/(max(1024, image) - 1)].")
@click.option(
    "--max-minutes",
    type=click.FloatRange(min=0, min_open=True),
    help="Wall-clock budget; the poly schedule runs over the epochs that fit [none].",
)
@click.option(
    "--init",
    type=click.Path(exists=True, dir_okay=False),
    help="Start from this checkpoint's weights (fine-tuning; same data and settings).",
)
@click.option(
    "--qat",
    type=click.Choice(["cpu", "tensorrt"]),
    help="Quantization-aware fine-tuning of --init for this int8 target: int8 rounding of every "
    "convolution input simulated; a few epochs at a low --lr (e.g. 5 at 5e-5).",
)
@click.option(
    "--select",
    type=click.Choice(["ap", "iou"]),
    help="Keep as best.pth the latest epoch whose val AP@0.5 (whole images segmented by the runtime) is "
    "within two standard errors (at least one object) of the best so far (ap), or upstream's best mean IoU "
    "of val crops (iou) [ap].",
)
@click.option(
    "--tune-seed/--no-tune-seed",
    default=None,
    help="After training, lower best.pth's seed threshold to the level 95 % of the val objects' seediness "
    "peaks reach, where that is under the threshold and val AP@0.5 does not fall; the contract records "
    "the tune; not after --qat [on].",
)
@click.option(
    "--dilated-context",
    type=click.Choice(["crop", "all"]),
    help="crop: switch off the outer taps of the 3-tap convolutions that training crops do not feed with "
    "image data as the images do (on images much larger than the crop: dilated 2-16 for 40 px crops, 4-16 "
    "for 64 px; in 3D also the z taps of the 1/4 and 1/8 blocks for 16-plane crops), so training sees the "
    "network inference runs; all: train every tap, as upstream does (on 40 px crops of 256 px images "
    "whole images relapsed to one label in some epochs: benchmarks/results/train_seeds_synthetic.md). "
    "Fine-tuning (--init) keeps its start's [crop].",
)
@click.option("--resume", is_flag=True, help="Continue RUN_DIR/last.pth (optimiser, schedule and log).")
@click.option("--force", is_flag=True, help="Start over in a run folder that already holds a run.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or epoch lines.")
def train_cmd(data_dir, out, config_file, crop_size, pixel_size, norm, pmin, pmax, divisor, resume, force,
              quiet, **options) -> None:  # fmt: skip
    """Train a BranchedERFNet on DATA_DIR/{train,val}/{images,masks}/*.tif."""
    policy = omp_wait_policy(os.getloadavg()[0], os.cpu_count() or 1, os.environ)
    if policy:  # OpenMP reads it once, when torch loads it: before require() imports torch
        os.environ["OMP_WAIT_POLICY"] = policy
    require("embedseg-train train", "train", "torch")
    if policy and not quiet:
        click.echo(f"the machine is busy: OMP_WAIT_POLICY={policy} (set it yourself to choose)", err=True)
    from .train import TrainConfig, TrainError, train

    try:
        settings = TrainConfig.from_json_file(config_file) if config_file else {}
    except TrainError as exc:
        raise click.ClickException(str(exc)) from None
    settings.update({k: v for k, v in options.items() if v is not None})
    if data_dir is not None:
        settings["data_dir"] = str(data_dir)
    if out is not None:
        settings["out"] = str(out)
    if crop_size is not None:
        settings["crop_size"] = _ints(crop_size, "--crop-size")
    if pixel_size is not None:
        settings["pixel_size"] = _floats(pixel_size, "--pixel-size")
    norm_options = {"kind": norm, "pmin": pmin, "pmax": pmax, "divisor": divisor}
    if any(v is not None for v in norm_options.values()):
        settings["normalization"] = {
            **settings.get("normalization", {}),
            **{k: v for k, v in norm_options.items() if v is not None},
        }
    if not settings.get("data_dir") or not settings.get("out"):
        raise click.UsageError("give DATA_DIR and --out RUN_DIR (or a --config that has them)")
    try:
        with warnings.catch_warnings():  # a warning is one line on stderr, not Python's source quote
            warnings.showwarning = _warning_line
            result = train(TrainConfig.from_dict(settings), progress=not quiet, resume=resume, force=force)
    except _errors() as exc:
        raise click.ClickException(str(exc)) from None
    epoch = "-" if result.best_epoch is None else result.best_epoch + 1  # counted from 1, as printed
    scores = f"val AP@0.5 {result.best_ap50:.3f}, IoU {result.best_iou:.4f}"
    best = f"{result.best_checkpoint} (epoch {epoch}, {scores})"
    click.echo(f"done: {result.epochs_done} epoch(s) logged in {result.run_dir}; best {best}")
    tune = result.seed_tune
    if tune is not None and tune.after < tune.before:
        verdict = "kept" if tune.kept else "not kept (val AP@0.5 would fall)"
        click.echo(
            f"seed threshold {tune.before} -> {tune.after:.4f} {verdict}: {tune.below} of {tune.objects} val "
            f"objects peak under {tune.before}; val AP@0.5 {tune.val_ap50[0]:.3f} -> {tune.val_ap50[1]:.3f}"
        )


if __name__ == "__main__":
    main()
