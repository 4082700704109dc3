"""Self-describing checkpoints, and import of upstream EmbedSeg checkpoints.

Our checkpoint is one ``torch.save`` file of plain types and tensors, so ``torch.load(weights_only=True)``
reads it::

    {"format": 1, "model_state_dict": ..., "contract": Contract.to_dict(), "epoch": int | None,
     "best_iou": float | None, "optimizer_state_dict": ... (resumable 'last' checkpoint only),
     "scheduler": {...} | None, "log": [row, ...], "versions": {...}}

An upstream EmbedSeg checkpoint (``best_iou_model.pth``/``checkpoint.pth``: ``model_state_dict``, ``epoch``,
``best_iou``, ``logger_data``, ``optim_state_dict``) carries no contract: :func:`import_upstream` rebuilds one
from upstream's JSON files (``data_properties.json``, ``normalization.json``, optionally a test config).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from embedseg_deploy.contract import (
    Contract,
    ContractError,
    Normalization,
    Thresholds,
    default_architecture,
    spacing_from_upstream_grid,
)
from embedseg_deploy.io import atomic_writer, sha256_file

from . import __version__
from .model import BranchedERFNet, build_model

CHECKPOINT_FORMAT = 1
UPSTREAM_NORMS = ("min-max-percentile", "mean-std", "absolute")  # upstream normalization.json "norm"
UPSTREAM_DATA_TYPES = ("8-bit", "16-bit")
CONVERT = "`embedseg-train import-upstream CHECKPOINT`"  # where the options of the hints below live
PathLike = str | os.PathLike


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit the model."""


def package_versions() -> dict[str, str]:
    import numpy

    return {
        "embedseg_training": __version__,
        "torch": str(torch.__version__),  # TorchVersion is not weights_only-loadable
        "numpy": str(numpy.__version__),
        "python": platform.python_version(),
    }


# ------------------------------------------------------------------------------------------------ save / load


def save_checkpoint(
    path: PathLike,
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    contract: Contract,
    *,
    epoch: int | None = None,
    best_iou: float | None = None,
    optimizer_state_dict: Mapping[str, Any] | None = None,
    scheduler: Mapping[str, Any] | None = None,
    log: Sequence[Mapping[str, Any]] = (),
    versions: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write our checkpoint atomically (temp file in the same folder, then ``os.replace``).

    ``extra`` adds entries (plain types and tensors only, so ``weights_only`` loading works), e.g. the
    training loop's RNG and grad-scaler state; it cannot replace the standard keys.
    """
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model_state_dict": {k: v.detach().cpu() for k, v in state.items()},
        "contract": contract.to_dict(),
        "epoch": None if epoch is None else int(epoch),
        "best_iou": None if best_iou is None else float(best_iou),
        "scheduler": None if scheduler is None else dict(scheduler),
        "log": [dict(row) for row in log],
        "versions": {str(k): str(v) for k, v in (versions or package_versions()).items()},
    }
    if optimizer_state_dict is not None:
        payload["optimizer_state_dict"] = optimizer_state_dict
    clash = sorted(set(extra or {}) & {*payload, "optimizer_state_dict"})
    if clash:
        raise ValueError(f"extra checkpoint entries {clash} would replace standard keys")
    payload.update(extra or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as f:
        torch.save(payload, f)
    return path


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _strip_module_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop torch.nn.DataParallel's ``module.`` prefix when every key has it."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _load_refusal(path: Path, exc: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in our words.

    torch's own message advises loading with ``weights_only=False``, which runs whatever code the file
    holds; that advice is never repeated. A file that pickles Python objects (a whole model, an argparse
    Namespace, ...) holds more than weights; anything else is not a torch checkpoint, or a damaged one.
    """
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return (
            f"{path}: holds more than weights (a pickled {found.group(1)} object), so it is not a plain "
            "checkpoint and is not loaded (unpickling objects can run code). Save the weights alone, e.g. "
            "torch.save({'model_state_dict': model.state_dict()}, path)"
        )
    detail = text.split("WeightsUnpickler error:", 1)[-1]  # drop torch's preamble and its advice
    lines = [ln.strip() for ln in detail.splitlines() if ln.strip() and "weights_only" not in ln]
    first = lines[0].split(". ")[0].rstrip(".")[:160] if lines else ""  # one whole sentence, no cut
    detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return f"{path}: not a torch checkpoint, or a damaged one (reading it fails with {detail})"


def checkpoint_layout(ckpt: Mapping[str, Any]) -> str:
    """``'ours'`` (format + contract) or ``'upstream'`` (an EmbedSeg checkpoint without a contract)."""
    return "ours" if "contract" in ckpt else "upstream"


def load_checkpoint(path: PathLike) -> dict[str, Any]:
    """Read and validate a checkpoint with ``weights_only=True``: ours, upstream EmbedSeg's, or a bare
    upstream state dict (returned as ``{"model_state_dict": ...}``). Errors name the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # foreign bytes raise many types (IndexError, UnpicklingError, ...)
        raise CheckpointError(_load_refusal(path, exc)) from None
    if _is_state_dict(obj) and any(k.split(".", 1)[0] in ("encoder", "module") for k in obj):
        obj = {"model_state_dict": obj}
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: unknown checkpoint layout (a {type(obj).__name__}, expected a dict)")
    if not _is_state_dict(obj.get("model_state_dict")):
        raise CheckpointError(
            f"{path}: unknown checkpoint layout (keys {sorted(map(str, obj))[:12]}); expected an "
            "embedseg-deploy checkpoint (format, model_state_dict, contract) or an upstream EmbedSeg one "
            "(model_state_dict, ...)"
        )
    obj["model_state_dict"] = _strip_module_prefix(obj["model_state_dict"])
    if "contract" in obj:
        if obj.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{path}: unsupported checkpoint format {obj.get('format')!r} "
                f"(this version reads {CHECKPOINT_FORMAT})"
            )
        try:
            Contract.from_dict(obj["contract"])
        except ContractError as exc:
            raise CheckpointError(f"{path}: bad model contract: {exc}") from None
    return obj


def model_from_state_dict(
    state: Mapping[str, torch.Tensor], contract: Contract, source: PathLike | str = "checkpoint"
) -> BranchedERFNet:
    """Build the contract's network and load ``state`` strictly; mismatches become a CheckpointError."""
    try:
        model = build_model(contract)
    except ValueError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:4]) if len(lines) > 1 else lines[0] if lines else ""
        raise CheckpointError(
            f"{source}: weights do not fit {contract.architecture} "
            f"({len(lines) - 1} problems: {detail[:600]})"
        ) from None
    return model


def load_model(
    path: PathLike,
    upstream_json_dir: PathLike | None = None,
    device: str | torch.device = "cpu",
    **upstream_options,
) -> tuple[BranchedERFNet, Contract]:
    """(model in eval mode, Contract) from our checkpoint or an upstream EmbedSeg one.

    For an upstream checkpoint the JSON files (``data_properties.json``, optional ``normalization.json``
    and ``test_config.json``) are looked up in ``upstream_json_dir``, by default the checkpoint's folder;
    ``upstream_options`` go to :func:`import_upstream`.
    """
    ckpt = load_checkpoint(path)
    if checkpoint_layout(ckpt) == "ours":
        contract = Contract.from_dict(ckpt["contract"])
        state = ckpt["model_state_dict"]
    else:
        folder = Path(upstream_json_dir) if upstream_json_dir is not None else Path(path).parent
        files = upstream_json_files(folder)
        if files["data_properties_json"] is None:
            raise CheckpointError(
                f"{path}: an upstream EmbedSeg checkpoint needs its data_properties.json; none in {folder} "
                "(give the folder that holds it with --upstream-json DIR, or convert the checkpoint once "
                f"with {CONVERT} --data-properties FILE -o model.pth)"
            )
        state, contract = import_upstream(ckpt, **files, **upstream_options, _source=Path(path))
    model = model_from_state_dict(state, contract, path)
    return model.to(device).eval(), contract


def upstream_json_files(folder: PathLike) -> dict[str, Path | None]:
    """The upstream JSON files present in ``folder`` (None where absent)."""
    folder = Path(folder)

    def pick(name: str) -> Path | None:
        p = folder / name
        return p if p.is_file() else None

    return {
        "data_properties_json": pick("data_properties.json"),
        "normalization_json": pick("normalization.json"),
        "test_config": pick("test_config.json"),
    }


# ------------------------------------------------------------------------------------------------ upstream


def _read_json(path_or_dict: PathLike | Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    if path_or_dict is None:
        return {}
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    path = Path(path_or_dict)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object")
    return data


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _json_name(given: PathLike | Mapping[str, Any] | None, name: str) -> str:
    """The file to name in a message: the path, or what the values stand for when given as a dict."""
    return f"{name} (given as values)" if isinstance(given, Mapping) else str(given or name)


def _positive(value: Any) -> float | None:
    """``value`` as a float when it is a finite number > 0, else None (strings, bools, NaN ...)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def upstream_normalization(norm: str | None, data_type: str | None) -> Normalization:
    """Our Normalization for upstream's ``norm`` and ``data_type`` (normalization.json)."""
    if norm in (None, "min-max-percentile"):
        return Normalization(kind="percentile", pmin=1.0, pmax=99.8, per_channel=True, clip=False)
    if norm == "mean-std":
        return Normalization(kind="mean-std", per_channel=True)
    if norm == "absolute":
        divisor = {"8-bit": 255.0, "16-bit": 65535.0}.get(str(data_type))
        if divisor is None:
            raise CheckpointError(
                f"upstream 'absolute' normalisation needs data_type '8-bit' or '16-bit', got {data_type!r} "
                f"(give --data-type to {CONVERT})"
            )
        return Normalization(kind="absolute", divisor=divisor)
    raise CheckpointError(f"unknown upstream normalisation {norm!r} ({', '.join(UPSTREAM_NORMS)})")


def upstream_architecture(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """ndim, input channels and branch sizes read off an upstream BranchedERFNet state dict."""
    try:
        first = state["encoder.initial_block.conv.weight"]
        branches = []
        while f"decoders.{len(branches)}.output_conv.weight" in state:
            branches.append(int(state[f"decoders.{len(branches)}.output_conv.weight"].shape[1]))
    except KeyError:
        raise CheckpointError(
            "not a BranchedERFNet state dict (no encoder.initial_block.conv.weight)"
        ) from None
    ndim = first.dim() - 2
    if ndim not in (2, 3):
        raise CheckpointError(f"initial conv weight of shape {tuple(first.shape)} is neither 2D nor 3D")
    if branches != [2 * ndim, 1]:
        raise CheckpointError(
            f"{ndim}D upstream model with num_classes {branches}: "
            f"only [{2 * ndim}, 1] (n_sigma = ndim) is supported"
        )
    return {**default_architecture(ndim, int(first.shape[1])), "ndim": ndim}


def import_upstream(
    checkpoint: PathLike | Mapping[str, Any],
    data_properties_json: PathLike | Mapping[str, Any] | None,
    normalization_json: PathLike | Mapping[str, Any] | None = None,
    test_config: PathLike | Mapping[str, Any] | None = None,
    *,
    grid: Sequence[float] | None = None,
    pixel: Sequence[float] | None = None,
    anisotropy: float | None = None,
    norm: str | None = None,
    data_type: str | None = None,
    seed_thresh: float | None = None,
    fg_thresh: float | None = None,
    min_object_size: int | None = None,
    _source: Path | None = None,
) -> tuple[dict[str, torch.Tensor], Contract]:
    """(state dict, Contract) for an upstream EmbedSeg checkpoint and its JSON files.

    Precedence for every value: explicit option > test config (upstream's create_test_configs_dict values)
    > data_properties / normalization.json > upstream defaults. ``grid`` and ``pixel`` are upstream's
    ``(n_z,) n_y, n_x`` and ``(l_z,) l_y, l_x`` in array order; by default ``l_y = l_x = 1`` and
    ``l_z = (n_z - 1)/(n_x - 1) * anisotropy``, so the z spacing is ``anisotropy / (n_x - 1)``.
    ``norm`` and ``data_type`` stand for normalization.json's keys.

    What changes the meaning of the network's output has no silent default: a missing grid (``n_y, n_x``,
    in 3D ``n_z``; the grid sets the pixel spacing sigma was learned in, and upstream's fallback of 1024
    is 4x off for a 256 grid), 3D anisotropy, or normalisation is a CheckpointError that names the key,
    the file and the ``embedseg-train import-upstream`` option giving it. Defaults that are taken
    (thresholds, min_object_size) are listed in ``provenance["notes"]``.
    """
    source = _source
    if isinstance(checkpoint, Mapping):
        ckpt = dict(checkpoint)
        if not _is_state_dict(ckpt.get("model_state_dict")):
            raise CheckpointError("upstream checkpoint has no model_state_dict")
        ckpt["model_state_dict"] = _strip_module_prefix(ckpt["model_state_dict"])
    else:
        source = Path(checkpoint)
        ckpt = load_checkpoint(source)
        if checkpoint_layout(ckpt) == "ours":
            raise CheckpointError(f"{source}: already an embedseg-deploy checkpoint (it has a contract)")
    state = ckpt["model_state_dict"]
    where = f"{source}: " if source else ""
    try:
        arch = upstream_architecture(state)
    except CheckpointError as exc:
        raise CheckpointError(where + str(exc)) from None
    ndim = arch.pop("ndim")
    props = _read_json(data_properties_json, "data_properties.json")
    norm_json = _read_json(normalization_json, "normalization.json")
    cfg = _read_json(test_config, "test config")
    notes: list[str] = []

    props_name = _json_name(data_properties_json, "data_properties.json")

    # upstream coordinate grid: (n_z,) n_y, n_x
    keys = ["n_z", "n_y", "n_x"][3 - ndim :]
    example = ",".join(["32", "256", "256"][3 - ndim :])
    if grid is None:
        grid = [_first(cfg.get(k), props.get(k)) for k in keys]
        missing = [k for k, g in zip(keys, grid, strict=True) if g is None]
        if missing:
            raise CheckpointError(
                f"{props_name}: no {', '.join(missing)}: upstream's coordinate grid, which sets the pixel "
                f"spacing this {ndim}D model learned in; add {'it' if len(missing) == 1 else 'them'} "
                f"there, or give --grid {','.join(keys).upper()} (e.g. --grid {example}) to {CONVERT}"
            )
    elif len(grid) != ndim:
        raise CheckpointError(
            f"{where}--grid gives {len(grid)} size(s), but this {ndim}D model needs {ndim}: "
            f"{','.join(keys)} in array order, e.g. --grid {example}"
        )
    sizes = [_positive(g) for g in grid]
    if any(g is None or g < 2 for g in sizes):
        raise CheckpointError(
            f"{where}upstream grid {','.join(keys)} = {list(grid)}: each size must be a number >= 2 "
            f"(from {props_name} or --grid)"
        )
    grid = sizes
    l_keys = ["l_z", "l_y", "l_x"][3 - ndim :]
    if pixel is not None and len(pixel) != ndim:
        raise CheckpointError(
            f"{where}--pixel gives {len(pixel)} value(s), but this {ndim}D model needs {ndim}: "
            f"{','.join(l_keys)} in array order"
        )
    pixel = list(pixel) if pixel is not None else [cfg.get(k) for k in l_keys]

    # anisotropy (z / x voxel size): sets the z spacing, l_z = (n_z - 1) / (n_x - 1) * anisotropy
    aniso = 1.0
    pixel_size = None
    if ndim == 3:
        psz = [_positive(props.get(f"pixel_size_{a}_microns")) for a in "zyx"]
        pixel_size = psz if all(psz) else None
        from_props = pixel_size[0] / pixel_size[2] if pixel_size else None
        from_l_z = pixel[0] * (grid[2] - 1.0) / (grid[0] - 1.0) if _positive(pixel[0]) else None
        aniso = _first(anisotropy, cfg.get("anisotropy_factor"), from_props, from_l_z)
        if _positive(aniso) is None:
            found = "" if aniso is None else f" (got {aniso!r})"
            raise CheckpointError(
                f"{props_name}: no pixel_size_z_microns and pixel_size_x_microns{found}: the z/x "
                f"anisotropy, which sets this 3D model's z spacing; add them there, or give "
                f"--anisotropy Z_OVER_X to {CONVERT}"
            )
        aniso = float(aniso)
        if pixel[0] is None:
            pixel[0] = (grid[0] - 1.0) / (grid[2] - 1.0) * aniso
    pixel = [1.0 if p is None else float(p) for p in pixel]  # upstream's l_y = l_x = 1
    spacing = spacing_from_upstream_grid(ndim, grid, pixel)

    # normalisation (normalization.json: norm, data_type)
    norm_kind = _first(norm, cfg.get("norm"), norm_json.get("norm"))
    if norm_kind is None:
        what = "upstream's norm, how images were normalised in training"
        choices = "|".join(UPSTREAM_NORMS)
        if normalization_json is None:
            raise CheckpointError(
                f"{where}no normalization.json given or found beside the checkpoint ({what}); give "
                f"--normalization FILE or --norm {choices} to {CONVERT}"
            )
        raise CheckpointError(
            f"{_json_name(normalization_json, 'normalization.json')}: no 'norm' key ({what}); add it "
            f"there, or give --norm {choices} to {CONVERT}"
        )
    data_type = _first(data_type, cfg.get("data_type"), norm_json.get("data_type"), props.get("data_type"))
    try:
        normalization = upstream_normalization(norm_kind, data_type)
    except CheckpointError as exc:
        raise CheckpointError(where + str(exc)) from None

    mos = _first(min_object_size, cfg.get("min_object_size"), props.get("min_object_size"))
    if mos is None:
        mos = Thresholds().min_object_size
        notes.append(f"min_object_size not in {props_name}: {mos} taken")
    seed = _first(seed_thresh, cfg.get("seed_thresh"))
    fg = _first(fg_thresh, cfg.get("fg_thresh"))
    if seed is None or fg is None:
        seed, fg = _first(seed, 0.9), _first(fg, 0.5)
        notes.append(
            f"seed_thresh {seed}, fg_thresh {fg}: upstream's defaults taken (no test config gives them; "
            "embedseg-run --seed-thresh/--fg-thresh change them at run time)"
        )
    thresholds = Thresholds(
        seed_thresh=float(seed),
        fg_thresh=float(fg),
        min_object_size=int(mos),
        min_mask_sum=int(cfg.get("min_mask_sum", 0)),
        min_unclustered_sum=int(cfg.get("min_unclustered_sum", 0)),
    )
    provenance = {
        "source": "upstream EmbedSeg",
        "source_file": source.name if source else None,
        "source_sha256": sha256_file(source) if source else None,
        "upstream_epoch": ckpt.get("epoch"),
        "upstream_best_iou": ckpt.get("best_iou"),
        "upstream_grid": grid,
        "upstream_pixel": pixel,
        "imported_by": f"embedseg_training {__version__}",
        "versions": package_versions(),
        "notes": notes,
    }
    try:
        contract = Contract(
            ndim=ndim,
            in_channels=arch["input_channels"],
            spacing=spacing,
            normalization=normalization,
            thresholds=thresholds,
            anisotropy=aniso,
            pixel_size=pixel_size,
            padding="center" if ndim == 2 else "end",
            architecture=arch,
            data_properties=props,
            provenance=provenance,
        )
    except ContractError as exc:
        raise CheckpointError(f"{where}cannot build a contract: {exc}") from None
    return state, contract


def upstream_log_rows(logger_data: Any) -> list[dict[str, Any]]:
    """Upstream's ``logger_data`` ({'train': [...], 'val': [...], 'iou': [...]}) as our log rows."""
    if not isinstance(logger_data, Mapping):
        return []
    train, val, iou = (list(logger_data.get(k) or []) for k in ("train", "val", "iou"))
    n = max(len(train), len(val), len(iou))
    pick = lambda xs, i: float(xs[i]) if i < len(xs) else None  # noqa: E731
    return [
        {"epoch": i, "train_loss": pick(train, i), "val_loss": pick(val, i), "val_iou": pick(iou, i)}
        for i in range(n)
    ]


def convert_upstream(
    checkpoint: PathLike,
    out: PathLike,
    data_properties_json: PathLike | None = None,
    normalization_json: PathLike | None = None,
    test_config: PathLike | None = None,
    *,
    force: bool = False,
    **options: Any,
) -> Contract:
    """Convert an upstream checkpoint (+ its JSON files, by default from its folder) into our checkpoint
    file ``out``; the weights are checked against the network before anything is written, and an
    existing ``out`` is only replaced with ``force`` (as ``embedseg-export`` does)."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and not force:
        raise CheckpointError(f"{out} exists; pass --force to overwrite it")
    found = upstream_json_files(checkpoint.parent)
    data_properties_json = data_properties_json or found["data_properties_json"]
    if data_properties_json is None:
        raise CheckpointError(
            f"{checkpoint}: no data_properties.json given or found beside it (give --data-properties FILE)"
        )
    normalization_json = normalization_json or found["normalization_json"]
    test_config = test_config or found["test_config"]
    ckpt = load_checkpoint(checkpoint)
    if checkpoint_layout(ckpt) == "ours":
        raise CheckpointError(f"{checkpoint}: already an embedseg-deploy checkpoint (it has a contract)")
    state, contract = import_upstream(
        ckpt, data_properties_json, normalization_json, test_config, **options, _source=checkpoint
    )
    model_from_state_dict(state, contract, checkpoint)  # weights that do not fit fail before writing
    save_checkpoint(
        out,
        state,
        contract,
        epoch=ckpt.get("epoch"),
        best_iou=ckpt.get("best_iou"),
        log=upstream_log_rows(ckpt.get("logger_data")),
    )
    return contract
