"""Dilated context that training crops can feed.

The encoder of BranchedERFNet ends in 3-tap convolutions dilated 2, 4, 8 and 16 at 1/8 resolution. On a
training crop whose 1/8 map is ``n`` pixels along an axis, the outer taps of a convolution dilated ``d``
read the zero padding at ``2 d`` of the ``n`` positions (all of them once ``d >= n``), while inside a whole
image they always read image features. The network learns the crop's mixture and meets another one in
every whole image or large tile it segments.

Measured on synthetic nuclei with upstream's crop rule (40 px, a 5 px map at 1/8;
benchmarks/results/train_seeds_synthetic.md): models whose whole images relapsed to one label per image
(AP@0.5 0.37, 0.61, 0.74 at their last epoch) scored 0.92-0.93 once the outer taps of every dilated
convolution were set to zero after training, and healthy ones did not lose. Taps dilated 8 and 16 had
decayed to zero by themselves (they never see data in a 40 px crop); those dilated 2 and 4 had not.

So a run switches those outer taps off from the start and keeps them at zero (their gradient is masked)
where the share of positions at which they read image data differs between the crop and the images by
more than a quarter (:func:`largest_fed_dilation`): training then sees the network that inference runs.
Where the images are little larger than the crop the shares are close and the taps stay: on DSB tiles
(64 px crops of 96 px images) switching dilation 4 off as well cost test AP (5 seeds, 0.60 vs 0.78 mean).
The architecture stays upstream's: the taps are zero weights, so checkpoints, ONNX models and engines
keep their shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

REDUCTION = 8  # the encoder's downsampling where the dilated convolutions sit
MAX_MISMATCH = 0.25  # largest tolerated difference in the share of positions whose outer taps read data


def _fed_share(n: int, d: int) -> float:
    """Share of the positions of an ``n``-pixel map at which one outer tap, ``d`` away, reads data."""
    return max(n - d, 0) / n if n > 0 else 0.0


def largest_fed_dilation(crop_size: Sequence[int], image_shape: Sequence[int]) -> list[int]:
    """Per axis (array order), the largest dilation (2, 4, 8, 16) whose outer taps read image data at
    nearly the same share of positions in a training crop as in the images (within
    :data:`MAX_MISMATCH`, on the 1/8 maps); 0 where none does.

    For images much larger than the crop this keeps ``d`` where ``crop // 8 >= 4 d``: none for 40 px
    crops, up to 2 for 64-120 px, 4 for 128 px. Images little larger than the crop keep more (64 px
    crops of 96 px images keep up to 4)."""
    out = []
    for crop, image in zip(crop_size, image_shape, strict=True):
        n_crop = int(crop) // REDUCTION
        n_image = max(int(image), int(crop)) // REDUCTION
        fed = 0
        for d in (2, 4, 8, 16):
            if _fed_share(n_image, d) - _fed_share(n_crop, d) > MAX_MISMATCH:
                break
            fed = d
        out.append(fed)
    return out


def _axis(conv: torch.nn.modules.conv._ConvNd) -> int | None:
    """The spatial axis of a 3-tap axis convolution (kernel 3 along one axis, 1 along the others)."""
    ks = list(conv.kernel_size)
    return ks.index(3) if ks.count(3) == 1 and ks.count(1) == len(ks) - 1 else None


def unfed_convs(
    model: torch.nn.Module, crop_size: Sequence[int], image_shape: Sequence[int]
) -> list[tuple[str, int]]:
    """``(name, axis)`` of the dilated axis convolutions whose outer taps a crop of ``crop_size`` does not
    feed as images of ``image_shape`` do (see :func:`largest_fed_dilation`)."""
    fed = largest_fed_dilation(crop_size, image_shape)
    out = []
    for name, conv in model.named_modules():
        if isinstance(conv, torch.nn.modules.conv._ConvNd) and (axis := _axis(conv)) is not None:
            d = conv.dilation[axis]
            if d > 1 and d > fed[axis]:
                out.append((name, axis))
    return out


def switch_off_unfed_taps(
    model: torch.nn.Module, crop_size: Sequence[int], image_shape: Sequence[int]
) -> list[str]:
    """Zero the outer taps of :func:`unfed_convs` and mask their gradient so they stay zero (also under
    Adam's weight decay: a zero weight with a zero gradient is not moved). Returns the layer names."""
    modules = dict(model.named_modules())
    names = []
    for name, axis in unfed_convs(model, crop_size, image_shape):
        weight = modules[name].weight
        mask = torch.zeros_like(weight)
        mask.narrow(2 + axis, 1, 1).fill_(1.0)  # the centre tap; weights are (out, in, *kernel)
        with torch.no_grad():
            weight.mul_(mask)
        weight.register_hook(lambda grad, mask=mask: grad * mask)
        names.append(name)
    return names
