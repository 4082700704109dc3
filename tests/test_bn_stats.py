"""Whole-image BatchNorm statistics (embedseg_training.bn_stats)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedseg_deploy.contract import Normalization
from embedseg_deploy.normalize import normalize
from embedseg_deploy.synthetic import write_dataset
from embedseg_training.bn_stats import whole_image_bn_stats
from embedseg_training.data import load_split
from embedseg_training.model import BranchedERFNet


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("bn"), ndim=2, n_train=2, n_val=1, n_test=0, shape=(52, 60),
                         n_objects=(3, 5), seed=3)  # fmt: skip
    return load_split(root, "train")


def test_the_first_layer_keeps_the_mean_and_variance_of_its_whole_image_inputs(samples):
    torch.manual_seed(0)
    model = BranchedERFNet(2, 1).train()
    bn = model.encoder.initial_block.bn
    seen = []
    bn.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    norm = Normalization()
    whole_image_bn_stats(model, samples, norm)
    assert model.training and bn.momentum == 0.1  # mode and momentum restored
    # 52 x 60 images are reflect-padded to 56 x 64 (the runtime's multiple of 8), then halved by the stride
    assert [tuple(x.shape[2:]) for x in seen] == [(28, 32), (28, 32)]
    mean = torch.stack([x.mean((0, 2, 3)) for x in seen]).mean(0)
    var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in seen]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)

    # the statistics are those of whole images, not of the crops training ran on
    crop = normalize(samples[0].image, norm, channel_axis=0)[:, :16, :16]
    seen.clear()
    model.eval()(torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None])
    assert not torch.allclose(seen[0].mean((0, 2, 3)), bn.running_mean, rtol=1e-3)


def test_dropout_is_off_and_nothing_else_changes(samples):
    torch.manual_seed(0)
    model = BranchedERFNet(2, 1).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    whole_image_bn_stats(model, samples, Normalization())
    again = BranchedERFNet(2, 1)
    again.load_state_dict(before)
    whole_image_bn_stats(again, samples, Normalization())
    after, twice = model.state_dict(), again.state_dict()
    assert not model.training
    for key, value in before.items():
        if "running" in key or "num_batches" in key:
            assert torch.equal(after[key], twice[key]), key  # deterministic: dropout was off
        else:
            assert torch.equal(after[key], value), key  # weights untouched
    assert any(not torch.equal(after[k], before[k]) for k in before if "running_mean" in k)
