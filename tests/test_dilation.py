"""Dilated taps that training crops cannot feed (embedseg_training.dilation) and the runs that use it."""

import pytest
import torch

from embedseg_training.dilation import largest_fed_dilation, switch_off_unfed_taps, unfed_convs
from embedseg_training.model import BranchedERFNet


def _outer_taps(model: torch.nn.Module, name: str, axis: int) -> torch.Tensor:
    weight = dict(model.named_modules())[name].weight.detach()
    return torch.cat([weight.narrow(2 + axis, 0, 1), weight.narrow(2 + axis, 2, 1)])


@pytest.mark.parametrize(
    ("crop", "images", "fed"),
    [([40, 40], [256, 256], [0, 0]), ([64, 64], [256, 256], [2, 2]), ([72, 72], [256, 256], [2, 2]),
     ([128, 128], [2048, 2048], [4, 4]), ([512, 512], [8192, 8192], [16, 16]),
     ([16, 32, 32], [32, 96, 96], [0, 0, 0]), ([32, 64, 128], [512, 512, 512], [0, 2, 4]),
     ([64, 64], [96, 96], [4, 4]), ([40, 40], [40, 40], [16, 16]), ([40, 40], [20, 20], [16, 16])],
)  # fmt: skip
def test_a_dilation_stays_where_crop_and_images_feed_its_taps_alike(crop, images, fed):
    # large images: kept where crop // 8 >= 4 d; images little larger than the crop keep more
    assert largest_fed_dilation(crop, images) == fed


def test_unfed_convs_are_the_dilated_ones_above_what_the_crop_feeds():
    model = BranchedERFNet(3, 1)
    off = unfed_convs(model, [16, 64, 64], [64, 512, 512])  # z feeds none, y and x dilation 2
    dilations = {(name, axis): dict(model.named_modules())[name].dilation[axis] for name, axis in off}
    assert {d for (_, axis), d in dilations.items() if axis == 0} == {2, 4, 8, 16}
    assert {d for (_, axis), d in dilations.items() if axis > 0} == {4, 8, 16}
    assert unfed_convs(model, [1024, 1024, 1024], [2048, 2048, 2048]) == []
    assert unfed_convs(model, [16, 64, 64], [16, 64, 64]) == []  # crops the size of the images


def test_switched_off_taps_stay_zero_through_adam_with_weight_decay():
    torch.manual_seed(0)
    model = BranchedERFNet(2, 1)
    names = switch_off_unfed_taps(model, [40, 40], [256, 256])
    assert len(names) == 16  # 2 rounds x dilations 2, 4, 8, 16 x 2 axes
    axis = {n: a for n, a in unfed_convs(model, [40, 40], [256, 256])}
    centre = {
        n: dict(model.named_modules())[n].weight.detach().narrow(2 + axis[n], 1, 1).clone() for n in names
    }
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 1, 64, 64)).square().mean().backward()
        opt.step()
    for n in names:
        assert torch.count_nonzero(_outer_taps(model, n, axis[n])) == 0
        now = dict(model.named_modules())[n].weight.detach().narrow(2 + axis[n], 1, 1)
        assert not torch.equal(now, centre[n])  # the centre tap still learns
