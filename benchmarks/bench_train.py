"""Training benchmark: synthetic data -> this project's training loop on CPU under a wall-clock budget.

For each of 2D and 3D: writes a synthetic dataset (:mod:`embedseg_deploy.synthetic`), probes 1 vs 2 torch
threads on a few real training steps and keeps the faster, then runs :func:`embedseg_training.train.train`
with ``max_minutes`` (the poly schedule is re-planned to the epochs that fit). Records per epoch: train
loss, val loss, val IoU (upstream's per-object IoU(phi > 0.5) on fixed val crops), crops/s and the
data-loading fraction of the step time; writes ``results/train_2d.{json,md}`` and ``train_3d.{json,md}``
with date, machine, load average and versions.

The 2D run uses the demo model's data and settings (:mod:`embedseg_training.make_demo_model`), so with
``--keep-runs DIR`` its run folder can be packaged as the bundled demo model
(``python -m embedseg_training.make_demo_model --from-run DIR/run_2d``).

Usage: ``python benchmarks/bench_train.py [--ndim 2|3|both] [--minutes-2d 9.5] [--minutes-3d 5]
[--threads auto|1|2] [--keep-runs DIR] [--out benchmarks/results]``.
"""

from __future__ import annotations

import os

# OpenMP threads sleep instead of spin-waiting when idle: on a shared 2-core machine spin-waiting made a
# 2-thread step up to 4x slower than a 1-thread step (measured at load 4-6). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedseg_deploy.contract import Normalization
from embedseg_deploy.io import atomic_write_text
from embedseg_deploy.synthetic import write_dataset
from embedseg_training.data import CropDataset, load_split
from embedseg_training.loss import spatial_embedding_loss
from embedseg_training.make_demo_model import DEMO_DATA, demo_config
from embedseg_training.model import BranchedERFNet
from embedseg_training.train import TrainConfig, default_spacing, train

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_IOU_2D = 0.75
HARD_LIMIT_MINUTES = 10.0
# 3D: the generator's 3D defaults (32 x 96 x 96, 10-20 objects, semi-axes 7-11 px) with z voxels twice
# the y/x pixel; crops of 16 x 48 x 48 hold whole objects (z extent 7-11 voxels).
DATA_3D: dict[str, Any] = {"ndim": 3, "n_train": 8, "n_val": 2, "n_test": 0, "seed": 0, "anisotropy": 2.0}
TRAINING_3D: dict[str, Any] = {
    "epochs": 1000,
    "crop_size": [16, 48, 48],
    "batch_size": 4,
    "iterations": 10,
    "val_crops": 24,
    "lr": 1e-3,
    "device": "cpu",
    "workers": 0,
    "seed": 0,
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    import embedseg_deploy
    import embedseg_training

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "embedseg_deploy": embedseg_deploy.__version__,
        "embedseg_training": embedseg_training.__version__,
    }


def step_seconds(data_dir: Path, cfg: TrainConfig, threads: int, steps: int = 3) -> float:
    """Median wall time of a training step (forward, loss, backward, Adam) with ``threads`` threads."""
    torch.set_num_threads(threads)
    samples = load_split(data_dir, "train")
    ds = CropDataset(samples, cfg.crop_size, norm=Normalization(), augment=True, length=cfg.batch_size)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size)))
    ndim = samples[0].ndim
    spacing = [default_spacing(samples[0].shape)] * ndim
    torch.manual_seed(0)
    model = BranchedERFNet(ndim, 1)
    model.init_output(ndim)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 1):  # the first step warms up
        t0 = time.perf_counter()
        res = spatial_embedding_loss(model(batch["image"]), batch["instance"], batch["center"], spacing, 10.0)
        opt.zero_grad()
        res.loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def pick_threads(data_dir: Path, cfg: TrainConfig, choice: str) -> tuple[int, dict[str, float]]:
    if choice != "auto":
        return int(choice), {}
    probe = {str(t): round(step_seconds(data_dir, cfg, t), 3) for t in (1, 2)}
    best = min(probe, key=probe.get)
    log(f"thread probe (s per step): {probe} -> {best}")
    return int(best), probe


def summarise(result, seconds: float) -> dict[str, Any]:
    rows, cfg = result.log, result.config
    ious = [r["val_iou"] for r in rows]
    t_cum = np.cumsum([r["time_s"] for r in rows])
    reached = next((float(t) for t, iou in zip(t_cum, ious, strict=True) if iou >= TARGET_IOU_2D), None)
    return {
        "epochs": len(rows),
        "stopped_by_budget": result.stopped_by_budget,
        "train_call_seconds": round(seconds, 1),
        "first_val_iou": round(ious[0], 4),
        "final_val_iou": round(ious[-1], 4),
        "best_val_iou": round(max(ious), 4),
        "best_epoch": int(np.argmax(ious)),
        "val_iou_rises": ious[-1] > ious[0],
        "seconds_to_val_iou_0.75": None if reached is None else round(reached, 1),
        "crops_per_s_median": round(float(np.median([r["crops_per_s"] for r in rows])), 2),
        "crops": len(rows) * cfg.iterations * cfg.batch_size,
        "data_time_fraction_max": round(max(r["data_time_fraction"] for r in rows), 4),
        "data_time_fraction_median": round(float(np.median([r["data_time_fraction"] for r in rows])), 4),
    }


def run_case(ndim: int, minutes: float, threads_choice: str, work: Path) -> dict[str, Any]:
    data_dir = work / f"data_{ndim}d"
    run_dir = work / f"run_{ndim}d"
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    if ndim == 2:
        data_settings = DEMO_DATA
        write_dataset(data_dir, overwrite=True, **DEMO_DATA)
        cfg = demo_config(data_dir, run_dir, minutes, None)
    else:
        data_settings = DATA_3D
        write_dataset(data_dir, overwrite=True, **DATA_3D)
        cfg = TrainConfig(data_dir=str(data_dir), out=str(run_dir), max_minutes=minutes, **TRAINING_3D)
    data_seconds = time.perf_counter() - t0
    threads, probe = pick_threads(data_dir, cfg, threads_choice)
    cfg.threads = threads
    log(f"{ndim}D: data written in {data_seconds:.1f} s; training {minutes} min on {threads} thread(s)")
    t0 = time.perf_counter()
    result = train(cfg, progress=False)
    seconds = time.perf_counter() - t0
    summary = summarise(result, seconds)
    data_ok = summary["data_time_fraction_max"] < 0.10
    if ndim == 2:
        ok = summary["best_val_iou"] >= TARGET_IOU_2D and seconds <= 60 * HARD_LIMIT_MINUTES and data_ok
        check = (
            f"{'PASS' if ok else 'FAIL'}: best val IoU {summary['best_val_iou']} (>= {TARGET_IOU_2D}), "
            f"{seconds:.0f} s (<= {60 * HARD_LIMIT_MINUTES:.0f} s), data loading max "
            f"{100 * summary['data_time_fraction_max']:.1f} % (< 10 %)"
        )
    else:
        ok = summary["val_iou_rises"] and data_ok
        check = (
            f"{'PASS' if ok else 'FAIL'}: val IoU {summary['first_val_iou']} -> {summary['final_val_iou']} "
            f"(best {summary['best_val_iou']}), data loading max "
            f"{100 * summary['data_time_fraction_max']:.1f} % (< 10 %)"
        )
    log(f"{ndim}D: {json.dumps(summary)}")
    settings = result.config.to_dict() | {"data_dir": "<temporary>", "out": "<temporary>"}
    return {
        "benchmark": f"train_{ndim}d",
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": versions(),
        "environment": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "OPENBLAS_"))},
        "threads": {"used": threads, "probe_seconds_per_step": probe, "choice": threads_choice},
        "budget_minutes": minutes,
        "hard_limit_minutes": HARD_LIMIT_MINUTES,
        "data": {"generator": "embedseg_deploy.synthetic.write_dataset", **data_settings},
        "data_seconds": round(data_seconds, 1),
        "training": settings,
        "summary": summary,
        "check": check,
        "epochs": [
            {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in result.log
        ],
    }


def markdown(doc: dict[str, Any]) -> str:
    m, s, t, th = doc["machine"], doc["summary"], doc["training"], doc["threads"]
    probe = f" (probe, s per step: {th['probe_seconds_per_step']})" if th["probe_seconds_per_step"] else ""
    versions = ", ".join(f"{k} {v}" for k, v in doc["versions"].items())
    lines = [
        f"# Training benchmark, {doc['benchmark'][-2:].upper()} (CPU, {doc['budget_minutes']} min budget)",
        "",
        f"{doc['date']}; {m['cpu_model']} ({m['cpu_count']} cpus); load average (1/5/15 min) before "
        f"{m['load_average_before']}, after {m['load_average_after']}; {versions}; {doc['environment']}.",
        "",
        f"Data: {doc['data']} (written in {doc['data_seconds']} s, outside the budget).",
        f"Training: crop {t['crop_size']}, batch {t['batch_size']}, {t['iterations']} iterations/epoch, "
        f"{t['val_crops']} val crops, Adam lr {t['lr']} (poly, re-planned to the budget), "
        f"{th['used']} torch thread(s){probe}.",
        "",
        f"**Result:** best val IoU **{s['best_val_iou']}** (epoch {s['best_epoch']}), "
        f"final {s['final_val_iou']}, first {s['first_val_iou']}; {s['epochs']} epochs, {s['crops']} crops "
        f"in {s['train_call_seconds']} s (budget {60 * doc['budget_minutes']:.0f} s); "
        + (
            f"val IoU >= {TARGET_IOU_2D} after {s['seconds_to_val_iou_0.75']} s; "
            if doc["benchmark"] == "train_2d"
            else ""
        )
        + f"median {s['crops_per_s_median']} crops/s; "
        f"data loading {100 * s['data_time_fraction_median']:.1f} % of step time "
        f"(max {100 * s['data_time_fraction_max']:.1f} %).",
        "",
        f"Done-when check: {doc['check']}",
        "",
        "| epoch | train loss | val loss | val IoU | lr | crops/s | data % | epoch s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["epochs"]:
        lines.append(
            f"| {r['epoch']} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | {r['val_iou']:.4f} | "
            f"{r['lr']:.2e} | {r['crops_per_s']:.1f} | {100 * r['data_time_fraction']:.1f} | "
            f"{r['time_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ndim", choices=["2", "3", "both"], default="both")
    parser.add_argument("--minutes-2d", type=float, default=9.5, help="2D budget [%(default)s]")
    parser.add_argument("--minutes-3d", type=float, default=5.0, help="3D budget [%(default)s]")
    parser.add_argument("--threads", choices=["auto", "1", "2"], default="auto")
    parser.add_argument("--keep-runs", type=Path, help="Keep data and run folders here (else a temp dir).")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    cases = {"2": [2], "3": [3], "both": [2, 3]}[args.ndim]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = args.keep_runs or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for ndim in cases:
            minutes = args.minutes_2d if ndim == 2 else args.minutes_3d
            doc = run_case(ndim, minutes, args.threads, work)
            name = f"train_{ndim}d"
            atomic_write_text(args.out / f"{name}.json", json.dumps(doc, indent=1) + "\n")
            atomic_write_text(args.out / f"{name}.md", markdown(doc))
            log(f"wrote {args.out / name}.json and .md")


if __name__ == "__main__":
    main()
