"""The training loop: data -> BranchedERFNet -> spatial-embedding loss -> self-describing checkpoints.

Follows upstream EmbedSeg's ``begin_training`` (method notes section 5) with these choices:

* Adam (lr 5e-4, weight decay 1e-4) and the poly schedule ``lr * (1 - e / n_epochs) ** 0.9`` over the
  run's real number of epochs (upstream hard-codes 200 and crashes beyond 201);
* crops are cut on the fly (embedseg_training.data.CropDataset), an epoch draws ``iterations x batch``
  crops uniformly over all objects (upstream: ``size`` = number of crops), and validation uses fixed,
  un-augmented crops of the val objects, so the val IoU (upstream's per-object IoU(phi > 0.5)) is not noisy;
* AMP (float16 + GradScaler) on CUDA; the loss always runs in float32;
* epochs are counted from 1 in what people read (log.csv, loss.png, the lines printed) and from 0 in
  the checkpoints' ``epoch`` key and :class:`RunResult` (upstream's format, an index);
* ``best.pth`` (see :mod:`.validate` for the rule; no optimiser) and ``last.pth`` (resumable: optimiser,
  schedule, grad scaler, RNG state, log) every epoch, ``log.csv`` and ``loss.png``; ``config.json`` holds
  every resolved setting and is accepted again as ``--config``.

Embedding spacing: upstream places pixels on a ``linspace(0, 1, n)`` grid with ``n`` the (rounded) test
image size, so the initial bandwidth ``exp(10)`` (``phi > 0.5`` within 0.0056 units) covers 5.7 px on a
1024 grid but 0.7 px on a 128 grid, where training barely starts. The default here is upstream's default
grid, ``spacing = 1 / (max(1024, n) - 1)`` per y/x pixel (``n`` = largest y/x image size rounded up to 8),
and ``anisotropy`` times that in z (physically isotropic embedding, as upstream).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from embedseg_deploy.contract import Contract, Normalization, Thresholds, default_architecture
from embedseg_deploy.io import atomic_write_text, atomic_writer

from . import __version__
from .checkpoint import load_checkpoint, package_versions, save_checkpoint
from .data import (
    CropDataset,
    compute_properties,
    grow_crop_to_images,
    load_split,
    round_up_8,
    worker_init_fn,
)
from .dilation import switch_off_taps, switch_off_unfed_taps
from .ema import WeightAverage
from .loss import spatial_embedding_loss
from .model import TILE_MULTIPLE, BranchedERFNet
from .validate import SeedTune, keeps, pick_images, pipeline_score, small_val_note, tune_seed_thresh

BEST, LAST, CONFIG, LOG_CSV, PLOT = "best.pth", "last.pth", "config.json", "log.csv", "loss.png"
LOG_FIELDS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_iou",
    "val_ap50",
    "val_ap50_90",
    "val_objects",
    "val_wide_objects",
    "lr",
    "crops_per_s",
    "data_time_fraction",
    "skipped_steps",
    "time_s",
)
POLY_POWER = 0.9
LINE_SECONDS = 30.0  # progress lines when stderr is not a terminal
UPSTREAM_GRID = 1024
MAX_NONFINITE_STEPS = 5  # consecutive NaN/inf losses before training stops


class TrainError(ValueError):
    """A training run cannot start or continue (bad settings, a run folder that does not fit)."""


@dataclass
class TrainConfig:
    """Every setting of a run; ``None`` means "derive from the data" (the resolved values go to config.json).

    Vectors (``crop_size``, ``pixel_size``) are in array order ``(z,) y, x``.
    """

    data_dir: str
    out: str
    ndim: int | None = None
    epochs: int = 200
    batch_size: int | None = None  # 2D 16, 3D 4
    crop_size: list[int] | None = None  # upstream's crop rule, grown to images under 1.5x it (data.py)
    crop_n_sigma: float = 5.0
    iterations: int | None = None  # per epoch; default ceil(objects / batch): one pass over all objects
    val_crops: int | None = None  # default: one crop per val object
    lr: float = 5e-4
    weight_decay: float = 1e-4
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    workers: int | None = None  # DataLoader workers; default 0 on CPU, 4 on CUDA
    threads: int | None = None  # torch CPU threads; None leaves torch's setting alone
    seed: int = 0
    amp: bool = True  # on CUDA only
    center: str = "medoid"
    bg_id: int = 0  # mask value of the background (upstream's background_id)
    channel_axis: int | None = None  # of multi-channel images; None: the one channel rule of io
    normalization: dict[str, Any] = field(default_factory=lambda: dataclasses.asdict(Normalization()))
    anisotropy: float | None = None
    pixel_size: list[float] | None = None
    foreground_weight: float | None = None
    spacing: float | None = None  # embedding units per y/x pixel
    seed_thresh: float = 0.9
    fg_thresh: float = 0.5
    select: str = "ap"  # best.pth by full-pipeline val AP@0.5 ("ap") or by upstream's crop IoU ("iou")
    dilated_context: str = "crop"  # "crop": taps crops do not feed as the images do stay off (dilation.py)
    crop_jitter: float = 0.0  # crops move off their object's centroid by up to this share (0: upstream's)
    ema: float = 0.0  # decay per step of the weight average that is validated and kept (ema.py); 0: none
    tune_seed: bool = True  # lower best.pth's seed threshold where val objects peak under it (validate.py)
    max_minutes: float | None = None  # wall-clock budget of one train() call; see epochs_in_budget
    steps: int | None = None  # optimizer steps in all; sets epochs to ceil(steps / iterations)
    init: str | None = None  # a checkpoint whose weights start the run (fine-tuning)
    qat: str | None = None  # int8 target ("cpu" or "tensorrt") simulated while fine-tuning; needs init

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TrainError(f"unknown training settings {unknown}; known: {sorted(names)}")
        missing = [k for k in ("data_dir", "out") if data.get(k) is None]
        if missing:
            raise TrainError(f"training settings need {missing}")
        return cls(**dict(data))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> dict[str, Any]:
        """The settings stored in a config.json (a dict: the CLI merges its own options into it)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TrainError(f"{path}: cannot read training config ({exc})") from None
        if not isinstance(data, dict):
            raise TrainError(f"{path}: a training config is a JSON object")
        return data


@dataclass
class RunResult:
    run_dir: Path
    best_checkpoint: Path | None
    last_checkpoint: Path
    best_iou: float
    best_epoch: int | None
    best_ap50: float  # full-pipeline pooled AP@0.5 on the val images at the best epoch
    epochs_done: int
    log: list[dict[str, Any]]
    config: TrainConfig
    contract: Contract  # the training loop's: best.pth's holds the tuned seed threshold (seed_tune)
    stopped_by_budget: bool = False  # max_minutes ended the run before config.epochs
    seed_tune: SeedTune | None = None  # best.pth's seed threshold tuned on val (tune_seed)


# ------------------------------------------------------------------------------------------------ helpers


def degenerate_seeds_warning(
    log: Sequence[Mapping[str, Any]], best_epoch: int | None, best: Path
) -> str | None:
    """What to tell the user when the kept epoch's val labels include objects started by a seed whose
    bandwidth is wider than any annotated object (:func:`.validate.wide_objects`): such an object takes
    pixels of several nuclei into one label. In the run measured the fault came at epoch 8 and stayed (the
    one epoch free of it scored test AP@0.5 0.600, the other 19 seeds 0.82 on average), so another seed, not
    another epoch, is the remedy."""
    if best_epoch is None:
        return None
    rows = {int(r["epoch"]): r for r in log}
    row = rows.get(best_epoch + 1, {})
    n = int(row.get("val_wide_objects") or 0)
    if not n:
        return None
    epochs = sum(1 for r in log if int(r.get("val_wide_objects") or 0))
    return (
        f"{best}: at its epoch {row['epoch']}, {n} val object(s) grew from a seed whose clustering bandwidth "
        f"is wider than the largest annotated object ({epochs} of {len(log)} epochs had such objects); each "
        "takes pixels of several objects into one label. This run degenerated: train again with another "
        "--seed (1 of 20 seeds on the DSB nuclei did, test AP@0.5 0.53; none of the other 19, nor of 10 on "
        "HeLa: benchmarks/results/wide_objects.md)"
    )


def poly_lr(base_lr: float, epoch: int, n_epochs: int) -> float:
    """Upstream's poly schedule over the run's epochs: ``base * (1 - epoch / n_epochs) ** 0.9``."""
    return base_lr * max(0.0, 1.0 - epoch / max(n_epochs, 1)) ** POLY_POWER


def epochs_in_budget(
    max_epochs: int, done: int, elapsed_s: float, epoch_times_s: Sequence[float], budget_s: float
) -> int:
    """Epochs of a run with a time budget: ``done`` plus those expected to fit in the time left
    (``budget_s - elapsed_s``), clamped to ``[done, max_epochs]``.

    An epoch is expected to take this call's mean epoch time (train + val + checkpoints), so the plan
    follows the machine's load both ways; a run can overshoot the budget by the excess of its last epoch
    over the mean.
    """
    if not epoch_times_s:
        return max_epochs
    per_epoch = max(float(np.mean(epoch_times_s)), 1e-9)
    fit = done + math.floor(max(budget_s - elapsed_s, 0.0) / per_epoch)
    return max(done, min(max_epochs, fit))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise TrainError(f"unknown device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device {name!r} asked for, but torch sees no CUDA GPU (use --device cpu)")
    return device


def default_spacing(max_image_shape: Sequence[int]) -> float:
    """Upstream's default grid: ``1 / (max(1024, n) - 1)`` with n the largest y/x size rounded up to 8."""
    n = max(round_up_8(max(max_image_shape[-2:])), UPSTREAM_GRID)
    return 1.0 / (n - 1)


def write_log_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_plot(path: Path, rows: Sequence[Mapping[str, Any]]) -> bool:
    """Loss and IoU curves as a PNG (no pyplot, no global backend change); False without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [r["train_loss"] for r in rows], label="train")
    ax1.plot(epochs, [r["val_loss"] for r in rows], label="val")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(epochs, [r["val_iou"] for r in rows], color="C2", label="IoU per object (crops)")
    ax2.plot(epochs, [r.get("val_ap50", np.nan) for r in rows], color="C3", label="AP@0.5 (images)")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("val")
    ax2.legend()
    fig.tight_layout()
    with atomic_writer(path) as f:
        fig.savefig(f, format="png", dpi=80)
    return True


class _Progress:
    """A click progress bar with loss and crops/s on a terminal; elsewhere (a log file, a pipe) a line
    every :data:`LINE_SECONDS` with the batch, the loss and the epoch's ETA; or nothing."""

    def __init__(self, enabled: bool, length: int, label: str):
        self.text, self.label, self.length, self.done = "", label, length, 0
        self.bar = None
        self.lines = enabled and not sys.stderr.isatty()
        self.start = self.last = time.perf_counter()
        if enabled and not self.lines:
            self.bar = click.progressbar(
                length=length, label=label, file=sys.stderr, item_show_func=lambda _: self.text
            )
            self.bar.__enter__()

    def update(self, text: str) -> None:
        self.text = text
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        now = time.perf_counter()
        if self.lines and (now - self.last >= LINE_SECONDS or self.done == self.length):
            self.last = now
            eta = (now - self.start) / self.done * (self.length - self.done)
            line = f"{self.label}: batch {self.done}/{self.length}, {text}, epoch ETA {eta:.0f} s"
            click.echo(line, err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


# ------------------------------------------------------------------------------------------------ setup


@dataclass
class _Setup:
    config: TrainConfig
    contract: Contract
    train_ds: CropDataset
    val_ds: CropDataset
    val_images: list  # the val Samples segmented by the full pipeline each epoch
    val_note: str | None  # why that check is coarse or partial
    device: torch.device


def settings_line(cfg: TrainConfig, contract: Contract, device: torch.device) -> str:
    """The resolved settings that decide a run, printed at its start (once the model is built)."""
    t = contract.thresholds
    steps = cfg.epochs * int(cfg.iterations)
    budget = f", at most {cfg.max_minutes:g} min" if cfg.max_minutes else ""
    jitter = f" (jitter {cfg.crop_jitter:g})" if cfg.crop_jitter else ""
    ema = f", weights averaged (EMA {cfg.ema:g})" if cfg.ema else ""
    return (
        f"training {contract.ndim}D on {cfg.data_dir}: crop {'x'.join(map(str, cfg.crop_size))}{jitter}, "
        f"batch {cfg.batch_size}, {cfg.iterations} iterations x {cfg.epochs} epochs = {steps} "
        f"steps{budget}, lr {cfg.lr:g} (poly){ema}, spacing 1/{1 / float(cfg.spacing):.0f} per px, "
        f"thresholds seed {t.seed_thresh} fg {t.fg_thresh} min object {t.min_object_size} px, device "
        f"{device}, threads {torch.get_num_threads()}, seed {cfg.seed}, {_taps_note(contract)}, best by val "
        f"{cfg.select.upper()} -> {cfg.out}"
    )


def _taps_note(contract: Contract) -> str:
    off = contract.provenance.get("dilated_taps_off")
    return f"outer taps off in {len(off['layers'])} axis convolutions" if off else "every tap trained"


def _initialise(model: torch.nn.Module, path: str, contract: Contract) -> Contract:
    """Start from the weights of the checkpoint ``path``, which must mean the same as this run's; returns
    its contract."""
    from .checkpoint import load_model

    try:
        start, theirs = load_model(Path(path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise TrainError(f"{path}: cannot start from this checkpoint ({exc})") from None
    for key in ("ndim", "in_channels", "spacing"):
        a, b = getattr(theirs, key), getattr(contract, key)
        if not np.allclose(a, b, rtol=1e-6):
            raise TrainError(f"{path}: its {key} {a} differs from this run's {b} (other data or settings)")
    model.load_state_dict(start.state_dict())
    return theirs


def _resolve(config: TrainConfig) -> _Setup:
    """Read the data, derive every unset value, build the datasets and the contract."""
    if config.epochs < 1:
        raise TrainError(f"epochs must be >= 1, got {config.epochs}")
    if config.steps is not None and config.steps < 1:
        raise TrainError(f"steps must be >= 1, got {config.steps}")
    if config.select not in ("ap", "iou"):
        raise TrainError(f"select must be ap or iou, got {config.select!r}")
    if config.dilated_context not in ("crop", "all"):
        raise TrainError(f"dilated_context must be crop or all, got {config.dilated_context!r}")
    if config.qat is not None and config.qat not in ("cpu", "tensorrt"):
        raise TrainError(f"qat must be cpu or tensorrt, got {config.qat!r}")
    if config.qat and not config.init:
        raise TrainError("quantization-aware training fine-tunes a trained model: give --init CHECKPOINT")
    if not 0.0 <= config.ema < 1.0:
        raise TrainError(f"ema must be within [0, 1), got {config.ema}")
    if config.ema and config.qat:
        raise TrainError("a weight average (ema) and quantization-aware training do not combine")
    if config.max_minutes is not None and not config.max_minutes > 0:
        raise TrainError(f"max_minutes must be > 0, got {config.max_minutes}")
    data_dir = Path(config.data_dir)
    if not data_dir.is_dir():
        raise TrainError(
            f"{data_dir}: data folder not found (expected train/ and val/ with images/ + masks/)"
        )
    split = {"channel_axis": config.channel_axis, "bg_id": config.bg_id}
    train = load_split(data_dir, "train", ndim=config.ndim, **split)
    val = load_split(data_dir, "val", ndim=train[0].ndim, in_channels=train[0].in_channels, **split)
    props = compute_properties(
        train + val,
        n_sigma=config.crop_n_sigma,
        pixel_size=config.pixel_size,
        anisotropy=config.anisotropy,
        foreground_weight=config.foreground_weight,
    )
    ndim = props.ndim
    crop = (
        config.crop_size
        if config.crop_size is not None
        else grow_crop_to_images(props.crop_size, props.max_image_shape)
    )
    crop = [int(crop)] if isinstance(crop, int | float) else [int(c) for c in crop]
    if len(crop) == 1:
        crop = crop * ndim
    if len(crop) != ndim or any(c < TILE_MULTIPLE or c % TILE_MULTIPLE for c in crop):
        raise TrainError(
            f"crop size {crop} must have {ndim} sizes (array order), each a multiple of {TILE_MULTIPLE}"
        )
    batch = config.batch_size or (16 if ndim == 2 else 4)
    device = resolve_device(config.device)
    norm = Normalization(**config.normalization)
    spacing_yx = config.spacing or default_spacing(props.max_image_shape)
    spacing = ([props.anisotropy * spacing_yx] if ndim == 3 else []) + [spacing_yx, spacing_yx]
    n_objects = sum(s.n_objects for s in train)
    resolved = dataclasses.replace(
        config,
        ndim=ndim,
        batch_size=batch,
        crop_size=crop,
        iterations=(iterations := config.iterations or max(1, math.ceil(n_objects / batch))),
        epochs=math.ceil(config.steps / iterations) if config.steps else config.epochs,
        workers=config.workers if config.workers is not None else (4 if device.type == "cuda" else 0),
        normalization=dataclasses.asdict(norm),
        anisotropy=props.anisotropy,
        pixel_size=props.pixel_size,
        foreground_weight=props.foreground_weight,
        spacing=spacing_yx,
        data_dir=str(data_dir.resolve()),  # the exporter finds it from anywhere (int8 calibration)
    )
    common = {"norm": norm, "center": config.center, "seed": config.seed, "anisotropy": props.anisotropy}
    length = resolved.iterations * batch
    train_ds = CropDataset(
        train, crop, augment=True, length=length, sampling="random", jitter=config.crop_jitter, **common
    )
    n_val = sum(s.n_objects for s in val)
    val_length = min(n_val, int(config.val_crops)) if config.val_crops else None
    val_ds = CropDataset(val, crop, augment=False, sampling="all", length=val_length, **common)
    contract = Contract(
        ndim=ndim,
        in_channels=props.in_channels,
        spacing=spacing,
        normalization=norm,
        thresholds=Thresholds(
            seed_thresh=config.seed_thresh, fg_thresh=config.fg_thresh, min_object_size=props.min_object_size
        ),
        anisotropy=props.anisotropy,
        pixel_size=props.pixel_size,
        padding="center" if ndim == 2 else "end",  # upstream's placements, kept for one convention
        architecture=default_architecture(ndim, props.in_channels),
        data_properties=props.to_dict(),
        provenance={"source": "embedseg_training", "trainer": f"embedseg_training {__version__}"},
    )
    used = pick_images(val)
    return _Setup(resolved, contract, train_ds, val_ds, used, small_val_note(val, used), device)


# ------------------------------------------------------------------------------------------------ epochs


def _batch_to(batch: Mapping[str, Any], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(batch[k].to(device, non_blocking=True) for k in ("image", "instance", "center"))


def _train_epoch(
    model, loader, opt, scaler, contract, fg_weight, device, use_amp, bar, epoch=0, average=None
) -> dict[str, float]:
    """One pass over ``loader``, moving the weight ``average`` (if any) after every step. A batch whose
    loss is NaN/inf is skipped before backward (on the CPU, without a grad scaler, one NaN step would
    poison every weight), with a warning; after :data:`MAX_NONFINITE_STEPS` such batches in a row the run
    stops with a :class:`TrainError`."""
    model.train()
    losses, n_crops, data_time, skipped, in_a_row = [], 0, 0.0, 0, 0
    start = time.perf_counter()
    batches = iter(loader)
    while True:
        t = time.perf_counter()
        batch = next(batches, None)
        data_time += time.perf_counter() - t
        if batch is None:
            break
        image, instance, center = _batch_to(batch, device)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            pred = model(image)
        res = spatial_embedding_loss(pred, instance, center, contract.spacing, fg_weight)
        if not torch.isfinite(res.loss.detach()).item():
            skipped, in_a_row = skipped + 1, in_a_row + 1
            names = ", ".join(sorted(set(map(str, batch["name"]))))
            if in_a_row >= MAX_NONFINITE_STEPS:
                raise TrainError(
                    f"epoch {epoch + 1}: the loss was {res.loss.item()} for {in_a_row} batches in a row, "
                    f"so training stopped (no step was taken on them; last.pth holds the last finished "
                    f"epoch, if any). Try a lower --lr or --no-amp, or check the images (last batch: {names})"
                )
            warnings.warn(
                f"epoch {epoch + 1}, batch {skipped + len(losses)}: loss is {res.loss.item()} (images "
                f"{names}); step skipped, weights unchanged",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        in_a_row = 0
        scaler.scale(res.loss).backward()
        scaler.step(opt)
        scaler.update()
        if average is not None:
            average.update(model)
        losses.append(res.loss.item())
        n_crops += image.shape[0]
        bar.update(f"loss {np.mean(losses):.4f}  {n_crops / (time.perf_counter() - start):.1f} crops/s")
    elapsed = max(time.perf_counter() - start, 1e-9)
    return {
        "train_loss": float(np.mean(losses)) if losses else float("nan"),
        "crops_per_s": n_crops / elapsed,
        "data_time_fraction": data_time / elapsed,
        "skipped_steps": skipped,
    }


@torch.no_grad()
def _validate(model, loader, contract, fg_weight, device, use_amp) -> tuple[float, float]:
    """(val loss, mean per-object IoU(phi > 0.5)) as upstream's val pass computes them."""
    model.eval()
    loss_sum, n, ious = 0.0, 0, []
    for batch in loader:
        image, instance, center = _batch_to(batch, device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            pred = model(image)
        res = spatial_embedding_loss(pred, instance, center, contract.spacing, fg_weight, compute_iou=True)
        loss_sum += res.loss.item() * image.shape[0]
        n += image.shape[0]
        ious.append(res.ious.cpu())
    all_ious = torch.cat(ious) if ious else torch.zeros(0)
    return loss_sum / max(n, 1), float(all_ious.mean()) if all_ious.numel() else 0.0


def _loader(ds: CropDataset, batch: int, drop_last: bool, workers: int, device: torch.device):
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        shuffle=False,  # the dataset draws its own (seeded) objects
        drop_last=drop_last,
        num_workers=workers,
        worker_init_fn=worker_init_fn if workers else None,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
    )


# ------------------------------------------------------------------------------------------------ run


def _restore(path: Path, model, opt, scaler, contract: Contract) -> dict[str, Any]:
    """Load a 'last' checkpoint into model, optimiser and scaler; returns it (epoch, log, best ...)."""
    if not path.is_file():
        raise TrainError(f"{path}: nothing to resume (no last checkpoint)")
    ck = load_checkpoint(path)
    if "optimizer_state_dict" not in ck or "contract" not in ck:
        raise TrainError(f"{path}: not a resumable checkpoint of ours (no optimiser state)")
    saved = Contract.from_dict(ck["contract"])
    for key in ("ndim", "in_channels", "spacing", "normalization"):
        if getattr(saved, key) != getattr(contract, key):
            raise TrainError(
                f"{path}: the run was trained with {key} = {getattr(saved, key)}, these settings give "
                f"{getattr(contract, key)}; resume with the run's config.json (--config)"
            )
    model.load_state_dict(ck["model_state_dict"], strict=True)
    opt.load_state_dict(ck["optimizer_state_dict"])
    if ck.get("grad_scaler") and scaler.is_enabled():
        scaler.load_state_dict(ck["grad_scaler"])
    if isinstance(ck.get("rng_state"), torch.Tensor):
        torch.set_rng_state(ck["rng_state"])
    if ck.get("cuda_rng_state") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["cuda_rng_state"])
    return ck


def tune_seed(
    model: torch.nn.Module, contract: Contract, val_images: Sequence[Any], device: str | torch.device = "cpu"
) -> SeedTune:
    """Tune ``contract``'s seed threshold for ``model`` on the val images (:func:`.validate.tune_seed_thresh`)
    and record it in the contract (``thresholds.seed_thresh`` where kept, ``provenance.seed_tune``). A
    contract tuned before (a resumed run that kept its best.pth) starts again from its untuned threshold."""
    from embedseg_deploy.backends.torch_backend import ModuleBackend

    start = (contract.provenance.get("seed_tune") or {}).get("before", contract.thresholds.seed_thresh)
    backend = ModuleBackend(model, contract, str(device))
    tune = tune_seed_thresh(backend, val_images, start, contract.thresholds.fg_thresh)
    contract.thresholds = dataclasses.replace(
        contract.thresholds, seed_thresh=tune.after if tune.kept else start
    )
    contract.provenance["seed_tune"] = tune.to_dict()
    return tune


def _tune_seed(path: Path, val_images: Sequence[Any], device: torch.device) -> SeedTune:
    """:func:`tune_seed` of the checkpoint at ``path``, written back into it atomically."""
    from .checkpoint import model_from_state_dict

    ckpt = load_checkpoint(path)
    contract = Contract.from_dict(ckpt["contract"])
    model = model_from_state_dict(ckpt["model_state_dict"], contract, path).to(device).eval()
    tune = tune_seed(model, contract, val_images, device)
    ckpt["contract"] = contract.to_dict()
    with atomic_writer(path) as f:
        torch.save(ckpt, f)
    return tune


def train(
    config: TrainConfig | Mapping[str, Any] | str | os.PathLike,
    progress: bool = True,
    resume: bool | str | os.PathLike = False,
    force: bool = False,
    on_epoch: Callable[[torch.nn.Module, Contract, dict[str, Any]], None] | None = None,
) -> RunResult:
    """Train a model as ``config`` (settings, a dict of them, or a run's config.json) says; ``resume``
    continues from ``out/last.pth`` (or a given path) with its optimiser, schedule, RNG state and log.

    Writes ``config.json`` (resolved settings), ``best.pth``, ``last.pth``, ``log.csv`` and ``loss.png``
    into ``config.out``. With ``max_minutes`` the call stops before an epoch that is not expected to end
    within that many minutes from its start: after every epoch the run is re-planned to the epochs
    expected to fit (:func:`epochs_in_budget`), epoch e gets the poly lr over that plan and the lr never
    rises (a plan that grows when the load drops holds the lr until the schedule catches up), so it falls
    to ~0 at the end of the budget. Without ``max_minutes`` runs are deterministic.

    ``on_epoch(model, contract, row)`` is called after each epoch's checkpoints are written (``row`` is
    its log row), e.g. to score the model on other images or to plot live.
    """
    t_call = time.perf_counter()
    if isinstance(config, str | os.PathLike):
        config = TrainConfig.from_json_file(config)
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    setup = _resolve(cfg)
    cfg, contract, device = setup.config, setup.contract, setup.device
    run_dir = Path(cfg.out)
    held = [f for f in (CONFIG, LAST, BEST) if (run_dir / f).exists()]
    if held and not (resume or force):
        raise TrainError(
            f"{run_dir} already holds a run ({', '.join(held)}): --resume continues it, --force starts over "
            "in it, or give another --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG, cfg.to_json() + "\n")
    use_amp = bool(cfg.amp and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(cfg.seed)
    model = BranchedERFNet(contract.ndim, contract.in_channels)
    model.init_output(contract.ndim)
    start_contract = _initialise(model, cfg.init, contract) if cfg.init else None
    model.to(device)
    taps = None  # before the QAT hooks: the probe input must not set their ranges
    if start_contract is not None:  # fine-tuning keeps the network it starts from, layer by layer
        taps = start_contract.provenance.get("dilated_taps_off")
        try:
            switch_off_taps(model, taps["layers"] if taps else [])
        except (KeyError, TypeError, ValueError) as exc:
            raise TrainError(f"{cfg.init}: unreadable record of switched-off taps ({exc})") from None
    elif cfg.dilated_context == "crop":
        crop, image = list(cfg.crop_size), contract.data_properties["max_image_shape"]
        taps = {"crop_size": crop, "image_shape": image, "layers": switch_off_unfed_taps(model, crop, image)}
    if taps:
        contract.provenance["dilated_taps_off"] = taps
    if progress:  # after the taps: the line says which are off
        click.echo(settings_line(cfg, contract, device), err=True)
    if setup.val_note:
        warnings.warn(setup.val_note, stacklevel=2)
    if cfg.qat:
        from .qat import attach

        attach(model, symmetric=cfg.qat == "tensorrt")
        contract.provenance["qat"] = {"from": cfg.init, "target": cfg.qat, "simulated": "convolution inputs"}
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    average = WeightAverage(model, cfg.ema) if cfg.ema else None
    judged = average.module if average else model  # what is validated, kept as best.pth and passed on
    start, best_iou, best_ap50, best_epoch, log = 0, -math.inf, -math.inf, None, []
    n_epochs = cfg.epochs  # the schedule's length; a time budget re-plans it after every epoch
    if resume:
        ck = _restore(run_dir / LAST if resume is True else Path(resume), model, opt, scaler, contract)
        start, best_iou, log = int(ck["epoch"]) + 1, float(ck["best_iou"]), list(ck["log"])
        best_ap50 = float(ck.get("best_ap50", -math.inf))
        best_epoch = ck.get("best_epoch")
        if average is not None:
            if not ck.get("weight_average"):
                raise TrainError(f"{cfg.out}: the run kept no weight average to resume (trained without ema)")
            average.load_state_dict(ck["weight_average"])
        if cfg.max_minutes is not None:  # a budgeted run goes on with its plan
            n_epochs = min(n_epochs, int((ck.get("scheduler") or {}).get("n_epochs", n_epochs)))

    fg_weight = float(cfg.foreground_weight)
    train_loader = _loader(setup.train_ds, cfg.batch_size, True, cfg.workers, device)
    val_loader = _loader(setup.val_ds, cfg.batch_size, False, cfg.workers, device)
    provenance = {**contract.provenance, "config": cfg.to_dict(), "versions": package_versions()}
    from embedseg_deploy.backends.torch_backend import ModuleBackend

    runtime = ModuleBackend(judged, contract, str(device))  # the model being judged, as embedseg-run sees it
    extent = (contract.data_properties or {}).get("max_extent")  # of the annotated objects: wide_objects
    epoch_times: list[float] = []
    epoch = start
    while epoch < n_epochs:
        lr = poly_lr(cfg.lr, epoch, n_epochs)
        if cfg.max_minutes is not None and log:  # a re-plan never raises the lr
            lr = min(lr, float(log[-1]["lr"]))
        for group in opt.param_groups:
            group["lr"] = lr
        setup.train_ds.set_epoch(epoch)
        t_epoch = time.perf_counter()
        bar = _Progress(progress, len(train_loader), f"epoch {epoch + 1}/{n_epochs}")
        try:
            stats = _train_epoch(
                model, train_loader, opt, scaler, contract, fg_weight, device, use_amp, bar, epoch, average
            )
        finally:
            bar.close()
        val_loss, val_iou = _validate(judged, val_loader, contract, fg_weight, device, use_amp)
        score = pipeline_score(runtime, setup.val_images, max_extent=extent)
        row = {"epoch": epoch + 1, **stats, "val_loss": val_loss, "val_iou": val_iou, "lr": lr}
        row |= {"val_ap50": score.ap50, "val_ap50_90": score.ap50_90, "val_objects": score.n_true}
        row["val_wide_objects"] = score.wide_objects
        row["time_s"] = time.perf_counter() - t_epoch
        log.append(row)
        if cfg.select == "ap":  # within two standard errors of the best AP so far: later epochs win
            improved = keeps(score.ap50, [r.get("val_ap50", 0.0) for r in log[:-1]], score.n_true)
        else:  # upstream's rule
            improved = val_iou > best_iou
        if improved:
            best_iou, best_ap50, best_epoch = val_iou, score.ap50, epoch
        contract.provenance = {**provenance, "epoch": epoch, "val_iou": val_iou, "val": score.to_dict()}
        schedule = {"kind": "poly", "power": POLY_POWER, "base_lr": cfg.lr, "n_epochs": n_epochs}
        common = {
            "epoch": epoch,
            "best_iou": best_iou,
            "log": log,
            "scheduler": {**schedule, "last_epoch": epoch},
        }
        if improved:
            best_extra = {"best_epoch": best_epoch, "best_ap50": best_ap50}
            save_checkpoint(run_dir / BEST, judged, contract, **common, extra=best_extra)
        save_checkpoint(
            run_dir / LAST,
            model,
            contract,
            **common,
            optimizer_state_dict=opt.state_dict(),
            extra={
                "best_epoch": best_epoch,
                "best_ap50": best_ap50,
                "grad_scaler": scaler.state_dict() if use_amp else None,
                "weight_average": average.state_dict() if average else None,
                "rng_state": torch.get_rng_state(),
                "cuda_rng_state": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
            },
        )
        write_log_csv(run_dir / LOG_CSV, log)
        write_plot(run_dir / PLOT, log)
        if progress:
            click.echo(
                f"epoch {epoch + 1}/{n_epochs}: train loss {row['train_loss']:.4f}, "
                f"val loss {val_loss:.4f}, val IoU {val_iou:.4f}, val AP@0.5 {score.ap50:.3f} "
                f"({score.n_pred} objects for {score.n_true}){' (best)' if improved else ''}, "
                f"lr {lr:.2e}, {row['crops_per_s']:.1f} crops/s, data {100 * row['data_time_fraction']:.0f}%"
                + (f", {row['skipped_steps']} non-finite step(s) skipped" if row["skipped_steps"] else ""),
                err=True,
            )
        epoch_times.append(time.perf_counter() - t_epoch)
        if on_epoch is not None:
            on_epoch(judged, contract, row)
        epoch += 1
        if cfg.max_minutes is not None:
            elapsed = time.perf_counter() - t_call
            n_epochs = epochs_in_budget(cfg.epochs, epoch, elapsed, epoch_times, 60.0 * cfg.max_minutes)
    best = run_dir / BEST
    warning = degenerate_seeds_warning(log, best_epoch, best)
    if warning:
        warnings.warn(warning, stacklevel=2)
    seed_tune = None
    # after the loop, outside a max_minutes budget; not after QAT, whose best epoch was chosen on the
    # model with int8 rounding simulated, which the fp32 network loaded here is not
    if best.is_file() and cfg.tune_seed and not cfg.qat and setup.val_images:
        seed_tune = _tune_seed(best, setup.val_images, device)
    return RunResult(
        run_dir=run_dir,
        best_checkpoint=best if best.is_file() else None,
        last_checkpoint=run_dir / LAST,
        best_iou=best_iou,
        best_epoch=best_epoch,
        best_ap50=best_ap50,
        epochs_done=len(log),
        log=log,
        config=cfg,
        contract=contract,
        stopped_by_budget=n_epochs < cfg.epochs,
        seed_tune=seed_tune,
    )
