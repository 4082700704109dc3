"""Upstream parity where the image is not a multiple of 8: upstream EmbedSeg 0.2.5's own labels against ours.

Upstream pads the image (reflect; centred in 2D, at the end in 3D), runs the network, clusters the whole
padded output and crops the labels. This runs upstream itself (its ``predict`` / ``predict_3d`` with the
fixture checkpoints, in its own virtual environment: ``python benchmarks/bench_cluster.py
--setup-upstream``) on crops of the fixture images whose sizes are not multiples of 8, and compares its
labels with this runtime's (the checkpoints exported to ONNX, ORT CPU, whole image) and, with ``--before
PATH``, with an earlier checkout's. Agreement: identical, equal pixels after renaming, AP@0.5.

    python benchmarks/bench_upstream_padding.py [--before /tmp/old] [--venv upstream-venv]

Results: benchmarks/results/upstream_padding.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from _common import FIXTURES, RESULTS, UPSTREAM_VENV, pin_threads

pin_threads()

import numpy as np  # noqa: E402
import tifffile  # noqa: E402

# (case, crop) pairs: the 250 x 229 and 229 x 250 images, and crops where seeds in the padding
# matter; every size has at least one axis that is not a multiple of 8.
CROPS = {
    2: [
        (slice(0, 229), slice(0, 250)),
        (slice(0, 237), slice(0, 229)),
        (slice(7, 233), slice(11, 220)),
        (slice(2, 184), slice(1, 173)),
        (slice(53, 225), slice(27, 248)),
        (slice(0, 237), slice(0, 250)),
    ],
    3: [
        (slice(6, 29), slice(6, 79), slice(1, 88)),
        (slice(0, 25), slice(11, 81), slice(7, 80)),
        (slice(6, 30), slice(16, 81), slice(7, 89)),
        (slice(0, 30), slice(0, 92), slice(0, 90)),
    ],
}

UPSTREAM = textwrap.dedent(
    """
    import json, sys
    import numpy as np, tifffile, torch
    from EmbedSeg.models import get_model
    from EmbedSeg.test import predict, predict_3d
    from EmbedSeg.utils.generate_crops import normalize_min_max_percentile
    from EmbedSeg.utils.utils import Cluster, Cluster_3d

    torch.set_num_threads(2)
    case, jobs = sys.argv[1], json.loads(sys.argv[2])
    cfg = json.load(open(f"{case}/test_config.json"))
    model = get_model(cfg["model_name"], {"num_classes": cfg["num_classes"], "input_channels": 1})
    state = torch.load(f"{case}/checkpoint.pth", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model_state_dict"], strict=True)
    model.eval()
    args = (False, True, cfg["n_sigma"], cfg["fg_thresh"], cfg["seed_thresh"], 0, 0, cfg["min_object_size"])
    for job in jobs:
        image = tifffile.imread(job["image"])
        axis = tuple(range(image.ndim))
        im = torch.from_numpy(normalize_min_max_percentile(image, 1, 99.8, axis=axis).astype("float32"))
        im = im[None, None]
        with torch.no_grad():
            if image.ndim == 2:
                cluster = Cluster(cfg["n_y"], cfg["n_x"], cfg["l_y"], cfg["l_x"], "cpu")
                labels, _ = predict(im, model, *args, cluster, "cpu")
            else:
                grid = [cfg[k] for k in ("n_z", "n_y", "n_x", "l_z", "l_y", "l_x")]
                cluster = Cluster_3d(*grid, "cpu")
                labels, _ = predict_3d(im, model, *args, cluster, "cpu")
        tifffile.imwrite(job["out"], labels.cpu().numpy().astype(np.uint16))
    print("ok")
    """
)

OURS = textwrap.dedent(
    """
    import json, sys
    import tifffile
    from embedseg_deploy.predict import Predictor
    model, jobs = sys.argv[1], json.loads(sys.argv[2])
    p = Predictor(model, backend="onnx-cpu", threads=2, tile=0)
    for job in jobs:
        labels = p.predict(tifffile.imread(job["image"]))
        tifffile.imwrite(job["out"], labels.astype("uint16"))
    print("ok")
    """
)


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=UPSTREAM_VENV)
    parser.add_argument("--before", type=Path, default=None, help="checkout of the code to compare with")
    args = parser.parse_args()
    from embedseg_deploy.bench import agreement
    from embedseg_deploy.cluster import consecutive_labels
    from embedseg_deploy.io import atomic_write_json, atomic_write_text
    from embedseg_deploy.predict import versions
    from embedseg_exporters.onnx_export import export_checkpoint

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-padding-") as tmp:
        tmp = Path(tmp)
        for ndim, crops in CROPS.items():
            case = FIXTURES / f"{ndim}d"
            model = tmp / f"upstream-{ndim}d.onnx"
            export_checkpoint(case / "checkpoint.pth", model, force=True, verify=False)
            image = tifffile.imread(case / "image.tif")
            jobs: dict[str, list[dict[str, str]]] = {"upstream": [], "after": [], "before": []}
            for k, crop in enumerate(crops):
                path = tmp / f"{ndim}d-{k}.tif"
                tifffile.imwrite(path, np.ascontiguousarray(image[crop]))
                for side in jobs:
                    jobs[side].append({"image": str(path), "out": str(tmp / f"{ndim}d-{k}-{side}.tif")})
            run([str(args.venv / "bin" / "python"), "-c", UPSTREAM, str(case), json.dumps(jobs["upstream"])])
            run([sys.executable, "-c", OURS, str(model), json.dumps(jobs["after"])])
            if args.before:
                env = {**os.environ, "PYTHONPATH": str(args.before)}
                run([sys.executable, "-c", OURS, str(model), json.dumps(jobs["before"])], env)
            for k, crop in enumerate(crops):
                # upstream's ids may have gaps (overwritten or cropped-away objects); ours are 1..n in the
                # same order, so upstream's are renumbered alike before "identical" is asked
                up = consecutive_labels(tifffile.imread(jobs["upstream"][k]["out"]).astype(np.int32))[0]
                row = {
                    "ndim": ndim,
                    "crop": [[s.start, s.stop] for s in crop],
                    "shape": list(up.shape),
                    "upstream_objects": len(np.unique(up)) - 1,
                }
                for side in ("after", "before") if args.before else ("after",):
                    row[side] = agreement(up, tifffile.imread(jobs[side][k]["out"]))
                rows.append(row)
                print(json.dumps(row), flush=True)
    doc = {
        "benchmark": "upstream parity on sizes that are not multiples of 8",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": versions("onnxruntime"),
        "upstream": "EmbedSeg 0.2.5 predict/predict_3d, torch CPU, fixture checkpoints, fixture test_config",
        "results": rows,
    }
    atomic_write_json(RESULTS / "upstream_padding.json", doc)
    lines = [
        f"# Upstream parity on sizes that are not multiples of 8 ({doc['date']})",
        "",
        f"Machine and versions: {doc['versions']}.",
        "Upstream EmbedSeg 0.2.5's own `predict`/`predict_3d` labels vs ours (fixture checkpoints exported",
        "to ONNX, ORT CPU, whole image). `equal px` counts pixels equal after renaming each label to the",
        "upstream label it overlaps most; `before` is the code that clustered the cropped output.",
        "",
        "| image | crop | upstream objects | after: identical / equal px / AP@0.5 "
        "| before: identical / equal px / AP@0.5 |",
        "| --- | --- | ---: | --- | --- |",
    ]

    def cell(a: dict | None) -> str:
        if a is None:
            return "-"
        return f"{'yes' if a['identical'] else 'no'} / {a['equal_pixels_renamed']:.4f} / {a['ap50']:.3f}"

    for r in rows:
        crop = ", ".join(f"{a}:{b}" for a, b in r["crop"])
        shape = "x".join(map(str, r["shape"]))
        cells = f"{cell(r['after'])} | {cell(r.get('before'))}"
        lines.append(f"| {r['ndim']}D {shape} | {crop} | {r['upstream_objects']} | {cells} |")
    atomic_write_text(RESULTS / "upstream_padding.md", "\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'upstream_padding'}.json and .md")


if __name__ == "__main__":
    main()
