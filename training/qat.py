"""Quantization-aware fine-tuning: a few epochs with int8 activation rounding simulated in the forward pass.

Where post-training int8 cannot keep a model's labels (``embedseg-export onnx --precision int8`` refuses
it, naming the blocks that hurt), fine-tuning with the rounding in the loop teaches the weights to live
with it. Every convolution input is fake-quantized as ONNX Runtime's static quantization will quantize it
(uint8 per tensor with a zero point, or symmetric int8 for TensorRT; ranges are the min/max seen,
averaged over batches), with the straight-through gradient of ``torch.fake_quantize_per_tensor_affine``.
The output convolutions' outputs stay fp32 as in the exported model. Weights are not fake-quantized:
the exporter quantizes them per channel, whose rounding is far finer than one activation scale per
tensor.

The result is an ordinary fp32 checkpoint (hooks leave no trace in the state dict) whose contract
records the fine-tuning; export it with ``--precision int8`` as any other.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

CONVS = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
MOMENTUM = 0.1  # of the running min/max, per training batch


@dataclass
class Range:
    """Running min/max of one tensor (EMA over training batches, first batch taken as is)."""

    low: float | None = None
    high: float | None = None

    def update(self, x: torch.Tensor) -> None:
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if self.low is None:
            self.low, self.high = lo, hi
        else:
            self.low += MOMENTUM * (lo - self.low)
            self.high += MOMENTUM * (hi - self.high)


def fake_quantize(x: torch.Tensor, r: Range, symmetric: bool) -> torch.Tensor:
    """``x`` rounded to the 256 levels of ``r`` (uint8 with a zero point, or symmetric int8)."""
    low, high = min(r.low, 0.0), max(r.high, 0.0)  # the range holds 0, as ONNX Runtime's does
    if symmetric:
        bound = max(abs(low), abs(high), 1e-8)
        return torch.fake_quantize_per_tensor_affine(x, bound / 127.0, 0, -128, 127)
    scale = max(high - low, 1e-8) / 255.0
    zero = round(-low / scale)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)


def attach(model: nn.Module, keep: Iterable[str] = (), symmetric: bool = False) -> list:
    """Fake-quantize the input of every convolution of ``model`` outside the blocks ``keep`` (ONNX block
    names such as ``/decoders.0/output_conv`` or module names); returns the hook handles
    (``handle.remove()`` detaches them). Ranges update in training mode and stay fixed in eval mode."""
    prefixes = tuple(k.strip("/").replace("/", ".") for k in keep)
    handles = []
    for name, module in model.named_modules():
        if not isinstance(module, CONVS) or any(name == p or name.startswith(p + ".") for p in prefixes):
            continue
        r = Range()

        def hook(mod: nn.Module, args: tuple, r: Range = r) -> tuple:
            x = args[0]
            if mod.training or r.low is None:
                r.update(x)
            return (fake_quantize(x, r, symmetric), *args[1:])

        handles.append(module.register_forward_pre_hook(hook))
    return handles
