import numpy as np
import pytest
import torch

from bitalloc.formats.affine import QuantOption
from bitalloc.formats.affine_rtn import dequantize, fake_quantize, pack_bits, quantize_rtn, unpack_bits

OPTIONS = [QuantOption(b, g, s) for b in (2, 3, 4, 8) for g in (16, 0) for s in (False, True)]


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_rtn_error_bounds(option):
    """Where the code was not clamped the error is at most half a step;
    everywhere it is at most one step; each group's peak is on the grid."""
    torch.manual_seed(0)
    W = torch.randn(8, 64)
    qw = quantize_rtn(W, option)
    assert int(qw.codes.max()) < 2**option.bits
    g = 64 if option.group_size == 0 else option.group_size
    step = qw.scales.float().repeat_interleave(g, dim=1)  # (8, 64), signed for sym
    if option.symmetric:
        raw = W / step + 2 ** (option.bits - 1)
    else:
        raw = W / step + qw.zeros.float().repeat_interleave(g, dim=1)
    unclamped = (raw >= -0.5) & (raw <= 2**option.bits - 0.5)
    err = (dequantize(qw) - W).abs()
    assert (err[unclamped] <= 0.5 * step.abs()[unclamped] * (1 + 1e-3) + 1e-7).all()
    assert (err <= step.abs() * (1 + 1e-3) + 1e-7).all()
    peak = W.reshape(8, -1, g).abs().argmax(-1)  # (8, groups): the largest magnitude per group
    peak_err = err.reshape(8, -1, g).gather(-1, peak[..., None])
    assert (peak_err <= 0.5 * step.abs().reshape(8, -1, g)[..., :1] * (1 + 1e-3) + 1e-7).all()


def test_more_bits_less_error():
    torch.manual_seed(1)
    W = torch.randn(16, 128)
    errs = [float(((fake_quantize(W, QuantOption(b, 32)) - W) ** 2).sum()) for b in (2, 3, 4, 5, 6, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:]))


def test_constant_groups_are_exact():
    W = torch.tensor([[0.5] * 8 + [-0.25] * 8 + [0.0] * 8])
    for opt in (QuantOption(2, 8), QuantOption(4, 8, True)):
        assert torch.allclose(fake_quantize(W, opt), W, rtol=1e-3, atol=1e-7)  # fp16 scale precision


def test_stored_fp16_scales_reproduce_weights():
    torch.manual_seed(2)
    W = torch.randn(4, 32) * 1e-3
    qw = quantize_rtn(W, QuantOption(4, 16))
    assert qw.scales.dtype == torch.float16 and qw.zeros.dtype == torch.float16
    # dequantizing from fp16 copies (as a file stores them) gives the same weight
    again = dequantize(type(qw)(qw.codes.clone(), qw.scales.clone(), qw.zeros.clone(), qw.option))
    assert torch.equal(again, dequantize(qw))


def test_ragged_last_group():
    torch.manual_seed(3)
    W = torch.randn(3, 40)
    out = fake_quantize(W, QuantOption(4, 16), allow_ragged=True)
    assert out.shape == W.shape
    assert float(((out - W) ** 2).mean()) < 0.02


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_unpack_round_trip_and_size(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=1001, dtype=np.uint8)
    packed = pack_bits(codes, bits)
    assert packed.nbytes == -(-1001 * bits // 8)
    assert np.array_equal(unpack_bits(packed, bits, 1001), codes)
