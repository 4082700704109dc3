"""The weight average (training/ema.py): its arithmetic, its warm-up, and its state."""

from __future__ import annotations

import math

import pytest
import torch

from embedseg_training.ema import WARMUP, WeightAverage


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))


def test_the_average_follows_the_weights_with_the_warmed_up_decay():
    net = _net()
    start = net[0].weight.detach().clone()
    average = WeightAverage(net, decay=0.9)
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[1].num_batches_tracked.fill_(7)
    kept = 1.0
    for n in (1, 2):  # in the warm-up: keep (1 + n) / (10 + n) of the average
        average.update(net)
        kept *= (1 + n) / (WARMUP + n)
    expected = start * kept + (1.0 - kept)
    torch.testing.assert_close(average.module[0].weight, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(average.module[0].weight, net[0].weight)
    average.updates = 100  # warmed up: the decay is the one asked for
    assert average.current_decay() == 0.9
    before = average.module[0].weight.clone()
    average.update(net)
    torch.testing.assert_close(average.module[0].weight, 0.9 * before + 0.1, rtol=1e-5, atol=1e-6)
    assert int(average.module[1].num_batches_tracked) == 7  # counters are copied, not averaged


def test_the_average_is_a_separate_frozen_copy():
    net = _net()
    average = WeightAverage(net, decay=0.5)
    assert all(not p.requires_grad for p in average.module.parameters()) and not average.module.training
    with torch.no_grad():
        net[0].weight.add_(1.0)
    assert not torch.equal(average.module[0].weight, net[0].weight)  # moves only on update()
    assert all(p.requires_grad for p in net.parameters())


def test_state_round_trip_and_bad_decay():
    net = _net()
    average = WeightAverage(net, decay=0.99)
    with torch.no_grad():
        net[0].bias.fill_(2.0)
    for _ in range(3):
        average.update(net)
    other = WeightAverage(_net(), decay=0.5)
    other.load_state_dict(average.state_dict())
    assert (other.decay, other.updates) == (0.99, 3)
    torch.testing.assert_close(other.module[0].bias, average.module[0].bias)
    assert math.isclose(other.current_decay(), average.current_decay())
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="decay"):
            WeightAverage(net, bad)
