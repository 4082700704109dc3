"""BranchedERFNet (Romera et al. 2017, as used by EmbedSeg) for 2D and 3D in one implementation.

Topology, module names and parameter names follow upstream EmbedSeg 0.2.5 (``BranchedERFNet`` /
``BranchedERFNet_3d``) so that upstream state dicts load with ``strict=True`` and no key mapping:
``encoder.initial_block``, ``encoder.layers.N``, ``encoder.output_conv`` (unused in the forward pass,
kept for the keys), ``decoders.B.layers.N``, ``decoders.B.output_conv``. The factorised convolutions are
named after their kernel shape (``conv3x1_1`` in 2D, ``conv1x3x1_2`` in 3D). The output is the raw network
output, N x C x spatial: offsets x, y[, z], sigmas x, y[, z], seed logit (see embedseg_deploy.contract).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

BN_EPS = 1e-3
TILE_MULTIPLE = 8  # three stride-2 downsamplers


def _ops(ndim: int) -> dict[str, type[nn.Module]]:
    if ndim == 2:
        return {"conv": nn.Conv2d, "tconv": nn.ConvTranspose2d, "bn": nn.BatchNorm2d,
                "pool": nn.MaxPool2d, "drop": nn.Dropout2d}  # fmt: skip
    if ndim == 3:
        return {"conv": nn.Conv3d, "tconv": nn.ConvTranspose3d, "bn": nn.BatchNorm3d,
                "pool": nn.MaxPool3d, "drop": nn.Dropout3d}  # fmt: skip
    raise ValueError(f"ndim must be 2 or 3, got {ndim}")


class DownsamplerBlock(nn.Module):
    """Stride-2 conv producing ``out - in`` channels, concatenated with a 2x max-pool of the input."""

    def __init__(self, ndim: int, n_in: int, n_out: int):
        super().__init__()
        ops = _ops(ndim)
        self.conv = ops["conv"](n_in, n_out - n_in, 3, stride=2, padding=1, bias=True)
        self.pool = ops["pool"](2, stride=2)
        self.bn = ops["bn"](n_out, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(torch.cat([self.conv(x), self.pool(x)], 1)))


class UpsamplerBlock(nn.Module):
    """Transposed 3-conv, stride 2 (doubles every spatial size), BN, ReLU."""

    def __init__(self, ndim: int, n_in: int, n_out: int):
        super().__init__()
        ops = _ops(ndim)
        self.conv = ops["tconv"](n_in, n_out, 3, stride=2, padding=1, output_padding=1, bias=True)
        self.bn = ops["bn"](n_out, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def _axis_conv_name(ndim: int, axis: int, stage: int) -> str:
    return "conv" + "x".join("3" if a == axis else "1" for a in range(ndim)) + f"_{stage}"


class NonBottleneck1d(nn.Module):
    """ERFNet's factorised residual block: one 3-tap conv per axis, twice (the second time dilated).

    Stage 1: conv per axis with ReLU between, BN, ReLU. Stage 2: dilated conv per axis with ReLU between,
    BN, dropout; then ReLU(out + input). Upstream names this ``non_bottleneck_1d``.
    """

    def __init__(self, ndim: int, channels: int, dropout: float, dilation: int):
        super().__init__()
        ops = _ops(ndim)
        self.ndim = ndim
        for stage, dil in ((1, 1), (2, dilation)):
            for axis in range(ndim):
                kernel = tuple(3 if a == axis else 1 for a in range(ndim))
                pad = tuple(dil if a == axis else 0 for a in range(ndim))
                dils = tuple(dil if a == axis else 1 for a in range(ndim))
                conv = ops["conv"](
                    channels, channels, kernel, stride=1, padding=pad, dilation=dils, bias=True
                )
                self.add_module(_axis_conv_name(ndim, axis, stage), conv)
            self.add_module(f"bn{stage}", ops["bn"](channels, eps=BN_EPS))
        self.dropout = ops["drop"](dropout) if dropout > 0 else None

    def _stage(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        for axis in range(self.ndim):
            if axis:
                x = torch.relu(x)
            x = getattr(self, _axis_conv_name(self.ndim, axis, stage))(x)
        return getattr(self, f"bn{stage}")(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._stage(torch.relu(self._stage(x, 1)), 2)
        if self.dropout is not None:
            out = self.dropout(out)
        return torch.relu(out + x)


class Encoder(nn.Module):
    def __init__(self, ndim: int, in_channels: int, num_classes: int):
        super().__init__()
        self.initial_block = DownsamplerBlock(ndim, in_channels, 16)
        layers: list[nn.Module] = [DownsamplerBlock(ndim, 16, 64)]
        layers += [NonBottleneck1d(ndim, 64, 0.03, 1) for _ in range(5)]
        layers.append(DownsamplerBlock(ndim, 64, 128))
        for _ in range(2):
            layers += [NonBottleneck1d(ndim, 128, 0.3, d) for d in (2, 4, 8, 16)]
        self.layers = nn.ModuleList(layers)
        # Unused in the forward pass (upstream's `only_encode` head); kept so upstream keys load strictly.
        self.output_conv = _ops(ndim)["conv"](128, num_classes, 1, stride=1, padding=0, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.initial_block(x)
        for layer in self.layers:
            x = layer(x)
        return x


class Decoder(nn.Module):
    def __init__(self, ndim: int, num_classes: int):
        super().__init__()
        self.layers = nn.ModuleList(
            [
                UpsamplerBlock(ndim, 128, 64),
                NonBottleneck1d(ndim, 64, 0, 1),
                NonBottleneck1d(ndim, 64, 0, 1),
                UpsamplerBlock(ndim, 64, 16),
                NonBottleneck1d(ndim, 16, 0, 1),
                NonBottleneck1d(ndim, 16, 0, 1),
            ]
        )
        self.output_conv = _ops(ndim)["tconv"](
            16, num_classes, 2, stride=2, padding=0, output_padding=0, bias=True
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.output_conv(x)


class BranchedERFNet(nn.Module):
    """Shared ERFNet encoder, one decoder per entry of ``num_classes``; outputs concatenated on channels.

    Input N x C_in x spatial with every spatial size a multiple of 8; output N x sum(num_classes) x spatial.
    """

    def __init__(self, ndim: int = 2, in_channels: int = 1, num_classes: Sequence[int] | None = None):
        super().__init__()
        _ops(ndim)  # validates ndim
        self.ndim = ndim
        self.in_channels = in_channels
        self.num_classes = list(num_classes) if num_classes is not None else [2 * ndim, 1]
        self.encoder = Encoder(ndim, in_channels, sum(self.num_classes))
        self.decoders = nn.ModuleList([Decoder(ndim, n) for n in self.num_classes])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.ndim + 2:
            raise ValueError(f"expected an N x C x {self.ndim}D input, got shape {tuple(x.shape)}")
        bad = [s for s in x.shape[2:] if s % TILE_MULTIPLE]
        if bad:
            raise ValueError(f"spatial sizes must be multiples of {TILE_MULTIPLE}, got {tuple(x.shape[2:])}")
        features = self.encoder(x)
        return torch.cat([decoder(features) for decoder in self.decoders], 1)

    def init_output(self, n_sigma: int | None = None) -> None:
        """Upstream's output initialisation: offset and sigma weights 0, offset bias 0, sigma bias 1.

        Acts on the first decoder's output conv; offsets are its first ``ndim`` channels, sigmas the next
        ``n_sigma``. With sigma bias 1 the initial bandwidth is exp(10) in embedding units^-2.
        """
        n_sigma = self.ndim if n_sigma is None else n_sigma
        conv = self.decoders[0].output_conv
        n_off = self.ndim
        with torch.no_grad():
            conv.weight[:, : n_off + n_sigma].zero_()  # transposed conv: weight is in x out x k...
            conv.bias[:n_off].zero_()
            conv.bias[n_off : n_off + n_sigma].fill_(1.0)


def build_model(contract_or_arch: Any) -> BranchedERFNet:
    """A fresh BranchedERFNet for a Contract (its ``architecture``/``ndim``) or an architecture mapping.

    An architecture mapping has ``name`` (``BranchedERFNet`` or ``BranchedERFNet_3d``, or ``ndim``),
    ``num_classes`` and ``input_channels``.
    """
    arch: Mapping[str, Any]
    if isinstance(contract_or_arch, Mapping):
        arch = contract_or_arch
        ndim = arch.get("ndim")
    else:  # a Contract
        arch = contract_or_arch.architecture or {}
        ndim = contract_or_arch.ndim
    name = arch.get("name")
    if ndim is None:
        ndim = {"BranchedERFNet": 2, "BranchedERFNet_3d": 3}.get(name)
        if ndim is None:
            raise ValueError(f"architecture {dict(arch)} names no known network and no ndim")
    elif name not in (None, "BranchedERFNet", "BranchedERFNet_3d"):
        raise ValueError(f"unknown network {name!r} (this package builds BranchedERFNet / BranchedERFNet_3d)")
    in_channels = int(arch.get("input_channels", arch.get("in_channels", 1)))
    num_classes = arch.get("num_classes") or [2 * ndim, 1]
    return BranchedERFNet(int(ndim), in_channels, [int(n) for n in num_classes])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
