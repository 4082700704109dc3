"""Checkpoint -> ONNX model with the model contract in its metadata, verified before it is written.

Exporter choice: **the TorchScript-based ("legacy") exporter is the default**, ``dynamo=True`` is kept
behind ``exporter="dynamo"`` and tested. Measured on torch 2.13 (CPU, 2 threads):

* legacy: exports BranchedERFNet 2D/3D with fully dynamic ``N`` and spatial axes in ~1 s, forces eval
  semantics, IR 8 at opset 17 (loads in older ONNX Runtime / TensorRT builds); it is deprecated and will
  go in a later torch release, which is why the dynamo path stays tested;
* dynamo: free spatial dims (``Dim.DYNAMIC``) fail on the ERFNet downsampler (concat of a stride-2 conv,
  which rounds up, and a 2x max-pool, which rounds down), so every spatial dim is declared as
  ``8 * Dim(...)``; export takes ~10 s, produces IR 10, and exports whatever mode the module is in (live
  dropout when left in ``train()``).

Either way the spatial sizes must be multiples of 8 (``contract.tile_multiple``), which the contract, the
graph's doc string and the input's doc string say. The graph keeps the raw network output as one tensor
``raw`` (N x C x spatial): tanh/exp/sigmoid and the pixel coordinates are applied by the runtime in fp32.

Every export is checked: no ``Dropout``/``Random*`` op and no training-mode ``BatchNormalization`` in the
graph, ``onnx.checker`` (full check) and strict shape inference pass, one fp32 input and one fp32 output
with the contract's channel counts, the opset is recorded in the contract. Verification (on by default)
runs ONNX Runtime CPU against the torch model (see :mod:`.verify`); a failing model is never written.
"""

from __future__ import annotations

import io
import os
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import TensorProto

from embedseg_deploy.contract import METADATA_KEY, Contract
from embedseg_deploy.engine_cache import write_atomic
from embedseg_deploy.io import sha256_file

from . import __version__
from .fp16 import DEFAULT_KEEP, convert_to_fp16
from .verify import (
    MIN_IMAGE_AP,
    TOLERANCES,
    Report,
    Tolerance,
    cached,
    compare,
    ort_runner,
    pooled_label_case,
    standard_inputs,
)

DEFAULT_OPSET = 17
EXPORTERS = ("legacy", "dynamo")
INPUT_NAME, OUTPUT_NAME = "image", "raw"
FORBIDDEN_OPS = frozenset(
    {
        "Dropout",
        "RandomUniform",
        "RandomUniformLike",
        "RandomNormal",
        "RandomNormalLike",
        "Bernoulli",
        "Multinomial",
    }
)


class ExportError(RuntimeError):
    """The model cannot be exported, or the export is not what the contract promises."""


@dataclass
class Exported:
    model: onnx.ModelProto
    contract: Contract
    report: Report | None
    seconds: float

    def serialized(self) -> bytes:
        return self.model.SerializeToString()


def _axis_names(ndim: int) -> dict[int, str]:
    return {0: "N", **{2 + i: a for i, a in enumerate("DHW"[3 - ndim :])}}


def _example(contract: Contract) -> torch.Tensor:
    spatial = [4 * contract.tile_multiple] * contract.ndim
    return torch.zeros(2, contract.in_channels, *spatial)  # batch 2: torch.export specialises size 1


def _torch_export(model: torch.nn.Module, contract: Contract, opset: int, exporter: str) -> onnx.ModelProto:
    x = _example(contract)
    if exporter == "legacy":
        axes = _axis_names(contract.ndim)
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notice and the shape-check TracerWarning
            torch.onnx.export(
                model,
                (x,),
                buffer,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        return onnx.load_from_string(buffer.getvalue())
    if exporter == "dynamo":
        from torch.export import Dim

        m = contract.tile_multiple
        dims = {0: Dim("N", min=1, max=4096)}
        for i, a in enumerate("DHW"[3 - contract.ndim :]):
            dims[2 + i] = m * Dim(f"{a}_over_{m}", min=1, max=8192)
        program = torch.onnx.export(
            model,
            (x,),
            dynamic_shapes=(dims,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
        return program.model_proto
    raise ExportError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")


def check_eval_graph(model: onnx.ModelProto) -> None:
    """Raise when the graph still holds dropout, random ops or training-mode batch norm."""
    problems = sorted({n.op_type for n in model.graph.node if n.op_type in FORBIDDEN_OPS})
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            training = any(a.name == "training_mode" and a.i for a in node.attribute)
            if training or len([o for o in node.output if o]) > 1:
                problems.append(f"training-mode BatchNormalization {node.name!r}")
    if problems:
        raise ExportError(f"the exported graph is not in eval mode: {', '.join(problems)}")


def check_interface(model: onnx.ModelProto, contract: Contract) -> None:
    """Checker, strict shape inference, and one fp32 input/output shaped as the contract says."""
    try:
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported model fails the ONNX checks: {exc}") from None
    graph = inferred.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise ExportError(
            f"expected one input and one output, got {len(graph.input)} and {len(graph.output)}"
        )
    for info, channels in ((graph.input[0], contract.in_channels), (graph.output[0], contract.out_channels)):
        t = info.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
        if t.elem_type != TensorProto.FLOAT or len(dims) != contract.ndim + 2 or dims[1] != channels:
            raise ExportError(
                f"{info.name}: expected float32 N x {channels} x {contract.ndim} spatial dims, "
                f"got elem type {t.elem_type} and dims {dims}"
            )
        if any(not isinstance(d, str) for d in [dims[0], *dims[2:]]):
            raise ExportError(f"{info.name}: batch and spatial axes must be dynamic, got {dims}")


def set_contract(model: onnx.ModelProto, contract: Contract) -> None:
    """Store the contract JSON under :data:`METADATA_KEY` (replacing an older one)."""
    keep = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in keep}, METADATA_KEY: contract.to_json()})


def _document(model: onnx.ModelProto, contract: Contract) -> None:
    rule = f"every spatial size must be a multiple of {contract.tile_multiple}"
    model.doc_string = (
        f"EmbedSeg BranchedERFNet {contract.ndim}D. Input {INPUT_NAME}: N x {contract.in_channels} x spatial "
        f"(normalised image, {rule}). Output {OUTPUT_NAME}: N x {contract.out_channels} x spatial raw "
        f"network output, channels {', '.join(contract.channels)} (pre-tanh / pre-exp(10 s) / pre-sigmoid). "
        f"Model contract: metadata key {METADATA_KEY!r}."
    )
    model.graph.input[0].doc_string = f"normalised image tile; {rule}"
    model.graph.output[0].doc_string = "raw network output: " + ", ".join(contract.channels)


def export_onnx(
    model: torch.nn.Module,
    contract: Contract,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "legacy",
    precision: str = "fp32",
    keep_fp32: Iterable[str] = DEFAULT_KEEP,
    verify: bool = True,
    fixture: str | Path | None = None,
    source: dict[str, Any] | None = None,
    tolerance: Tolerance | None = None,
    calibrate: str | Path | None = None,
    calibration_tiles: int | None = None,
    seed: int = 0,
    verify_images: str | Path | None = None,
    int8_target: str = "cpu",
) -> Exported:
    """Export ``model`` (a BranchedERFNet) with ``contract`` embedded; verify unless ``verify=False``.

    ``precision="fp16"`` converts the exported graph (:func:`.fp16.convert_to_fp16`, ``keep_fp32``)
    and verifies it against the fp32 torch model with the fp16 tolerance. ``tolerance`` replaces the
    precision's default limits (:data:`.verify.TOLERANCES`). ``precision="int8"`` exports and verifies
    the fp32 model, then quantizes it on tiles of the images in ``calibrate`` (:mod:`.int8`) and checks
    it against the fp32 model, labels included; ``int8_target`` picks the activation scheme, ``cpu``
    (ONNX Runtime CPU) or ``tensorrt`` (TensorRT and its ONNX Runtime EP), :data:`.int8.TARGETS`.

    fp16 and int8 are also judged on labels of images like the user's: ``verify_images`` (a .tif file
    or a data folder), else the validation images of ``calibrate`` or of the training data the checkpoint
    records (:func:`training_data`).
    """
    if precision not in ("fp32", "fp16", "int8"):
        raise ExportError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    data = training_data(contract)
    if precision == "int8" and calibrate is None:
        if data is None:
            raise ExportError(
                "int8 needs calibration images: --calibrate DATA_DIR (the training data folder); "
                + _where_trained(contract)
            )
        calibrate = data
    start = time.perf_counter()
    model.eval()
    training = [name for name, m in model.named_modules() if m.training]
    if training:
        raise ExportError(f"modules still in training mode after eval(): {training[:5]}")
    proto = _torch_export(model, contract, opset, exporter)
    check_eval_graph(proto)
    keep = sorted(set(keep_fp32)) if precision == "fp16" else []
    if precision == "fp16":
        proto = convert_to_fp16(proto, keep)
    _document(proto, contract)

    contract = Contract.from_dict(contract.to_dict())
    export_facts = {
        "exporter": f"embedseg_exporters {__version__}",
        "torch_exporter": exporter,
        "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "ir_version": int(proto.ir_version),
        "precision": precision,
        "fp32_nodes": keep,
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "axes": ["N", "C", *"DHW"[3 - contract.ndim :]],  # N and spatial dynamic, C fixed
        "versions": _versions(),
    }
    if source:
        export_facts["checkpoint"] = source
    contract.provenance = {**contract.provenance, "export": export_facts}
    set_contract(proto, contract)
    check_interface(proto, contract)

    images = None
    if precision != "fp32" and verify:
        images = _images_like_the_users(contract, verify_images, calibrate if precision == "int8" else data)
    report = None
    if verify:
        checked = "fp32" if precision == "int8" else precision
        fp16_images = images if precision == "fp16" else None
        report = verify_against_torch(proto, model, contract, checked, fixture, tolerance, fp16_images)
        report.raise_if_failed()
        export_facts["verification"] = {
            "passed": report.passed,
            "max_errors": report.max_errors(),
            "statistic": report.tolerance.statistic,  # of each input's errors; max_errors: over the inputs
        }
        if fp16_images:
            export_facts["verification"]["images"] = _label_record(report)
        set_contract(proto, contract)
    if precision == "int8":
        proto, report = _to_int8(proto, contract, calibrate, calibration_tiles, seed, images, int8_target)
    return Exported(proto, contract, report, time.perf_counter() - start)


def _recorded_data(contract: Contract) -> str | None:
    """The data folder a checkpoint of ours records (``provenance.config.data_dir``)."""
    return (contract.provenance.get("config") or {}).get("data_dir")


def training_data(contract: Contract) -> Path | None:
    """The data folder a checkpoint of ours was trained on, if it is here."""
    folder = _recorded_data(contract)
    return Path(folder) if folder and Path(folder).is_dir() else None


def _where_trained(contract: Contract) -> str:
    folder = _recorded_data(contract)
    if folder:
        return f"the checkpoint was trained on {folder}, which is not on this machine"
    return "the checkpoint records no training data"


def _images_like_the_users(contract: Contract, given, folder) -> tuple[dict, str] | None:
    """(images, what) to judge labels on: ``given``, else ``folder``'s val/ and test/ images; None when
    there are none (int8 then holds out tiles of its calibration images)."""
    from .verify import VERIFY_LAYOUTS, verification_images

    try:
        if given is not None:
            return verification_images(contract, given), "verification images"
        if folder is not None and any((Path(folder) / sub).is_dir() for (sub,) in VERIFY_LAYOUTS[:2]):
            return verification_images(contract, folder), "val/test images"
    except ValueError as exc:
        raise ExportError(f"--verify-input: {exc}") from None
    return None


def _label_record(report: Report) -> dict[str, Any]:
    pooled = [c for c in report.cases if c.name.startswith("pooled")]
    keys = ("ap50", "n_ref", "n_test", "per_input", "one_object_grace")
    return {c.name: {k: c.labels[k] for k in keys} for c in pooled}


def _to_int8(proto, contract: Contract, folder, n_tiles: int | None, seed: int, images, target: str):
    """The fp32 ``proto`` quantized on ``folder``'s images with the fp32 blocks found by
    :func:`.int8.search`, and verified against it on ``images`` (else held-out tiles)."""
    import tempfile

    from . import int8
    from .verify import VerificationError

    n = n_tiles or int8.DEFAULT_TILES
    tiles = int8.calibration_tiles(contract, folder, n, seed)
    if images is None:
        held_out = int8.calibration_tiles(contract, folder, int8.VERIFY_TILES, seed + 1)
        images = {f"held-out-{k}": t for k, t in enumerate(held_out)}, "held-out tiles"
    fp32 = proto.SerializeToString()
    with tempfile.TemporaryDirectory() as tmp:
        quantizer = int8.Quantizer(fp32, tiles, Path(tmp), target)
        model, result = int8.search(
            quantizer, ort_runner(fp32), contract, tiles, [int8.output_node(proto)], int8.blocks(proto),
        )  # fmt: skip
    if not result.passed:
        raise VerificationError(
            f"int8: even with {len(result.fp32_blocks)} blocks in fp32 the model fails the label check on "
            f"calibration tiles (AP@0.5 {result.steps[-1]['ap50']}); {int8.failure_hint(result, contract)}"
        )
    quantized = onnx.load_from_string(model)
    facts = int8.int8_facts(folder, len(tiles), seed, result, target)
    contract.provenance["export"].update(precision="int8", fp32_nodes=result.fp32_nodes, int8=facts)
    set_contract(quantized, contract)
    check_interface(quantized, contract)
    report = int8.verify_int8(quantized.SerializeToString(), fp32, contract, *images)
    note = int8.few_objects_note(result)
    if note:
        report.notes.append(note)
    if not report.passed:
        report.notes.append(int8.failure_hint(result, contract))
    report.raise_if_failed()
    facts["verification"] = {
        "passed": report.passed,
        "max_errors": report.max_errors(),
        "statistic": report.tolerance.statistic,
        **_label_record(report),
    }
    set_contract(quantized, contract)
    return quantized, report


def verify_against_torch(
    proto: onnx.ModelProto,
    model: torch.nn.Module,
    contract: Contract,
    precision: str,
    fixture=None,
    tolerance: Tolerance | None = None,
    images: tuple[dict, str] | None = None,
) -> Report:
    """ONNX Runtime CPU vs the torch model on the fixture tile and two random tiles, and on ``images``
    (like the user's: raw limits per image, label AP@0.5 pooled over them >= :data:`MIN_IMAGE_AP`)."""
    test = cached(ort_runner(proto.SerializeToString(), optimize=precision == "fp32"))

    @cached
    def reference(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    inputs = standard_inputs(contract, fixture)
    limits = tolerance or TOLERANCES[precision]
    if precision == "fp16" and images is None:  # no labels like the user's: every pixel judged
        limits = replace(limits, statistic="max") if tolerance else TOLERANCES["fp16-tiles"]
    names = (f"onnx-{precision}", "torch-fp32")
    report = compare(test, reference, contract, inputs, limits, names)
    if images is not None:
        on, what = images
        report.cases += compare(test, reference, contract, on, limits, names, (), foreground_only=True).cases
        report.notes.append(f"{what}: offsets and sigma judged on the foreground the clustering reads")
        report.cases.append(pooled_label_case(test, reference, contract, on, MIN_IMAGE_AP, what))
    if precision == "fp16":
        report.notes.append("ONNX Runtime CPU without graph optimisation: every fp16 cast kept, as on a GPU")
        if images is None:
            report.notes.append(
                "labels judged on the fixture or synthetic tile only, so raw errors per pixel: give "
                "--verify-input (images or the data folder) to judge the labels on images like yours"
            )
    return report


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "onnx": onnx.__version__}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    upstream_json_dir: str | os.PathLike | None = None,
    force: bool = False,
    fixture: str | os.PathLike | None = None,
    **options: Any,
) -> Exported:
    """Load ``checkpoint`` (ours or upstream EmbedSeg), export, verify and write ``out`` atomically.

    Without ``fixture``, an upstream fixture's ``network_input.npy`` beside the checkpoint is used.
    """
    from embedseg_training.checkpoint import load_model

    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise ExportError(f"{out}: folder {out.parent} does not exist")
    model, contract = load_model(checkpoint, upstream_json_dir)
    if fixture is None and (checkpoint.parent / "network_input.npy").is_file():
        fixture = checkpoint.parent / "network_input.npy"
    source = {"file": checkpoint.name, "sha256": sha256_file(checkpoint)}
    exported = export_onnx(model, contract, fixture=fixture, source=source, **options)
    write_atomic(out, exported.serialized(), force=force)
    return exported
