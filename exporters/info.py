"""What a model file is, its contract, and (for engines) whether it can run on this machine.

Kinds are told apart by content first (a torch checkpoint is a zip or a pickle, a TIFF has its magic, an
ONNX model parses as a ``ModelProto`` with a graph) and by suffix for engines, whose bytes are opaque.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from embedseg_deploy.contract import Contract
from embedseg_deploy.engine_cache import (
    EngineError,
    engine_problems,
    local_environment,
    onnx_contract,
    read_onnx_header,
    read_sidecar,
)

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
KINDS = ("checkpoint", "onnx", "engine")


class ModelFileError(ValueError):
    """The file is missing, of the wrong kind, or unreadable."""


def detect_kind(path: str | os.PathLike) -> str:
    """``checkpoint``, ``onnx`` or ``engine``; :class:`ModelFileError` for anything else."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder, not a model file")
    if path.suffix.lower() in ENGINE_SUFFIXES:
        return "engine"
    if path.name.lower().endswith(tuple(s + ".json" for s in ENGINE_SUFFIXES)):
        raise ModelFileError(f"{path}: an engine's sidecar JSON; pass the engine itself ({path.name[:-5]})")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80":
        return "checkpoint"
    if magic in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        raise ModelFileError(f"{path}: a TIFF image, not a model (checkpoint, ONNX model or engine)")
    try:
        read_onnx_header(path)
    except EngineError as exc:
        if path.suffix.lower() == ".onnx":
            raise ModelFileError(str(exc)) from None
        raise ModelFileError(
            f"{path}: not a model file (neither a torch checkpoint, an ONNX model nor a TensorRT engine)"
        ) from None
    return "onnx"


def expect_kind(path: str | os.PathLike, wanted: str, command: str) -> None:
    """Raise a clear error when ``path`` is not a ``wanted`` file."""
    kind = detect_kind(path)
    if kind == wanted:
        return
    hints = {
        "checkpoint": "export it first: embedseg-export onnx CHECKPOINT -o model.onnx",
        "onnx": "build an engine from it with embedseg-export trt, or run it with embedseg-run",
        "engine": "it is already a TensorRT engine; run it with embedseg-run",
    }
    raise ModelFileError(
        f"{path}: is {_article(kind)} {kind}, but {command} needs {_article(wanted)} {wanted}; {hints[kind]}"
    )


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(path: str | os.PathLike, upstream_json_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """{"kind", "path", "contract", "details", "problems", "notes"} for a checkpoint, ONNX model or engine."""
    path = Path(path)
    kind = detect_kind(path)
    info: dict[str, Any] = {"kind": kind, "path": str(path), "details": {}, "problems": [], "notes": []}
    if kind == "checkpoint":
        from embedseg_training.checkpoint import checkpoint_layout, load_checkpoint, load_model

        ckpt = load_checkpoint(path)
        _model, contract = load_model(path, upstream_json_dir)
        info["details"] = {
            "layout": checkpoint_layout(ckpt),
            "epoch": ckpt.get("epoch"),
            "best_iou": ckpt.get("best_iou"),
        }
        info["notes"] += list(contract.provenance.get("notes", []))  # defaults an upstream import took
    elif kind == "onnx":
        header = read_onnx_header(path)
        contract = onnx_contract(path, header)
        export = contract.provenance.get("export", {})
        info["details"] = {
            "ir_version": header["ir_version"],
            "opset": header["opset"],
            "producer": header["producer"],
            "precision": export.get("precision", "fp32"),
            "input": export.get("input"),
            "output": export.get("output"),
        }
        if "int8" in export:
            info["details"]["int8"] = _int8_summary(export["int8"])
        info["notes"] += _onnx_check(path)
    else:
        doc = read_sidecar(path)
        contract = Contract.from_dict(doc["contract"])
        facts = doc["engine"]
        info["details"] = {
            k: facts.get(k)
            for k in (
                "tensorrt_version",
                "gpu_name",
                "compute_capability",
                "precision",
                "profiles",
                "onnx_file",
                "onnx_sha256",
            )
        }
        try:
            env = local_environment()
        except EngineError as exc:
            info["notes"].append(f"not checked against this machine: {exc}")
        else:
            info["details"]["this_machine"] = env
            info["problems"] += [
                f"cannot run here: {p}; rebuild it on this machine" for p in engine_problems(facts, env)
            ]
    info["contract"] = contract.to_dict()
    return info


def _int8_summary(facts: dict[str, Any]) -> str:
    """One line: the activation target, the calibration, the blocks kept fp32 and the verdict."""
    cal = facts.get("calibration", {})
    blocks = facts.get("search", {}).get("fp32_blocks", [])
    verdict = facts.get("verification", {})
    aps = [v["ap50"] for k, v in verdict.items() if k.startswith("pooled") and isinstance(v, dict)]
    return (
        f"{facts.get('target', 'cpu')} ({facts.get('activations')}); calibrated on {cal.get('tiles')} tiles "
        f"of {cal.get('folder')}; fp32 blocks: {', '.join(blocks) or 'none'} (and the output node)"
        + (f"; label AP@0.5 vs fp32 {aps[0]:.4f}" if aps else "")
    )


def _onnx_check(path: Path) -> list[str]:
    """Run onnx.checker when onnx is installed (it is in the export tier); problems become errors."""
    try:
        import onnx
    except ImportError:
        return ["onnx not installed: only the header was checked"]
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: the ONNX model is corrupted ({str(exc).splitlines()[0]})") from None
    return []


def format_info(info: dict[str, Any]) -> str:
    """A short human-readable summary."""
    c = Contract.from_dict(info["contract"])
    tile, halo = c.recommended_tile("gpu")
    n, t = c.normalization, c.thresholds
    lines = [
        f"{info['path']}: {info['kind']}",
        f"  model: {c.architecture.get('name')} {c.ndim}D, {c.in_channels} input channel(s), "
        f"outputs {', '.join(c.channels)}",
        f"  spacing (array order): {[round(s, 8) for s in c.spacing]}, anisotropy {c.anisotropy}",
        f"  normalization: {n.kind} (pmin {n.pmin}, pmax {n.pmax}, divisor {n.divisor}, clip {n.clip})",
        f"  thresholds: seed {t.seed_thresh}, fg {t.fg_thresh}, min object {t.min_object_size}",
        f"  tiles: multiple of {c.tile_multiple}, padding {c.padding!r}, GPU tile {tile} halo {halo}",
    ]
    lines += [f"  {k}: {v}" for k, v in info["details"].items() if v is not None]
    lines += [f"  note: {n}" for n in info["notes"]]
    lines += [f"  PROBLEM: {p}" for p in info["problems"]]
    return "\n".join(lines)
