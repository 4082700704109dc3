"""Verification of exported models in the units the clustering sees.

Raw outputs are compared after the activations the runtime applies, per output group:

* offsets in pixels: ``|tanh(a) - tanh(b)| / spacing`` along the offset's axis (a pixel is ``spacing``
  embedding units, ~1e-3 for upstream models, so a raw difference is worth ~1000x more here than it looks);
* sigma, relative: ``|exp(10 a) - exp(10 b)| / exp(10 b) = |expm1(10 (a - b))|``;
* seed, absolute: ``|sigmoid(a) - sigmoid(b)|``.

Then, where ``embedseg_deploy.cluster`` is importable, both outputs are clustered with the contract's
thresholds and the labels compared: identical for fp32, AP@0.5 (``embedseg_deploy.metrics``) for fp16.

The inputs: the fixture tile (upstream ``network_input.npy`` or a deterministic synthetic image normalised
as the contract says) and random tiles at two sizes with batch 1 and 2 (dynamic axes exercised).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedseg_deploy.contract import Contract, axis_of_dim
from embedseg_deploy.normalize import normalize

Runner = Callable[[np.ndarray], np.ndarray]
GROUPS = ("offset_px", "sigma_rel", "seed_abs")


@dataclass(frozen=True)
class Tolerance:
    """Largest accepted error per output group; ``min_label_ap`` None means labels must be identical."""

    offset_px: float
    sigma_rel: float
    seed_abs: float
    min_label_ap: float | None = None
    statistic: str = "max"  # or "mean": offsets and sigma over the foreground, seediness everywhere

    def __post_init__(self) -> None:
        if self.statistic not in ("max", "mean"):
            raise ValueError(f"statistic must be 'max' or 'mean', got {self.statistic!r}")


# fp32: ONNX Runtime CPU vs torch CPU, labels identical. Both sum in float32 in another order, and one float32
# step of a tanh offset near 1 is already 1.2e-4 px at spacing 1/1023, so the raw limits sit far above
# rounding and far below anything a label feels: on 77 trained models (benchmarks/results/export_fp32.md)
# at most 5.4e-4 px, 9.7e-5 rel, 8.8e-5 (median 1.7e-5 px), where a wrong operator moves offsets by pixels.
# The former limits (1e-4 each) refused 6 of those 77 models, all with identical labels.
# fp16: fp16 ONNX vs the fp32 reference. On images like the user's the labels decide (pooled AP@0.5 >= 0.99)
# and the raw errors are judged by means (offsets and sigma over the foreground, seediness everywhere): a
# maximum judges one pixel, and on 78 trained models (benchmarks/results/export_fp16_max.md) the worst
# pixel moved up to 0.98 px with the labels on the val images unchanged; the max limits refused 21 such
# models. The means (export_fp16.md, 83 models) were at most 0.033 px, 0.005, 0.0006 where labels held
# (median 0.004 px, 0.003, 0.0003), up to 0.10 px and 0.013 where they moved, which the label check
# refuses (AP@0.5 0.88-0.98). Without such images only a synthetic tile's labels are checked (a collapse
# check: TensorRT #3893, fp16 mIoU 79 -> 0), too weak to stand for the user's objects, so the raw errors
# are then judged strictly, per pixel ("fp16-tiles"; it refused 5 of those 6 models). GPU engines are
# compared with ONNX Runtime CPU on tiles, so by the per-pixel rules: fp32 kernels sum in another order,
# tf32 and fp16 round like fp16 ONNX does (not measured yet: no GPU here).
MIN_IMAGE_AP = 0.99  # fp16 vs fp32 labels, pooled over images like the user's
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(1e-2, 1e-3, 1e-3),
    "fp16": Tolerance(0.1, 0.05, 0.005, min_label_ap=0.9, statistic="mean"),
    "fp16-tiles": Tolerance(0.1, 0.1, 0.02, min_label_ap=0.9),
    "engine-fp32": Tolerance(1e-2, 1e-3, 1e-3, min_label_ap=0.98),
    "engine-tf32": Tolerance(0.1, 0.1, 0.02, min_label_ap=0.9),
    "engine-fp16": Tolerance(0.1, 0.1, 0.02, min_label_ap=0.9),
    # TensorRT int8 vs ONNX Runtime CPU on the same QDQ model: both round to int8 but sum and fuse in
    # another order; judged like the int8 export (means over the foreground, :mod:`.int8`).
    "engine-int8": Tolerance(1.0, 0.1, 0.05, min_label_ap=0.9, statistic="mean"),
}


class VerificationError(RuntimeError):
    """An exported model does not reproduce its reference within tolerance."""


def output_errors(
    test: np.ndarray,
    ref: np.ndarray,
    spacing: list[float],
    fg_thresh: float | None = None,
    statistic: str = "max",
) -> dict[str, float]:
    """Max (or ``statistic="mean"``) error per output group between raw outputs ``(N, 2*ndim+1,
    *spatial)``; inf when not finite.

    With ``fg_thresh``, offsets and sigma are judged only where the reference's seediness exceeds it:
    the pixels the clustering reads them at (on images like the user's, fp16 moves background offsets,
    which no object uses, by 0.57 px where the foreground's move by 0.03). The seediness is judged
    everywhere.
    """
    if test.shape != ref.shape:
        raise VerificationError(f"output shape {test.shape} differs from the reference {ref.shape}")
    ndim = len(spacing)
    if not np.isfinite(test).all():
        return dict.fromkeys(GROUPS, float("inf"))
    a, b = test.astype(np.float64), ref.astype(np.float64)
    where = np.ones(b[:, -1].shape, bool) if fg_thresh is None else _sigmoid(b[:, -1]) > fg_thresh

    def peak(error: np.ndarray) -> float:
        if not where.any():
            return 0.0
        return float(error[where].max() if statistic == "max" else error[where].mean())

    offsets = [
        peak(np.abs(np.tanh(a[:, d]) - np.tanh(b[:, d]))) / spacing[axis_of_dim(d, ndim)] for d in range(ndim)
    ]
    sigma = peak(np.abs(np.expm1(10.0 * (a[:, ndim : 2 * ndim] - b[:, ndim : 2 * ndim]))).max(axis=1))
    seed = np.abs(_sigmoid(a[:, -1]) - _sigmoid(b[:, -1]))
    seed = seed.max() if statistic == "max" else seed.mean()
    return {"offset_px": float(max(offsets)), "sigma_rel": float(sigma), "seed_abs": float(seed)}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


# ----------------------------------------------------------------------------------------------------------
# Inputs


def synthetic_image(contract: Contract, spatial: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A deterministic image of bright blobs (C, *spatial), float32, normalised as the contract says.

    About one blob per 18 pixels along each axis, each drawn on its bounding box only, so that
    profile-sized tiles (1088 x 1088, 80 x 304 x 304) take a fraction of a second.
    """
    rng = np.random.default_rng(seed)
    image = np.empty(spatial)
    image[...] = 0.1 + 0.05 * np.arange(spatial[-1]) / max(spatial[-1], 1)  # background with a gradient
    n_blobs = max(2, int(np.prod(spatial) / (18.0**contract.ndim)))
    for _ in range(n_blobs):
        centre = rng.uniform(0, spatial)
        radii = rng.uniform(4.0, 9.0, contract.ndim)
        lo = np.clip(np.floor(centre - radii), 0, None).astype(int)
        hi = np.minimum(np.ceil(centre + radii).astype(int) + 1, spatial)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        grids = np.ogrid[box]
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii, strict=True)) <= 1.0
        image[box][inside] = rng.uniform(0.5, 1.0)
    image = image + rng.normal(0.0, 0.02, image.shape)
    scale = contract.normalization.divisor if contract.normalization.kind == "absolute" else 1000.0
    raw = np.clip(image, 0, 1) * float(scale)
    stack = np.stack([raw * (1.0 - 0.1 * c) for c in range(contract.in_channels)])
    return normalize(stack, contract.normalization, channel_axis=0)


def random_tiles(contract: Contract, seed: int = 1) -> dict[str, np.ndarray]:
    """Two uniform [0, 1) tiles of different sizes, batch 1 and 2 (multiples of the tile multiple)."""
    rng = np.random.default_rng(seed)
    m = contract.tile_multiple
    sizes = ([8 * m, 8 * m], [6 * m, 10 * m]) if contract.ndim == 2 else ([2 * m] * 3, [2 * m, 3 * m, 4 * m])
    tiles = {}
    for batch, spatial in zip((1, 2), sizes, strict=True):
        name = f"random-{'x'.join(map(str, spatial))}-b{batch}"
        tiles[name] = rng.uniform(0, 1, (batch, contract.in_channels, *spatial)).astype(np.float32)
    return tiles


def fixture_tile(contract: Contract, path: str | Path | None = None) -> tuple[str, np.ndarray]:
    """("fixture", (1, C, *spatial)) from ``path`` (.npy, C x spatial or 1 x C x spatial) or synthetic."""
    if path is None:
        spatial = (128, 128) if contract.ndim == 2 else (16, 48, 48)
        return "synthetic", synthetic_image(contract, spatial)[None]
    x = np.load(path)
    if x.ndim == contract.ndim + 1:
        x = x[None]
    if x.ndim != contract.ndim + 2 or x.shape[1] != contract.in_channels:
        raise VerificationError(
            f"{path}: shape {x.shape} is not C x spatial for a {contract.ndim}D model with "
            f"{contract.in_channels} channel(s)"
        )
    if any(s % contract.tile_multiple for s in x.shape[2:]):
        raise VerificationError(
            f"{path}: spatial sizes {x.shape[2:]} are not multiples of {contract.tile_multiple}"
        )
    return "fixture", np.ascontiguousarray(x, dtype=np.float32)


def standard_inputs(contract: Contract, fixture: str | Path | None = None) -> dict[str, np.ndarray]:
    name, tile = fixture_tile(contract, fixture)
    return {name: tile, **random_tiles(contract)}


def image_files(folder: str | Path, layouts: tuple[tuple[str, ...], ...], purpose: str) -> list[Path]:
    """The .tif images of the first layout of ``folder`` that has any (``layouts``: sub-folder tuples,
    e.g. ``(("val/images", "test/images"), ("images",), (".",))``); ValueError naming the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: folder not found")
    for layout in layouts:
        found = [p for sub in layout for p in sorted((folder / sub).glob("*.tif*")) if p.is_file()]
        if found:
            return found
    looked = ", ".join(sub for layout in layouts for sub in layout)
    raise ValueError(f"{folder}: no .tif images to {purpose} (looked in {looked})")


def read_normalized(contract: Contract, path: Path) -> np.ndarray:
    """One image (C, *spatial), float32, normalised as the contract says; ValueError naming the file."""
    from embedseg_deploy.io import InputError, read_tiff, to_channels_first

    try:
        x = to_channels_first(read_tiff(path).data, contract.ndim, contract.in_channels, path=path)
        return normalize(x, contract.normalization, channel_axis=0)
    except (InputError, ValueError) as exc:
        text = str(exc)
        raise ValueError(text if str(path) in text else f"{path}: {text}") from None


def image_tiles(
    contract: Contract, files: list[Path], n: int, tile: tuple[int, ...], seed: int = 0
) -> list[np.ndarray]:
    """Up to ``n`` tiles (1, C, *tile) cut at seeded random places from ``files`` in turn, each image
    normalised whole first, as at inference. An image no larger than a tile (after cutting it to the tile
    multiple) gives itself once: fewer than ``n`` tiles when the images are few and small."""
    rng = np.random.default_rng(seed)
    images = [read_normalized(contract, path) for path in files]
    m = contract.tile_multiple
    tiles, whole = [], set()
    for k in range(n * len(images)):  # enough turns to skip the images already given whole
        if len(tiles) == n or len(whole) == len(images):
            break
        i = k % len(images)
        x, path = images[i], files[i]
        size = [min(t, s // m * m) for t, s in zip(tile, x.shape[1:], strict=True)]
        if min(size) < m:
            raise ValueError(f"{path}: shape {x.shape[1:]} is smaller than {m} px along an axis")
        if all(s - t < m for s, t in zip(x.shape[1:], size, strict=True)):  # one place only
            if i in whole:
                continue
            whole.add(i)
        start = [int(rng.integers(0, s - t + 1)) for s, t in zip(x.shape[1:], size, strict=True)]
        box = tuple(slice(a, a + t) for a, t in zip(start, size, strict=True))
        tiles.append(np.ascontiguousarray(x[(slice(None), *box)][None], dtype=np.float32))
    return tiles


VERIFY_LAYOUTS = (("val/images",), ("test/images",), ("images",), (".",))
VERIFY_EXTENT = {2: (512, 512), 3: (48, 160, 160)}
VERIFY_IMAGES = 6


def verification_images(
    contract: Contract, source: str | Path, limit: int = VERIFY_IMAGES
) -> dict[str, np.ndarray]:
    """Up to ``limit`` images like the user's, each (1, C, *spatial) and named by its file: the .tif file
    ``source``, or a folder's ``val/`` and ``test/`` images (else ``images/``, else its TIFFs).

    Each is normalised whole, centre-cropped to at most :data:`VERIFY_EXTENT` and padded (mirrored) up
    to the tile multiple, so verification sees the user's images at sizes a CPU judges in seconds.
    """
    source = Path(source)
    files = [source] if source.is_file() else image_files(source, VERIFY_LAYOUTS, "verify on")[:limit]
    m = contract.tile_multiple
    out = {}
    for path in files:
        x = read_normalized(contract, path)
        box = tuple(
            slice((s - min(s, e)) // 2, (s - min(s, e)) // 2 + min(s, e))
            for s, e in zip(x.shape[1:], VERIFY_EXTENT[contract.ndim], strict=True)
        )
        x = x[(slice(None), *box)]
        pad = [(0, 0)] + [(0, -s % m) for s in x.shape[1:]]
        out[path.name] = np.ascontiguousarray(np.pad(x, pad, mode="symmetric")[None], dtype=np.float32)
    return out


# ----------------------------------------------------------------------------------------------------------
# Runners and labels


def ort_runner(model: bytes | str | Path, threads: int = 2, optimize: bool = True) -> Runner:
    """ONNX Runtime CPU session as a function. ``optimize=False`` keeps every Cast of an fp16 model, so
    activations are rounded to fp16 between nodes as on a GPU (ORT's CPU optimiser would drop them)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # shared/loaded CPUs
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def clusterer() -> Callable[..., np.ndarray] | None:
    """``embedseg_deploy.cluster.cluster`` when importable, else None."""
    try:
        return importlib.import_module("embedseg_deploy.cluster").cluster
    except (ImportError, AttributeError):
        return None


def labels_of(raw: np.ndarray, contract: Contract, cluster: Callable[..., np.ndarray]) -> np.ndarray:
    """Instance labels of one raw output ``(C, *spatial)`` with the contract's spacing and thresholds."""
    return np.asarray(cluster(raw, contract.spacing, **asdict(contract.thresholds)))


def label_ap(ref: np.ndarray, test: np.ndarray, thresh: float = 0.5) -> float:
    """AP (TP / (TP + FP + FN)) of ``test`` against ``ref`` at IoU ``thresh``; 1.0 when both are empty."""
    if not ref.any() and not test.any():
        return 1.0
    from embedseg_deploy.metrics import matching

    return float(matching(ref, test, thresh=thresh).accuracy)


def cached(run: Runner) -> Runner:
    """``run`` that computes each input array once (keyed by identity: the caller keeps the inputs)."""
    store: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def call(x: np.ndarray) -> np.ndarray:
        if id(x) not in store:
            store[id(x)] = (x, np.asarray(run(x)))
        return store[id(x)][1]

    return call


# ----------------------------------------------------------------------------------------------------------
# Reports


@dataclass
class Case:
    name: str
    shape: list[int]
    errors: dict[str, float]
    labels: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class Report:
    """What was compared with what, per input case, and whether it passed."""

    test: str
    reference: str
    tolerance: Tolerance
    cases: list[Case] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not any(c.problems for c in self.cases)

    def max_errors(self) -> dict[str, float]:
        return {g: max((c.errors[g] for c in self.cases), default=0.0) for g in GROUPS}

    def to_dict(self) -> dict[str, Any]:
        return {
            "test": self.test,
            "reference": self.reference,
            "passed": self.passed,
            "tolerance": asdict(self.tolerance),
            "max_errors": self.max_errors(),
            "cases": [asdict(c) for c in self.cases],
            "notes": list(self.notes),
        }

    def lines(self) -> list[str]:
        out = [f"verification: {self.test} vs {self.reference}: {'passed' if self.passed else 'FAILED'}"]
        statistic = "mean " if self.tolerance.statistic == "mean" else ""
        for c in self.cases:
            errs = ", ".join(f"{g} {c.errors[g]:.2e}" for g in GROUPS)
            lab = ""
            if c.labels:
                n_ref, n_test, ap = c.labels["n_ref"], c.labels["n_test"], c.labels["ap50"]
                lab = f"; labels {n_ref}/{n_test} objects, AP@0.5 {ap:.4f}"
                if c.labels.get("one_object_grace"):
                    lab += f" (one object of {n_ref} differs: AP's smallest step below {FEW_OBJECTS} objects)"
            if c.name.startswith("pooled"):
                out.append(f"  {c.name} ({c.shape[0]}){lab}")
            else:
                out.append(f"  {c.name} {'x'.join(map(str, c.shape))}: {statistic}{errs}{lab}")
            out += [f"    PROBLEM: {p}" for p in c.problems]
        out += [f"  note: {n}" for n in self.notes]
        return out

    def raise_if_failed(self) -> None:
        if not self.passed:
            labels_differ = any("label" in p for c in self.cases for p in c.problems)
            fp32 = self.test.endswith("fp32") and self.reference.endswith("fp32")
            cause = "float rounding between the two runtimes" if fp32 else "the reduced precision"
            fix = "relax the limits (embedseg-export onnx --tolerance PX,REL,ABS)"
            if not fp32:
                fix = "judge the labels on images like yours (--verify-input) or " + fix
            hint = []
            if not labels_differ and self.test.startswith("onnx"):  # the onnx command takes --tolerance
                hint = [f"If only raw-output limits are exceeded and labels agree, it is {cause}: {fix}."]
            raise VerificationError("\n".join([*self.lines(), *hint]))


def compare(
    test: Runner,
    reference: Runner,
    contract: Contract,
    inputs: Mapping[str, np.ndarray],
    tolerance: Tolerance,
    names: tuple[str, str] = ("onnx", "torch"),
    label_cases: tuple[str, ...] = ("fixture", "synthetic"),
    foreground_only: bool = False,
) -> Report:
    """Run both on every input, measure the errors, cluster the ``label_cases`` and judge them.
    ``foreground_only``: offsets and sigma judged on the reference's foreground (:func:`output_errors`)."""
    report = Report(names[0], names[1], tolerance)
    cluster = clusterer()
    if cluster is None:
        report.notes.append("label check skipped: embedseg_deploy.cluster is not importable")
    fg = contract.thresholds.fg_thresh if foreground_only else None
    for name, x in inputs.items():
        a, b = np.asarray(test(x)), np.asarray(reference(x))
        case = Case(name, list(x.shape), output_errors(a, b, contract.spacing, fg, tolerance.statistic))
        for group in GROUPS:
            limit = getattr(tolerance, group)
            if not case.errors[group] <= limit:
                what = "" if tolerance.statistic == "max" else f" ({tolerance.statistic})"
                case.problems.append(f"{group} error{what} {case.errors[group]:.3g} exceeds {limit:g}")
        if cluster is not None and name in label_cases:
            ref_labels, test_labels = labels_of(b[0], contract, cluster), labels_of(a[0], contract, cluster)
            identical = bool(np.array_equal(ref_labels, test_labels))
            n_ref = len(np.unique(ref_labels[ref_labels > 0]))
            n_test = len(np.unique(test_labels[test_labels > 0]))
            tp, fp, fn = (n_ref, 0, 0) if identical else label_counts(ref_labels, test_labels)
            ap = tp / (tp + fp + fn) if tp + fp + fn else 1.0
            case.labels = {"n_ref": n_ref, "n_test": n_test, "identical": identical, "ap50": ap}
            case.labels.update(tp=tp, fp=fp, fn=fn)
            one_object = fp + fn <= 1  # not a collapse: on a tile of 8 nuclei one object is AP 0.875
            if tolerance.min_label_ap is None and not identical:
                case.problems.append(f"labels differ (AP@0.5 {ap:.4f}); fp32 must give identical labels")
            elif tolerance.min_label_ap is not None and ap < tolerance.min_label_ap and not one_object:
                case.problems.append(f"label AP@0.5 {ap:.4f} below {tolerance.min_label_ap}")
        report.cases.append(case)
    return report


def label_counts(ref: np.ndarray, test: np.ndarray) -> tuple[int, int, int]:
    """(TP, FP, FN) of ``test``'s objects against ``ref``'s at IoU 0.5."""
    from embedseg_deploy.metrics import matching

    m = matching(ref, test, thresh=0.5)
    return int(m.tp), int(m.fp), int(m.fn)


FEW_OBJECTS = 100


def pooled_label_case(
    test: Runner,
    reference: Runner,
    contract: Contract,
    inputs: Mapping[str, np.ndarray],
    min_ap: float,
    what: str,
) -> Case:
    """Labels of both on every input (every batch item), matched at IoU 0.5 and judged pooled
    (:func:`pool_labels`)."""
    cluster = clusterer()
    counts: dict[str, tuple[int, int, int]] = {}
    for name, x in inputs.items():
        for k in range(x.shape[0]):
            ref = labels_of(np.asarray(reference(x))[k], contract, cluster)
            c = label_counts(ref, labels_of(np.asarray(test(x))[k], contract, cluster))
            counts[name] = tuple(a + b for a, b in zip(counts.get(name, (0, 0, 0)), c, strict=True))
    return pool_labels(counts, min_ap, what)


def pool_labels(counts: Mapping[str, tuple[int, int, int]], min_ap: float, what: str) -> Case:
    """The verdict on (TP, FP, FN) per input, pooled: AP = TP / (TP + FP + FN) over all objects, a
    problem when below ``min_ap``. One object of a 45-object tile moves a per-image AP by 0.02; pooling
    judges the model on all of them at once. Below :data:`FEW_OBJECTS` reference objects one object may
    differ (AP 0.98 with 57 objects is the smallest step, not a trend); ``labels`` records when that
    grace decided."""
    tp, fp, fn = (sum(c[i] for c in counts.values()) for i in range(3))
    per_input = {name: round(t / (t + p + n), 4) if t + p + n else 1.0 for name, (t, p, n) in counts.items()}
    pooled = tp / (tp + fp + fn) if tp + fp + fn else 1.0
    case = Case(f"pooled {what}", [len(counts)], dict.fromkeys(GROUPS, 0.0))
    case.labels = {"n_ref": tp + fn, "n_test": tp + fp, "identical": fp == fn == 0, "ap50": pooled}
    case.labels["per_input"] = per_input
    grace = tp + fn < FEW_OBJECTS and fp + fn <= 1  # AP's resolution is 1/n: one object is all it can tell
    case.labels["one_object_grace"] = bool(grace and pooled < min_ap)
    if pooled < min_ap and not grace:
        case.problems.append(
            f"label AP@0.5 over the {what} {pooled:.4f} below {min_ap} ({fp} objects more, {fn} fewer than "
            "the reference)"
        )
    return case
