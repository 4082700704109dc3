"""Objects grown from seeds wider than any training object, per trained model: a degenerate run's mark.

For each default seed model of ``bench_seeds.py`` (``ROOT/SET/default/seedN/run/best.pth``) the val and
test images go through the runtime's pipeline (``training.validate.pipeline_score``); recorded are AP@0.5
and the labels whose seed has a clustering bandwidth wider than the largest annotated object's extent
(``validate.wide_objects``, what the trainer logs per epoch as ``val_wide_objects`` and warns about).

    python benchmarks/bench_wide_objects.py [--root DIR] [--sets dsb-2d hela-2d ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import REPO, RESULTS, finish, header, log, machine_line, pin_threads, shown

pin_threads(1)

SETS = ("dsb-2d", "hela-2d", "nuclei-2d", "nuclei-3d")


def measure(checkpoint: Path, data: Path) -> dict:
    import torch

    from embedseg_deploy.backends.torch_backend import ModuleBackend
    from embedseg_training.checkpoint import load_model
    from embedseg_training.data import load_split
    from embedseg_training.validate import pipeline_score

    torch.set_num_threads(1)
    model, contract = load_model(checkpoint)
    extent = (contract.data_properties or {}).get("max_extent")
    if extent is None:
        raise SystemExit(f"{checkpoint}: its contract records no object extents (not one of our runs)")
    row: dict = {"max_extent": extent}
    for split in ("val", "test"):
        score = pipeline_score(ModuleBackend(model, contract), load_split(data, split), max_extent=extent)
        row[split] = {"ap50": round(score.ap50, 4), "wide": score.wide_objects, "labels": score.n_pred}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "scratch" / "seeds")
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="wide_objects", help="result file stem")
    args = parser.parse_args()
    root = args.root.resolve()
    doc = header("wide_objects", 1, root=shown(root), sets=args.sets)
    doc["models"] = []
    for name in args.sets:
        runs = sorted(root.glob(f"{name}/default/seed*/run/best.pth"), key=lambda p: int(p.parts[-3][4:]))
        for checkpoint in runs:
            row = {
                "set": name,
                "seed": int(checkpoint.parts[-3][4:]),
                **measure(checkpoint, root / name / "data"),
            }
            log(f"{name} seed {row['seed']}: val {row['val']}, test {row['test']}")
            doc["models"].append(row)
    print(finish(doc, markdown, args.name, args.out))


def markdown(doc: dict) -> str:
    lines = [
        "# Objects grown from seeds wider than any training object, per trained model",
        "",
        machine_line(doc),
        "",
        f"Default seed models of `{doc['parameters']['root']}`; val and test images through the runtime's "
        "pipeline; wide = labels whose seed's clustering bandwidth (sigma) exceeds the largest annotated "
        "object's extent on some axis.",
        "",
        "| set | seed | limit (px) | val AP@0.5 | val wide / labels | test AP@0.5 | test wide / labels |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in doc["models"]:
        v, t = r["val"], r["test"]
        lines.append(
            f"| {r['set']} | {r['seed']} | {' x '.join(map(str, r['max_extent']))} | {v['ap50']:.3f} | "
            f"{v['wide']} / {v['labels']} | {t['ap50']:.3f} | {t['wide']} / {t['labels']} |"
        )
    bad = [f"{r['set']} seed {r['seed']}" for r in doc["models"] if r["val"]["wide"] or r["test"]["wide"]]
    lines += [
        "",
        f"Models with wide objects: {len(bad)} of {len(doc['models'])} ({', '.join(bad) or 'none'}).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
