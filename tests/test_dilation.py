"""Convolution taps that training crops do not feed as the images do (embedseg_training.dilation)."""

import collections

import pytest
import torch

from embedseg_training.dilation import axis_convs, fed_alike, switch_off_unfed_taps, unfed_convs
from embedseg_training.model import BranchedERFNet


def _outer_taps(model: torch.nn.Module, name: str, axis: int) -> torch.Tensor:
    weight = dict(model.named_modules())[name].weight.detach()
    return torch.cat([weight.narrow(2 + axis, 0, 1), weight.narrow(2 + axis, 2, 1)])


@pytest.mark.parametrize(
    ("crop", "image", "reduction", "dilation", "alike"),
    [(40, 256, 8, 2, False),  # 5 px map: 60 % of positions vs 94 %
     (40, 256, 8, 1, True), (40, 256, 4, 1, True),
     (64, 256, 8, 2, True), (64, 256, 8, 4, False),  # 8 px map: 75 % vs 94 %; 50 % vs 88 %
     (64, 96, 8, 4, True), (64, 96, 8, 8, False),  # images little larger than the crop keep more
     (16, 32, 8, 1, False),  # a 2-plane map: one tap reads padding at every plane
     (40, 40, 8, 16, True), (40, 20, 8, 2, True)],  # crops as large as the images
)  # fmt: skip
def test_taps_stay_where_crop_and_image_feed_them_alike(crop, image, reduction, dilation, alike):
    assert fed_alike(crop, image, reduction, dilation, 0.25) == alike


def test_axis_convs_measure_each_map_size():
    found = collections.Counter((r, d) for _, _, r, d in axis_convs(BranchedERFNet(2, 1), 2))
    # decoders at 1/2 and 1/4, encoder blocks at 1/4 and 1/8 (dilated 2-16 in their second stage)
    assert found == {(2, 1): 16, (4, 1): 36, (8, 1): 16, (8, 2): 4, (8, 4): 4, (8, 8): 4, (8, 16): 4}


def test_unfed_convs_follow_each_axis():
    model = BranchedERFNet(3, 1)
    axes = {(n, a): (r, d) for n, a, r, d in axis_convs(model, 3)}
    off = unfed_convs(model, [16, 32, 32], [32, 96, 96])  # 2 x 4 x 4 at 1/8 vs 4 x 12 x 12
    z = sorted({axes[k] for k in off if k[1] == 0})
    yx = sorted({axes[k] for k in off if k[1] > 0})
    # 3D cuts at a mismatch of 0.1: z at 1/4 (4 planes vs 8) and at 1/8 (2 vs 4; dilated 4-16 reads only
    # padding in the crop and in the images), y/x at 1/8 (4 vs 12) up to dilation 8
    assert z == [(4, 1), (8, 1), (8, 2)]
    assert yx == [(8, 1), (8, 2), (8, 4), (8, 8)]
    assert unfed_convs(model, [16, 64, 64], [16, 64, 64]) == []  # crops the size of the images


def test_switched_off_taps_stay_zero_through_adam_with_weight_decay():
    torch.manual_seed(0)
    model = BranchedERFNet(2, 1)
    names = switch_off_unfed_taps(model, [40, 40], [256, 256])
    assert len(names) == 16  # 2 rounds x dilations 2, 4, 8, 16 x 2 axes
    axis = {n: a for n, a in unfed_convs(model, [40, 40], [256, 256])}
    modules = dict(model.named_modules())
    centre = {n: modules[n].weight.detach().narrow(2 + axis[n], 1, 1).clone() for n in names}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 1, 64, 64)).square().mean().backward()
        opt.step()
    for n in names:
        assert torch.count_nonzero(_outer_taps(model, n, axis[n])) == 0
        now = modules[n].weight.detach().narrow(2 + axis[n], 1, 1)
        assert not torch.equal(now, centre[n])  # the centre tap still learns
