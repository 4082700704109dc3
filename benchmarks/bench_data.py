"""Data loading cost vs a BranchedERFNet training step on CPU (target: loading < 10% of the step).

Writes a small synthetic dataset (2D and 3D), builds :class:`CropDataset` and times, per batch, (a) the
crops of the first epoch (visible-part centres computed), (b) the crops of a later epoch (centres cached),
(c) one training step: forward, spatial-embedding loss, backward, Adam step. Usage:
``python benchmarks/bench_data.py [--threads 2] [--batches 4] [--out benchmarks/results]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from embedseg_deploy.synthetic import write_dataset
from embedseg_training.data import CropDataset, compute_properties, load_split
from embedseg_training.loss import spatial_embedding_loss
from embedseg_training.model import BranchedERFNet

CASES = {
    # name: (ndim, dataset options, crop (None = data properties), batch size)
    "2d-props-crop": (2, dict(shape=(256, 256), n_train=12), None, 16),
    "2d-crop96": (2, dict(shape=(256, 256), n_train=12), [96, 96], 16),
    "3d-crop32x48x48": (3, dict(shape=(32, 96, 96), n_train=6, anisotropy=2.0), [32, 48, 48], 2),
}


def collate_time(ds: CropDataset, batch: int, n_batches: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds per batch of crops."""
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=0, drop_last=True)
    wall, cpu, it = [], [], iter(loader)
    for _ in range(n_batches):
        t, c = time.perf_counter(), time.process_time()
        next(it)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return wall, cpu


def step_time(
    ds: CropDataset, batch: int, n_batches: int, spacing: list[float], fg_weight: float
) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of a training step (after one warm-up step)."""
    model = BranchedERFNet(ds.ndim, ds.in_channels, [2 * ds.ndim, 1])
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=0, drop_last=True)
    batches = [b for _, b in zip(range(n_batches + 1), loader, strict=False)]
    wall, cpu = [], []
    for b in batches:
        t, c = time.perf_counter(), time.process_time()
        out = model(b["image"])
        loss = spatial_embedding_loss(out, b["instance"], b["center"], spacing, fg_weight).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return wall[1:], cpu[1:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (ndim, options, crop, batch) in CASES.items():
            root = write_dataset(Path(tmp) / name, ndim=ndim, n_val=1, n_test=0, seed=0, **options)
            samples = load_split(root, "train")
            props = compute_properties(samples)
            crop = crop or props.crop_size
            t = time.perf_counter()
            ds = CropDataset(samples, crop, anisotropy=props.anisotropy, seed=0)
            build = time.perf_counter() - t
            first, first_cpu = collate_time(ds, batch, args.batches)
            ds.set_epoch(0)  # same items again: their targets are now cached
            cached, cached_cpu = collate_time(ds, batch, args.batches)
            spacing = [1 / 255.0 * (props.anisotropy if (ndim == 3 and a == 0) else 1.0) for a in range(ndim)]
            step, step_cpu = step_time(ds, batch, args.batches, spacing, props.foreground_weight)
            row = {
                "case": name,
                "crop": crop,
                "batch": batch,
                "objects": ds.n_objects,
                "dataset_build_s": round(build, 4),
                "load_first_epoch_s_per_batch": round(float(np.median(first)), 4),
                "load_cached_s_per_batch": round(float(np.median(cached)), 4),
                "train_step_s": round(float(np.median(step)), 4),
                "load_first_epoch_cpu_s_per_batch": round(float(np.median(first_cpu)), 4),
                "load_cached_cpu_s_per_batch": round(float(np.median(cached_cpu)), 4),
                "train_step_cpu_s": round(float(np.median(step_cpu)), 4),
            }
            row["load_fraction_first_epoch"] = round(
                row["load_first_epoch_s_per_batch"] / row["train_step_s"], 4
            )
            row["load_fraction_cached"] = round(row["load_cached_s_per_batch"] / row["train_step_s"], 4)
            # CPU seconds resist other jobs on a shared machine; crops use one thread, the step `threads`
            cpu_step = row["train_step_cpu_s"] / args.threads
            row["load_fraction_first_epoch_cpu"] = round(
                row["load_first_epoch_cpu_s_per_batch"] / cpu_step, 4
            )
            row["load_fraction_cached_cpu"] = round(row["load_cached_cpu_s_per_batch"] / cpu_step, 4)
            print(row, flush=True)
            results.append(row)
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "threads": args.threads,
        "batches": args.batches,
        "num_workers": 0,
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],  # the CPU is shared: noisy when high
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_data.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [
        "# Data loading vs training step (CPU)",
        "",
        f"{meta['date']}, {meta['machine']}, Python {meta['python']}, torch {meta['torch']}, "
        f"{args.threads} threads, DataLoader num_workers=0, median of {args.batches} batches, "
        f"load average {meta['load_average_1_5_15']}.",
        "",
        "Wall: seconds per batch. CPU: load CPU s / (step CPU s / threads), less sensitive to other jobs.",
        "",
        "| case | crop | batch | load 1st epoch (s) | load cached (s) | step (s) | load/step 1st | cached "
        "| CPU: load/step 1st | CPU: cached |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    if meta["load_average_1_5_15"][0] > (os.cpu_count() or 1):
        lines[3:3] = [  # after the header line
            "",
            f"Note: load average above the {os.cpu_count()} CPUs (other jobs were running), so absolute",
            "times are inflated and noisy; prefer the CPU-time ratios.",
        ]
    for r in results:
        lines.append(
            f"| {r['case']} | {'x'.join(map(str, r['crop']))} | {r['batch']} "
            f"| {r['load_first_epoch_s_per_batch']} | {r['load_cached_s_per_batch']} | {r['train_step_s']} "
            f"| {r['load_fraction_first_epoch']:.1%} | {r['load_fraction_cached']:.1%} "
            f"| {r['load_fraction_first_epoch_cpu']:.1%} | {r['load_fraction_cached_cpu']:.1%} |"
        )
    (args.out / "bench_data.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
