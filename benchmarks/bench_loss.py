"""Forward+backward time of the spatial-embedding loss vs BranchedERFNet on CPU batches.

Crops are densely packed with random discs/balls (denser than DSB), one centre pixel each; the
prediction is the freshly initialised network's output. Usage:
``python benchmarks/bench_loss.py [--threads 2] [--out benchmarks/results]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from embedseg_training.loss import spatial_embedding_loss
from embedseg_training.model import BranchedERFNet


def packed_crops(ndim: int, shape: tuple[int, ...], batch: int, radius: float, seed: int = 0):
    """Instance crops of non-overlapping discs (2D) / balls (3D) placed by rejection sampling."""
    rng = np.random.default_rng(seed)
    inst = np.zeros((batch, *shape), np.int32)
    cen = np.zeros((batch, *shape), bool)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    for b in range(batch):
        n = 0
        for _ in range(400):
            c = rng.uniform(0, shape)
            r = radius * rng.uniform(0.7, 1.3)
            m = ((grid - c) ** 2).sum(-1) <= r * r
            if m.sum() < 5 or inst[b][m].any():
                continue
            n += 1
            inst[b][m] = n
            p = tuple(np.clip(np.round(c).astype(int), 0, np.array(shape) - 1))
            cen[(b, *p)] = m[p]  # a centre pixel where the disc's centre lies inside it
    return torch.from_numpy(inst), torch.from_numpy(cen)


def best_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = [
        ("2d dsb-like", 2, (96, 96), 16, 8.0),
        ("2d large crop", 2, (256, 256), 4, 10.0),
        ("3d organoid-like", 3, (32, 64, 64), 2, 8.0),
    ]
    rows = []
    for name, ndim, shape, batch, radius in cases:
        model = BranchedERFNet(ndim)
        model.init_output(ndim)
        x = torch.randn(batch, 1, *shape)
        inst, cen = packed_crops(ndim, shape, batch, radius)
        with torch.no_grad():
            pred = model(x)
        spacing = [1 / 255] * ndim

        def net(model=model, x=x):
            model.zero_grad()
            model(x).sum().backward()

        def loss(pred=pred, inst=inst, cen=cen, spacing=spacing):
            p = pred.clone().requires_grad_(True)
            spatial_embedding_loss(p, inst, cen, spacing).loss.backward()

        t_net, t_loss = best_time(net, args.reps), best_time(loss, args.reps)
        n_obj = int(sum(len(torch.unique(i)) - 1 for i in inst))
        rows.append(
            {
                "case": name,
                "shape": list(shape),
                "batch": batch,
                "objects": n_obj,
                "network_s": round(t_net, 4),
                "loss_s": round(t_loss, 4),
                "loss_over_network": round(t_loss / t_net, 3),
            }
        )
        print(rows[-1])
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)",
        "load_average": os.getloadavg(),
        "versions": {"torch": str(torch.__version__), "python": platform.python_version()},
        "what": "forward+backward, best of reps; network on random input, loss on the network's output",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loss_vs_network.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"# Loss vs network, forward+backward (CPU)\n\n{meta['date']}, {meta['machine']}, torch "
        f"{meta['versions']['torch']}, load average {meta['load_average']}. {meta['what']}.\n",
        "| case | crop | batch | objects | network s | loss s | loss/network |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['case']} | {r['shape']} | {r['batch']} | {r['objects']} | {r['network_s']} | {r['loss_s']} | "
        f"{r['loss_over_network']} |"
        for r in rows
    ]
    (args.out / "loss_vs_network.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
