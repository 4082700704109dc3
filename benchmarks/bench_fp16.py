"""fp16 ONNX error report: which parts of BranchedERFNet must stay fp32 (decides exporters.fp16 defaults).

For each upstream fixture (2D, 3D: trained upstream EmbedSeg checkpoints) the fp32 ONNX export is converted
to fp16 with several fp32 "keep" sets and run on ONNX Runtime CPU without graph optimisation (every Cast
kept, so activations are rounded to fp16 between nodes as on a GPU; ORT's optimiser would otherwise fold
the casts away and run fp32). Inputs: the fixture's network input and its flips (4 per fixture, the label
agreement is pooled over them) plus two random tiles. Reported per keep set: fp32 node count, max offset
error in pixels, max relative sigma error, max seed error, and the agreement of the clustered labels with
the fp32 labels (AP@0.5 = TP / (TP + FP + FN), embedseg_deploy.metrics).

    python benchmarks/bench_fp16.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from embedseg_deploy.metrics import matching
from embedseg_exporters.fp16 import KEEP_CHOICES, convert_to_fp16, precision_of_nodes
from embedseg_exporters.onnx_export import export_onnx
from embedseg_exporters.verify import GROUPS, clusterer, labels_of, ort_runner, output_errors, random_tiles
from embedseg_training.checkpoint import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FIXTURES

KEEP_SETS = [(), ("heads",), ("bn",), ("heads", "bn"), ("first",), ("heads", "bn", "first")]


def flips(x: np.ndarray) -> dict[str, np.ndarray]:
    """The fixture tile and its flips along the last one/two axes (same statistics, new objects layout)."""
    return {
        "fixture": x,
        "flip-x": np.ascontiguousarray(x[..., ::-1]),
        "flip-y": np.ascontiguousarray(x[..., ::-1, :]),
        "flip-xy": np.ascontiguousarray(x[..., ::-1, ::-1]),
    }


def label_agreement(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Pooled AP@0.5, smallest per-image AP@0.5, mean IoU of the matched objects, reference object count."""
    tp = fp = fn = n = 0
    worst, iou_sum = 1.0, 0.0
    for ref, test in pairs:
        m = matching(ref, test, thresh=0.5)
        tp, fp, fn, n = tp + m.tp, fp + m.fp, fn + m.fn, n + m.n_true
        iou_sum += m.mean_matched_score * m.tp
        worst = min(worst, m.accuracy if (m.n_true or m.n_pred) else 1.0)
    return {
        "label_ap50_pooled": tp / (tp + fp + fn) if tp + fp + fn else 1.0,
        "label_ap50_min": worst,
        "matched_iou_mean": iou_sum / tp if tp else 1.0,
        "reference_objects": n,
    }


def run_case(ndim: int) -> dict:
    folder = FIXTURES / f"{ndim}d"
    model, contract = load_model(folder / "checkpoint.pth")
    fp32 = export_onnx(model, contract, verify=False).model
    x = np.load(folder / "network_input.npy")[None]
    inputs = {**flips(x), **random_tiles(contract)}
    ref_run = ort_runner(fp32.SerializeToString())
    ref = {k: ref_run(v) for k, v in inputs.items()}
    cluster = clusterer()
    if cluster is None:
        raise SystemExit("embedseg_deploy.cluster is needed for the label agreement")
    ref_labels = {k: labels_of(ref[k][0], contract, cluster) for k in flips(x)}
    rows = []
    for keep in KEEP_SETS:
        model16 = convert_to_fp16(fp32, keep)
        kinds = list(precision_of_nodes(model16).values())
        run = ort_runner(model16.SerializeToString(), optimize=False)
        start = time.perf_counter()
        out = {k: run(v) for k, v in inputs.items()}
        seconds = time.perf_counter() - start
        errors = {k: output_errors(out[k], ref[k], contract.spacing) for k in inputs}
        worst = {g: max(e[g] for e in errors.values()) for g in GROUPS}
        pairs = [(ref_labels[k], labels_of(out[k][0], contract, cluster)) for k in ref_labels]
        agreement = label_agreement(pairs)
        rows.append(
            {
                "keep_fp32": list(keep),
                "fp32_nodes": kinds.count("fp32"),
                "nodes": len(kinds),
                **worst,
                "fixture_errors": errors["fixture"],
                **agreement,
                "labels_identical": sum(bool(np.array_equal(a, b)) for a, b in pairs),
                "label_images": len(pairs),
                "ort_cpu_seconds": round(seconds, 2),
            }
        )
        print(
            ndim,
            rows[-1]["keep_fp32"],
            {g: f"{worst[g]:.3g}" for g in GROUPS},
            f"AP {agreement['label_ap50_pooled']:.4f}",
            flush=True,
        )
    return {
        "ndim": ndim,
        "fixture": str(folder.relative_to(FIXTURES.parent.parent.parent)),
        "spacing": contract.spacing,
        "inputs": {k: list(v.shape) for k, v in inputs.items()},
        "rows": rows,
    }


def markdown(doc: dict) -> str:
    lines = [
        "# fp16 ONNX error report",
        "",
        f"Date {doc['date']}; machine: {doc['machine']}; versions: "
        + ", ".join(f"{k} {v}" for k, v in doc["versions"].items())
        + ".",
        "",
        "fp16 BranchedERFNet (fp32 I/O) vs the fp32 ONNX model on the upstream fixtures, ONNX Runtime",
        "CPU with graph optimisation off (every fp16 Cast kept). Errors are maxima over the fixture tile,",
        "its three flips and two random tiles: offsets in pixels `|tanh a - tanh b| / spacing`, sigma",
        "relative `|exp(10a) - exp(10b)| / exp(10b)`, seed `|sigmoid a - sigmoid b|`. Labels: the runtime's",
        "clustering of fp16 vs fp32 output on the fixture and its flips, AP@0.5 pooled over the 4 images",
        "(goal >= 0.995)",
        "and the mean IoU of the matched objects (1 = identical objects).",
        "",
        "| case | keep fp32 | fp32 nodes | offset px | sigma rel | seed abs | label AP@0.5 (min) "
        "| matched IoU | identical |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in doc["cases"]:
        for r in case["rows"]:
            lines.append(
                f"| {case['ndim']}D | {', '.join(r['keep_fp32']) or 'none'} | {r['fp32_nodes']}/{r['nodes']} "
                f"| {r['offset_px']:.3g} | {r['sigma_rel']:.3g} | {r['seed_abs']:.3g} "
                f"| {r['label_ap50_pooled']:.4f} ({r['label_ap50_min']:.4f}) | {r['matched_iou_mean']:.4f} "
                f"| {r['labels_identical']}/{r['label_images']} |"
            )
    lines += ["", "## Decision", "", doc["decision"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cases = [run_case(2), run_case(3)]
    doc = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()} Linux, 2 shared CPU cores (torch/ORT 2 threads), no GPU",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__,
        },
        "keep_choices": list(KEEP_CHOICES),
        "cases": cases,
        "decision": DECISION,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fp16_error.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / "fp16_error.md").write_text(markdown(doc))
    print(f"wrote {args.out / 'fp16_error.json'} and fp16_error.md")


DECISION = (
    "Default `--keep-fp32 heads,bn` (9 nodes: the two output convs and the 7 BatchNormalization nodes that\n"
    "export leaves unfolded). Every keep set already meets the label goal (AP@0.5 = 1.0 vs fp32 on all 4\n"
    "images per fixture; the labels differ only in boundary pixels, matched IoU >= 0.998), so the choice\n"
    "rests on the raw errors: heads+bn halves the 3D sigma error of no-keep (about 2.0 % -> 1.1 %) and\n"
    "lowers the 2D offset error by about a fifth, for 9 extra casts; `first` (the input convs) adds\n"
    "little (2D offsets 0.015 -> 0.013 px, 3D nothing) and is left out.\n"
    "Offsets stay below 0.02 px in every setting, far below the 1-pixel scale that clustering resolves.\n"
    "Caveat: ONNX Runtime CPU computes fp16 nodes in fp32 between casts (fp32 accumulation); GPU kernels\n"
    "(TensorRT, CUDA EP) may accumulate in fp16, so `embedseg-export trt` re-verifies every fp16 engine\n"
    "against ONNX Runtime fp32 on the GPU it was built for."
)

if __name__ == "__main__":
    main()
