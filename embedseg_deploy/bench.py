"""``embedseg-run bench``: the same images on every requested or available backend, in one process.

Each image goes through the product path (:func:`embedseg_deploy.predict.process_job`: read the TIFF,
normalise, tile, run the network, stitch, cluster, write the labels), repeated in interleaved rounds
(round r runs every backend on every image before round r+1 starts) so that the machine's drift hits all
backends alike; warm-up runs are excluded. Reported per backend and image:

* latency per image and per tile (one ``Backend.run`` call divided by its batch): p50/p90/p99, mean, min;
* throughput in megapixels (2D) or megavoxels (3D) per second of the whole image, and of the network
  alone over the pixels it computed (tiles overlap: ``computed / image pixels`` is reported as well);
* a per-stage breakdown (medians): read, normalize, tile, h2d, network, d2h, stitch, decode, cluster,
  write. ``decode`` (sigmoid, foreground, tanh + coordinates) runs inside the clustering call; it is
  timed again on the same raw output right after each run and subtracted from ``cluster``. ``h2d``/``d2h``
  are null on the CPU (no transfer) and on GPU backends (their ``run`` includes the copies: no hook);
* the speed of each backend relative to the first one, as the median over rounds of per-round ratios;
* session/engine build time, apart; label agreement with the first backend (AP@0.5, equal pixels);
* achieved GFLOP/s of the network when the FLOPs can be counted (needs ``onnx``, optional).

Without images, images of the model's dimensionality are generated (:func:`make_bench_image`).
Output: a JSON report (written atomically), a markdown table, and a PNG plot when matplotlib is
installed. torch is imported only when a checkpoint is benchmarked on the torch backend.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import numpy as np

from .backends import BackendError, create_backend, model_kind
from .backends.onnx_backend import DEFAULT_SESSION_CONFIG
from .bench_report import (  # noqa: F401  (the report's API, also reached through this module)
    LATENCY_KEYS,
    SCHEMA,
    STAGES,
    format_markdown,
    latency_stats,
    median_spread,
    plot_report,
    validate_report,
    write_json_atomic,
    write_text_atomic,
)
from .io import read_tiff, write_tiff_atomic
from .machine import cpu_model, gpu_status, machine_info, package_versions  # noqa: F401
from .predict import Job, Predictor, process_job

ENV_PREFIXES = ("OMP", "MKL", "OPENBLAS", "NUMBA", "ORT", "KMP", "GOMP", "CUDA")
# (label, backend name, device) tried for each kind of model file
TARGETS = {
    "onnx": [
        ("onnx-cpu", "onnx-cpu", "cpu"),
        ("onnx-cuda", "onnx-cuda", "cuda"),
        ("onnx-trt", "onnx-trt", "cuda"),
        ("tensorrt", "tensorrt", "cuda"),
    ],
    "checkpoint": [("torch-cpu", "torch", "cpu"), ("torch-cuda", "torch", "cuda")],
    "engine": [("tensorrt", "tensorrt", "cuda")],
}
DEFAULT_SHAPES = {2: (1024, 1024), 3: (64, 256, 256)}
QUICK_SHAPES = {2: (128, 128), 3: (16, 64, 64)}
# objects per pixel and semi-axes (px) of the upstream fixtures' images: 2D ~50 per 256^2, 7-13 px;
# 3D ~15 per 32 x 96 x 96, 7-11 px (anisotropy 2)
OBJECT_DENSITY = {2: 50 / 256**2, 3: 15 / (32 * 96 * 96)}
OBJECT_RADIUS = {2: (7.0, 13.0), 3: (7.0, 11.0)}
AGREEMENT_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(9))  # IoU 0.50 ... 0.90


# ------------------------------------------------------------------------------------------------------
# small pure helpers


def pixel_unit(ndim: int) -> str:
    return "Mpx" if ndim == 2 else "Mvox"


def tile_plan_pixels(
    shape: Sequence[int], tile: Sequence[int] | None, halo: Sequence[int], multiple: int, placement: str
) -> tuple[int, int]:
    """(number of tiles, pixels the network computes) for an image of spatial ``shape``."""
    from .tiling import plan_tiles

    plan = plan_tiles(shape, tile, halo if tile else 0, multiple, placement)
    return len(plan), int(sum(math.prod(t.shape) for t in plan))


def make_bench_image(
    shape: Sequence[int],
    seed: int = 0,
    n_objects: int | None = None,
    radius: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic image of ``shape`` like the upstream fixtures' (object density and size of
    :data:`OBJECT_DENSITY`, :data:`OBJECT_RADIUS`; 3D with anisotropy 2), and its labels."""
    from .synthetic import make_image

    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    n = n_objects if n_objects is not None else max(1, round(OBJECT_DENSITY[ndim] * math.prod(shape)))
    rng = np.random.default_rng(seed)
    aniso = 2.0 if ndim == 3 else 1.0
    return make_image(shape, n, rng, radius=radius or OBJECT_RADIUS[ndim], anisotropy=aniso)


def conv_flops(onnx_path: str | os.PathLike, input_shape: Sequence[int]) -> dict[str, int] | None:
    """FLOPs of the Conv and ConvTranspose nodes of an ONNX model for one input shape (N, C, *spatial),
    counted from the graph with ONNX shape inference (2 FLOPs per multiply-add). None without ``onnx``.

    Conv: ``2 * prod(output) * Cin/group * prod(kernel)``; ConvTranspose: ``2 * prod(input) *
    Cout/group * prod(kernel)``. Element-wise nodes (ReLU, Add, BatchNorm, pooling) are counted apart as
    output elements (``elementwise``), for reference.
    """
    try:
        import onnx
    except ImportError:
        return None
    out = {"conv": 0, "conv_transpose": 0, "elementwise": 0}
    for (op, _name), n in node_flops(onnx.load(str(onnx_path)), input_shape, str(onnx_path)).items():
        out[{"Conv": "conv", "ConvTranspose": "conv_transpose"}.get(op, "elementwise")] += n
    out["total"] = out["conv"] + out["conv_transpose"]
    return out


def node_flops(model: Any, input_shape: Sequence[int], where: str = "model") -> dict[tuple[str, str], int]:
    """{(op type, node name): FLOPs} of an ``onnx.ModelProto`` for one input shape, as :func:`conv_flops`
    counts them (output elements for nodes other than Conv and ConvTranspose)."""
    from onnx import shape_inference

    model = type(model).FromString(model.SerializeToString())  # shape inference on a copy
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != len(input_shape):
        raise ValueError(f"{where}: input has {len(dims)} dims, shape {list(input_shape)} given")
    for d, v in zip(dims, input_shape, strict=True):
        d.ClearField("dim_param")
        d.dim_value = int(v)
    model = shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {
        vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
        for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]
    }
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    out: dict[tuple[str, str], int] = {}
    for i, node in enumerate(model.graph.node):
        key = (node.op_type, node.name or f"#{i}")
        if node.op_type in ("Conv", "ConvTranspose"):
            w = weights.get(node.input[1])
            if w is None:
                raise ValueError(f"{where}: {node.op_type} {node.name} has a non-constant weight")
            per_position = math.prod(w[1:])  # Cin/group * kernel (Conv); Cout/group * kernel (ConvT)
            counted = node.output[0] if node.op_type == "Conv" else node.input[0]
            out[key] = 2 * math.prod(shapes[counted]) * per_position
        elif node.output and node.output[0] in shapes:
            out[key] = math.prod(shapes[node.output[0]])
    return out


def decode_seconds(raw: np.ndarray, spacing: Sequence[float], fg_thresh: float) -> float:
    """Time of the clustering's decode step alone (seediness, foreground, tanh + coordinates) on ``raw``."""
    from .cluster import decode

    t0 = time.perf_counter()
    decode(raw, spacing, fg_thresh)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------------
# one opened backend with its timing hooks


@dataclass
class Target:
    """A backend opened on one model, wrapped so that every ``run`` call and the raw output are seen."""

    label: str
    model: Path
    predictor: Predictor
    build_seconds: float
    calls: list[tuple[float, int]] = field(default_factory=list)  # (seconds, batch size) per run call
    last_raw: np.ndarray | None = None

    def hook(self) -> None:
        backend, predictor = self.predictor.backend, self.predictor
        run, cluster = backend.run, predictor.cluster

        def timed_run(batch: np.ndarray) -> np.ndarray:
            t0 = time.perf_counter()
            out = run(batch)
            self.calls.append((time.perf_counter() - t0, int(batch.shape[0])))
            return out

        def keep_raw(raw: np.ndarray, origin: Sequence[int] | None = None, return_seeds: bool = False):
            self.last_raw = raw
            return cluster(raw, origin, return_seeds)

        backend.run = timed_run  # type: ignore[method-assign]  # instance attribute shadows the method
        backend.asynchronous = False  # one call at a time, so that each call's time is the network's
        predictor.cluster = keep_raw  # type: ignore[method-assign]

    @property
    def ndim(self) -> int:
        return self.predictor.contract.ndim


def open_targets(
    models: Sequence[str | os.PathLike],
    backends: Sequence[str] | None,
    threads: int | None,
    tile: Sequence[int] | int | None,
    halo: Sequence[int] | int | None,
    batch_size: int,
    engine_cache: str | os.PathLike | None = None,
    ort_config: dict[str, str] | None = None,
) -> tuple[list[Target], list[dict[str, str]]]:
    """Open every (model, backend) pair asked for (``backends`` None: all that apply to each model file);
    returns the opened targets and the skipped ones with their reasons."""
    wanted = None if backends is None else {b.strip().lower() for b in backends if b.strip()}
    _, no_gpu = gpu_status()
    targets: list[Target] = []
    skipped: list[dict[str, str]] = []
    labels_seen: set[str] = set()
    for model in models:
        path = Path(model)
        for label, name, device in TARGETS[model_kind(path)]:
            if wanted is not None and not (wanted & {label, name}):
                continue
            try:
                t0 = time.perf_counter()
                extra = {"session_config": ort_config} if ort_config and name.startswith("onnx") else {}
                backend = create_backend(
                    path, name, device=device, threads=threads, engine_cache=engine_cache, **extra
                )
                predictor = Predictor(backend, tile=tile, halo=halo, batch_size=batch_size, threads=threads)
                built = time.perf_counter() - t0
            except (RuntimeError, ValueError, OSError, ImportError) as exc:  # BackendError, EngineError, ...
                skipped.append(
                    {
                        "backend": label,
                        "model": str(path),
                        "reason": str(exc).replace(f"{path}: ", ""),
                        "gpu": no_gpu if device == "cuda" else None,
                    }
                )
                continue
            precision = predictor.backend.precision
            shown = label if precision == "fp32" else f"{label}-{precision}"
            if shown in labels_seen:
                shown = f"{shown}:{path.name}"
            labels_seen.add(shown)
            target = Target(shown, path, predictor, built)
            target.hook()
            targets.append(target)
    return targets, skipped


# ------------------------------------------------------------------------------------------------------
# the benchmark


def prepare_images(
    images: Sequence[str | os.PathLike] | None,
    ndims: set[int],
    folder: Path,
    shape: Sequence[int] | None = None,
    quick: bool = False,
    n_objects: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The input files: the given ones, or one generated image per dimensionality (written as TIFF so
    that reading is timed as for real files)."""
    out = []
    if images:
        for item in images:
            path = Path(item)
            img = read_tiff(path)
            out.append(
                {"name": path.name, "path": str(path), "shape": list(img.data.shape), "generated": False}
            )
        return out
    for ndim in sorted(ndims):
        shp = (
            tuple(shape)
            if shape is not None and len(shape) == ndim
            else (QUICK_SHAPES if quick else DEFAULT_SHAPES)[ndim]
        )
        image, labels = make_bench_image(shp, seed=seed, n_objects=n_objects)
        path = folder / f"generated-{ndim}d-{'x'.join(map(str, shp))}.tif"
        write_tiff_atomic(path, image, overwrite=True)
        out.append(
            {
                "name": path.name,
                "path": str(path),
                "shape": list(shp),
                "generated": True,
                "true_objects": int(labels.max()),
            }
        )
    return out


def _spatial(entry: dict[str, Any], target: Target) -> tuple[int, ...] | None:
    """The image's spatial shape as ``target``'s model reads it, or None when the image does not fit it."""
    from .io import InputError
    from .predict import spatial_shape_of

    try:
        return spatial_shape_of(Path(entry["path"]), target.predictor.contract)[0]
    except InputError:
        return None


def run_once(target: Target, entry: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """One image through the product path on one target: stage timings, per-tile calls, labels path."""
    target.calls.clear()
    target.last_raw = None
    src = Path(entry["path"])
    job = Job(src, out_dir / f"{target.label.replace(':', '_')}--{src.stem}.tif")
    record = process_job(target.predictor, job, False, True, None, None, None)
    if record["status"] != "ok":
        raise RuntimeError(f"{target.label} on {src.name}: {record.get('error')}")
    if "blocks" in record.get("mode", ""):
        raise RuntimeError(f"{target.label} on {src.name}: image needs block mode; bench times whole images")
    timings = dict(record["timings"])
    decode = None
    if target.last_raw is not None:
        c = target.predictor
        decode = decode_seconds(target.last_raw, c.contract.spacing, float(c.thresholds["fg_thresh"]))
    target.last_raw = None
    stages: dict[str, float | None] = {s: timings.get(s) for s in STAGES}
    stages["h2d"] = stages["d2h"] = None
    stages["decode"] = decode
    if decode is not None and stages["cluster"] is not None:
        stages["cluster"] = max(0.0, stages["cluster"] - decode)
    return {
        "total": timings["total"],
        "stages": stages,
        "calls": list(target.calls),
        "objects": record["objects"],
        "labels": job.output,
    }


def summarize(
    target: Target, entry: dict[str, Any], runs: list[dict[str, Any]], flops: dict[str, int] | None
) -> dict[str, Any]:
    """Statistics of the timed runs of one target on one image."""
    p = target.predictor
    spatial = tuple(entry["spatial"])
    pixels = math.prod(spatial)
    n_tiles, computed = tile_plan_pixels(
        spatial, p.tile, p.halo, p.contract.tile_multiple, p.contract.padding
    )
    totals = [r["total"] for r in runs]
    per_tile = [s / n for r in runs for s, n in r["calls"]]
    network = [r["stages"]["network"] for r in runs]
    stages = {
        s: (
            None
            if all(r["stages"][s] is None for r in runs)
            else median_spread([r["stages"][s] for r in runs])["median"]
        )
        for s in STAGES
    }
    lat = latency_stats(totals)
    net_median = float(np.median(network))
    other = [t - n for t, n in zip(totals, network, strict=True)]
    result = {
        "backend": target.label,
        "image": entry["name"],
        "spatial": list(spatial),
        "pixels": pixels,
        "unit": pixel_unit(len(spatial)),
        "latency_s": lat,
        "per_tile_s": latency_stats(per_tile),
        "tiles": n_tiles,
        "tile_shape": [int(t) for t in (p.tile or [])] or None,
        "computed_pixels": computed,
        "computed_over_image": computed / pixels,
        "stages_s": stages,
        "non_network_fraction": median_spread([o / t for o, t in zip(other, totals, strict=True)]),
        "throughput_per_s": pixels / 1e6 / lat["p50"],
        "network_throughput_per_s": computed / 1e6 / net_median,
        "objects": runs[-1]["objects"],
    }
    if flops:
        gflop = flops["total"] / 1e9
        result["network_gflop"] = gflop
        result["network_gflops_per_s"] = gflop / net_median
    return result


def flops_per_image(
    targets: Sequence[Target], entry: dict[str, Any], target: Target
) -> dict[str, int] | None:
    """Conv FLOPs the network computes on this image with ``target``'s tile plan, counted on any ONNX
    model of the same architecture in the run."""
    arch = target.predictor.contract.architecture
    onnx_model = next(
        (
            t.model
            for t in targets
            if model_kind(t.model) == "onnx" and t.predictor.contract.architecture == arch
        ),
        None,
    )
    if onnx_model is None:
        return None
    from .tiling import plan_tiles

    p = target.predictor
    plan = plan_tiles(
        tuple(entry["spatial"]), p.tile, p.halo if p.tile else 0, p.contract.tile_multiple, p.contract.padding
    )
    total: dict[str, int] = {}
    cache: dict[tuple[int, ...], dict[str, int] | None] = {}
    for t in plan:
        if t.shape not in cache:
            cache[t.shape] = conv_flops(onnx_model, (1, p.contract.in_channels, *t.shape))
        counted = cache[t.shape]
        if counted is None:
            return None
        for k, v in counted.items():
            total[k] = total.get(k, 0) + v
    return total


def agreement(reference: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """How two label images agree: AP@0.5 and AP@0.5:0.9 (TP / (TP + FP + FN), the latter averaged over
    IoU 0.50, 0.55, ..., 0.90: a reduced precision that moves boundaries shows there first), the fraction
    of equal pixels as they are and after renaming each label to the reference label it overlaps most
    (ids depend on the seed order, so the same objects may carry other numbers), and exact identity."""
    from .metrics import label_overlap, match_overlap

    per_threshold = match_overlap(label_overlap(reference, labels), AGREEMENT_THRESHOLDS)
    m = per_threshold[0]
    ref, lab = reference.ravel().astype(np.int64), labels.ravel().astype(np.int64)
    pairs, counts = np.unique(np.stack([lab, ref]), axis=1, return_counts=True)
    best: dict[int, tuple[int, int]] = {}
    for (p, r), n in zip(pairs.T.tolist(), counts.tolist(), strict=True):
        if p and n > best.get(p, (0, 0))[1]:
            best[p] = (r, n)
    renamed = np.zeros(int(lab.max()) + 1, np.int64)
    for p, (r, _) in best.items():
        renamed[p] = r if r else -1  # a label mostly on reference background matches nothing
    return {
        "ap50": float(m.accuracy),
        "ap50_90": float(np.mean([x.accuracy for x in per_threshold])),
        "equal_pixels": float(np.mean(ref == lab)),
        "equal_pixels_renamed": float(np.mean(renamed[lab] == ref)),
        "identical": bool(np.array_equal(reference, labels)),
        "objects": [int(m.n_true), int(m.n_pred)],
    }


def run_bench(
    models: Sequence[str | os.PathLike],
    images: Sequence[str | os.PathLike] | None = None,
    *,
    backends: Sequence[str] | None = None,
    threads: int | None = None,
    tile: Sequence[int] | int | None = None,
    halo: Sequence[int] | int | None = None,
    batch_size: int = 1,
    repeats: int = 5,
    warmup: int = 1,
    shape: Sequence[int] | None = None,
    n_objects: int | None = None,
    quick: bool = False,
    engine_cache: str | os.PathLike | None = None,
    ort_config: dict[str, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Benchmark ``models`` (ONNX files, engines, checkpoints) on ``images`` (generated when None).

    ``backends``: labels or backend names to run (None: every one that applies and works here).
    Returns the report (see :func:`validate_report` for its layout).
    """
    log = log or (lambda _msg: None)
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    started = datetime.now().astimezone()
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    targets, skipped = open_targets(
        models, backends, threads, tile, halo, batch_size, engine_cache, ort_config
    )
    if not targets:
        detail = "; ".join(f"{s['backend']}: {s['reason']}" for s in skipped) or "no backend was asked for"
        raise BackendError(f"no backend could run: {detail}")
    for t in targets:
        log(f"opened {t.label} ({t.model.name}) in {t.build_seconds:.2f} s")
    t0 = time.perf_counter()
    from .cluster import warm_up

    warm_up()
    cluster_warmup = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="embedseg-bench-") as tmp:
        tmp_path = Path(tmp)
        entries = prepare_images(images, {t.ndim for t in targets}, tmp_path, shape, quick, n_objects)
        pairs = []  # (target, entry) of the same dimensionality
        for entry in entries:
            for t in targets:
                spatial = _spatial(entry, t)
                if spatial is not None:
                    pairs.append((t, {**entry, "spatial": list(spatial)}))
        if not pairs:
            raise ValueError("no image matches the dimensionality of the models")
        for t, entry in pairs:
            for _ in range(warmup):
                run_once(t, entry, tmp_path)
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in range(repeats):
            for t, entry in pairs:
                rec = run_once(t, entry, tmp_path)
                runs.setdefault((t.label, entry["name"]), []).append(rec)
                log(f"round {r + 1}/{repeats}: {t.label} on {entry['name']}: {rec['total']:.3f} s")
        results = []
        for t, entry in pairs:
            flops = flops_per_image(targets, entry, t)
            results.append(summarize(t, entry, runs[(t.label, entry["name"])], flops))
        ratios, agree = [], []
        for entry in entries:
            here = [t for t, e in pairs if e["name"] == entry["name"]]
            if not here:
                continue
            ref = here[0]
            ref_runs = runs[(ref.label, entry["name"])]
            ref_labels = read_tiff(ref_runs[-1]["labels"]).data
            for t in here[1:]:
                own = runs[(t.label, entry["name"])]
                per_round = [a["total"] / b["total"] for a, b in zip(ref_runs, own, strict=True)]
                ratios.append(
                    {
                        "image": entry["name"],
                        "reference": ref.label,
                        "backend": t.label,
                        "speedup_vs_reference": median_spread(per_round),
                    }
                )
                labels = read_tiff(own[-1]["labels"]).data
                agree.append(
                    {
                        "image": entry["name"],
                        "reference": ref.label,
                        "backend": t.label,
                        **agreement(ref_labels, labels),
                    }
                )
    versions_now = package_versions()
    report = {
        "benchmark": "embedseg-run bench",
        "schema": SCHEMA,
        "date": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.now().astimezone() - started).total_seconds(), 2),
        "machine": machine_info(),
        "load_average": {"before": load_before, "after": list(os.getloadavg()) if load_before else None},
        "versions": versions_now,
        "parameters": {
            "threads": threads,
            "tile": "contract default" if tile is None else tile,
            "halo": "contract default" if halo is None else halo,
            "batch_size": batch_size,
            "repeats": repeats,
            "warmup": warmup,
            "quick": quick,
            "backends_requested": list(backends) if backends else "all",
            "ort_session_config": {**DEFAULT_SESSION_CONFIG, **(ort_config or {})},  # what sessions got
            "environment": {k: v for k, v in os.environ.items() if k.split("_")[0] in ENV_PREFIXES},
            "timing": "interleaved rounds; warm-up runs excluded; per image = read..write (process_job)",
        },
        "images": [{k: v for k, v in e.items()} for e in entries],
        "backends": [
            {
                "backend": t.label,
                "model": str(t.model),
                "build_seconds": t.build_seconds,
                **{k: v for k, v in t.predictor.describe().items() if k not in ("model", "backend")},
            }
            for t in targets
        ],
        "cluster_warmup_seconds": cluster_warmup,
        "skipped": skipped,
        "results": results,
        "ratios": ratios,
        "agreement": agree,
        "stage_notes": {
            "h2d/d2h": "null on the CPU (no transfer); GPU backends copy inside run(): counted in network",
            "decode": "timed again on the same raw output after each run; subtracted from cluster",
            "tile": "gathering tile inputs (reflect padding included)",
        },
    }
    return report


# ------------------------------------------------------------------------------------------------------
# checking and presenting the report


# ------------------------------------------------------------------------------------------------------
# command line


def _sizes(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        sizes = [int(v) for v in value.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give one integer or z,y,x") from None
    if not sizes or any(s < 0 for s in sizes):
        raise click.BadParameter(f"{value!r}: sizes must be non-negative integers")
    return sizes


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--also",
    "also",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Another model file to run side by side (an fp16 ONNX model, a .pth checkpoint for torch).",
)
@click.option(
    "--backends",
    default="all",
    show_default=True,
    help="Comma-separated backends (onnx-cpu, onnx-cuda, onnx-trt, tensorrt, torch) or 'all'.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads (ORT intra-op, torch, numba) [default: the backends' own].",
)
@click.option(
    "--tile", default=None, help="Tile size, one int or z,y,x; 0 = whole image [default: contract]."
)
@click.option("--halo", default=None, help="Tile halo, one int or z,y,x [default: contract].")
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="Tiles per network call."
)
@click.option(
    "--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Timed runs per image."
)
@click.option(
    "--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed runs first."
)
@click.option("--shape", default=None, help="Shape of the generated image when no IMAGES are given (z,y,x).")
@click.option("--objects", type=click.IntRange(min=1), default=None, help="Objects in the generated image.")
@click.option(
    "--engine-cache", type=click.Path(path_type=Path), default=None, help="TensorRT engine cache folder."
)
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    default=Path("embedseg-bench.json"),
    show_default=True,
    help="JSON report; the markdown (.md) and the plot (.png) go beside it.",
)
@click.option(
    "--ort-config",
    multiple=True,
    help="ONNX Runtime session config entry KEY=VALUE, e.g. session.intra_op.allow_spinning=0 (repeatable).",
)
@click.option("--plot/--no-plot", default=True, show_default=True, help="PNG plot (needs matplotlib).")
@click.option("--quick", is_flag=True, help="Smoke test: small generated images, 2 runs after 1 warm-up.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
def bench_command(
    model,
    images,
    also,
    backends,
    threads,
    tile,
    halo,
    batch_size,
    repeats,
    warmup,
    shape,
    objects,
    engine_cache,
    ort_config,
    out,
    plot,
    quick,
    quiet,
) -> None:
    """Time MODEL on every requested or available backend, on IMAGES or generated ones."""
    if quick:
        repeats, warmup = min(repeats, 2), min(warmup, 1)
    names = None if backends.strip().lower() == "all" else [b for b in backends.split(",") if b.strip()]
    log = None if quiet else (lambda msg: click.echo(msg, err=True))
    config = {}
    for item in ort_config:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r}: use KEY=VALUE", param_hint="--ort-config")
        config[key.strip()] = value.strip()
    try:
        report = run_bench(
            [model, *also],
            list(images) or None,
            backends=names,
            threads=threads,
            tile=_sizes(tile),
            halo=_sizes(halo),
            batch_size=batch_size,
            repeats=repeats,
            warmup=warmup,
            shape=_sizes(shape),
            n_objects=objects,
            quick=quick,
            engine_cache=engine_cache,
            ort_config=config or None,
            log=log,
        )
    except (BackendError, ValueError, OSError, RuntimeError) as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    problems = validate_report(report)
    report["problems"] = problems
    write_json_atomic(out, report)
    markdown = format_markdown(report)
    write_text_atomic(out.with_suffix(".md"), markdown)
    png = plot_report(report, out.with_suffix(".png")) if plot else None
    click.echo(markdown)
    click.echo(f"report: {out}" + (f", plot: {png}" if png else ""), err=True)
    if problems:
        click.echo("Error: incomplete report: " + "; ".join(problems), err=True)
        sys.exit(1)
