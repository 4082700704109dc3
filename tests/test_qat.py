"""Quantization-aware fine-tuning (issue 10): the simulated int8 rounding, the hooks, and a fine-tuning run
from a checkpoint that leaves an ordinary checkpoint behind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedseg_training.model import BranchedERFNet
from embedseg_training.qat import Range, attach, fake_quantize
from embedseg_training.train import TrainError, train

from .test_train import _tiny, data2d  # noqa: F401  (the module-scoped data fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fake_quantize_rounds_to_256_levels_of_the_range():
    x = torch.linspace(-0.3, 1.7, 1001)
    r = Range()
    r.update(x)
    y = fake_quantize(x, r, symmetric=False)
    step = 2.0 / 255
    assert len(torch.unique(y)) <= 256 and (y - x).abs().max() <= step / 2 + 1e-6
    assert torch.isclose(y, torch.zeros(1)).any()  # zero is exact (a zero point)
    s = fake_quantize(x, r, symmetric=True)
    assert (s - x).abs().max() <= 1.7 / 127 / 2 + 1e-6 and len(torch.unique(s)) <= 255
    x.requires_grad_(True)
    fake_quantize(x, r, symmetric=False).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight-through inside the range


def test_hooks_quantize_conv_inputs_outside_kept_blocks_and_leave_no_state():
    torch.manual_seed(0)
    model = BranchedERFNet(2, 1).eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        ref = model(x)
    keys = set(model.state_dict())
    handles = attach(model, keep=["/decoders.0", "/decoders.1"])
    with torch.no_grad():
        out = model(x)
    n_convs = sum(isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d) for m in model.modules())
    n_decoder = sum(
        isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d) for m in model.decoders.modules()
    )
    assert len(handles) == n_convs - n_decoder > 0
    assert not torch.equal(out, ref) and (out - ref).abs().max() < 0.5  # rounded, not broken
    assert set(model.state_dict()) == keys
    for h in handles:
        h.remove()
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_qat_fine_tunes_a_checkpoint_and_records_it(data2d, tmp_path):  # noqa: F811
    first = train(_tiny(data2d, tmp_path / "a", epochs=1, crop_size=[32, 32]), progress=False)
    with pytest.raises(TrainError, match="give --init CHECKPOINT"):
        train(_tiny(data2d, tmp_path / "b", epochs=1, crop_size=[32, 32], qat="cpu"), progress=False)
    init = str(first.last_checkpoint)
    settings = _tiny(data2d, tmp_path / "q", epochs=1, crop_size=[32, 32], init=init, qat="cpu")
    qat = train(settings, progress=False)
    from embedseg_training.checkpoint import load_model

    model, contract = load_model(qat.last_checkpoint)
    assert contract.provenance["qat"] == {
        "from": init,
        "target": "cpu",
        "simulated": "convolution inputs",
    }
    start, _ = load_model(first.last_checkpoint)
    pairs = zip(model.state_dict().values(), start.state_dict().values(), strict=True)
    moved = [not torch.equal(a, b) for a, b in pairs]
    assert any(moved) and np.isfinite(qat.log[0]["train_loss"])  # it trained from those weights
    other = _tiny(data2d, tmp_path / "c", epochs=1, crop_size=[32, 32], init=init)
    other.spacing = 1 / 255
    with pytest.raises(TrainError, match=r"its spacing .* differs from this run's"):
        train(other, progress=False)
