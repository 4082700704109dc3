"""The precision ladder (issue 10): fp32, fp16 and int8 ONNX models on ONNX Runtime CPU, side by side.

For every data set of ``benchmarks/int8_datasets.py`` (synthetic sets, each with a model trained on it
separately by ``embedseg-train``) the model is exported three times with ``embedseg-export onnx``:
fp32, fp16 and int8 (calibrated on the set's train/ images, verified on its val/ images, as a user would
run it). Then, in one process:

* accuracy: the set's test images go through the product path (``Predictor``, tiled, clustered) with each
  model; reported are AP@0.5 and AP@0.5:0.9 (mean over IoU 0.50, 0.55, ..., 0.90) of fp16 and int8 labels
  against the fp32 labels, and AP@0.5 of each against the ground truth (matches pooled over the images);
* speed: the network alone (``Backend.run``) on one 2D 1024 x 1024 or 3D 64 x 256 x 256 tile, rounds
  interleaved (every precision once per round) after a warm-up, 2 threads; speed-ups are medians of the
  per-round ratios to fp32.

    python benchmarks/int8_datasets.py            # once: writes and trains the sets (~40 min)
    python benchmarks/bench_precision.py [--rounds N] [--root DIR] [--name STEM] [SET ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import RESULTS, finish, header, log, machine_line, pin_threads

pin_threads()

import numpy as np  # noqa: E402
from int8_datasets import DEFAULT_ROOT, SETS  # noqa: E402

PRECISIONS = ("fp32", "fp16", "int8")
SPEED_SHAPE = {2: (1024, 1024), 3: (64, 256, 256)}
THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(9))  # 0.50 ... 0.90


def export_all(checkpoint: Path, folder: Path, data: Path) -> dict[str, dict]:
    """fp32, fp16 and int8 models of ``checkpoint`` (cached in ``folder``), with export facts."""
    from embedseg_deploy.engine_cache import onnx_contract
    from embedseg_exporters.onnx_export import export_checkpoint
    from embedseg_exporters.verify import VerificationError

    out = {}
    for precision in PRECISIONS:
        path = folder / f"model-{precision}.onnx"
        seconds = None
        if not path.is_file() or path.stat().st_mtime < checkpoint.stat().st_mtime:
            t0 = time.perf_counter()
            try:
                data_options = {"calibrate": data} if precision == "int8" else {}
                if precision != "fp32":
                    data_options["verify_images"] = data
                export_checkpoint(checkpoint, path, precision=precision, force=True, **data_options)
            except VerificationError as exc:  # the exporter refused: recorded, as a user would see it
                lines = str(exc).splitlines()
                problems = [x.strip() for x in lines if "PROBLEM" in x or x.startswith("int8:")]
                notes = [x.strip() for x in lines if "most sensitive" in x]
                out[precision] = {"refused": list(dict.fromkeys(problems[:4] + notes[:1]))}
                path.unlink(missing_ok=True)
                log(f"  {precision}: refused: {problems[:2]}")
                continue
            seconds = round(time.perf_counter() - t0, 1)
        facts = onnx_contract(path).provenance["export"]
        out[precision] = {"path": path, "export_seconds": seconds}
        if precision == "int8":
            search = facts["int8"]["search"]
            out[precision]["fp32_blocks"] = search["fp32_blocks"]
            out[precision]["fp32_flops_share"] = search.get("fp32_flops_share")
            out[precision]["most_sensitive"] = search["sensitivity"][:3]
            out[precision]["search_steps"] = search["steps"]
        log(f"  {precision}: {path.name} ({seconds if seconds is not None else 'cached'} s)")
    return out


def pooled(pairs: list[tuple[np.ndarray, np.ndarray]], thresholds=THRESHOLDS) -> list[float]:
    """Accuracy TP / (TP + FP + FN) per threshold, matches pooled over (reference, test) label pairs."""
    from embedseg_deploy.metrics import label_overlap, match_overlap

    counts = np.zeros((len(thresholds), 3))
    for ref, test in pairs:
        for k, m in enumerate(match_overlap(label_overlap(ref, test), thresholds)):
            counts[k] += (m.tp, m.fp, m.fn)
    return [float(tp / max(tp + fp + fn, 1)) for tp, fp, fn in counts]


def accuracy(models: dict[str, dict], data: Path) -> dict:
    from embedseg_deploy.io import read_tiff
    from embedseg_deploy.predict import Predictor

    images = sorted((data / "test" / "images").glob("*.tif"))
    truth = [read_tiff(data / "test" / "masks" / p.name).data for p in images]
    labels = {}
    for precision, info in models.items():
        if "refused" in info:
            continue
        predictor = Predictor(info["path"], "onnx-cpu", threads=2)
        labels[precision] = [predictor.predict(read_tiff(p).data) for p in images]
    out = {"images": len(images), "shape": list(truth[0].shape), "objects": int(sum(t.max() for t in truth))}
    for precision in labels:
        vs_fp32 = pooled(list(zip(labels["fp32"], labels[precision], strict=True)))
        out[precision] = {
            "ap50_vs_fp32": round(vs_fp32[0], 4),
            "ap50_90_vs_fp32": round(float(np.mean(vs_fp32)), 4),
            "ap50_vs_truth": round(pooled(list(zip(truth, labels[precision], strict=True)), (0.5,))[0], 4),
            "objects": int(sum(len(np.unique(x)) - 1 for x in labels[precision])),
        }
    return out


def speed(models: dict[str, dict], ndim: int, rounds: int) -> dict:
    from embedseg_deploy.backends import create_backend

    backends = {
        p: create_backend(info["path"], "onnx-cpu", threads=2) for p, info in models.items() if "path" in info
    }
    x = np.random.default_rng(0).uniform(0, 1, (1, 1, *SPEED_SHAPE[ndim])).astype(np.float32)
    times: dict[str, list[float]] = {p: [] for p in backends}
    for r in range(rounds + 1):  # round 0 warms up
        for precision, backend in backends.items():
            t0 = time.perf_counter()
            backend.run(x)
            if r:
                times[precision].append(time.perf_counter() - t0)
    out = {"shape": list(SPEED_SHAPE[ndim]), "rounds": rounds}
    for precision, t in times.items():
        ratios = [a / b for a, b in zip(times["fp32"], t, strict=True)]
        out[precision] = {
            "median_s": round(float(np.median(t)), 4),
            "min_s": round(float(np.min(t)), 4),
            "speedup_vs_fp32": round(float(np.median(ratios)), 3),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="precision", help="result file stem")
    parser.add_argument("names", nargs="*", default=list(SETS))
    args = parser.parse_args()
    doc = header("precision", 2, rounds=args.rounds, sets={n: SETS[n] for n in args.names})
    doc["sets"] = {}
    for name in args.names:
        run = args.root / name / "run"
        checkpoint = run / "best.pth"
        if not checkpoint.is_file():
            raise SystemExit(f"{checkpoint}: not trained yet (python benchmarks/int8_datasets.py {name})")
        log(f"{name}: exporting")
        data = (args.root / SETS[name].get("like", name) / "data").resolve()
        models = export_all(checkpoint, run, data)
        ndim = SETS[name]["ndim"]
        log(f"{name}: accuracy on the test images")
        entry = {
            "ndim": ndim,
            "exports": _plain(models),
            "accuracy": accuracy(models, data),
        }
        entry["training"] = _training(run)
        log(f"{name}: speed")
        entry["speed"] = speed(models, ndim, args.rounds)
        doc["sets"][name] = entry
        log(f"  {entry['accuracy']}\n  {entry['speed']}")
    finish(doc, markdown, args.name, args.out)


def _plain(models: dict[str, dict]) -> dict:
    return {
        p: {k: (str(v) if isinstance(v, Path) else v) for k, v in info.items()} for p, info in models.items()
    }


def _training(run: Path) -> dict:
    import json

    config = json.loads((run / "config.json").read_text())
    rows = (run / "log.csv").read_text().splitlines()
    head = rows[0].split(",")
    last = dict(zip(head, rows[-1].split(","), strict=False))
    keys = ("crop_size", "batch_size", "iterations", "lr", "threads", "max_minutes", "seed")
    return {
        "config": {k: config.get(k) for k in keys},
        "epochs": len(rows) - 1,
        "best_val_iou": max(float(dict(zip(head, r.split(","), strict=False))["val_iou"]) for r in rows[1:]),
        "last": {k: last[k] for k in ("train_loss", "val_loss", "val_iou") if k in last},
    }


def markdown(doc: dict) -> str:
    lines = [
        "# Precision ladder: fp32 vs fp16 vs int8 on ONNX Runtime CPU",
        "",
        machine_line(doc),
        "",
        "Models trained separately per data set (`benchmarks/int8_datasets.py`); int8 calibrated on train/,",
        "verified on val/, judged here on test/. AP = TP / (TP + FP + FN) pooled over the test images;",
        "AP@0.5:0.9 is the mean over IoU 0.50, 0.55, ..., 0.90. Speed: the network alone on one tile,",
        f"median of {doc['parameters']['rounds']} interleaved rounds after a warm-up, 2 threads.",
        "",
        "| data set | model | test images | AP@0.5 vs truth (fp32 / fp16 / int8) | fp16 vs fp32 AP@0.5, "
        "@0.5:0.9 | int8 vs fp32 AP@0.5, @0.5:0.9 | int8: blocks kept fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in doc["sets"].items():
        a, t, e = s["accuracy"], s["training"], s["exports"]

        def vs_fp32(p: str, a=a) -> str:
            return f"{a[p]['ap50_vs_fp32']:.4f}, {a[p]['ap50_90_vs_fp32']:.4f}" if p in a else "refused"

        truth = " / ".join(f"{a[p]['ap50_vs_truth']:.3f}" if p in a else "-" for p in PRECISIONS)
        blocks = "-"
        if "fp32_blocks" in e["int8"]:
            share = e["int8"].get("fp32_flops_share")
            blocks = str(len(e["int8"]["fp32_blocks"]))
            blocks += f" ({100 * share:.0f} % of FLOPs)" if share else ""
        lines.append(
            f"| {name} | {s['ndim']}D, {t['epochs']} epochs, best val IoU {t['best_val_iou']:.3f} "
            f"| {a['images']} x {'x'.join(map(str, a['shape']))}, {a['objects']} objects | {truth} "
            f"| {vs_fp32('fp16')} | {vs_fp32('int8')} | {blocks} |"
        )
    lines += ["", "| data set | tile | fp32 s | fp16 s (x) | int8 s (x) |", "|---|---|---:|---:|---:|"]
    for name, s in doc["sets"].items():
        v = s["speed"]
        cells = [f"{v['fp32']['median_s']:.3f}"] + [
            f"{v[p]['median_s']:.3f} ({v[p]['speedup_vs_fp32']:.2f}x)" if p in v else "refused"
            for p in ("fp16", "int8")
        ]
        lines.append(f"| {name} | {'x'.join(map(str, v['shape']))} | " + " | ".join(cells) + " |")
    lines += ["", "Per data set: the int8 search (fp32 blocks -> AP@0.5 on calibration tiles), refusals:", ""]
    for name, s in doc["sets"].items():
        for precision in ("fp16", "int8"):
            e = s["exports"][precision]
            if "refused" in e:
                reasons = "; ".join(dict.fromkeys(e["refused"]))
                lines.append(f"- {name} {precision} refused by the exporter: {reasons}")
            elif precision == "int8":
                steps = ", ".join(f"{x['fp32_blocks']} -> {x['ap50']}" for x in e["search_steps"])
                worst = ", ".join(f"{b} ({v})" for b, v in e["most_sensitive"]) or "not ranked (none needed)"
                lines.append(
                    f"- {name} int8 kept fp32: {', '.join(e['fp32_blocks']) or 'none'}; search {steps}; "
                    f"most sensitive: {worst}"
                )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
