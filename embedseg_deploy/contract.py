"""The model contract: everything the runtime needs to know about a model, in one JSON document.

The same document travels in every checkpoint (``"contract"`` key), in the ONNX ``metadata_props``
(key :data:`METADATA_KEY`) and beside every TensorRT engine (``model.engine.json``), so that
``embedseg-run predict model.onnx image.tif`` needs no other file.

Axis conventions (one rule, no exceptions):

* Every spatial vector (``spacing``, ``pixel_size``, tile sizes, halos) is in **array order**:
  ``(y, x)`` in 2D, ``(z, y, x)`` in 3D.
* The network's output channels follow upstream EmbedSeg: offsets ``x, y[, z]``, then sigmas
  ``x, y[, z]``, then the seed logit. Embedding dimension ``d`` (0 = x) pairs with array axis
  ``ndim - 1 - d``; :func:`axis_of_dim` is the one place that says so.

Coordinates: the embedding of pixel ``p`` is ``tanh(offset_p) + p * spacing`` with ``p`` the pixel's
global index in the whole image. Upstream checkpoints keep their meaning with
``spacing = pixel / (grid - 1)`` (see :func:`spacing_from_upstream_grid`).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT = 1
METADATA_KEY = "embedseg_contract"
TILE_MULTIPLE = 8

NORMALIZATION_KINDS = ("percentile", "absolute", "mean-std", "none")
# Where the reflect padding that rounds an image up to ``tile_multiple`` goes: split around the image
# ("center", upstream 2D) or after it ("end", upstream 3D). The network is not shift-equivariant at
# stride 8, so the runtime keeps the placement the model was validated with.
PADDING_PLACEMENTS = ("center", "end")


class ContractError(ValueError):
    """A model contract is missing, malformed or inconsistent."""


def axis_of_dim(d: int, ndim: int) -> int:
    """Array axis that embedding dimension ``d`` (0 = x, 1 = y, 2 = z) runs along."""
    return ndim - 1 - d


def channel_names(ndim: int) -> list[str]:
    """Names of the raw network output channels, in upstream's order."""
    dims = "xyz"[:ndim]
    return [f"offset_{a}" for a in dims] + [f"sigma_{a}" for a in dims] + ["seed"]


def spacing_from_upstream_grid(
    ndim: int, grid: Sequence[float], pixel: Sequence[float] | None = None
) -> list[float]:
    """Embedding units per pixel that reproduce an upstream EmbedSeg coordinate grid.

    ``grid`` and ``pixel`` are upstream's ``(n_z,) n_y, n_x`` and ``(l_z,) l_y, l_x`` in array order;
    upstream builds ``linspace(0, l, n)`` so one pixel is ``l / (n - 1)`` units.
    """
    if len(grid) != ndim:
        raise ContractError(f"grid needs {ndim} sizes, got {list(grid)}")
    pixel = [1.0] * ndim if pixel is None else list(pixel)
    return [float(l) / (float(n) - 1.0) for n, l in zip(grid, pixel, strict=True)]


@dataclass
class Normalization:
    """How an image is scaled before it enters the network (embedseg_deploy.normalize applies it)."""

    kind: str = "percentile"
    pmin: float = 1.0
    pmax: float = 99.8
    divisor: float | None = None
    per_channel: bool = True
    clip: bool = False

    def __post_init__(self) -> None:
        if self.kind not in NORMALIZATION_KINDS:
            raise ContractError(f"normalization kind must be one of {NORMALIZATION_KINDS}, got {self.kind!r}")
        if self.kind == "absolute" and not (self.divisor and self.divisor > 0):
            raise ContractError("absolute normalization needs a positive divisor (255, 65535, ...)")
        if self.kind == "percentile" and not (0 <= self.pmin < self.pmax <= 100):
            raise ContractError(f"percentiles need 0 <= pmin < pmax <= 100, got {self.pmin}, {self.pmax}")


@dataclass
class Thresholds:
    """Default clustering parameters (upstream names and meanings)."""

    seed_thresh: float = 0.9
    fg_thresh: float = 0.5
    min_object_size: int = 36
    min_mask_sum: int = 0
    min_unclustered_sum: int = 0


@dataclass
class Contract:
    """The model contract (``format`` 1). See the module docstring for axis conventions."""

    ndim: int
    in_channels: int = 1
    spacing: list[float] = field(default_factory=list)
    normalization: Normalization = field(default_factory=Normalization)
    thresholds: Thresholds = field(default_factory=Thresholds)
    anisotropy: float = 1.0
    pixel_size: list[float] | None = None
    tile_multiple: int = TILE_MULTIPLE
    padding: str = "center"
    tile: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    architecture: dict[str, Any] = field(default_factory=dict)
    data_properties: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT

    def __post_init__(self) -> None:
        if self.ndim not in (2, 3):
            raise ContractError(f"ndim must be 2 or 3, got {self.ndim}")
        if self.in_channels < 1:
            raise ContractError(f"in_channels must be >= 1, got {self.in_channels}")
        if len(self.spacing) != self.ndim or not all(math.isfinite(s) and s > 0 for s in self.spacing):
            raise ContractError(f"spacing needs {self.ndim} positive numbers (array order): {self.spacing}")
        self.spacing = [float(s) for s in self.spacing]
        if self.pixel_size is not None and len(self.pixel_size) != self.ndim:
            raise ContractError(f"pixel_size needs {self.ndim} numbers (array order), got {self.pixel_size}")
        if self.padding not in PADDING_PLACEMENTS:
            raise ContractError(f"padding must be one of {PADDING_PLACEMENTS}, got {self.padding!r}")
        if self.tile_multiple < 1:
            raise ContractError("tile_multiple must be positive")
        if not self.tile:
            self.tile = default_tiles(self.ndim)
        for device, entry in self.tile.items():
            for key in ("size", "halo"):
                values = entry.get(key)
                if values is None or len(values) != self.ndim:
                    raise ContractError(f"tile[{device!r}][{key!r}] needs {self.ndim} sizes, got {values}")
            if any(s % self.tile_multiple for s in entry["size"]):
                raise ContractError(
                    f"tile[{device!r}]['size'] {entry['size']} must be multiples of {self.tile_multiple}"
                )
        if not self.architecture:
            self.architecture = default_architecture(self.ndim, self.in_channels)

    @property
    def n_sigma(self) -> int:
        return self.ndim

    @property
    def out_channels(self) -> int:
        return 2 * self.ndim + 1

    @property
    def channels(self) -> list[str]:
        return channel_names(self.ndim)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["n_sigma"] = self.n_sigma
        d["channels"] = self.channels
        return {"format": d.pop("format"), **d}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Contract:
        if not isinstance(data, Mapping):
            raise ContractError(f"a contract is a JSON object, got {type(data).__name__}")
        data = copy.deepcopy(dict(data))
        fmt = data.pop("format", None)
        if fmt != FORMAT:
            raise ContractError(f"unsupported contract format {fmt!r} (this version reads format {FORMAT})")
        data.pop("n_sigma", None)
        channels = data.pop("channels", None)
        try:
            data["normalization"] = Normalization(**data.get("normalization", {}))
            data["thresholds"] = Thresholds(**data.get("thresholds", {}))
            contract = cls(**data)
        except TypeError as exc:  # unknown or missing keys
            raise ContractError(f"malformed contract: {exc}") from None
        if channels is not None and channels != contract.channels:
            raise ContractError(f"contract channels {channels} do not match ndim {contract.ndim}")
        return contract

    @classmethod
    def from_json(cls, text: str | bytes) -> Contract:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ContractError(f"contract is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def recommended_tile(self, device: str = "cpu") -> tuple[list[int], list[int]]:
        """(tile size, halo) in array order for ``device`` ('cpu' or 'gpu')."""
        entry = self.tile.get(device) or self.tile.get("cpu") or default_tiles(self.ndim)["cpu"]
        return list(entry["size"]), list(entry["halo"])


def describe_contract(c: Contract) -> list[str]:
    """The contract in words, one ``label  text`` line each (``embedseg-run info``)."""
    axes = "zyx"[-c.ndim :]
    n = c.normalization
    if n.kind == "percentile":
        norm = f"percentiles {n.pmin:g}-{n.pmax:g} of the image mapped to 0-1{', clipped' if n.clip else ''}"
    elif n.kind == "absolute":
        norm = f"divided by {n.divisor:g}"
    elif n.kind == "mean-std":
        norm = "mean 0, standard deviation 1"
    else:
        norm = "none"
    if n.kind != "none":
        norm += ", per channel" if n.per_channel and c.in_channels > 1 else ""
    per_unit = [f"{1 / s:.6g}" for s in c.spacing]
    spacing = (
        f"{' x '.join(f'{s:.6g}' for s in c.spacing)} embedding units per pixel ({', '.join(axes)}): an "
        f"embedding unit spans {' x '.join(per_unit)} pixels; the learned sigmas are in these units, so "
        "images must keep the training pixel size"
    )
    if c.pixel_size:
        px = f"{' x '.join(f'{p:g}' for p in c.pixel_size)} µm ({', '.join(axes[-len(c.pixel_size) :])})"
    else:
        px = "not recorded (input pixel sizes are not checked against the training data)"
    t = c.thresholds
    tiles = "; ".join(
        f"{dev} {'x'.join(map(str, e['size']))} (halo {'x'.join(map(str, e['halo']))})"
        for dev, e in c.tile.items()
    )
    arch = c.architecture.get("name", "?")
    return [
        f"network     {arch} {c.ndim}D, {c.in_channels} input channel(s), outputs {', '.join(c.channels)}",
        f"normalise   {norm}",
        f"spacing     {spacing}",
        f"pixel size  {px}" + (f", anisotropy (z/x) {c.anisotropy:g}" if c.ndim == 3 else ""),
        f"padding     reflect to multiples of {c.tile_multiple}, "
        + (
            "split before and after (upstream 2D)"
            if c.padding == "center"
            else "after the image (upstream 3D)"
        ),
        f"clustering  seed_thresh {t.seed_thresh:g}, fg_thresh {t.fg_thresh:g}, min_object_size "
        f"{t.min_object_size}, min_mask_sum {t.min_mask_sum}, min_unclustered_sum {t.min_unclustered_sum}",
        f"tiles       {tiles}",
    ]


def default_architecture(ndim: int, in_channels: int = 1) -> dict[str, Any]:
    return {
        "name": "BranchedERFNet" if ndim == 2 else "BranchedERFNet_3d",
        "num_classes": [2 * ndim, 1],
        "input_channels": in_channels,
    }


def default_tiles(ndim: int) -> dict[str, dict[str, list[int]]]:
    """Tile and halo per device, in array order.

    Tiles are large on purpose: BranchedERFNet's output moves up to ~231 px away from an input change,
    so tiled prediction equals whole-image prediction only with a halo of 240 px, and whole-image
    prediction is also the fastest on CPU (1024^2: 2.9 s whole vs 11 s in 512^2 tiles with a 32 px halo,
    benchmarks). The halo used once an image exceeds the tile (64 px) matched every object of a
    1024^2 whole-image prediction at IoU 0.5 on the upstream 2D fixture model; 32 px lost some.
    """
    if ndim == 2:
        return {
            "cpu": {"size": [2048, 2048], "halo": [64, 64]},
            "gpu": {"size": [2048, 2048], "halo": [64, 64]},
        }
    return {
        "cpu": {"size": [64, 512, 512], "halo": [16, 64, 64]},
        "gpu": {"size": [64, 256, 256], "halo": [16, 64, 64]},
    }


PIXEL_SIZE_TOLERANCE = 0.05


def check_pixel_size(image_px: Sequence[float] | None, contract: Contract, where: str = "") -> str | None:
    """A warning text when the image's pixel size differs from the model's by more than 5 %."""
    model_px = contract.pixel_size
    if image_px is None or model_px is None:
        return None
    n = min(len(image_px), len(model_px))
    pairs = list(zip(image_px[-n:], model_px[-n:], strict=True))
    if all(abs(a - b) <= PIXEL_SIZE_TOLERANCE * b for a, b in pairs):
        return None
    shown = ", ".join(f"{a:.4g}" for a in image_px[-n:])
    model = ", ".join(f"{b:.4g}" for b in model_px[-n:])
    return (
        f"{where}pixel size ({shown}) µm differs from the model's ({model}) µm by more than "
        f"{PIXEL_SIZE_TOLERANCE:.0%}; rescale the image for best results"
    )
