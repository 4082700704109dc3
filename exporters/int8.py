"""int8 ONNX models: static QDQ quantization calibrated on the user's images, checked on labels.

ONNX Runtime's static quantization (QDQ, per-channel int8 weights, uint8 activations, MinMax ranges)
over calibration tiles cut from the user's images and normalised as the contract says. The raw output is
never quantized: the graph's last node (the Concat of the offset/sigma head and the seed head) and the
offset/sigma head stay fp32. Quantizing that Concat puts offsets (a few hundredths of an embedding unit)
and seed logits (several units) under one activation scale: 11.5 px of offset per step on the upstream
2D fixture, and label AP against fp32 fell to 0.05-0.08 (benchmarks/results/int8.md). With it in fp32
AP was 0.994-1.0 at 2.2x the fp32 speed.

The quantized model is verified against the fp32 model on held-out tiles of the same images, on labels
(AP@0.5 >= :data:`MIN_LABEL_AP`) as well as raw-output limits; a model that fails is not written.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from embedseg_deploy.contract import Contract
from embedseg_deploy.io import InputError, read_tiff, to_channels_first
from embedseg_deploy.normalize import normalize

from .verify import Report, Tolerance, compare, ort_runner

DEFAULT_TILES = 16
VERIFY_TILES = 4
MIN_LABEL_AP = 0.99
# Per tile only a collapse is refused (one object of a 45-object tile moves AP@0.5 by 0.02); the limit
# that counts, MIN_LABEL_AP, applies to the matches pooled over all held-out tiles.
TOLERANCE = Tolerance(offset_px=4.0, sigma_rel=0.5, seed_abs=0.3, min_label_ap=0.9)
TILE = {2: (256, 256), 3: (32, 128, 128)}


class Int8Error(ValueError):
    """Calibration data or the quantized model is not usable; names the folder or file."""


def calibration_files(folder: str | Path) -> list[Path]:
    """The images of a training-layout folder (train/ and val/ ``images``), an ``images`` folder, or the
    TIFFs in ``folder`` itself."""
    folder = Path(folder)
    if not folder.is_dir():
        raise Int8Error(f"{folder}: calibration folder not found")
    for layout in (("train/images", "val/images"), ("images",), (".",)):
        found = [p for sub in layout for p in sorted((folder / sub).glob("*.tif*")) if p.is_file()]
        if found:
            return found
    raise Int8Error(
        f"{folder}: no .tif images to calibrate on (looked in train/images, images/ and the folder)"
    )


def calibration_tiles(
    contract: Contract, folder: str | Path, n: int = DEFAULT_TILES + VERIFY_TILES, seed: int = 0
) -> list[np.ndarray]:
    """``n`` tiles (1, C, *tile) cut at seeded random places from the folder's images, normalised as the
    contract says (whole image first, as at inference). Images smaller than a tile give themselves, cut
    to the tile multiple."""
    rng = np.random.default_rng(seed)
    images = []
    for path in calibration_files(folder):
        try:
            x = to_channels_first(read_tiff(path).data, contract.ndim, contract.in_channels, path=path)
            images.append(normalize(x, contract.normalization, channel_axis=0))
        except (InputError, ValueError) as exc:
            text = str(exc)
            raise Int8Error(text if str(path) in text else f"{path}: {text}") from None
    m = contract.tile_multiple
    tiles = []
    for k in range(n):
        x = images[k % len(images)]
        size = [min(t, s // m * m) for t, s in zip(TILE[contract.ndim], x.shape[1:], strict=True)]
        if min(size) < m:
            raise Int8Error(f"{folder}: an image of shape {x.shape[1:]} is smaller than {m} px along an axis")
        start = [int(rng.integers(0, s - t + 1)) for s, t in zip(x.shape[1:], size, strict=True)]
        box = tuple(slice(a, a + t) for a, t in zip(start, size, strict=True))
        tiles.append(np.ascontiguousarray(x[(slice(None), *box)][None], dtype=np.float32))
    return tiles


def fp32_nodes(model: onnx.ModelProto) -> list[str]:
    """The nodes kept in fp32: the one that makes the graph output and the offset/sigma head before it."""
    producer = {out: node for node in model.graph.node for out in node.output}
    last = producer.get(model.graph.output[0].name)
    if last is None:
        return []
    keep = [last.name]
    if last.op_type == "Concat" and last.input and last.input[0] in producer:
        keep.insert(0, producer[last.input[0]].name)
    return keep


def quantize(fp32: bytes, tiles: list[np.ndarray], keep: list[str]) -> bytes:
    """The QDQ int8 model of the fp32 model ``fp32`` calibrated on ``tiles``; ``keep`` stays fp32."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = onnx.load_from_string(fp32).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.tiles = iter(tiles)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.tiles, None)
            return None if x is None else {name: x}

    with tempfile.TemporaryDirectory() as folder:
        src, pre, out = (Path(folder) / f for f in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(fp32)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)  # spatial sizes are dynamic
        quantize_static(
            str(pre),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=keep,
        )
        return out.read_bytes()


def verify_int8(int8: bytes, fp32: bytes, contract: Contract, tiles: list[np.ndarray]) -> Report:
    """int8 against fp32 (both ONNX Runtime CPU) on held-out tiles: raw limits and labels per tile, and
    label AP@0.5 pooled over the tiles (TP / (TP + FP + FN) of all their objects) >= MIN_LABEL_AP."""
    from embedseg_deploy.metrics import matching

    from .verify import Case, clusterer, labels_of

    test, reference = ort_runner(int8), ort_runner(fp32)
    inputs = {f"held-out-{k}": t for k, t in enumerate(tiles)}
    report = compare(test, reference, contract, inputs, TOLERANCE, ("onnx-int8", "onnx-fp32"), tuple(inputs))
    cluster = clusterer()
    tp = fp = fn = 0
    for x in tiles:
        m = matching(labels_of(reference(x)[0], contract, cluster), labels_of(test(x)[0], contract, cluster))
        tp, fp, fn = tp + m.tp, fp + m.fp, fn + m.fn
    pooled = tp / max(tp + fp + fn, 1)
    case = Case("pooled", [len(tiles)], report.max_errors())
    case.labels = {"n_ref": tp + fn, "n_test": tp + fp, "identical": fp == fn == 0, "ap50": pooled}
    if pooled < MIN_LABEL_AP:
        case.problems.append(
            f"label AP@0.5 over the held-out tiles {pooled:.4f} below {MIN_LABEL_AP} ({fp} objects more, "
            f"{fn} fewer than fp32): calibrate on more images (--calibration-tiles), or export fp16"
        )
    report.cases.append(case)
    return report


def int8_facts(folder: str | Path, n_calibration: int, seed: int, keep: list[str]) -> dict[str, Any]:
    return {
        "calibration": {"folder": str(folder), "tiles": n_calibration, "seed": seed, "method": "MinMax"},
        "activations": "uint8 per tensor",
        "weights": "int8 per channel",
        "fp32_nodes": keep,
        "reason_fp32": "the raw output is never quantized (offsets and seed logits share the output tensor)",
    }
