"""Irreps of l sets and the per-block layout of flat feature vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from e3nn import o3

from study.nn.irreps import (
    MAX_L,
    IrrepBlock,
    IrrepsLayout,
    irreps_for,
    validate_l_values,
)


def _block_id_tensor(layout: IrrepsLayout, leading: tuple[int, ...] = (3,)) -> torch.Tensor:
    """A tensor whose every entry holds the index of the block it belongs to."""
    x = torch.full((*leading, layout.dim), -1.0)
    for index, block in enumerate(layout.blocks):
        x[..., block.start : block.stop] = index
    assert (x >= 0).all()
    return x


def test_irreps_for_uses_parity_of_each_order():
    assert irreps_for([0, 1, 2], 16) == o3.Irreps("16x0e+16x1o+16x2e")
    assert irreps_for([4, 0, 3], 5) == o3.Irreps("5x0e+5x3o+5x4e")  # sorted ascending
    assert irreps_for([0, 1, 2, 10], 1) == o3.Irreps("1x0e+1x1o+1x2e+1x10e")
    with pytest.raises(ValueError, match="multiplicity"):
        irreps_for([0, 1], 0)


def test_layout_of_contiguous_orders_has_right_offsets():
    layout = IrrepsLayout.from_irreps("16x0e+16x1o+16x2e")
    assert [(b.l, b.parity, b.multiplicity, b.start, b.stop) for b in layout.blocks] == [
        (0, 1, 16, 0, 16),
        (1, -1, 16, 16, 64),
        (2, 1, 16, 64, 144),
    ]
    assert [b.dim for b in layout.blocks] == [16, 48, 80]
    assert layout.dim == 144 == o3.Irreps("16x0e+16x1o+16x2e").dim
    assert layout.l_values == (0, 1, 2)
    assert str(layout) == "16x0e+16x1o+16x2e"


@pytest.mark.parametrize("l_values", [[0, 1, 2], [0, 3, 4, 5, 6], [0, 1, 2, 10]])
def test_slice_and_channels_read_exactly_their_own_block(l_values):
    layout = IrrepsLayout.from_irreps(irreps_for(l_values, 16))
    x = _block_id_tensor(layout, leading=(2, 3))
    for index, l in enumerate(l_values):
        flat = layout.slice(x, l)
        assert flat.shape == (2, 3, 16 * (2 * l + 1))
        assert (flat == index).all()
        per_channel = layout.channels(x, l)
        assert per_channel.shape == (2, 3, 16, 2 * l + 1)
        assert (per_channel == index).all()
    # numpy arrays go through the same code and stay numpy
    array = x.numpy()
    assert isinstance(layout.slice(array, l_values[-1]), np.ndarray)
    assert layout.channels(array, l_values[-1]).shape == (2, 3, 16, 2 * l_values[-1] + 1)


def test_channels_follow_e3nn_multiplicity_major_layout():
    # channel c, component m sits at start + c * (2l+1) + m
    layout = IrrepsLayout.from_irreps("3x0e+2x1o+2x2e")
    x = torch.arange(layout.dim, dtype=torch.float64)
    block = layout.block(2)
    channels = layout.channels(x, 2)
    for c in range(2):
        for m in range(5):
            assert channels[c, m] == block.start + c * 5 + m
    # and this agrees with e3nn's own per-irrep split
    irreps = o3.Irreps("3x0e+2x1o+2x2e")
    chunks = x.split([mul * ir.dim for mul, ir in irreps])
    parts = [chunk.reshape(mul, ir.dim) for (mul, ir), chunk in zip(irreps, chunks)]
    assert torch.equal(parts[1], layout.channels(x, 1))
    assert torch.equal(parts[2], layout.channels(x, 2))


def test_non_contiguous_orders():
    layout = IrrepsLayout.from_irreps(irreps_for([0, 3, 4, 5, 6], 4))
    assert layout.l_values == (0, 3, 4, 5, 6)
    assert [b.parity for b in layout.blocks] == [1, -1, 1, -1, 1]
    assert [(b.start, b.stop) for b in layout.blocks] == [(0, 4), (4, 32), (32, 68), (68, 112), (112, 164)]
    with pytest.raises(KeyError, match="l=1"):
        layout.block(1)


def test_unsimplified_irreps_merge_adjacent_and_refuse_ambiguous_orders():
    merged = IrrepsLayout.from_irreps("8x0e+8x0e+0x2e+4x1o")
    assert [(b.l, b.multiplicity, b.start, b.stop) for b in merged.blocks] == [(0, 16, 0, 16), (1, 4, 16, 28)]
    split = IrrepsLayout.from_irreps("4x0e+2x1o+4x0e")
    assert [(b.start, b.stop) for b in split.blocks_for(0)] == [(0, 4), (10, 14)]
    with pytest.raises(ValueError, match="separate blocks"):
        split.block(0)
    with pytest.raises(ValueError, match="separate blocks"):
        IrrepsLayout.from_irreps("2x1o+2x1e").slice(torch.zeros(12), 1)
    assert split.block(1).start == 4


def test_slice_rejects_tensor_of_another_layout():
    layout = IrrepsLayout.from_irreps("2x0e+2x1o")
    with pytest.raises(ValueError, match="has 9 dims, layout 2x0e\\+2x1o has 8"):
        layout.slice(torch.zeros(5, 9), 1)


@pytest.mark.parametrize(
    ("l_values", "message"),
    [
        ([1, 2], "l values must include 0"),
        ([0, 11], "l value 11 out of range 0..10"),
        ([0, -1], "l value -1 out of range 0..10"),
        ([0, 2, 2], "l value 2 repeated"),
        ([0, 1.0], "l values must be integers"),
        ([0, "1"], "l values must be integers"),
        ([0, True], "l values must be integers"),
        ([], "must not be empty"),
        ("012", "list of integers"),
    ],
)
def test_validate_l_values_errors(l_values, message):
    with pytest.raises(ValueError, match=message) as info:
        validate_l_values(l_values)
    assert "\n" not in str(info.value)


def test_validate_l_values_sorts_and_accepts_numpy_ints():
    assert validate_l_values([6, 0, 3]) == (0, 3, 6)
    assert validate_l_values(np.array([0, 10])) == (0, MAX_L)
    assert all(type(v) is int for v in validate_l_values(np.array([2, 0])))


def test_to_dict_round_trip_is_json():
    layout = IrrepsLayout.from_irreps(irreps_for([0, 3, 4], 8))
    data = json.loads(json.dumps(layout.to_dict()))
    assert data["irreps"] == "8x0e+8x3o+8x4e"
    assert data["dim"] == layout.dim
    assert IrrepsLayout.from_dict(data) == layout
    assert IrrepsLayout.from_dict({"irreps": "8x0e+8x3o+8x4e"}) == layout
    data["blocks"][1]["multiplicity"] = 7
    with pytest.raises(ValueError):
        IrrepsLayout.from_dict(data)


def test_block_rejects_inconsistent_extent():
    with pytest.raises(ValueError, match="2l\\+1"):
        IrrepBlock(l=1, parity=-1, multiplicity=2, start=0, stop=5)
