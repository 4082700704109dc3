"""Test models for the runtime tests (H7): a toy ONNX network built with onnx.helper, exported
BranchedERFNets of the upstream fixture checkpoints, synthetic images, and small shared helpers.

The toy network is one convolution whose output is a valid EmbedSeg raw output: zero offsets (so every
pixel embeds at its own coordinate), a constant sigma giving a proposal radius of about ``radius`` pixels,
and a seed logit that is a steep function of the 3x3(x3) local mean of the normalised image. It is local
(reach 1 pixel), fast, and segments bright blobs into roughly round objects, which is all the CLI, resume,
bad-input and big-image tests need. The exported ERFNets (upstream fixture checkpoints through the
project's exporter) are the real thing, for the upstream parity and tiled == whole-image tests.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np

from embedseg_deploy.contract import METADATA_KEY, Contract, Normalization, Thresholds


def toy_contract(ndim: int, in_channels: int = 1, **overrides) -> Contract:
    spacing = [1 / 1023] * ndim
    data = dict(
        ndim=ndim,
        in_channels=in_channels,
        spacing=spacing,
        normalization=Normalization("percentile", 1.0, 99.8),
        thresholds=Thresholds(seed_thresh=0.9, fg_thresh=0.5, min_object_size=4),
        padding="center" if ndim == 2 else "end",
        tile={
            "cpu": {"size": [64] * ndim, "halo": [8] * ndim},
            "gpu": {"size": [128] * ndim, "halo": [8] * ndim},
        },
        provenance={"test_model": "toy"},
    )
    data.update(overrides)
    return Contract(**data)


def toy_onnx(
    path: Path,
    ndim: int,
    in_channels: int = 1,
    radius: float = 10.0,
    contract: Contract | None = None,
    static_shape: tuple[int, ...] | None = None,
) -> Path:
    """Write the toy network as ONNX (opset 17) with ``contract`` in its metadata; returns ``path``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    contract = contract or toy_contract(ndim, in_channels)
    out_ch = 2 * ndim + 1
    k = (3,) * ndim
    weight = np.zeros((out_ch, in_channels, *k), np.float32)
    weight[-1] = 24.0 / (in_channels * 3**ndim)  # seed logit: 24 * local mean - 12
    bias = np.zeros(out_ch, np.float32)
    d = radius * contract.spacing[-1]
    bias[ndim : 2 * ndim] = math.log(math.log(2) / d**2) / 10  # exp(10 s) d^2 = ln 2 at ``radius`` px
    bias[-1] = -12.0
    spatial = list(static_shape) if static_shape else [f"s{i}" for i in range(ndim)]
    batch = 1 if static_shape else "N"
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, in_channels, *spatial])
    y = helper.make_tensor_value_info("raw", TensorProto.FLOAT, [batch, out_ch, *spatial])
    conv = helper.make_node("Conv", ["input", "W", "B"], ["raw"], pads=[1] * (2 * ndim), kernel_shape=list(k))
    graph = helper.make_graph(
        [conv],
        "toy",
        [x],
        [y],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {METADATA_KEY: contract.to_json()})
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def blobs(shape: tuple[int, ...], n: int, radius: float = 4.0, seed: int = 0, gap: float = 12.0,
          dtype=np.uint16) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """An image of up to ``n`` bright balls (radius px, edges ``gap`` px apart) on a noisy background, and
    its labels. With the toy network's proposal radius (10 px) below ``gap``, each ball is one object."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float32)
    labels = np.zeros(shape, np.int32)
    centres: list[np.ndarray] = []
    tries = 0
    while len(centres) < n and tries < 10000:
        tries += 1
        c = np.array(
            [rng.uniform(radius + 1, s - radius - 2) if s > 2 * radius + 3 else s / 2 for s in shape]
        )
        if all(np.linalg.norm(c - o) > 2 * radius + gap for o in centres):
            centres.append(c)
    for i, c in enumerate(centres, 1):
        dist2 = sum((g - ci) ** 2 for g, ci in zip(grid, c, strict=True))
        labels[dist2 <= radius**2] = i
    image = 100 + 1000 * (labels > 0) + rng.normal(0, 20, shape)
    return np.clip(image, 0, None).astype(dtype), labels


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label images are equal up to renumbering (0 stays background)."""
    if a.shape != b.shape or not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[a > 0]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def export_erfnet(case: Path, path: Path) -> Path:
    """Export the upstream fixture checkpoint of ``case`` with the project's exporter (H2's upstream import:
    grid spacing, padding placement, normalisation and thresholds in the contract)."""
    from embedseg_exporters.onnx_export import export_checkpoint

    export_checkpoint(case / "checkpoint.pth", path, force=True, verify=False)
    return path


def models_dir(tmp_path_factory) -> Path:
    """One folder per test session for the models below, shared by every runtime test module."""
    path = tmp_path_factory.getbasetemp() / "runtime-models"
    path.mkdir(exist_ok=True)
    return path


def toy_model(tmp_path_factory, ndim: int, in_channels: int = 1, name: str | None = None, **kwargs) -> Path:
    """The toy network as ONNX, written once per session."""
    path = models_dir(tmp_path_factory) / (name or f"toy{ndim}d-c{in_channels}.onnx")
    return path if path.exists() else toy_onnx(path, ndim, in_channels, **kwargs)


def erfnet_model(tmp_path_factory, case: Path) -> Path:
    """The upstream fixture checkpoint of ``case`` exported to ONNX, once per session."""
    path = models_dir(tmp_path_factory) / f"upstream-{case.name}.onnx"
    return path if path.exists() else export_erfnet(case, path)
