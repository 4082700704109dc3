"""Backends side by side: torch eager CPU, ONNX Runtime CPU fp32 and fp16, and the GPU backends when present.

One :func:`embedseg_deploy.bench.run_bench` call per dimensionality (the code behind ``embedseg-run
bench``): the upstream fixture checkpoint (torch backend), its fp32 and fp16 ONNX exports (every ONNX
backend that runs here), on a generated 2D 1024x1024 image (~800 objects) and a 3D 64x256x256 volume,
whole image in one tile (as upstream predicts), 2 threads, interleaved rounds after a warm-up. GPU
backends that cannot run are listed with the reason.

    python benchmarks/bench_backends.py [--quick] [--repeats 3] [--spinning 0|1] [--out benchmarks/results]

Results: ``backends.json`` (the two bench reports) and ``backends.md``.
"""

from __future__ import annotations

import _common

_ENV = _common.pin_threads()

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from embedseg_deploy.bench import QUICK_SHAPES, format_markdown, run_bench, validate_report  # noqa: E402

NAME = "backends"
SHAPES = {2: (1024, 1024), 3: (64, 256, 256)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small images, 1 timed run (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile", type=int, default=0, help="tile size (0 = whole image)")
    parser.add_argument(
        "--spinning",
        choices=["0", "1"],
        default="0",
        help="ORT session.intra_op.allow_spinning (see hwlimit.md)",
    )
    parser.add_argument("--threads", type=int, default=_common.THREADS)
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    args = parser.parse_args()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats = 1 if args.quick else args.repeats
    doc = _common.header(
        NAME,
        args.threads,
        repeats=repeats,
        warmup=1,
        tile=args.tile or "whole image",
        ort_allow_spinning=args.spinning,
        shapes={str(k): v for k, v in shapes.items()},
    )
    reports = {}
    for ndim in (2, 3):
        models = [
            _common.exported_model(ndim, "fp32"),
            _common.exported_model(ndim, "fp16"),
            _common.fixture_checkpoint(ndim),
        ]
        _common.log(f"{ndim}D: {', '.join(m.name for m in models)}")
        report = run_bench(
            models,
            threads=args.threads,
            tile=[args.tile] * ndim,
            repeats=repeats,
            warmup=1,
            shape=shapes[ndim],
            ort_config={"session.intra_op.allow_spinning": args.spinning},
            log=_common.log,
        )
        problems = validate_report(report)
        if problems:
            raise RuntimeError(f"{ndim}D bench report incomplete: {problems}")
        reports[f"{ndim}d"] = report
    doc["reports"] = reports
    print(_common.finish(doc, markdown, NAME if not args.quick else NAME + "_quick", args.out))


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# Backends side by side (upstream fixture checkpoints; generated images; whole image per call)",
        "",
        _common.machine_line(doc),
        f"ORT session.intra_op.allow_spinning = {doc['parameters']['ort_allow_spinning']}; torch with "
        f"OMP_WAIT_POLICY={doc['environment'].get('OMP_WAIT_POLICY', 'unset')}. Labels in the tables: "
        "`onnx-cpu` = fp32 export, `onnx-cpu-fp16` = fp16 export, `torch-cpu` = the checkpoint in torch "
        "eager.",
        "",
    ]
    for key, report in doc["reports"].items():
        text = format_markdown(report, title=f"{key.upper()}: embedseg-run bench")
        lines.append(text.replace("# ", "## ", 1))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
