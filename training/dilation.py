"""Convolution taps that training crops do not feed as the images do.

BranchedERFNet's residual blocks are 3-tap convolutions along one axis at a time; the encoder's last
blocks sit at 1/8 resolution and are dilated 2, 4, 8 and 16. On a training crop whose map at a layer is
``n`` pixels along an axis, the outer taps of a convolution dilated ``d`` read the zero padding at ``2 d``
of the ``n`` positions (all of them once ``d >= n``), while inside a whole image they read image features
nearly everywhere. The network learns the crop's mixture and meets another one in every whole image or
large tile it segments.

Measured on synthetic nuclei with upstream's crop rule (40 px, a 5 px map at 1/8;
benchmarks/results/train_seeds_synthetic.md): models whose whole images relapsed to one label per image
(AP@0.5 0.37, 0.61, 0.74 at their last epoch) scored 0.92-0.93 once the outer taps of every dilated
convolution were set to zero after training, and healthy ones did not lose. Taps dilated 8 and 16 had
decayed to zero by themselves (they never see data in a 40 px crop); those dilated 2 and 4 had not. In 3D
(16 x 32 x 32 crops, a 2-plane map in z at 1/8) a relapsed model (AP 0.19) scored 0.77 with the outer
z taps of the undilated 1/8 convolutions zeroed.

So a run switches off, from the start, the outer taps of every axis convolution where the share of
positions at which one of them reads image data differs between the crop and the largest image by a
quarter or more in 2D, a tenth in 3D (:data:`MAX_MISMATCH`, :func:`unfed_convs`), and keeps them at
zero (their gradient is masked): training then sees the network that inference runs. Where the images
are little larger than the crop the shares are close and the taps stay: on DSB tiles (64 px crops of
96 px images) switching dilation 4 off as well cost test AP (5 seeds, 0.60 vs 0.78 mean). Such images
are now trained whole instead (``data.grow_crop_to_images``), which leaves no difference to switch off.
The architecture stays upstream's: the taps are zero weights, so checkpoints, ONNX models and engines
keep their shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Taps go off where the shares of positions reading data differ by this much or more. 2D: set on the 2D
# seed sets (0.25 keeps DSB's dilation 4, cuts nuclei's 2). 3D: 16-plane crops leave 4 planes at 1/4 and 2
# at 1/8, and 0.25 left relapses that zeroing the 1/4 z taps (mismatch 0.125) undid; 0.10 removed them.
MAX_MISMATCH = {2: 0.25, 3: 0.10}
PROBE = 64  # per axis, the size of the input that measures each convolution's map size


def _fed_share(n: int, d: int) -> float:
    """Share of the positions of an ``n``-pixel map at which one outer tap, ``d`` away, reads data."""
    return max(n - d, 0) / n if n > 0 else 0.0


def fed_alike(crop: int, image: int, reduction: int, dilation: int, limit: float) -> bool:
    """Whether a tap ``dilation`` away on a map ``reduction`` times smaller than the input reads data at
    nearly the same share of positions (less than ``limit`` apart) in a ``crop``-pixel crop as in an
    ``image``-pixel image."""
    n_crop, n_image = crop // reduction, max(image, crop) // reduction
    return _fed_share(n_image, dilation) - _fed_share(n_crop, dilation) < limit


def _axis(conv: torch.nn.modules.conv._ConvNd) -> int | None:
    """The spatial axis of a 3-tap axis convolution (kernel 3 along one axis, 1 along the others)."""
    ks = list(conv.kernel_size)
    return ks.index(3) if ks.count(3) == 1 and ks.count(1) == len(ks) - 1 else None


def axis_convs(model: torch.nn.Module, ndim: int) -> list[tuple[str, int, int, int]]:
    """``(name, axis, reduction, dilation)`` of every 3-tap axis convolution of ``model``; ``reduction``
    (input size / map size along ``axis``) is measured on a ``PROBE``-sized input."""
    convs = {
        name: (conv, axis)
        for name, conv in model.named_modules()
        if isinstance(conv, torch.nn.modules.conv._ConvNd) and (axis := _axis(conv)) is not None
    }
    sizes: dict[str, int] = {}

    def record(name: str, axis: int):
        return lambda module, args, out: sizes.__setitem__(name, out.shape[2 + axis])

    hooks = [conv.register_forward_hook(record(name, axis)) for name, (conv, axis) in convs.items()]
    first = next(m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, first.in_channels, *[PROBE] * ndim), device=first.weight.device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [(name, axis, PROBE // sizes[name], conv.dilation[axis]) for name, (conv, axis) in convs.items()]


def unfed_convs(
    model: torch.nn.Module, crop_size: Sequence[int], image_shape: Sequence[int]
) -> list[tuple[str, int]]:
    """``(name, axis)`` of the axis convolutions whose outer taps a crop of ``crop_size`` does not feed as
    images of ``image_shape`` do (:func:`fed_alike`)."""
    ndim = len(crop_size)
    return [
        (name, axis)
        for name, axis, reduction, dilation in axis_convs(model, ndim)
        if not fed_alike(
            int(crop_size[axis]), int(image_shape[axis]), reduction, dilation, MAX_MISMATCH[ndim]
        )
    ]


def switch_off_taps(model: torch.nn.Module, names: Sequence[str]) -> list[str]:
    """Zero the outer taps of the axis convolutions ``names`` and mask their gradient so they stay zero
    (also under Adam's weight decay: a zero weight with a zero gradient is not moved). Returns ``names``;
    ValueError for a name that is not a 3-tap axis convolution of ``model``."""
    modules = dict(model.named_modules())
    for name in names:
        conv = modules.get(name)
        axis = _axis(conv) if isinstance(conv, torch.nn.modules.conv._ConvNd) else None
        if axis is None:
            raise ValueError(f"{name!r} is not a 3-tap axis convolution of this network")
        mask = torch.zeros_like(conv.weight)
        mask.narrow(2 + axis, 1, 1).fill_(1.0)  # the centre tap; weights are (out, in, *kernel)
        with torch.no_grad():
            conv.weight.mul_(mask)
        conv.weight.register_hook(lambda grad, mask=mask: grad * mask)
    return list(names)


def switch_off_unfed_taps(
    model: torch.nn.Module, crop_size: Sequence[int], image_shape: Sequence[int]
) -> list[str]:
    """:func:`switch_off_taps` of :func:`unfed_convs`; returns the layer names."""
    return switch_off_taps(model, [name for name, _ in unfed_convs(model, crop_size, image_shape)])
