import pytest

from bitalloc.errors import BitallocError, GroupSizeError
from bitalloc.formats.affine import QuantOption, build_menu, storage_bits


@pytest.mark.parametrize(
    "shape, option, expected",
    [
        # 4-bit, groups of 128 over 576... not dividing; use 512 cols: 8 groups/row, fp16 scale + fp16 zero
        ((10, 512), QuantOption(4, 128), 10 * 512 * 4 + 10 * 4 * 32),
        ((10, 512), QuantOption(4, 128, symmetric=True), 10 * 512 * 4 + 10 * 4 * 16),
        ((576, 576), QuantOption(3, 64), 576 * 576 * 3 + 576 * 9 * 32),
        ((1536, 576), QuantOption(2, 32, True), 1536 * 576 * 2 + 1536 * 18 * 16),
        ((7, 33), QuantOption(8, 0), 7 * 33 * 8 + 7 * 1 * 32),  # per-channel: one group per row
        ((7, 33), QuantOption(5, 0, True), 7 * 33 * 5 + 7 * 16),
    ],
)
def test_storage_bits_hand_counts(shape, option, expected):
    assert storage_bits(shape, option) == expected


def test_bpw_of_common_formats():
    # 4-bit, group 64, fp16 scale+zero: 4 + 32/64 = 4.5 bits per weight
    assert storage_bits((64, 4096), QuantOption(4, 64)) / (64 * 4096) == 4.5
    assert storage_bits((64, 4096), QuantOption(3, 64, True)) / (64 * 4096) == 3.25


def test_non_dividing_group_is_an_error_naming_the_tensor():
    with pytest.raises(GroupSizeError, match="model.layers.0.q_proj.weight"):
        storage_bits((4, 576), QuantOption(4, 128), name="model.layers.0.q_proj.weight")


def test_ragged_fallback_counts_the_short_group_in_full():
    # 576 = 4*128 + 64: five groups per row, each with scale and zero
    assert storage_bits((4, 576), QuantOption(4, 128), allow_ragged=True) == 4 * 576 * 4 + 4 * 5 * 32


def test_group_larger_than_tensor():
    with pytest.raises(GroupSizeError):
        storage_bits((4, 64), QuantOption(4, 128))
    assert storage_bits((4, 64), QuantOption(4, 128), allow_ragged=True) == 4 * 64 * 4 + 4 * 32


@pytest.mark.parametrize("name", ["int4-g128-asym", "int2-g32-sym", "int8-pc-sym", "int3-pc-asym"])
def test_option_names_round_trip(name):
    assert QuantOption.parse(name).name == name


@pytest.mark.parametrize("bad", ["int9-g64-asym", "int1-g32-sym", "int4-g64", "fp8", "int4-gx-asym"])
def test_bad_option_names(bad):
    with pytest.raises(BitallocError):
        QuantOption.parse(bad)


def test_menu_and_group_parsing():
    menu = build_menu((2, 4), (64, 0), ("asym", "sym"))
    assert len(menu) == 8 and len(set(menu)) == 8
    with pytest.raises(BitallocError):
        build_menu((4,), (64,), ("nf4",))
