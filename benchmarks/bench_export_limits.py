"""Export verification limits against trained models: how far fp32 and fp16 ONNX differ from torch fp32.

Every ``best.pth`` under ROOT (default: the seed benchmark's runs, ``scratch/seeds/SET/VARIANT/seedN/run``)
is exported at ``--precision`` with the verifier's inputs (a synthetic blob tile and two random tiles;
for fp16 also the val/ images of the training data the checkpoint records) and every limit switched off,
so what is recorded is the largest difference each model shows (offsets in pixels, sigma relative,
seediness absolute) and its labels against fp32 torch's (identical on the tiles; for fp16 AP@0.5 pooled
over the val images too). The limits in ``exporters/verify.py`` are set from these tables.

    python benchmarks/bench_export_limits.py [--precision fp32|fp16] [--statistic max|mean] [--root DIR]
    python benchmarks/bench_export_limits.py --precision fp16 --statistic max --name export_fp16_max
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import REPO, RESULTS, THREADS, finish, header, log, machine_line, pin_threads, shown

pin_threads()

GROUPS = ("offset_px", "sigma_rel", "seed_abs")
FORMER = {"fp32": (1e-4, 1e-4, 1e-4), "fp16": (0.1, 0.1, 0.02)}  # the limits before 2026-12-07


def measure(checkpoint: Path, out: Path, precision: str, statistic: str) -> dict:
    """Largest raw difference per group over the verification cases, and the label verdicts."""
    from embedseg_exporters import onnx_export
    from embedseg_exporters.verify import Tolerance

    onnx_export.MIN_IMAGE_AP = 0.0  # measure the pooled AP, do not refuse on it
    tol = Tolerance(1e9, 1e9, 1e9, 0.0, statistic)  # every limit off
    exported = onnx_export.export_checkpoint(checkpoint, out, force=True, precision=precision, tolerance=tol)
    report = exported.report
    raw = [case for case in report.cases if not case.name.startswith("pooled")]
    worst = {g: max(case.errors[g] for case in raw) for g in GROUPS}
    tiles = [case.labels for case in raw if case.labels is not None]
    pooled = [case.labels["ap50"] for case in report.cases if case.name.startswith("pooled")]
    return {
        **worst,
        "worst_case": max(raw, key=lambda case: case.errors["seed_abs"]).name,
        "labels_identical": all(x["identical"] for x in tiles),
        "pooled_ap50": pooled[0] if pooled else None,
        "cases": len(report.cases),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "scratch" / "seeds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    parser.add_argument("--statistic", choices=("max", "mean"), help="per input [the precision's rule]")
    parser.add_argument("--name", help="result file stem (default export_PRECISION)")
    args = parser.parse_args()
    from embedseg_exporters.verify import TOLERANCES

    checkpoints = sorted(args.root.glob("*/*/seed*/run/best.pth"))
    if not checkpoints:
        raise SystemExit(f"{args.root}: no */*/seed*/run/best.pth (run benchmarks/bench_seeds.py first)")
    limits = TOLERANCES[args.precision]
    statistic = args.statistic or limits.statistic
    root = args.root.resolve()
    doc = header(
        "export_limits",
        THREADS,
        precision=args.precision,
        root=shown(root),
        limits={g: getattr(limits, g) for g in GROUPS},
        statistic=statistic,
    )
    doc["models"] = []
    with tempfile.TemporaryDirectory() as tmp:
        for checkpoint in checkpoints:
            name = str(checkpoint.parent.parent.relative_to(args.root))
            row = {"model": name, **measure(checkpoint, Path(tmp) / "model.onnx", args.precision, statistic)}
            log(f"{name}: " + ", ".join(f"{g} {row[g]:.2e}" for g in GROUPS))
            doc["models"].append(row)
    print(finish(doc, markdown, args.name or f"export_{args.precision}", args.out))


def markdown(doc: dict) -> str:
    precision, limits = doc["parameters"]["precision"], doc["parameters"]["limits"]
    rows = doc["models"]
    inputs = "a synthetic blob tile, two random tiles" + (", the val/ images" if precision == "fp16" else "")
    statistic = doc["parameters"].get("statistic", "max")
    lines = [
        f"# {precision} export: ONNX Runtime CPU vs torch fp32 on trained models",
        "",
        machine_line(doc),
        "",
        f"{len(rows)} models (`{doc['parameters']['root']}`); per model the largest over the verifier's "
        f"inputs ({inputs}) of the {statistic} difference per input; limits now "
        + ", ".join(f"{g} {limits[g]:g}" for g in GROUPS)
        + ".",
        "",
        "| model | offset px | sigma rel | seed abs (on) | tile labels same | val AP@0.5 pooled | within |",
        "|---|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        ok = all(r[g] <= limits[g] for g in GROUPS)
        pooled = "-" if r["pooled_ap50"] is None else f"{r['pooled_ap50']:.4f}"
        lines.append(
            f"| {r['model']} | {r['offset_px']:.2e} | {r['sigma_rel']:.2e} | {r['seed_abs']:.2e} "
            f"({r['worst_case']}) | {'yes' if r['labels_identical'] else 'no'} | {pooled} | "
            f"{'yes' if ok else 'NO'} |"
        )
    lines += ["", "Largest: " + ", ".join(f"{g} {max(r[g] for r in rows):.2e}" for g in GROUPS) + "."]
    if statistic == "max":  # the rule before 2026-12-07 judged every precision per pixel
        former = sum(any(r[g] > f for g, f in zip(GROUPS, FORMER[precision], strict=True)) for r in rows)
        lines.append(f"Over the limits before 2026-12-07 {FORMER[precision]}: {former} of {len(rows)}.")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
