import pytest
import torch

from bitalloc.calib import GramAccumulator
from bitalloc.gptq import gptq_quantize
from bitalloc.options import QuantOption
from bitalloc.quant import dequantize, quantize_rtn

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
    assert loss > 0


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
