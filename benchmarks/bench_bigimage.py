"""Peak memory of big-image (block-wise) prediction as the 3D volume grows, on ONNX Runtime CPU.

Each measurement runs in a fresh subprocess that segments one uncompressed TIFF volume and reports its own
peak resident set size (``VmHWM`` in ``/proc/self/status``) and wall time; the parent makes the
volumes (a synthetic 3D image tiled to each size) and writes JSON + markdown to ``benchmarks/results/``.

    python benchmarks/bench_bigimage.py [--model M.onnx] [--sizes 16x512x512 ... 64x1024x1024]
                                        [--block default] [--whole] [--threads 2]

Without ``--model`` the upstream 3D fixture checkpoint is exported (needs torch and the exporter tier).
``--whole`` also measures whole-image mode (the volume in memory at once) for comparison, up to
``--whole-max-mvoxels``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import FIXTURES  # noqa: E402

FIXTURE = FIXTURES / "3d"

CHILD = textwrap.dedent(
    """
    import json, sys, time
    model, src, out, mode, threads, block = sys.argv[1:7]
    t0 = time.perf_counter()
    from embedseg_deploy.predict import Predictor
    p = Predictor(model, backend="onnx-cpu", threads=int(threads))
    if mode == "blocks":
        from embedseg_deploy.bigimage import predict_big
        r = predict_big(p, src, out, block=None if block == "default" else [int(b) for b in block.split("x")])
        n, timings = r.n_objects, r.timings
    else:
        from embedseg_deploy.io import read_tiff, write_tiff_atomic
        res = p.run(read_tiff(src).data)
        write_tiff_atomic(out, res.labels.astype("uint16"), overwrite=True)
        n, timings = res.n_objects, res.timings
    # VmHWM, not ru_maxrss: Linux carries the parent's resident set into a child's ru_maxrss at exec
    peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(json.dumps({"objects": n, "seconds": time.perf_counter() - t0, "peak_rss_mib": peak_kib / 1024,
                      "timings": {k: round(v, 3) for k, v in timings.items()}}))
    """
)


def make_volume(shape: tuple[int, ...], path: Path) -> None:
    """A synthetic 3D image (32 x 256 x 256, ~250 objects) tiled to ``shape``, written uncompressed."""
    from embedseg_deploy.io import write_tiff_atomic
    from embedseg_deploy.synthetic import make_image

    base, _ = make_image((32, 256, 256), 250, np.random.default_rng(0), radius=(5.0, 9.0), anisotropy=2.0)
    reps = [-(-s // b) for s, b in zip(shape, base.shape, strict=True)]
    volume = np.tile(base, reps)[tuple(slice(0, s) for s in shape)]
    write_tiff_atomic(path, np.ascontiguousarray(volume), pixel_size=(2.0, 1.0, 1.0), overwrite=True)


def export_fixture_model(folder: Path) -> Path:
    from embedseg_exporters.onnx_export import export_checkpoint

    path = folder / "upstream-3d.onnx"
    export_checkpoint(FIXTURE / "checkpoint.pth", path, force=True, verify=False)
    return path


def measure(model: Path, src: Path, mode: str, threads: int, block: str) -> dict:
    out = src.with_name(src.stem + f"-{mode}-labels.tif")
    cmd = [sys.executable, "-c", CHILD, str(model), str(src), str(out), mode, str(threads), block]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} on {src.name} failed:\n{proc.stderr[-3000:]}")
    out.unlink(missing_ok=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=["16x512x512", "32x512x512", "64x512x512", "128x512x512", "64x1024x1024"],
    )
    parser.add_argument(
        "--block", default="default", help="block core size z x y x x [the runtime's default]"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--whole", action="store_true", help="also measure whole-image mode")
    parser.add_argument("--whole-max-mvoxels", type=float, default=20.0, help="largest volume for --whole")
    parser.add_argument("--out", type=Path, default=RESULTS / "bigimage")
    args = parser.parse_args()

    import onnxruntime

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-bigimage-") as tmp:
        tmp = Path(tmp)
        model = args.model or export_fixture_model(tmp)
        for size in args.sizes:
            shape = tuple(int(s) for s in size.split("x"))
            src = tmp / f"volume-{size}.tif"
            make_volume(shape, src)
            whole = args.whole and np.prod(shape) / 1e6 <= args.whole_max_mvoxels
            for mode in ["blocks"] + (["whole"] if whole else []):
                r = measure(model, src, mode, args.threads, args.block)
                row = {"shape": list(shape), "megavoxels": round(np.prod(shape) / 1e6, 2), "mode": mode, **r}
                rows.append(row)
                print(
                    f"{size:>14} {mode:>6}: peak RSS {r['peak_rss_mib']:7.0f} MiB, {r['seconds']:6.1f} s, "
                    f"{r['objects']} objects",
                    flush=True,
                )
            src.unlink()
    doc = {
        "benchmark": "bigimage",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} ({os.cpu_count()} cpus), {platform.system()}",
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "parameters": {
            "model": str(args.model or "upstream 3D fixture checkpoint, exported"),
            "backend": "onnx-cpu",
            "threads": args.threads,
            "block": args.block,
        },
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [
        f"# Big-image prediction: peak memory ({doc['date']})",
        "",
        f"Machine: {doc['machine']}; onnxruntime {onnxruntime.__version__}, {args.threads} threads, "
        f"block core {args.block} (z x y x x), model: {doc['parameters']['model']}.",
        "Peak RSS = `VmHWM` of a fresh process that reads, predicts, clusters and writes one volume.",
        "",
        "| volume (z x y x x) | Mvoxels | mode | peak RSS (MiB) | wall (s) | objects |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        shape = " x ".join(map(str, r["shape"]))
        lines.append(
            f"| {shape} | {r['megavoxels']} | {r['mode']} | {r['peak_rss_mib']:.0f} | "
            f"{r['seconds']:.1f} | {r['objects']} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
