import json

import numpy as np
import pytest

from embedseg_deploy.contract import (
    Contract,
    ContractError,
    Normalization,
    axis_of_dim,
    channel_names,
    spacing_from_upstream_grid,
)


def test_round_trip_json_2d_and_3d():
    for ndim in (2, 3):
        c = Contract(ndim=ndim, spacing=[0.01] * ndim, normalization=Normalization("absolute", divisor=255))
        again = Contract.from_json(c.to_json())
        assert again == c
        assert again.out_channels == 2 * ndim + 1
        assert json.loads(c.to_json())["channels"] == channel_names(ndim)


def test_upstream_grid_spacing_matches_linspace():
    # upstream builds linspace(0, l, n): one pixel is l / (n - 1) units; 3D z spacing = anisotropy/(n_x - 1)
    n_z, n_y, n_x, aniso = 32, 96, 96, 2.0
    l_z = (n_z - 1) / (n_x - 1) * aniso
    sz, _sy, sx = spacing_from_upstream_grid(3, [n_z, n_y, n_x], [l_z, 1, 1])
    assert sx == pytest.approx(np.linspace(0, 1, n_x)[1])
    assert sz == pytest.approx(np.linspace(0, l_z, n_z)[1])
    assert sz == pytest.approx(aniso / (n_x - 1))


def test_axis_convention():
    assert [axis_of_dim(d, 2) for d in range(2)] == [1, 0]  # x is the last array axis
    assert [axis_of_dim(d, 3) for d in range(3)] == [2, 1, 0]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"format": 2, "ndim": 2, "spacing": [1, 1]}, "unsupported contract format"),
        ({"format": 1, "ndim": 4, "spacing": [1] * 4}, "ndim must be 2 or 3"),
        ({"format": 1, "ndim": 2, "spacing": [1]}, "spacing needs 2"),
        ({"format": 1, "ndim": 2, "spacing": [1, -1]}, "spacing needs 2"),
        ({"format": 1, "ndim": 2, "spacing": [1, 1], "bogus": 1}, "malformed contract"),
        (
            {
                "format": 1,
                "ndim": 2,
                "spacing": [1, 1],
                "tile": {"cpu": {"size": [100, 100], "halo": [8, 8]}},
            },
            "multiples of 8",
        ),
        ({"format": 1, "ndim": 2, "spacing": [1, 1], "normalization": {"kind": "absolute"}}, "divisor"),
        ({"format": 1, "ndim": 2, "spacing": [1, 1], "padding": "middle"}, "padding must be"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_contracts_name_the_problem(data, message):
    with pytest.raises(ContractError, match=message):
        Contract.from_dict(data)


def test_not_json():
    with pytest.raises(ContractError, match="not valid JSON"):
        Contract.from_json("{nope")
