"""ONNX model -> TensorRT engine + ``model.engine.json``, verified against ONNX Runtime CPU.

The build itself (ONNX parser, strongly typed network, optimisation profiles, TF32 policy, timing cache,
workspace limit) lives in :mod:`embedseg_deploy.engine_cache`, so the runtime builds engines the same way
on first use. This module adds what only an export needs: profiles from ``--tile``, the fp16 ONNX made on
the fly when an fp16 engine is asked of an fp32 model (TensorRT 11 has no fp16 builder flag, and on 10 the
flag would let TensorRT pick fp16 also where measurement says fp32 must stay), and a verification of the
engine on tiles at the shapes of every profile before anything is written. The engine runs through the
runtime's :class:`~embedseg_deploy.engine_cache.EngineRunner` (the one engine runner of the project, which
switches profiles by input shape and raises ``EngineError``, the exporter's error type).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedseg_deploy.contract import Contract
from embedseg_deploy.engine_cache import (
    EngineError,
    EngineRunner,
    Profile,
    build_engine,
    cache_key,
    check_profiles,
    default_profile,
    local_environment,
    make_sidecar,
    onnx_contract,
    onnx_precision,
    parse_batch,
    parse_profile,
    read_onnx_header,
    resolve_precision,
    sidecar_path,
    write_atomic,
    write_engine,
)
from embedseg_deploy.io import sha256_file

from .fp16 import DEFAULT_KEEP
from .verify import TOLERANCES, Report, compare, fixture_tile, ort_runner, synthetic_image


def profiles_from_tiles(contract: Contract, tiles: Sequence[str] | None, batch: str = "1") -> list[Profile]:
    """One profile per ``--tile`` value (``OPT`` or ``MIN/OPT/MAX``); the contract's GPU tile by default."""
    if not tiles:
        return [default_profile(contract, batch=parse_batch(batch))]
    return [
        parse_profile(t, contract.ndim, contract.in_channels, contract.tile_multiple, batch) for t in tiles
    ]


def fp16_onnx(src: Path, dst: Path, keep: Sequence[str], force: bool) -> Path:
    """Write the fp16 version of the fp32 ONNX ``src`` to ``dst``, verified against ``src`` on ORT CPU."""
    import onnx

    from .fp16 import convert_to_fp16
    from .onnx_export import check_interface, set_contract

    model = onnx.load(str(src))
    contract = onnx_contract(src)
    converted = convert_to_fp16(model, keep)
    contract.provenance = {
        **contract.provenance,
        "export": {**contract.provenance.get("export", {}), "precision": "fp16", "fp32_nodes": sorted(keep)},
    }
    set_contract(converted, contract)
    check_interface(converted, contract)
    data = converted.SerializeToString()
    report = compare(
        ort_runner(data, optimize=False),
        ort_runner(src),
        contract,
        {"synthetic": fixture_tile(contract)[1]},
        TOLERANCES["fp16"],
        ("onnx-fp16", "onnx-fp32"),
    )
    report.raise_if_failed()
    write_atomic(dst, data, force=force)
    return dst


def engine_inputs(contract: Contract, profiles: Sequence[Profile], fixture: str | Path | None = None) -> dict:
    """Synthetic contract-normalised tiles at every profile's min, opt and max shape (+ a fixture tile)."""
    inputs: dict[str, np.ndarray] = {}
    for k, p in enumerate(profiles):
        for which, shape in (("opt", p.opt), ("min", p.min), ("max", p.max)):
            tile = synthetic_image(contract, tuple(shape[2:]), seed=k)
            name = "synthetic" if (k, which) == (0, "opt") else f"profile{k}-{which}"
            inputs.setdefault(name, np.ascontiguousarray(np.repeat(tile[None], shape[0], axis=0)))
    if fixture is not None:
        name, tile = fixture_tile(contract, fixture)
        if any(p.contains(tile.shape) for p in profiles):
            inputs[name] = tile
    return inputs


def build_trt(
    onnx_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tiles: Sequence[str] | None = None,
    batch: str = "1",
    precision: str | None = None,
    workspace_mb: int | None = None,
    timing_cache: str | os.PathLike | None = None,
    keep_fp32: Sequence[str] = DEFAULT_KEEP,
    verify: bool = True,
    fixture: str | os.PathLike | None = None,
    force: bool = False,
    device_id: int = 0,
    verbose: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Build, verify and write ``out`` + ``out.json``; returns (engine path, sidecar document)."""
    onnx_path, out = Path(onnx_path), Path(out)
    for target in (out, sidecar_path(out)):
        if target.exists() and not force:
            raise EngineError(f"{target} exists; pass --force to overwrite it")
    if not out.parent.is_dir():  # found out now, not after a build of minutes
        raise EngineError(f"{out}: folder {out.parent} does not exist")
    header = read_onnx_header(onnx_path)
    contract = onnx_contract(onnx_path, header)
    profiles = profiles_from_tiles(contract, tiles, batch)
    check_profiles(profiles, contract)
    model_precision = onnx_precision(contract)
    wanted = precision or model_precision
    build_path = onnx_path
    if wanted == "fp16" and model_precision == "fp32":
        build_path = out.with_name(out.stem + ".fp16.onnx")
        if build_path.exists() and not force:
            raise EngineError(f"{build_path} exists (the fp16 ONNX this build writes); pass --force")
    else:
        wanted = resolve_precision(onnx_path, contract, wanted)

    env = local_environment(device_id)  # clear error without TensorRT or a GPU, before any work
    if build_path != onnx_path:
        fp16_onnx(onnx_path, build_path, keep_fp32, force)
        contract = onnx_contract(build_path)
    digest = sha256_file(build_path)
    engine, facts = build_engine(
        build_path, profiles, wanted, workspace_mb * 2**20 if workspace_mb else None, timing_cache, verbose
    )
    facts.update(
        gpu_name=env["gpu_name"],
        compute_capability=env["compute_capability"],
        onnx_sha256=digest,
        onnx_file=build_path.name,
        onnx_opset=header["opset"].get("ai.onnx"),
        cache_key=cache_key(digest, env["tensorrt_version"], env["compute_capability"], wanted, profiles),
        built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    extra: dict[str, Any] = {}
    if verify:
        report = verify_engine(engine, onnx_path, contract, profiles, wanted, fixture, device_id)
        extra["verification"] = report.to_dict()
        report.raise_if_failed()
    sidecar = make_sidecar(contract, facts, extra)
    write_engine(out, engine, sidecar, force=force)
    return out, sidecar


def verify_engine(
    engine: bytes,
    reference_onnx: Path,
    contract: Contract,
    profiles: Sequence[Profile],
    precision: str,
    fixture: str | os.PathLike | None = None,
    device_id: int = 0,
) -> Report:
    """The engine vs ONNX Runtime CPU on the (fp32 when available) source ONNX at every profile's shapes."""
    inputs = engine_inputs(contract, profiles, fixture)
    tolerance = TOLERANCES[f"engine-{precision}"]
    reference = ort_runner(reference_onnx)
    ref_precision = onnx_precision(onnx_contract(reference_onnx))
    runner = EngineRunner(engine, device_id)
    try:
        names = (f"tensorrt-{precision}", f"onnx-{ref_precision}")
        fg = precision == "int8"  # judged on the foreground, as the int8 export is
        return compare(runner, reference, contract, inputs, tolerance, names, foreground_only=fg)
    finally:
        runner.close()
