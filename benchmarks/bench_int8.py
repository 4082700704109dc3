"""int8 diagnosis (issue 10, first step): where static QDQ quantization of an EmbedSeg ERFNet loses accuracy.

ONNX Runtime's static quantization (QDQ, per-channel int8 weights) of the upstream 2D fixture model,
calibrated on synthetic nuclei images normalised by the model's contract. Each variant changes one thing
(activation type, calibration method, what stays in fp32). Measured per variant, side by side with fp32
in one run: the raw-output errors in the clustering's units (offsets in px, sigma relative, seed absolute,
as the exporter's verification measures them), label AP@0.5 against the fp32 labels on held-out images,
and the time of a 1024 x 1024 tile on ORT CPU (2 threads).

    python benchmarks/bench_int8.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import RESULTS, exported_model, finish, header, log, machine_line, pin_threads

pin_threads()

import numpy as np  # noqa: E402

CALIBRATION_SEEDS = range(100, 108)
EVAL_SEEDS = range(200, 204)


def images(seeds, shape=(256, 256)) -> list[np.ndarray]:
    from embedseg_deploy.synthetic import make_image

    return [make_image(shape, 40 * shape[0] * shape[1] // 256**2, np.random.default_rng(s))[0] for s in seeds]


def prepared(contract, imgs) -> list[np.ndarray]:
    from embedseg_deploy.normalize import normalize

    return [normalize(i, contract.normalization)[None, None].astype(np.float32) for i in imgs]


def quantize(model: Path, out: Path, tiles, input_name: str, **options) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(tiles)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {input_name: x}

    pre = out.with_suffix(".pre.onnx")
    if not pre.exists():
        quant_pre_process(str(model), str(pre), skip_symbolic_shape=True)  # dynamic H, W
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True, **options)
    return out


def labels_of(raw: np.ndarray, contract) -> np.ndarray:
    from embedseg_deploy.cluster import cluster_from_contract

    return cluster_from_contract(raw[0], contract)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from onnxruntime.quantization import CalibrationMethod, QuantType

    from embedseg_deploy.backends import create_backend
    from embedseg_deploy.engine_cache import onnx_contract, read_onnx_header
    from embedseg_deploy.metrics import matching
    from embedseg_exporters.verify import output_errors

    model = exported_model(2)
    contract = onnx_contract(model)
    input_name = read_onnx_header(model)["inputs"][0]
    calib = prepared(contract, images(CALIBRATION_SEEDS))
    evals = prepared(contract, images(EVAL_SEEDS, (512, 512)))
    big = prepared(contract, images([300], (1024, 1024)))[0]
    fp32 = create_backend(model, "onnx-cpu", threads=2)
    ref_raw = [fp32.run(x) for x in evals]
    ref_labels = [labels_of(r, contract) for r in ref_raw]
    heads = ["/decoders.0/output_conv/ConvTranspose", "/decoders.1/output_conv/ConvTranspose"]
    variants = {
        "naive: uint8 activations, MinMax": dict(activation_type=QuantType.QUInt8),
        "int8 symmetric activations, MinMax": dict(
            activation_type=QuantType.QInt8, extra_options={"ActivationSymmetric": True}
        ),
        "uint8, percentile 99.999": dict(
            activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.Percentile
        ),
        "uint8, entropy": dict(activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.Entropy),
        "uint8, output Concat fp32 (raw output not quantized)": dict(
            activation_type=QuantType.QUInt8, nodes_to_exclude=["/Concat"]
        ),
        "uint8, both output heads and Concat fp32": dict(
            activation_type=QuantType.QUInt8, nodes_to_exclude=[*heads, "/Concat"]
        ),
        "uint8, offset/sigma head and Concat fp32": dict(
            activation_type=QuantType.QUInt8, nodes_to_exclude=[heads[0], "/Concat"]
        ),
        "uint8, seed head and Concat fp32": dict(
            activation_type=QuantType.QUInt8, nodes_to_exclude=[heads[1], "/Concat"]
        ),
    }
    if args.quick:
        variants = dict(list(variants.items())[:2])
    doc = header("int8", 2, model=str(model), calibration_images=len(calib), eval_images=len(evals))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for i, (name, options) in enumerate(variants.items()):
            log(f"{name} ...")
            t0 = time.perf_counter()
            path = quantize(model, Path(folder) / f"v{i}.onnx", calib, input_name, **options)
            seconds = time.perf_counter() - t0
            q = create_backend(path, "onnx-cpu", threads=2)
            raws = [q.run(x) for x in evals]
            errors = [output_errors(r, ref, contract.spacing) for r, ref in zip(raws, ref_raw, strict=True)]
            aps, counts = [], []
            for r, ref_l in zip(raws, ref_labels, strict=True):
                lab = labels_of(r, contract)
                aps.append(float(matching(ref_l, lab, 0.5).accuracy))
                counts.append((int(len(np.unique(ref_l)) - 1), int(len(np.unique(lab)) - 1)))
            times = {"fp32": [], "int8": []}
            for _ in range(2 if args.quick else 3):  # interleaved, side by side
                for key, b in (("fp32", fp32), ("int8", q)):
                    t = time.perf_counter()
                    b.run(big)
                    times[key].append(time.perf_counter() - t)
            rows.append(
                {
                    "variant": name,
                    "quantize_seconds": round(seconds, 1),
                    "max_errors": {k: max(e[k] for e in errors) for k in errors[0]},
                    "ap50_vs_fp32": aps,
                    "objects_fp32_int8": counts,
                    "fp32_s": float(np.median(times["fp32"])),
                    "int8_s": float(np.median(times["int8"])),
                    "speedup": float(np.median(times["fp32"]) / np.median(times["int8"])),
                }
            )
            log(f"  AP {np.round(aps, 3)}, {rows[-1]['speedup']:.2f}x, errors {rows[-1]['max_errors']}")
    doc["variants"] = rows
    finish(doc, markdown, "int8", args.out)


def markdown(doc) -> str:
    lines = [
        "# int8 static quantization of the upstream 2D fixture ERFNet (ORT CPU, QDQ, per-channel weights)",
        "",
        machine_line(doc),
        "",
        f"Calibration: {doc['parameters']['calibration_images']} synthetic 256^2 images; evaluation: "
        f"{doc['parameters']['eval_images']} held-out synthetic 512^2 images (labels vs fp32's labels); "
        "time: one 1024^2 tile, fp32 and int8 interleaved, median.",
        "",
        "The collapse comes from quantizing the graph output: the final Concat joins the offset/sigma head"
        " and the seed logits into one tensor with one activation scale. Measured on a 512^2 eval image:"
        " offsets -0.033..0.042 (pre-tanh), sigma logits 0.59..0.87, seed logits -5.4..6.1, spacing 1/255"
        " per px; a uint8 step over that range is 0.045 units, 11.5 px of offset. Keeping that Concat in"
        " fp32 (the raw output is never quantized) restores the labels and keeps the speed; keeping the"
        " offset/sigma head in fp32 too brings AP vs fp32 to >= 0.994. Entropy calibration gave MinMax's"
        " numbers exactly (not checked that it took effect). The model is the lightly trained"
        " upstream fixture and the images are synthetic: the issue's accuracy targets are still to be"
        " measured on separately trained models and real data.",
        "",
        "| variant | offsets px | sigma rel | seed abs | AP@0.5 vs fp32 (per image) | objects fp32/int8 | "
        "fp32 s | int8 s | speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in doc["variants"]:
        e = r["max_errors"]
        lines.append(
            f"| {r['variant']} | {e['offset_px']:.2f} | {e['sigma_rel']:.2f} | {e['seed_abs']:.3f} | "
            f"{', '.join(f'{a:.3f}' for a in r['ap50_vs_fp32'])} | "
            f"{', '.join(f'{a}/{b}' for a, b in r['objects_fp32_int8'])} | {r['fp32_s']:.2f} | "
            f"{r['int8_s']:.2f} | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
