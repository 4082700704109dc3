"""fp32 export rounding: ONNX Runtime CPU vs torch CPU on trained models, against the fp32 verification limits.

Every ``best.pth`` under ROOT (default: the seed benchmark's runs, ``scratch/seeds/SET/VARIANT/seedN/run``)
is exported to fp32 ONNX with the verifier's standard inputs (a synthetic blob tile and two random tiles),
the raw-output limits switched off, so what is recorded is the largest difference each model shows
(offsets in pixels, sigma relative, seediness absolute) and whether its labels are identical. The limits
in ``exporters/verify.py`` are set from this table.

    python benchmarks/bench_export_fp32.py [--root DIR] [--name STEM]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import REPO, RESULTS, THREADS, finish, header, log, machine_line, pin_threads

pin_threads()

GROUPS = ("offset_px", "sigma_rel", "seed_abs")
FORMER = 1e-4  # the fp32 limits before 2026-12-07, each group


def measure(checkpoint: Path, out: Path) -> dict:
    """Largest raw difference per group over the verification cases, and the label verdict."""
    from embedseg_exporters.onnx_export import export_checkpoint
    from embedseg_exporters.verify import Tolerance

    report = export_checkpoint(checkpoint, out, force=True, tolerance=Tolerance(1.0, 1.0, 1.0)).report
    worst = {g: max(case.errors[g] for case in report.cases) for g in GROUPS}
    labelled = [case.labels for case in report.cases if case.labels is not None]
    return {**worst, "labels_identical": all(x["identical"] for x in labelled), "cases": len(report.cases)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "scratch" / "seeds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="export_fp32", help="result file stem")
    args = parser.parse_args()
    from embedseg_exporters.verify import TOLERANCES

    checkpoints = sorted(args.root.glob("*/*/seed*/run/best.pth"))
    if not checkpoints:
        raise SystemExit(f"{args.root}: no */*/seed*/run/best.pth (run benchmarks/bench_seeds.py first)")
    limits = TOLERANCES["fp32"]
    root = args.root.resolve()
    shown = root.relative_to(REPO) if root.is_relative_to(REPO) else root
    doc = header("export_fp32", THREADS, root=str(shown), limits={g: getattr(limits, g) for g in GROUPS})
    doc["models"] = []
    with tempfile.TemporaryDirectory() as tmp:
        for checkpoint in checkpoints:
            name = str(checkpoint.parent.parent.relative_to(args.root))
            row = {"model": name, **measure(checkpoint, Path(tmp) / "model.onnx")}
            log(f"{name}: " + ", ".join(f"{g} {row[g]:.2e}" for g in GROUPS))
            doc["models"].append(row)
    print(finish(doc, markdown, args.name, args.out))


def markdown(doc: dict) -> str:
    limits = doc["parameters"]["limits"]
    rows = doc["models"]
    lines = [
        "# fp32 export: ONNX Runtime CPU vs torch CPU on trained models",
        "",
        machine_line(doc),
        "",
        f"{len(rows)} models (`{doc['parameters']['root']}`); per model the largest difference over the "
        "verifier's three inputs (a synthetic blob tile, two random tiles); limits now "
        + ", ".join(f"{g} {limits[g]:g}" for g in GROUPS)
        + ".",
        "",
        "| model | offset px | sigma rel | seed abs | labels identical | within the limits |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        ok = all(r[g] <= limits[g] for g in GROUPS) and r["labels_identical"]
        lines.append(
            f"| {r['model']} | {r['offset_px']:.2e} | {r['sigma_rel']:.2e} | {r['seed_abs']:.2e} | "
            f"{'yes' if r['labels_identical'] else 'NO'} | {'yes' if ok else 'NO'} |"
        )
    former = sum(any(r[g] > FORMER for g in GROUPS) for r in rows)
    lines += [
        "",
        "Largest: " + ", ".join(f"{g} {max(r[g] for r in rows):.2e}" for g in GROUPS) + ".",
        f"Over the former limits ({FORMER:g} each), so refused before: {former} of {len(rows)}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
