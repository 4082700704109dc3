"""``embedseg-run evaluate PRED GT``: pair label files, compute the metrics, write CSV and JSON.

Predictions and ground truth are files or folders of TIFFs; files in two folders pair by name
(:func:`embedseg_deploy.io.tiff_stem`: the ``.tif``/``.tiff``/``.ome.tif`` suffix may differ). Every image
is matched at each threshold (default IoU 0.50:0.05:0.95) and the dataset is summarised both ways, always
labelled: ``per_image_mean`` (what EmbedSeg, Cellpose and Kaggle DSB report) and ``pooled`` (StarDist's
``matching_dataset`` default). SEG and the DSB score come with every image and summary. See
:mod:`embedseg_deploy.metrics` for the definitions.
"""

from __future__ import annotations

import csv
import io as _stringio
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import __version__
from .io import InputError, atomic_write_json, atomic_write_text, read_tiff, tiff_files, tiff_stem
from .metrics import (
    AGGREGATIONS,
    CRITERIA,
    DSB_THRESHOLDS,
    Criterion,
    DatasetMatching,
    LabelError,
    Matching,
    SegResult,
    aggregate,
    aggregate_seg,
    check_labels,
    dsb_from_matchings,
    label_overlap,
    match_overlap,
    seg_from_overlap,
)

DEFAULT_THRESHOLDS: tuple[float, ...] = DSB_THRESHOLDS
CSV_NAME = "evaluation.csv"
JSON_NAME = "evaluation.json"
_MAX_LISTED = 20


@dataclass(frozen=True)
class ImagePair:
    """A prediction file and its ground-truth partner; ``name`` is the shared file name without suffix."""

    name: str
    pred: Path
    gt: Path


@dataclass(frozen=True)
class ImageResult:
    """Metrics of one image: one :class:`Matching` per threshold, SEG and the DSB score."""

    name: str
    pred: Path
    gt: Path
    shape: tuple[int, ...]
    matchings: tuple[Matching, ...]
    seg: SegResult
    dsb: float

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "pred": str(self.pred),
            "gt": str(self.gt),
            "shape": list(self.shape),
            "seg": self.seg.to_dict(),
            "dsb": self.dsb,
            "matchings": [m.to_dict() for m in self.matchings],
        }


@dataclass(frozen=True)
class Summary:
    """Dataset metrics under one aggregation: one record per threshold, SEG and the DSB score."""

    aggregation: str
    matchings: tuple[DatasetMatching, ...]
    seg: float
    dsb: float

    def to_dict(self) -> dict:
        return {
            "aggregation": self.aggregation,
            "seg": self.seg,
            "dsb": self.dsb,
            "matchings": [m.to_dict() for m in self.matchings],
        }


@dataclass(frozen=True)
class EvaluationReport:
    """Everything ``evaluate_paths`` computed, plus where it wrote the CSV and JSON files (if anywhere)."""

    pred: Path
    gt: Path
    criterion: str
    thresholds: tuple[float, ...]
    ignore_label: int | None
    images: tuple[ImageResult, ...]
    summaries: dict[str, Summary]
    unpaired_pred: tuple[Path, ...] = ()
    unpaired_gt: tuple[Path, ...] = ()
    csv_path: Path | None = None
    json_path: Path | None = None

    @property
    def per_image_mean(self) -> Summary:
        return self.summaries["per_image_mean"]

    @property
    def pooled(self) -> Summary:
        return self.summaries["pooled"]

    def to_dict(self) -> dict:
        return {
            "format": 1,
            "tool": f"embedseg-deploy {__version__} evaluate",
            "pred": str(self.pred),
            "gt": str(self.gt),
            "criterion": self.criterion,
            "thresholds": list(self.thresholds),
            "ignore_label": self.ignore_label,
            "dsb_thresholds": list(DSB_THRESHOLDS),
            "n_images": len(self.images),
            "summaries": {k: s.to_dict() for k, s in self.summaries.items()},
            "images": [r.to_dict() for r in self.images],
            "unpaired_pred": [str(p) for p in self.unpaired_pred],
            "unpaired_gt": [str(p) for p in self.unpaired_gt],
        }


# ------------------------------------------------------------------------------------------------ pairing


def _tiffs(folder: Path) -> dict[str, Path]:
    """:func:`tiff_files` of a folder, which must hold at least one."""
    found = tiff_files(folder)
    if not found:
        raise InputError(f"{folder}: no .tif/.tiff files")
    return found


def _listing(paths: Iterable[Path]) -> str:
    names = sorted(p.name for p in paths)
    more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def pair_files(
    pred: str | os.PathLike, gt: str | os.PathLike, strict: bool = True
) -> tuple[list[ImagePair], list[Path], list[Path]]:
    """Pair prediction and ground-truth files; returns ``(pairs, unpaired_pred, unpaired_gt)``.

    Two files pair with each other whatever their names; a file pairs with the file of the same name in
    a folder; two folders pair their TIFFs by name. With ``strict`` (default) a file left without a
    partner is an error that lists them all; else they are returned (no pair at all is always an error).
    """
    pred, gt = Path(pred), Path(gt)
    for what, path in (("predictions", pred), ("ground truth", gt)):
        if not path.exists():
            raise InputError(f"{path}: {what} not found")
    if pred.is_file() and gt.is_file():
        return [ImagePair(tiff_stem(gt), pred, gt)], [], []
    if pred.is_file() or gt.is_file():
        file, folder = (pred, gt) if pred.is_file() else (gt, pred)
        name = tiff_stem(file)
        partner = _tiffs(folder).get(name)
        if partner is None:
            raise InputError(f"{folder}: no .tif/.tiff file named {name!r} to pair with {file}")
        return [ImagePair(name, *((file, partner) if file == pred else (partner, file)))], [], []
    preds, gts = _tiffs(pred), _tiffs(gt)
    pairs = [ImagePair(name, preds[name], gts[name]) for name in sorted(preds.keys() & gts.keys())]
    lone_pred = [preds[k] for k in sorted(preds.keys() - gts.keys())]
    lone_gt = [gts[k] for k in sorted(gts.keys() - preds.keys())]
    problems = []
    if lone_gt:
        problems.append(f"{pred}: no prediction for {len(lone_gt)} ground-truth file(s): {_listing(lone_gt)}")
    if lone_pred:
        problems.append(f"{gt}: no ground truth for {len(lone_pred)} prediction(s): {_listing(lone_pred)}")
    if problems and (strict or not pairs):
        raise InputError("; ".join(problems))
    return pairs, lone_pred, lone_gt


# --------------------------------------------------------------------------------------------- evaluation


def _check_thresholds(thresholds: float | Sequence[float]) -> tuple[float, ...]:
    """Sorted distinct values in (0, 1], rounded to 10 decimals (``np.arange`` makes 0.6000000000000001)."""
    values = [round(float(t), 10) for t in np.atleast_1d(np.asarray(thresholds, dtype=float))]
    if not values or not all(0 < t <= 1 for t in values):
        raise ValueError(f"thresholds must be numbers in (0, 1], got {thresholds!r}")
    return tuple(sorted(set(values)))


def _read_labels(path: Path) -> np.ndarray:
    try:
        return check_labels(read_tiff(path).data, "label images")
    except LabelError as exc:
        raise InputError(f"{path}: {exc}") from None


def evaluate_pair(
    pair: ImagePair,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    criterion: Criterion = "iou",
    ignore_label: int | None = None,
) -> tuple[ImageResult, tuple[Matching, ...]]:
    """Metrics of one file pair, and its IoU matchings at :data:`DSB_THRESHOLDS` (for the DSB score)."""
    gt, pred = _read_labels(pair.gt), _read_labels(pair.pred)
    if gt.shape != pred.shape:
        raise InputError(f"{pair.pred} has shape {pred.shape} but its ground truth {pair.gt} has {gt.shape}")
    try:
        overlap = label_overlap(gt, pred, ignore_label=ignore_label)
    except LabelError as exc:
        raise InputError(f"{pair.pred} vs {pair.gt}: {exc}") from None
    matchings = match_overlap(overlap, tuple(thresholds), criterion)
    if criterion == "iou" and set(DSB_THRESHOLDS) <= set(thresholds):
        dsb_matchings = tuple(m for m in matchings if m.thresh in DSB_THRESHOLDS)
    else:
        dsb_matchings = match_overlap(overlap, DSB_THRESHOLDS, "iou")
    result = ImageResult(
        name=pair.name,
        pred=pair.pred,
        gt=pair.gt,
        shape=tuple(gt.shape),
        matchings=matchings,
        seg=seg_from_overlap(overlap),
        dsb=dsb_from_matchings(dsb_matchings),
    )
    return result, dsb_matchings


def evaluate_paths(
    pred: str | os.PathLike,
    gt: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    thresholds: float | Sequence[float] = DEFAULT_THRESHOLDS,
    criterion: Criterion = "iou",
    ignore_label: int | None = None,
    strict: bool = True,
) -> EvaluationReport:
    """Evaluate predicted label TIFFs against ground truth (files or folders, see :func:`pair_files`).

    Writes ``evaluation.csv`` and ``evaluation.json`` into ``out_dir`` (created if needed, files
    replaced atomically) when it is given. Errors name the offending files.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r} (use one of {CRITERIA})")
    thresholds = _check_thresholds(thresholds)
    if ignore_label is not None and int(ignore_label) < 0:
        raise ValueError(f"ignore_label must be a non-negative integer, got {ignore_label}")
    pairs, lone_pred, lone_gt = pair_files(pred, gt, strict=strict)
    images, dsb_records = [], []
    for pair in pairs:
        result, dsb_matchings = evaluate_pair(pair, thresholds, criterion, ignore_label)
        images.append(result)
        dsb_records.append(dsb_matchings)
    summaries = {}
    for aggregation in AGGREGATIONS:
        summaries[aggregation] = Summary(
            aggregation=aggregation,
            matchings=tuple(
                aggregate([r.matchings[k] for r in images], aggregation) for k in range(len(thresholds))
            ),
            seg=aggregate_seg([r.seg for r in images], aggregation),
            dsb=dsb_from_matchings(
                [aggregate([d[k] for d in dsb_records], aggregation) for k in range(len(DSB_THRESHOLDS))]
            ),
        )
    report = EvaluationReport(
        pred=Path(pred),
        gt=Path(gt),
        criterion=criterion,
        thresholds=thresholds,
        ignore_label=ignore_label,
        images=tuple(images),
        summaries=summaries,
        unpaired_pred=tuple(lone_pred),
        unpaired_gt=tuple(lone_gt),
    )
    if out_dir is None:
        return report
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(report, out_dir / CSV_NAME)
    json_path = out_dir / JSON_NAME
    report = replace(report, csv_path=csv_path, json_path=json_path)
    write_json(report, json_path)
    return report


# ------------------------------------------------------------------------------------------------ output

CSV_COLUMNS = (
    "image",
    "aggregation",
    "criterion",
    "thresh",
    "n_images",
    "tp",
    "fp",
    "fn",
    "n_true",
    "n_pred",
    "precision",
    "recall",
    "accuracy",
    "f1",
    "mean_true_score",
    "mean_matched_score",
    "panoptic_quality",
    "seg",
    "dsb",
    "pred_file",
    "gt_file",
)


def csv_rows(report: EvaluationReport) -> list[dict]:
    """One row per image and threshold (``aggregation="image"``), then the summary rows of both modes."""
    rows = []
    for r in report.images:
        where = {"image": r.name, "aggregation": "image", "n_images": 1, "pred_file": r.pred, "gt_file": r.gt}
        rows += [{**m.to_dict(), **where, "seg": r.seg.seg, "dsb": r.dsb} for m in r.matchings]
    for s in report.summaries.values():
        rows += [{**m.to_dict(), "seg": s.seg, "dsb": s.dsb} for m in s.matchings]
    return [{k: row.get(k, "") for k in CSV_COLUMNS} for row in rows]


def write_csv(report: EvaluationReport, path: str | os.PathLike) -> Path:
    """Write :func:`csv_rows` to ``path`` atomically."""
    buffer = _stringio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(report))
    return atomic_write_text(path, buffer.getvalue())


def write_json(report: EvaluationReport, path: str | os.PathLike) -> Path:
    """Write ``report.to_dict()`` to ``path`` atomically."""
    return atomic_write_json(path, report.to_dict(), indent=2)


_TITLES = {
    "per_image_mean": "per-image mean of the rates (as EmbedSeg, Cellpose and Kaggle DSB report)",
    "pooled": "pooled over all objects (StarDist matching_dataset default)",
}


def format_table(report: EvaluationReport, aggregations: Sequence[str] = ("per_image_mean", "pooled")) -> str:
    """Fixed-width text tables, one per aggregation: thresholds as rows; accuracy is AP_dsb.

    TP/FP/FN are sums over the images under both aggregations (as in the CSV and JSON, and StarDist's
    ``by_image``); each title says so, since only the rates are per-image means.
    """
    n = len(report.images)
    ignore = "" if report.ignore_label is None else f", ignore_label {report.ignore_label}"
    lines = [f"{n} image(s), criterion {report.criterion}{ignore}"]
    columns = ("TP", "FP", "FN", "prec", "recall", "acc", "F1", "PQ")
    header = f"{report.criterion:>6} " + " ".join(f"{c:>7}" for c in columns)
    for aggregation in aggregations:
        summary = report.summaries[aggregation]
        lines += ["", f"{_TITLES[aggregation]}; TP/FP/FN summed over the {n} image(s):", header]
        for m in summary.matchings:
            lines.append(
                f"{m.thresh:6.2f} {m.tp:7d} {m.fp:7d} {m.fn:7d} {m.precision:7.4f} {m.recall:7.4f} "
                f"{m.accuracy:7.4f} {m.f1:7.4f} {m.panoptic_quality:7.4f}"
            )
        lines.append(f"DSB score (mean acc, IoU 0.50:0.05:0.95) {summary.dsb:.4f}   SEG {summary.seg:.4f}")
    return "\n".join(lines)
