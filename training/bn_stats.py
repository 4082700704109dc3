"""BatchNorm statistics of whole images: the running averages a network keeps from training crops do not
describe the whole images (or large tiles) it segments.

Measured on synthetic nuclei (benchmarks/results/train_seeds_synthetic.md): a model whose whole images
collapsed (background seeds with near-zero sigma, one label per image, AP@0.5 0.00) while its 40 px crops
scored well kept AP 0.00 with statistics re-estimated exactly from training crops, and reached 0.64 with
statistics estimated on the whole training images. Training itself is unchanged: in train mode the layers
use batch statistics; only the running averages, which eval mode and every exported model use, are
replaced.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from embedseg_deploy.contract import TILE_MULTIPLE, Normalization
from embedseg_deploy.normalize import normalize
from embedseg_deploy.tiling import pad_reflect, pad_widths

from .data import Sample

MAX_EDGE = 512  # per axis: a larger image contributes its central window (memory stays bounded)


def _window(image: np.ndarray, multiple: int, placement: str, max_edge: int) -> np.ndarray:
    """The central window of ``image`` (C, *spatial), at most ``max_edge`` per axis, padded to a multiple
    of ``multiple`` as the runtime pads it."""
    spatial = image.shape[1:]
    cut = [min(n, max_edge) for n in spatial]
    starts = [(n - c) // 2 for n, c in zip(spatial, cut, strict=True)]
    image = image[(slice(None), *(slice(s, s + c) for s, c in zip(starts, cut, strict=True)))]
    return pad_reflect(image, pad_widths(cut, multiple, placement))


def whole_image_bn_stats(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    norm: Normalization,
    device: torch.device | str = "cpu",
    multiple: int = TILE_MULTIPLE,
    placement: str = "center",
    max_edge: int = MAX_EDGE,
) -> None:
    """Replace the running mean and variance of every BatchNorm layer of ``model`` by their average over
    ``samples``, each normalised and padded (``placement``) as the runtime does it and passed whole (dropout
    off, no gradient).
    The model's train/eval mode is restored."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not layers or not samples:
        return
    was_training = model.training
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the images
        m.train()
    try:
        with torch.no_grad():
            for s in samples:
                x = _window(normalize(s.image, norm, channel_axis=0), multiple, placement, max_edge)
                model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None].to(device))
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
