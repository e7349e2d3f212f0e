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


# ---- importance-weighted clipping search ------------------------------------

def _candidates(w: np.ndarray, imp: np.ndarray, bits: int, sym: bool, factor: float, steps: int) -> list[np.ndarray]:
    """Dequantized group for one shrink factor and each of its least-squares
    refits, written from the rule in the docs: symmetric, the signed peak
    over 2^(b-1) times the factor; asymmetric, both ends of the range times
    the factor; a refit keeps the codes and takes s = sum(imp w c) /
    sum(imp c^2) with c = q - z (zero point fixed); fp16 scales; codes
    rounded in float32 as the stored weights are."""
    qmax, w = 2**bits - 1, w.astype(np.float32)
    if sym:
        half = 2 ** (bits - 1)
        peak = w[np.argmax(np.abs(w))]
        base = np.float16(abs(peak) / half)
        mag = np.float32(np.float16(np.float32(base) * np.float32(factor)))
        s, z = (-mag if peak > 0 else mag), half
    else:
        lo, hi = w.min() * np.float32(factor), w.max() * np.float32(factor)
        s = np.float32(np.float16((hi - lo) / np.float32(qmax)))
        z = min(max(np.round(-lo / s), 0), qmax)
    out = []
    for step in range(steps + 1):
        c = np.clip(np.round(w / s + z), 0, qmax) - z
        if step:
            num, den = float((imp * w * c).sum()), float((imp * c * c).sum())
            if den > 0 and num * s > 0:
                s = np.float32(np.float16(num / den))
            c = np.clip(np.round(w / s + z), 0, qmax) - z
        out.append(c * s)
    return out


@pytest.mark.parametrize("option", [QuantOption(2, 16), QuantOption(3, 16, True), QuantOption(3, 0),
                                    QuantOption(4, 16, True)], ids=str)
def test_weighted_search_picks_the_least_weighted_error_of_the_grid(option):
    """Every group's weighted error is the least over the shrink grid and the
    refits from each of its points (the candidates computed here in numpy from
    the documented rule), never above plain min/max rounding's, and (for
    these weights) below the shrink grid's alone somewhere."""
    from bitalloc.formats.affine_rtn import REFIT_STEPS, SHRINK_GRID

    gen = torch.Generator().manual_seed(11)
    W = torch.randn(6, 48, generator=gen) * torch.linspace(0.5, 2.0, 48)
    imp = torch.rand(48, generator=gen) ** 4 + 1e-3  # very unequal columns
    got = dequantize(quantize_rtn(W, option, importance=imp)).double().numpy()
    plain = dequantize(quantize_rtn(W, option)).double().numpy()
    w64, i64 = W.double().numpy(), imp.double().numpy()
    g = 48 if option.group_size == 0 else option.group_size
    refit_won = 0
    for r in range(6):
        for c in range(0, 48, g):
            w, i = w64[r, c : c + g], i64[c : c + g]
            chains = [_candidates(w, i, option.bits, option.symmetric, f, REFIT_STEPS) for f in SHRINK_GRID]
            errs = [[float((i * (d.astype(np.float64) - w) ** 2).sum()) for d in chain] for chain in chains]
            grid_only = min(e[0] for e in errs)
            chosen = float((i * (got[r, c : c + g] - w) ** 2).sum())
            assert chosen == pytest.approx(min(min(e) for e in errs), rel=1e-4, abs=1e-9)
            assert chosen <= float((i * (plain[r, c : c + g] - w) ** 2).sum()) * (1 + 1e-6) + 1e-12
            assert chosen <= grid_only * (1 + 1e-6) + 1e-12
            refit_won += chosen < grid_only * (1 - 1e-6)
    assert refit_won > 0


@pytest.mark.parametrize("option", [QuantOption(3, 16), QuantOption(4, 16, True), QuantOption(2, 0)], ids=str)
def test_weighted_search_in_slices_equals_the_whole_tensor_at_once(option, monkeypatch):
    """The search runs a few rows at a time (its temporaries stay in cache):
    slices of 1, 3 and 5 rows (the last slice short), and a ragged last
    group, give the scales and zeros of one search over the whole tensor,
    bit for bit."""
    import bitalloc.formats.affine_rtn as rtn

    gen = torch.Generator().manual_seed(3)
    W = torch.randn(13, 40, generator=gen) * torch.linspace(0.2, 3.0, 40)
    imp = torch.rand(40, generator=gen) ** 3 + 1e-3
    g = 40 if option.group_size == 0 else option.group_size
    Wg = rtn.grouped(W, g)  # the last group of 16 is ragged (40 = 2 x 16 + 8)
    weights = rtn.grouped_importance(imp, 40, g)
    bits = torch.full((Wg.shape[1],), float(option.bits))
    whole = rtn.search_qparams(Wg, option, bits, weights)
    searched = []
    real = rtn.search_qparams
    monkeypatch.setattr(rtn, "search_qparams", lambda Wg, *a: searched.append(Wg.shape[0]) or real(Wg, *a))
    for rows in (1, 3, 5):
        monkeypatch.setattr(rtn, "SEARCH_SLICE", rows * Wg.shape[1] * Wg.shape[2])
        searched.clear()
        sliced = rtn.group_qparams(Wg, option, bits, weights)
        assert searched == [rows] * (13 // rows) + ([13 % rows] if 13 % rows else [])  # really in slices
        assert torch.equal(sliced[0], whole[0]) and torch.equal(sliced[1], whole[1])


def test_weighted_search_lowers_the_output_error_of_a_layer():
    """With inputs whose columns differ in scale, the search (weights = mean
    squared input) gives a smaller output error ||X (W - Q)^T||^2 than plain
    rounding, at every bit-width tried."""
    gen = torch.Generator().manual_seed(12)
    X = torch.randn(512, 64, generator=gen) * torch.linspace(0.1, 3.0, 64)  # (n, in)
    W = torch.randn(16, 64, generator=gen)
    imp = (X**2).mean(0)
    for option in (QuantOption(2, 32), QuantOption(3, 32, True), QuantOption(4, 0)):
        out = lambda Q: float(((X @ (W - Q).T) ** 2).sum())  # noqa: E731
        assert out(fake_quantize(W, option, importance=imp)) < out(fake_quantize(W, option))


def test_zero_importance_group_keeps_plain_scales_and_ragged_padding_weighs_nothing():
    gen = torch.Generator().manual_seed(13)
    W = torch.randn(4, 40, generator=gen)
    imp = torch.rand(40, generator=gen) + 0.1
    imp[:16] = 0.0  # the first group: nothing reaches it
    opt = QuantOption(3, 16)
    searched = quantize_rtn(W, opt, allow_ragged=True, importance=imp)
    plain = quantize_rtn(W, opt, allow_ragged=True)
    assert torch.equal(searched.scales[:, 0], plain.scales[:, 0])
    assert torch.equal(searched.zeros[:, 0], plain.zeros[:, 0])
    # the ragged tail (8 real columns) chooses as if only those columns existed
    tail = quantize_rtn(W[:, 32:], QuantOption(3, 8), importance=imp[32:])
    assert torch.equal(searched.scales[:, 2], tail.scales[:, 0]) and torch.equal(searched.codes[:, 32:], tail.codes)
    with pytest.raises(Exception, match="one value per input column"):
        quantize_rtn(W, opt, allow_ragged=True, importance=imp[:39])
