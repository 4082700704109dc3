"""The training loop: data -> BranchedERFNet -> spatial-embedding loss -> self-describing checkpoints.

Follows upstream EmbedSeg's ``begin_training`` (method notes section 5) with these choices:

* Adam (lr 5e-4, weight decay 1e-4) and the poly schedule ``lr * (1 - e / n_epochs) ** 0.9`` over the
  run's real number of epochs (upstream hard-codes 200 and crashes beyond 201);
* crops are cut on the fly (embedseg_training.data.CropDataset), an epoch draws ``iterations x batch``
  crops uniformly over all objects (upstream: ``size`` = number of crops), and validation uses fixed,
  un-augmented crops of the val objects, so the val IoU (upstream's per-object IoU(phi > 0.5)) is not noisy;
* AMP (float16 + GradScaler) on CUDA; the loss always runs in float32;
* ``best.pth`` (val IoU strictly greater than before, no optimiser) and ``last.pth`` (resumable: optimiser,
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
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedseg_deploy.contract import Contract, Normalization, Thresholds
from embedseg_deploy.io import InputError

from . import __version__
from .checkpoint import load_checkpoint, package_versions, save_checkpoint
from .data import CropDataset, compute_properties, load_split, round_up_8, worker_init_fn
from .loss import spatial_embedding_loss
from .model import TILE_MULTIPLE, BranchedERFNet, architecture_of

BEST, LAST, CONFIG, LOG_CSV, PLOT = "best.pth", "last.pth", "config.json", "log.csv", "loss.png"
LOG_FIELDS = ("epoch", "train_loss", "val_loss", "val_iou", "lr", "crops_per_s", "data_time_fraction", "time_s")
POLY_POWER = 0.9
UPSTREAM_GRID = 1024


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
    crop_size: list[int] | None = None  # data properties' crop (upstream's notebook rule)
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
    normalization: dict[str, Any] = field(default_factory=lambda: dataclasses.asdict(Normalization()))
    anisotropy: float | None = None
    pixel_size: list[float] | None = None
    foreground_weight: float | None = None
    spacing: float | None = None  # embedding units per y/x pixel
    seed_thresh: float = 0.9
    fg_thresh: float = 0.5

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
    epochs_done: int
    log: list[dict[str, Any]]
    config: TrainConfig
    contract: Contract


# ------------------------------------------------------------------------------------------------ helpers


def poly_lr(base_lr: float, epoch: int, n_epochs: int) -> float:
    """Upstream's poly schedule over the run's epochs: ``base * (1 - epoch / n_epochs) ** 0.9``."""
    return base_lr * max(0.0, 1.0 - epoch / max(n_epochs, 1)) ** POLY_POWER


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
    n = max(round_up_8(max(max_image_shape[-2:]) + 7 - 7), UPSTREAM_GRID)
    return 1.0 / (n - 1)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_log_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(path, buf.getvalue())


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
    ax2.plot(epochs, [r["val_iou"] for r in rows], color="C2")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("val IoU (per object)")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=80)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return True


class _Progress:
    """A click progress bar with loss and crops/s, or nothing."""

    def __init__(self, enabled: bool, length: int, label: str):
        self.text = ""
        self.bar = None
        if enabled:
            import click

            self.bar = click.progressbar(
                length=length, label=label, file=sys.stderr, item_show_func=lambda _: self.text
            )
            self.bar.__enter__()

    def update(self, text: str) -> None:
        self.text = text
        if self.bar is not None:
            self.bar.update(1)

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
    device: torch.device


def _resolve(config: TrainConfig) -> _Setup:
    """Read the data, derive every unset value, build the datasets and the contract."""
    if config.epochs < 1:
        raise TrainError(f"epochs must be >= 1, got {config.epochs}")
    data_dir = Path(config.data_dir)
    if not data_dir.is_dir():
        raise TrainError(f"{data_dir}: data folder not found (expected train/ and val/ with images/ + masks/)")
    train = load_split(data_dir, "train", ndim=config.ndim)
    val = load_split(data_dir, "val", ndim=train[0].ndim, in_channels=train[0].in_channels)
    props = compute_properties(
        train + val,
        n_sigma=config.crop_n_sigma,
        pixel_size=config.pixel_size,
        anisotropy=config.anisotropy,
        foreground_weight=config.foreground_weight,
    )
    ndim = props.ndim
    crop = list(config.crop_size) if config.crop_size is not None else list(props.crop_size)
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
        iterations=config.iterations or max(1, math.ceil(n_objects / batch)),
        val_crops=config.val_crops,
        workers=config.workers if config.workers is not None else (4 if device.type == "cuda" else 0),
        normalization=dataclasses.asdict(norm),
        anisotropy=props.anisotropy,
        pixel_size=props.pixel_size,
        foreground_weight=props.foreground_weight,
        spacing=spacing_yx,
        data_dir=str(data_dir),
    )
    train_ds = CropDataset(train, crop, norm=norm, center=config.center, augment=True, seed=config.seed,
                           anisotropy=props.anisotropy, length=resolved.iterations * batch, sampling="random")  # fmt: skip
    val_ds = CropDataset(val, crop, norm=norm, center=config.center, augment=False, seed=config.seed,
                         anisotropy=props.anisotropy, sampling="all")  # fmt: skip
    if config.val_crops:
        val_ds.length = min(val_ds.length, int(config.val_crops))
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
        padding="center" if ndim == 2 else "end",
        architecture=architecture_of(BranchedERFNet(ndim, props.in_channels)) if False else {},
        data_properties=props.to_dict(),
        provenance={"source": "embedseg_training", "trainer": f"embedseg_training {__version__}"},
    )
    contract.architecture = {
        "name": "BranchedERFNet" if ndim == 2 else "BranchedERFNet_3d",
        "num_classes": [2 * ndim, 1],
        "input_channels": props.in_channels,
    }
    return _Setup(resolved, contract, train_ds, val_ds, device)
