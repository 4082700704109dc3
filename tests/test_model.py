"""BranchedERFNet: upstream's parameter counts, names and outputs (upstream fixtures), 2D and 3D."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedseg_deploy.contract import Contract
from embedseg_training.model import BranchedERFNet, build_model, count_parameters

from .conftest import upstream_case

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    "ndim,in_channels,total,encoder,decoders",
    [
        (2, 1, 2_252_624, 1_874_475, [189_172, 188_977]),
        (2, 3, 2_252_838, None, None),
        (3, 1, 3_690_146, 2_874_555, [408_118, 407_473]),
    ],
)
def test_parameter_counts_match_upstream(ndim, in_channels, total, encoder, decoders):
    model = BranchedERFNet(ndim, in_channels)
    assert count_parameters(model) == total
    if encoder is not None:
        assert count_parameters(model.encoder) == encoder
        assert [count_parameters(d) for d in model.decoders] == decoders


@pytest.mark.parametrize("ndim", [2, 3])
def test_upstream_fixture_loads_strictly_and_reproduces_its_output(ndim):
    case = upstream_case(ndim)
    state = torch.load(case / "checkpoint.pth", weights_only=True)["model_state_dict"]
    model = BranchedERFNet(ndim)
    assert sorted(model.state_dict()) == sorted(state)
    model.load_state_dict(state, strict=True)
    model.eval()
    x = torch.from_numpy(np.load(case / "network_input.npy"))[None]
    expected = np.load(case / "network_output.npy")
    with torch.no_grad():
        out = model(x)[0].numpy()
    assert out.shape == expected.shape == (2 * ndim + 1, *x.shape[2:])
    assert np.abs(out - expected).max() < 1e-4


def test_init_output_sets_offsets_and_sigmas_like_upstream():
    for ndim in (2, 3):
        model = BranchedERFNet(ndim)
        model.init_output(ndim)
        conv = model.decoders[0].output_conv
        assert torch.all(conv.weight[:, : 2 * ndim] == 0)
        assert torch.all(conv.bias[:ndim] == 0) and torch.all(conv.bias[ndim : 2 * ndim] == 1)
        model.eval()
        with torch.no_grad():
            out = model(torch.randn(1, 1, *([16] * ndim)))
        assert torch.all(out[:, :ndim] == 0) and torch.all(out[:, ndim : 2 * ndim] == 1)
        assert out[:, 2 * ndim].std() > 0  # the seed branch keeps its random initialisation


def test_3d_output_shape_and_batch():
    model = BranchedERFNet(3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 8, 16, 24))
    assert out.shape == (2, 7, 8, 16, 24)


def test_input_checks():
    model = BranchedERFNet(2)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.zeros(1, 1, 20, 16))
    with pytest.raises(ValueError, match="2D input"):
        model(torch.zeros(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="ndim"):
        BranchedERFNet(4)


def test_build_model_from_contract_and_architecture():
    c = Contract(ndim=3, in_channels=2, spacing=[0.02, 0.01, 0.01])
    m = build_model(c)
    assert m.ndim == 3 and m.in_channels == 2 and m.num_classes == [6, 1]
    m2 = build_model({"name": "BranchedERFNet", "num_classes": [4, 1], "input_channels": 1})
    assert m2.ndim == 2 and count_parameters(m2) == 2_252_624
    with pytest.raises(ValueError, match="unknown network"):
        build_model({"name": "UNet", "ndim": 2})
