"""int8 ONNX models: static QDQ quantization calibrated on the user's images, mixed precision chosen by
measurement, checked on labels.

ONNX Runtime's static quantization (QDQ, per-channel int8 weights, uint8 activations, MinMax ranges)
over calibration tiles cut from the user's images and normalised as the contract says. The raw output is
never quantized: the graph's last node (the Concat of the offset/sigma head and the seed head) stays
fp32. Quantizing it puts offsets (a few hundredths of an embedding unit) and seed logits (several units)
under one activation scale: 11.5 px of offset per step on the upstream 2D fixture, and label AP against
fp32 fell to 0.05-0.08 (benchmarks/results/int8.md).

Which other blocks stay fp32 is measured, not fixed (:func:`search`): each block of the network
(an ERFNet downsampler, non-bottleneck block, upsampler or output convolution) is quantized alone and its
output error on calibration tiles ranks it; the most sensitive blocks are then kept in fp32, as few as
pass the label check on those tiles, and the most expensive of them are tried back in int8. What decides
how many: the embedding spacing. At the default 1/1023 a pixel is 0.001 units, finer than per-tensor
uint8 rounding in the offset decoder keeps; models trained at 1/255 kept 2 cheap blocks fp32 in 2D and
none in 3D (benchmarks/results/precision.md).

The result is verified against the fp32 model on other images (the user's validation images where there
are any), on labels (pooled AP@0.5 >= :data:`MIN_LABEL_AP`) as well as raw-output limits; a model that
fails is not written, and the error names the sensitive blocks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from embedseg_deploy.contract import Contract, axis_of_dim

from .verify import (
    FEW_OBJECTS,
    Report,
    Runner,
    Tolerance,
    cached,
    compare,
    image_files,
    image_tiles,
    ort_runner,
    pool_labels,
)

DEFAULT_TILES = 16
SEARCH_TILES = 4  # of the calibration tiles: the sensitivity of each block
VERIFY_TILES = 4  # held-out tiles when there are no separate verification images
MIN_LABEL_AP = 0.99
SEARCH_MIN_AP = 0.995  # the search's target on calibration tiles: a margin for the held-out verdict
# Raw limits are means: over the foreground for offsets and sigma, everywhere for the seediness. int8
# rounds every activation, so a maximum over ~65k pixels judges the one worst boundary pixel (10-60 px on
# trained 2D models whose labels agree at AP@0.5 0.99). The means separate what hurts labels from what
# does not (benchmarks/results/precision.md): offset/sigma decoder in int8 mean 2.8-5.6 px, AP@0.5
# 0.0-0.85; in fp32 0.24 px, AP@0.5 1.0. Per tile only a collapse is refused (one object of a 45-object
# tile moves AP@0.5 by 0.02); the limit that counts, MIN_LABEL_AP, applies to the pooled matches.
TOLERANCE = Tolerance(offset_px=1.0, sigma_rel=0.1, seed_abs=0.05, min_label_ap=0.9, statistic="mean")
TILE = {2: (256, 256), 3: (32, 128, 128)}
# Activation schemes: ONNX Runtime's fast x86 kernels take uint8 activations with zero points (symmetric
# int8 ran 1.12x fp32 where uint8 ran 2.2x, benchmarks/results/int8.md); TensorRT takes symmetric int8
# only (zero point 0). Weights are symmetric int8 per channel for both.
TARGETS = {"cpu": "uint8 per tensor, with zero points", "tensorrt": "int8 per tensor, symmetric"}
CALIBRATION_LAYOUTS = (("train/images",), ("images",), (".",))
QUANTIZED_OPS = ("Conv", "ConvTranspose", "Add", "Concat", "MaxPool")


class Int8Error(ValueError):
    """Calibration data or the quantized model is not usable; names the folder or file."""


def calibration_files(folder: str | Path) -> list[Path]:
    """The images of a training-layout folder (``train/images``), an ``images`` folder, or the TIFFs in
    ``folder`` itself; ``val/`` is left for verification."""
    try:
        return image_files(folder, CALIBRATION_LAYOUTS, "calibrate on")
    except ValueError as exc:
        raise Int8Error(str(exc)) from None


def calibration_tiles(
    contract: Contract, folder: str | Path, n: int = DEFAULT_TILES, seed: int = 0
) -> list[np.ndarray]:
    """``n`` tiles (1, C, *tile) cut at seeded random places from the folder's images, normalised as the
    contract says (whole image first, as at inference)."""
    try:
        return image_tiles(contract, calibration_files(folder), n, TILE[contract.ndim], seed)
    except ValueError as exc:
        raise Int8Error(str(exc)) from None


# ----------------------------------------------------------------------------------------------------------
# Quantization


def output_node(model: onnx.ModelProto) -> str | None:
    """The node that makes the graph output: always fp32."""
    producer = {out: node for node in model.graph.node for out in node.output}
    node = producer.get(model.graph.output[0].name)
    return node.name if node is not None else None


def blocks(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Quantizable nodes grouped by network block, in graph order, without the output node.

    A block is the first two parts of the node name torch gives (``/encoder/layers.3/conv3x1_1/Conv`` ->
    ``/encoder/layers.3``); a node without such a name is a block of its own.
    """
    last = output_node(model)
    out: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OPS and node.name != last:
            key = "/".join(node.name.split("/")[:3]) if node.name.startswith("/") else node.name
            out.setdefault(key, []).append(node.name)
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantizer warns on the root logger for every unfolded BatchNorm; hide that."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


class Quantizer:
    """Calibrates an fp32 model once, then makes QDQ int8 models with any nodes left in fp32."""

    def __init__(self, fp32: bytes, tiles: list[np.ndarray], folder: Path, target: str = "cpu") -> None:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        if target not in TARGETS:
            raise Int8Error(f"int8 target must be one of {', '.join(TARGETS)}, got {target!r}")
        self.folder, self.target = folder, target
        self.fp32_model = onnx.load_from_string(fp32)
        self.name = self.fp32_model.graph.input[0].name
        self.tiles = tiles
        self.source, self.ranges = folder / "pre.onnx", folder / "ranges.json"
        (folder / "fp32.onnx").write_bytes(fp32)
        with _quiet():
            quant_pre_process(str(folder / "fp32.onnx"), str(self.source), skip_symbolic_shape=True)

    def __call__(self, exclude: list[str] | None = None, only: list[str] | None = None) -> bytes:
        """The int8 model with ``exclude`` in fp32 (or with only ``only`` quantized)."""
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        name, tiles = self.name, self.tiles

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.tiles = iter(tiles)

            def get_next(self) -> dict[str, np.ndarray] | None:
                x = next(self.tiles, None)
                return None if x is None else {name: x}

        out = self.folder / "int8.onnx"
        with _quiet():
            quantize_static(
                str(self.source),
                str(out),
                None if self.ranges.is_file() else Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8 if self.target == "cpu" else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude,
                nodes_to_quantize=only,
                calibration_cache_path=self.ranges,
                extra_options={"ActivationSymmetric": self.target == "tensorrt"},
            )
        return out.read_bytes()


# ----------------------------------------------------------------------------------------------------------
# Mixed precision


def output_score(test: np.ndarray, ref: np.ndarray, contract: Contract) -> float:
    """Mean raw-output error where the clustering looks, each group in units of its verification limit:
    offsets (px) and sigma (relative) over the reference's foreground, seediness everywhere."""
    from .verify import _sigmoid

    ndim = contract.ndim
    a, b = test.astype(np.float64), ref.astype(np.float64)
    fg = _sigmoid(b[:, -1]) > contract.thresholds.fg_thresh
    if not fg.any():
        fg = np.ones_like(fg)
    offset = sum(
        np.abs(np.tanh(a[:, d]) - np.tanh(b[:, d]))[fg].mean() / contract.spacing[axis_of_dim(d, ndim)]
        for d in range(ndim)
    )
    sigma = np.abs(np.expm1(10.0 * (a[:, ndim : 2 * ndim] - b[:, ndim : 2 * ndim]))).max(axis=1)[fg].mean()
    seed = np.abs(_sigmoid(a[:, -1]) - _sigmoid(b[:, -1])).mean()
    t = TOLERANCE
    return float(offset / t.offset_px + sigma / t.sigma_rel + seed / t.seed_abs)


@dataclass
class Search:
    """What the mixed-precision search measured and chose (stored in the contract)."""

    fp32_nodes: list[str]
    fp32_blocks: list[str] = field(default_factory=list)
    sensitivity: list[tuple[str, float]] = field(default_factory=list)  # most sensitive first
    steps: list[dict[str, Any]] = field(default_factory=list)  # {"fp32_blocks": k, "ap50": .., "passed": ..}
    passed: bool = True
    fp32_flops_share: float = 0.0  # of the network's convolution FLOPs, in the blocks kept fp32

    def record(self, top: int = 8) -> dict[str, Any]:
        out = asdict(self)
        del out["fp32_nodes"]  # the contract lists them once, beside the search
        out["sensitivity"] = [[b, round(s, 4)] for b, s in self.sensitivity[:top]]
        return out

    def worst(self, n: int = 3) -> str:
        return ", ".join(f"{b} ({s:.3g})" for b, s in self.sensitivity[:n]) or "none measured"


def search(
    quantizer: Quantizer,
    fp32: Runner,
    contract: Contract,
    tiles: list[np.ndarray],
    mandatory: list[str],
    network: dict[str, list[str]],
    max_fraction: float = 0.5,
) -> tuple[bytes, Search]:
    """The int8 model with the fewest blocks of ``network`` kept fp32 (besides ``mandatory``) that passes
    the label check on the calibration ``tiles``; blocks are ranked by their output error when quantized
    alone (on the first :data:`SEARCH_TILES`) and added most sensitive first, doubling, then bisected;
    then each kept block but the first is tried back in int8, the most expensive (convolution FLOPs)
    first, and stays int8 when the check still passes (a ranking of blocks quantized alone misses how
    their errors add up).
    Gives up (``passed`` False) beyond ``max_fraction`` of the blocks."""
    reference = cached(fp32)
    inputs = {f"calibration-{k}": t for k, t in enumerate(tiles)}

    def attempt(kept: list[str]) -> tuple[bytes, Report]:
        model = quantizer(exclude=mandatory + [n for b in kept for n in network[b]])
        test = ort_runner(model)
        names = ("int8", "fp32")
        return model, judge(test, reference, contract, inputs, names, "calibration tiles", SEARCH_MIN_AP)

    model, report = attempt([])
    result = Search(list(mandatory))
    result.steps.append(_step(0, report))
    if report.passed:
        return model, result
    for block, nodes in network.items():
        test = ort_runner(quantizer(only=nodes))
        score = float(np.mean([output_score(test(x), reference(x), contract) for x in tiles[:SEARCH_TILES]]))
        result.sensitivity.append((block, score))
    result.sensitivity.sort(key=lambda item: -item[1])
    ranked = [b for b, _ in result.sensitivity]
    limit = max(1, int(len(ranked) * max_fraction))
    good: tuple[int, bytes] | None = None
    bad, k = 0, 1
    while k <= limit:  # doubling: 1, 2, 4, ...
        model, report = attempt(ranked[:k])
        result.steps.append(_step(k, report))
        if report.passed:
            good = (k, model)
            break
        bad, k = k, min(2 * k, limit) if k < limit else limit + 1
    if good is None:
        result.passed = False
        result.fp32_blocks = ranked[:limit]
        return model, result
    while good[0] - bad > 1:  # bisect between the last failure and the first success
        k = (bad + good[0]) // 2
        model, report = attempt(ranked[:k])
        result.steps.append(_step(k, report))
        if report.passed:
            good = (k, model)
        else:
            bad = k
    kept, model = ranked[: good[0]], good[1]
    cost = block_flops(quantizer.fp32_model, network, tiles[0].shape)
    for block in sorted(kept[1:], key=lambda b: -cost[b]):  # prune: the most expensive first
        trial = [b for b in kept if b != block]
        candidate, report = attempt(trial)
        result.steps.append(_step(len(trial), report, without=block))
        if report.passed:
            kept, model = trial, candidate
    result.fp32_blocks = kept
    result.fp32_nodes = mandatory + [n for b in kept for n in network[b]]
    result.fp32_flops_share = round(sum(cost[b] for b in kept) / max(sum(cost.values()), 1), 4)
    return model, result


def block_flops(
    model: onnx.ModelProto, network: dict[str, list[str]], shape: tuple[int, ...]
) -> dict[str, int]:
    """Convolution FLOPs of each block at the input ``shape``: what keeping it in fp32 costs."""
    from embedseg_deploy.bench import node_flops

    per_node = {name: n for (op, name), n in node_flops(model, shape).items() if op.startswith("Conv")}
    return {block: sum(per_node.get(n, 0) for n in nodes) for block, nodes in network.items()}


def _step(k: int, report: Report, without: str | None = None) -> dict[str, Any]:
    pooled = next(c for c in report.cases if c.name.startswith("pooled"))
    ap = round(pooled.labels["ap50"], 4)
    step = {"fp32_blocks": k, "ap50": ap, "objects": pooled.labels["n_ref"], "passed": report.passed}
    return step if without is None else {**step, "without": without}


# ----------------------------------------------------------------------------------------------------------
# Verification


def judge(
    test: Runner,
    reference: Runner,
    contract: Contract,
    inputs: dict[str, np.ndarray],
    names: tuple[str, str],
    what: str,
    min_ap: float | None = None,
) -> Report:
    """int8 against fp32: raw limits and a collapse check per input, and label AP@0.5 pooled over all
    inputs (TP / (TP + FP + FN) of all their objects) >= ``min_ap`` (default :data:`MIN_LABEL_AP`).
    The inputs are single tiles or images (batch 1): :func:`.verify.compare` clusters the first item."""
    report = compare(test, reference, contract, inputs, TOLERANCE, names, tuple(inputs), foreground_only=True)
    counts = {c.name: (c.labels["tp"], c.labels["fp"], c.labels["fn"]) for c in report.cases if c.labels}
    report.cases.append(pool_labels(counts, MIN_LABEL_AP if min_ap is None else min_ap, what))
    return report


def verify_int8(
    int8: bytes, fp32: bytes, contract: Contract, inputs: dict[str, np.ndarray], what: str
) -> Report:
    """The int8 model against the fp32 model (both ONNX Runtime CPU) on ``inputs``."""
    return judge(ort_runner(int8), ort_runner(fp32), contract, inputs, ("onnx-int8", "onnx-fp32"), what)


def few_objects_note(result: Search) -> str | None:
    """A note when the search judged labels on so few objects that one object moves AP@0.5 a lot."""
    n = result.steps[0]["objects"] if result.steps else 0
    if n >= FEW_OBJECTS:  # the same bound as the verdict's one-object grace
        return None
    return (
        f"the calibration tiles hold {n} objects: one object more or less moves their AP@0.5 by "
        f"{1 / max(n, 1):.3f}; calibrate on more images for a finer judgement"
    )


FINE_SPACING = 1 / 300  # finer than upstream's 1/255: a pixel is too few embedding units for uint8


def failure_hint(result: Search, contract: Contract | None = None) -> str:
    """What to try when the int8 model fails, naming the blocks that hurt most."""
    retrain = ""
    if contract is not None and min(contract.spacing[-2:]) < FINE_SPACING:
        retrain = (
            f", or retrain at a coarser embedding spacing (this model has 1/{1 / contract.spacing[-1]:.0f} "
            "per pixel; at embedseg-train --spacing 0.0039, i.e. 1/255, the same data kept 2 instead of 4 "
            "blocks fp32 in 2D and 0 instead of 12 in 3D: benchmarks/results/precision.md; but over 5 seeds "
            "it lowered test AP@0.5 by 0.03-0.07 on real nuclei: benchmarks/results/train_seeds_spacing.md)"
        )
    return (
        f"most sensitive blocks (output error when quantized alone, in units of the limits): "
        f"{result.worst()}. Try calibrating on more images (--calibration-tiles), or export fp16{retrain}"
    )


def int8_facts(
    folder: str | Path, n_calibration: int, seed: int, result: Search, target: str = "cpu"
) -> dict[str, Any]:
    return {
        "calibration": {"folder": str(folder), "tiles": n_calibration, "seed": seed, "method": "MinMax"},
        "target": target,
        "activations": TARGETS[target],
        "weights": "int8 per channel",
        "fp32_nodes": result.fp32_nodes,
        "reason_fp32": "the raw output is never quantized (offsets and seed logits share the output tensor); "
        "fp32_blocks: the fewest of the most sensitive blocks that pass the label check on calibration tiles",
        "search": result.record(),
    }
