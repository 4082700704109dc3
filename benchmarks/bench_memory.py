"""Memory of prediction: bytes per pixel of each stage, and peak RSS flat under a memory budget.

Part 1, ``stages``: a fresh process per case predicts one image whole (or tiled) with the Python API and
reads its peak resident set size after every stage (``VmHWM``, reset between stages through
``/proc/self/clear_refs``): normalise, network, cluster, relabel. Dividing each stage's rise by the
pixels gives the bytes per pixel that ``embedseg_deploy.memory`` budgets with. ORT's CPU memory arena is
measured with and without shrinking it after each run.

Part 2, ``flat``: ``embedseg-run predict --memory-budget B`` on images from 2048^2 to 16384^2 (2D) and
64x512^2 to 256x1024^2 (3D), each in a fresh process; its ``VmHWM`` is the peak RSS (not ``ru_maxrss``,
which Linux seeds at exec with the parent's resident set: a 1 GB parent made a 765 MiB run read 1002). With
``--before PATH`` (a checkout of an earlier commit) the same images also run on that code, side by side.

    python benchmarks/bench_memory.py stages
    python benchmarks/bench_memory.py flat [--budget-2d 1.2G] [--budget-3d 2G] [--before /tmp/old] [--name N]

Uses the upstream fixture checkpoints (2D and 3D) exported to ONNX. Results: benchmarks/results/
memory_stages.{json,md} and memory_flat.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from _common import FIXTURES, RESULTS, pin_threads

pin_threads()

import numpy as np  # noqa: E402

STAGES_CHILD = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np

    def status():
        out = {}
        for line in open("/proc/self/status"):
            key, value = line.split(":", 1)
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
        return out

    model, src, tile, arena = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    from embedseg_deploy.backends import create_backend
    from embedseg_deploy.cluster import consecutive_labels, warm_up
    from embedseg_deploy.io import read_tiff
    from embedseg_deploy.predict import Predictor

    backend = create_backend(model, "onnx-cpu", threads=2, shrink_arena=arena)
    p = Predictor(backend, tile=None if tile == "default" else int(tile))
    warm_up()
    image = read_tiff(src).data
    out = {"base": status()["VmRSS"], "pixels": int(image.size)}

    def stage(name, fn):
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
        before = status()["VmRSS"]
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        after = status()
        out[name] = {"before": before, "peak": after["VmHWM"], "after": after["VmRSS"], "seconds": seconds}
        return result

    x = stage("normalize", lambda: p.prepare(image))
    raw = stage("network", lambda: p.predict_raw(x))
    keep = p.crop(x.shape[1:])
    del x
    labels = stage("cluster", lambda: p.cluster(raw))
    labels, n = stage("relabel", lambda: consecutive_labels(labels[keep]))
    out["objects"] = n
    out["tile"] = p.tile
    print(json.dumps(out))
    """
)

FLAT_CHILD = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    from embedseg_deploy.cli import main
    try:
        main(sys.argv[1:], standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise
    # VmHWM, not ru_maxrss: Linux carries the parent's resident set into a child's ru_maxrss at exec
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(json.dumps({"peak_rss": hwm * 1024, "seconds": time.perf_counter() - t0}))
    """
)

MIB = 2**20


def export_models(folder: Path) -> dict[int, Path]:
    from embedseg_exporters.onnx_export import export_checkpoint

    models = {}
    for ndim in (2, 3):
        path = folder / f"upstream-{ndim}d.onnx"
        export_checkpoint(FIXTURES / f"{ndim}d" / "checkpoint.pth", path, force=True, verify=False)
        models[ndim] = path
    return models


def make_image(shape: tuple[int, ...], path: Path) -> None:
    """A synthetic image like the fixtures' (2D: 2048^2 with ~3000 objects; 3D: 32x256^2 with ~250),
    tiled up to ``shape``, written uncompressed (block mode memory-maps it)."""
    from embedseg_deploy.io import write_tiff_atomic
    from embedseg_deploy.synthetic import make_image as synth

    rng = np.random.default_rng(0)
    if len(shape) == 2:
        base, _ = synth((2048, 2048), 3000, rng, radius=(7.0, 13.0))
    else:
        base, _ = synth((32, 256, 256), 250, rng, radius=(5.0, 9.0), anisotropy=2.0)
    reps = [-(-s // b) for s, b in zip(shape, base.shape, strict=True)]
    image = np.tile(base.astype(np.uint16), reps)[tuple(slice(0, s) for s in shape)]
    write_tiff_atomic(path, np.ascontiguousarray(image), overwrite=True)


def run_json(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    # run outside the checkout: `python -c` puts the working folder first on sys.path, before PYTHONPATH
    proc = subprocess.run(
        cmd, capture_output=True, text=True, check=False, env=env, cwd=tempfile.gettempdir()
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stages(args: argparse.Namespace, models: dict[int, Path], tmp: Path) -> dict:
    cases = [
        ((1024, 1024), "0"),
        ((2048, 2048), "0"),
        ((4096, 4096), "default"),
        ((32, 256, 256), "0"),
        ((64, 256, 256), "0"),
        ((64, 512, 512), "0"),
    ]
    rows = []
    for shape, tile in cases:
        src = tmp / f"{'x'.join(map(str, shape))}.tif"
        make_image(shape, src)
        for arena in (False, True):
            cmd = [
                sys.executable,
                "-c",
                STAGES_CHILD,
                str(models[len(shape)]),
                str(src),
                tile,
                str(int(arena)),
            ]
            r = run_json(cmd)
            px = r["pixels"]
            row = {
                "shape": list(shape),
                "tile": r["tile"],
                "arena_shrink": arena,
                "base_mib": r["base"] / MIB,
            }
            for name in ("normalize", "network", "cluster", "relabel"):
                s = r[name]
                row[name] = {
                    "peak_rise_bytes_per_px": (s["peak"] - s["before"]) / px,
                    "kept_bytes_per_px": (s["after"] - s["before"]) / px,
                    "peak_mib": s["peak"] / MIB,
                    "seconds": s["seconds"],
                }
            row["peak_mib"] = max(row[n]["peak_mib"] for n in ("normalize", "network", "cluster", "relabel"))
            row["objects"] = r["objects"]
            rows.append(row)
            print(json.dumps(row), flush=True)
        src.unlink()
    return {"benchmark": "memory stages", "results": rows}


def flat(args: argparse.Namespace, models: dict[int, Path], tmp: Path) -> dict:
    rows = []
    for ndim, sizes, budget in ((2, args.sizes_2d, args.budget_2d), (3, args.sizes_3d, args.budget_3d)):
        for size in sizes:
            shape = tuple(int(s) for s in size.split("x"))
            src = tmp / f"{size}.tif"
            make_image(shape, src)
            sides = [("after", None, budget)] + ([("before", args.before, None)] if args.before else [])
            for name, code, side_budget in sides:
                if name == "before" and math.prod(shape) > args.before_max_mpx * 1e6:
                    continue
                out = tmp / f"out-{name}"
                cmd = [
                    sys.executable,
                    "-c",
                    FLAT_CHILD,
                    "predict",
                    str(models[ndim]),
                    str(src),
                    "-o",
                    str(out),
                ]
                cmd += ["--backend", "onnx-cpu", "--threads", "2", "-q", "--overwrite"]
                if side_budget:
                    cmd += ["--memory-budget", side_budget]
                env = dict(os.environ)
                if code:
                    env["PYTHONPATH"] = str(code)
                r = run_json(cmd, env)
                summary = json.loads((out / "summary.json").read_text())
                (record,) = summary["files"]
                row = {
                    "side": name,
                    "shape": list(shape),
                    "megapixels": math.prod(shape) / 1e6,
                    "budget": side_budget,
                    "mode": record.get("mode", "whole"),
                    "peak_rss_mib": r["peak_rss"] / MIB,
                    "seconds": r["seconds"],
                    "objects": record.get("objects"),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            src.unlink()
    return {"benchmark": "memory flat", "results": rows}


def write(doc: dict, name: str, lines: list[str]) -> None:
    from embedseg_deploy.io import atomic_write_json, atomic_write_text
    from embedseg_deploy.predict import versions

    doc = {**doc, "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": versions("onnxruntime")}
    atomic_write_json(RESULTS / f"{name}.json", doc)
    head = [f"# {doc['benchmark']} ({doc['date']})", "", f"Machine and versions: {doc['versions']}.", ""]
    atomic_write_text(RESULTS / f"{name}.md", "\n".join(head + lines) + "\n")
    print(f"wrote {RESULTS / name}.json and .md")


def stages_table(doc: dict) -> list[str]:
    lines = [
        "Bytes per pixel each stage adds to the resident set at its peak (and keeps after it), whole-image",
        "mode unless a tile is shown; ONNX Runtime CPU, 2 threads, upstream fixture ERFNets.",
        "",
        "| image | tile | arena shrunk | normalise | network | cluster | relabel | peak MiB | base MiB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in doc["results"]:
        cells = [
            f"{r[n]['peak_rise_bytes_per_px']:.1f} ({r[n]['kept_bytes_per_px']:.1f})"
            for n in ("normalize", "network", "cluster", "relabel")
        ]
        image, tile = "x".join(map(str, r["shape"])), r["tile"] or "whole"
        lines.append(
            f"| {image} | {tile} | {'yes' if r['arena_shrink'] else 'no'} | "
            + " | ".join(cells)
            + f" | {r['peak_mib']:.0f} | {r['base_mib']:.0f} |"
        )
    return lines


def flat_table(doc: dict) -> list[str]:
    lines = [
        "Peak RSS (`VmHWM`) of `embedseg-run predict` in a fresh process per image (read, normalise,",
        "predict, cluster, write); ONNX Runtime CPU, 2 threads, upstream fixture ERFNets. `before` is the",
        "code before the memory budget (no budget option; its fixed 4 GiB estimate decides the mode).",
        "",
        "| code | image | Mpx | budget | mode | peak RSS MiB | wall s | objects |",
        "| --- | --- | ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for r in doc["results"]:
        image = "x".join(map(str, r["shape"]))
        lines.append(
            f"| {r['side']} | {image} | {r['megapixels']:.1f} | {r['budget'] or '-'} | "
            f"{r['mode']} | {r['peak_rss_mib']:.0f} | {r['seconds']:.0f} | {r['objects']} |"
        )
    for ndim in (2, 3):
        peaks = [
            r["peak_rss_mib"] for r in doc["results"] if r["side"] == "after" and len(r["shape"]) == ndim
        ]
        if peaks:
            lines.append("")
            lines.append(
                f"{ndim}D with the budget: peak RSS {min(peaks):.0f}-{max(peaks):.0f} MiB, max/min "
                f"{max(peaks) / min(peaks):.2f} (target: within 20 %, i.e. <= 1.20)"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["stages", "flat"])
    parser.add_argument(
        "--sizes-2d", nargs="*", default=["2048x2048", "4096x4096", "8192x8192", "16384x16384"]
    )
    parser.add_argument(
        "--sizes-3d", nargs="*", default=["64x512x512", "128x512x512", "64x1024x1024", "256x1024x1024"]
    )
    parser.add_argument("--budget-2d", default="1.2G")
    parser.add_argument("--budget-3d", default="2G")
    parser.add_argument("--before", type=Path, default=None, help="checkout of the code to compare with")
    parser.add_argument("--before-max-mpx", type=float, default=70.0, help="largest image for --before")
    parser.add_argument("--name", default=None, help="result file name [memory_stages / memory_flat]")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        tmp = Path(tmp)
        models = export_models(tmp)
        if args.part == "stages":
            doc = stages(args, models, tmp)
            write(doc, args.name or "memory_stages", stages_table(doc))
        else:
            doc = flat(args, models, tmp)
            write(doc, args.name or "memory_flat", flat_table(doc))


if __name__ == "__main__":
    main()
