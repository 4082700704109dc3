"""How often the int8 export keeps a trained model: each seed of the seed benchmark, as a user exports it.

``bench_precision.py`` judges one model per data set; whether int8 is kept is a property of the model as
much as of the data (objects that sit on a threshold in fp32 flip under any rounding), so one model per
set says little about what a user will meet. Here each ``best.pth`` of ``bench_seeds.py``'s default
variant (``ROOT/SET/default/seedN/run``) goes through ``embedseg-export onnx --precision int8`` with the
set's data folder for calibration (train/) and verification (val/), and the result records whether the
exporter wrote the model, which blocks it kept fp32 and their share of the FLOPs, or why it refused.

    python benchmarks/bench_int8_acceptance.py [--root DIR] [--sets ...] [--seeds 1 2 3 4 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import REPO, RESULTS, THREADS, finish, header, log, machine_line, pin_threads, shown

pin_threads()

SETS = ("nuclei-2d", "dsb-2d", "hela-2d", "nuclei-3d")


def attempt(checkpoint: Path, data: Path, out: Path) -> dict:
    """Export ``checkpoint`` to int8 as the CLI does; the search record, or the exporter's reasons."""
    from embedseg_deploy.engine_cache import onnx_contract
    from embedseg_exporters.onnx_export import export_checkpoint
    from embedseg_exporters.verify import VerificationError

    start = time.perf_counter()
    try:
        export_checkpoint(checkpoint, out, precision="int8", force=True, calibrate=data, verify_images=data)
    except VerificationError as exc:
        lines = [x.strip() for x in str(exc).splitlines()]
        why = [x.split(" Try ")[0] for x in lines if "PROBLEM" in x or x.startswith("int8:")]
        return {"kept": False, "why": why, "seconds": round(time.perf_counter() - start, 1)}
    found = onnx_contract(out).provenance["export"]["int8"]["search"]
    return {
        "kept": True,
        "fp32_blocks": found["fp32_blocks"],
        "fp32_flops_share": found.get("fp32_flops_share"),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "scratch" / "seeds")
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="int8_acceptance", help="result file stem")
    args = parser.parse_args()
    root = args.root.resolve()
    doc = header("int8_acceptance", THREADS, root=shown(root), sets=args.sets, seeds=args.seeds)
    doc["models"] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            for seed in args.seeds:
                checkpoint = root / name / "default" / f"seed{seed}" / "run" / "best.pth"
                if not checkpoint.is_file():
                    raise SystemExit(f"{checkpoint}: missing (run benchmarks/bench_seeds.py first)")
                row = {"set": name, "seed": seed}
                row.update(attempt(checkpoint, root / name / "data", Path(tmp) / "model.onnx"))
                log(f"{name} seed {seed}: {'kept' if row['kept'] else 'refused'} ({row['seconds']} s)")
                doc["models"].append(row)
    print(finish(doc, markdown, args.name, args.out))


def markdown(doc: dict) -> str:
    rows = doc["models"]
    lines = [
        "# int8 export: how often a trained model is kept",
        "",
        machine_line(doc),
        "",
        f"Each seed's best.pth of the seed benchmark's default variant (`{doc['parameters']['root']}`), "
        "exported by `embedseg-export onnx --precision int8 --calibrate DATA` (calibrated on train/, "
        "verified on val/: labels vs fp32 AP@0.5 >= 0.99 pooled, after a search that keeps the fewest "
        "blocks fp32 for AP >= 0.995 on the calibration tiles).",
        "",
        "| set | kept | seeds kept | blocks kept fp32 (share of FLOPs) per kept seed |",
        "|---|---:|---|---|",
    ]
    for name in doc["parameters"]["sets"]:
        mine = [r for r in rows if r["set"] == name]
        kept = [r for r in mine if r["kept"]]
        detail = "; ".join(
            f"seed {r['seed']}: {len(r['fp32_blocks'])} ({100 * (r['fp32_flops_share'] or 0):.1f} %)"
            for r in kept
        )
        seeds = " ".join(str(r["seed"]) for r in kept) or "none"
        lines.append(f"| {name} | {len(kept)} of {len(mine)} | {seeds} | {detail or '-'} |")
    lines += ["", "Refusals, as the exporter words them:", ""]
    lines += [f"- {r['set']} seed {r['seed']}: " + " ".join(r["why"]) for r in rows if not r["kept"]]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
