import numpy as np
import pytest
import torch

from bitalloc.calib.grams import GramAccumulator
from bitalloc.quantizers.gptq import gptq_quantize
from bitalloc.formats.affine import QuantOption
from bitalloc.formats.affine_rtn import dequantize, quantize_rtn

OPTIONS = [QuantOption(b, g, s) for b in (2, 3, 4) for g in (32, 0) for s in (False, True)]


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_gptq_with_diagonal_hessian_equals_rtn(option):
    torch.manual_seed(0)
    W = torch.randn(24, 128)
    H = torch.diag(torch.rand(128) + 0.5)
    qw, _ = gptq_quantize(W, H, option)
    ref = quantize_rtn(W, option)
    assert torch.equal(qw.codes, ref.codes)
    assert torch.equal(qw.scales, ref.scales)


def correlated_inputs(n=2048, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g) / d**0.5
    return torch.randn(n, d, generator=g) @ (A + torch.eye(d))  # (n, d) correlated features


@pytest.mark.parametrize("option", [QuantOption(3, 32), QuantOption(4, 0, True), QuantOption(2, 64)], ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_rtn(option, act_order):
    torch.manual_seed(1)
    X = correlated_inputs()
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(32, 128)
    qw, loss = gptq_quantize(W, H, option, act_order=act_order)
    out_err = lambda Q: float(torch.trace((W - Q) @ H @ (W - Q).T))  # noqa: E731
    assert out_err(dequantize(qw)) < 0.9 * out_err(dequantize(quantize_rtn(W, option)))
    # GPTQ's loss sum_j (w_j - q_j)^2 / U_jj^2 / 2 (w_j as updated when column j is rounded) is, by the
    # error-feedback identity W - Q = E U with U^T U = (damped H)^-1, half the output error under the damped H
    Hd = H.double() + 0.01 * torch.diag(H).double().mean() * torch.eye(H.shape[0], dtype=torch.float64)
    D = (W - dequantize(qw)).double()
    assert loss == pytest.approx(0.5 * float(torch.trace(D @ Hd @ D.T)), rel=1e-3)


def test_gram_accumulation_equals_one_shot():
    torch.manual_seed(2)
    lin = torch.nn.Sequential(torch.nn.Linear(16, 8))
    acc = GramAccumulator(lin, ["0"])
    batches = [torch.randn(3, 5, 16) for _ in range(4)]
    for b in batches:
        lin(b)
    acc.remove()
    X = torch.cat([b.reshape(-1, 16) for b in batches])  # (60, 16)
    assert torch.allclose(acc.hessians()["0"], (2 * X.T @ X / X.shape[0]).float(), atol=1e-5)


def test_modules_fed_the_same_input_share_one_hessian_and_gptq_reuses_nothing_stale():
    """Two heads reading the same tensor (as q/k/v do) get one shared H; a
    third reading another input its own. GPTQ with the shared tensor gives
    exactly what it gives with private copies, in either order."""
    from bitalloc.formats.affine import QuantOption

    torch.manual_seed(4)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.c(self.a(x) + self.b(x))

    net = Net()
    acc = GramAccumulator(net, ["a", "b", "c"])
    for _ in range(3):
        net(torch.randn(4, 16))
    acc.remove()
    H = acc.hessians()
    assert H["a"] is H["b"] and H["c"] is not H["a"]
    opt = QuantOption.parse("int3-g8-asym")
    W = [torch.randn(8, 16), torch.randn(8, 16), torch.randn(8, 8)]
    shared = [gptq_quantize(w, H[n], opt) for w, n in zip(W, "abc")]
    private = [gptq_quantize(w, H[n].clone(), opt) for w, n in zip(reversed(W), "cba")][::-1]
    for (q1, l1), (q2, l2) in zip(shared, private):
        assert torch.equal(q1.codes, q2.codes) and torch.equal(q1.scales, q2.scales) and l1 == l2


@pytest.mark.parametrize("sym", [False, True])
def test_mixed_column_bits_gptq_diag_equals_rtn_and_round_trips(sym):
    from bitalloc.formats.affine_rtn import pack_weight_codes, unpack_weight_codes

    torch.manual_seed(4)
    W = torch.randn(16, 128)
    opt = QuantOption(3, 32, sym, mixed="slim")
    bits = (4, 2, 3, 3)
    ref = quantize_rtn(W, opt, column_bits=bits)
    qw, _ = gptq_quantize(W, torch.diag(torch.rand(128) + 0.5), opt, column_bits=bits)
    assert torch.equal(qw.codes, ref.codes) and qw.column_bits == bits
    # each column group is quantized at its own width: the 4-bit group is finer than the 2-bit one
    err = ((dequantize(ref) - W) ** 2).reshape(16, 4, 32).mean(dim=(0, 2))
    assert err[0] < err[2] < err[1]
    assert int(ref.codes[:, 32:64].max()) < 4
    packed = pack_weight_codes(ref)
    assert packed.nbytes == sum(16 * 32 * b // 8 for b in bits)
    assert np.array_equal(unpack_weight_codes(packed, (16, 128), opt, bits), ref.codes.numpy())


def test_mixed_bits_must_keep_the_mean():
    from bitalloc.errors import BitallocError

    with pytest.raises(BitallocError, match="average exactly"):
        quantize_rtn(torch.randn(4, 64), QuantOption(3, 32, mixed="baq"), column_bits=(4, 3))


def test_sequential_gptq_first_layer_equals_one_shot_and_reloads(tmp_path):
    """Layer 0 sees the same inputs either way, so sequential and one-shot
    GPTQ agree there; later layers differ (their inputs are quantized)."""
    from bitalloc import api
    from bitalloc.calib.grams import CalibSettings, accumulate_hessians, calibration_windows
    from bitalloc.plan import Plan
    from bitalloc.solve.problem import Budget
    from bitalloc.quantizers.apply import quantize_model, restored
    from bitalloc.evaluate.text import wiki_text
    from conftest import char_tokenizer, tiny_llama

    path = tmp_path / "m"
    tiny_llama(num_hidden_layers=3).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    loaded = api.load(str(path))
    inv = loaded.inventory
    windows = calibration_windows(loaded.tokenizer, wiki_text("calib"), CalibSettings(3, 64))
    H = accumulate_hessians(loaded.model, inv, windows)
    assignment = {u.name: QuantOption(3, 32) for u in inv.units}
    one = Plan(assignment, inv.identity, "tiny", Budget(4.0), "x", "x", quantizer="gptq")
    seq = Plan(assignment, inv.identity, "tiny", Budget(4.0), "x", "x", quantizer="gptq", sequential=True)
    with restored(loaded.model):
        a = quantize_model(loaded.model, inv, one, hessians=H)
    with restored(loaded.model):
        b = quantize_model(loaded.model, inv, seq, calib_windows=windows)
    first = [u.name for u in inv.units if ".layers.0." in u.name]
    assert all(torch.equal(a[n].codes, b[n].codes) for n in first)
    assert any(not torch.equal(a[u.name].codes, b[u.name].codes) for u in inv.units if ".layers.2." in u.name)
    assert Plan.from_dict(seq.to_dict()).sequential


def test_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    """Checked against the textbook route: invert the damped H explicitly,
    then take its upper Cholesky factor (H^-1 = U^T U)."""
    from bitalloc.quantizers.gptq import inverse_hessian_factor

    torch.manual_seed(3)
    X = torch.randn(300, 40, dtype=torch.float64)
    X[:, 5] = 0.0  # a dead input column
    H = 2 * X.T @ X / 300
    U, dead = inverse_hessian_factor(H, 0.01)
    Hd = H.clone()
    Hd[5, 5] = 1.0
    Hd += 0.01 * torch.diag(Hd).mean() * torch.eye(40, dtype=torch.float64)
    expected = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    assert dead.tolist() == [i == 5 for i in range(40)]
    assert torch.equal(U, torch.triu(U)) and bool((torch.diag(U) > 0).all())
    assert torch.allclose(U, expected, rtol=1e-9, atol=1e-12)
    assert torch.allclose(U.T @ U, torch.linalg.inv(Hd), rtol=1e-9, atol=1e-12)
    U32, dead32 = inverse_hessian_factor(H, 0.01, torch.float32)  # what GPTQ's float32 sweep uses
    assert U32.dtype == torch.float32 and torch.equal(dead32, dead)
    assert torch.allclose(U32.double(), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("option", [QuantOption(3, 32), QuantOption(2, 32, True), QuantOption(3, 0, True)], ids=str)
def test_gptq_search_with_diagonal_hessian_equals_weighted_rtn(option):
    """Without input correlation GPTQ pushes no error, so with the search its
    codes are RTN's with importance diag(H)."""
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(24, 128, generator=gen)
    d = torch.rand(128, generator=gen) ** 3 + 0.05
    qw, _ = gptq_quantize(W, torch.diag(d), option, search=True)
    ref = quantize_rtn(W, option, importance=d)
    assert torch.equal(qw.codes, ref.codes) and torch.equal(qw.scales, ref.scales)
    assert not torch.equal(ref.codes, quantize_rtn(W, option).codes)  # the search changed something
