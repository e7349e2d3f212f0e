"""Mixture-of-Experts: every expert slice a unit, through plan -> quantize ->
save -> reload -> eval for each transformers MoE family; per-expert Gram
matrices from only the tokens routed to each expert, checked against a
routing computed here from the router's own weights; per-layer ties; an
expert that calibration never reaches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitalloc import api
from bitalloc.calib.grams import CalibSettings, UnitGrams
from bitalloc.cli import main
from bitalloc.solve.problem import Budget

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "MixtralConfig": dict(num_local_experts=4, num_experts_per_tok=2),
    "Qwen2MoeConfig": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                           shared_expert_intermediate_size=64),
    "Qwen3MoeConfig": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
    "OlmoeConfig": dict(num_experts=8, num_experts_per_tok=2, eos_token_id=2, pad_token_id=1),
    "DeepseekV3Config": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                             first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=16,
                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
}
CALIB = ["--calib-windows", "4", "--calib-seq-len", "64", "--refine-windows", "2", "--refine-seq-len", "64"]


def build(name: str, **extra):
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, name)(**{**BASE, **FAMILIES[name], **extra})
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def save(model, path) -> str:
    from conftest import char_tokenizer

    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


def levels_ok(W: torch.Tensor, bits: int, group: int) -> bool:
    """Every group of every row holds at most 2^bits distinct values: the
    weight really sits on a grid of the planned width."""
    rows, cols = W.shape
    g = cols if group == 0 else group
    return all(len(torch.unique(W[r, k:k + g])) <= 2**bits for r in range(rows) for k in range(0, cols, g))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tie", ["per-expert", "experts"])
def test_family_plan_quantize_reload_eval(family, tie, tmp_path, capsys):
    from bitalloc.plan import Plan
    from bitalloc.export.native import load_quantized
    from bitalloc.model.units import get_weight

    src = save(build(family), tmp_path / "m")
    plan_path, out, report = tmp_path / "p.json", tmp_path / "q", tmp_path / "e.json"
    # per expert: the calibrated path (routed-token Hessians, GPTQ on expert slices); per layer: data-free RTN
    how = (["--tie", "experts", "--scorer", "rtn-mse-rel", *CALIB[4:]] if tie == "experts" else
           ["--scorer", "output", "--quantizer", "gptq", *CALIB])
    assert main(["--quiet", "plan", "--model", src, "--bpw", "3.5", *how, "--out", str(plan_path)]) == 0, \
        capsys.readouterr().err
    assert main(["--quiet", "quantize", "--model", src, "--plan", str(plan_path), "--out", str(out),
                 *(CALIB[:4] if tie != "experts" else [])]) == 0, capsys.readouterr().err
    assert main(["--quiet", "eval", "--quantized", str(out), "--reference", src, "--windows", "2", "--seq-len", "32",
                 "--json", str(report)]) == 0, capsys.readouterr().err
    result = json.loads(report.read_text())["result"]  # 2 windows x 31 predicted tokens
    assert result["tokens"] == sum(result["window_sums"]["tokens"]) == 2 * 31 and result["kl"] >= 0
    assert result["ppl"] == pytest.approx(np.exp(sum(result["window_sums"]["nll_sum"]) / (2 * 31)), rel=1e-9)
    plan = Plan.load(str(plan_path))
    loaded = api.load(src)
    experts = [u for u in loaded.inventory.units if u.index is not None]
    # gate, up and down of every expert of both layers (DeepSeek: layer 0 is dense)
    assert len(experts) >= 2 * 3 * 4 - (3 * 4 if family == "DeepseekV3Config" else 0)
    model, _, _ = load_quantized(str(out))
    for u in experts:
        opt = plan.assignment[u.name]
        assert levels_ok(get_weight(model, u), opt.bits, opt.group_size), (u.name, opt.name)
    if tie == "experts":
        by_part: dict[tuple, set] = {}  # per layer: one option for the gate halves, one for up, one for down
        for u in experts:
            by_part.setdefault((u.param, u.part), set()).add(plan.assignment[u.name])
        assert all(len(options) == 1 for options in by_part.values())


def _routed_tokens(model, layer: int, text_windows: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Mixtral: the hidden states entering layer ``layer``'s MoE block and,
    computed here from the router's weight (softmax, top-k), which experts
    each token goes to."""
    block = model.model.layers[layer].mlp
    seen = []
    handle = block.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for row in text_windows:
            model(row[None, :])
    handle.remove()
    X = torch.cat(seen)  # (tokens, hidden)
    probs = F.softmax(X @ block.gate.weight.T, dim=-1)  # (tokens, E)
    top = probs.topk(model.config.num_experts_per_tok, dim=-1).indices  # (tokens, k)
    return X, top


def test_expert_grams_use_only_routed_tokens():
    from bitalloc.calib.grams import calibration_windows
    from bitalloc.evaluate.text import calibration_text
    from bitalloc.model.units import find_units

    from conftest import char_tokenizer

    model = build("MixtralConfig")
    inv = find_units(model)
    windows = calibration_windows(char_tokenizer(), calibration_text(None), CalibSettings(3, 48))
    acc = UnitGrams(model, inv.units)
    with torch.no_grad():
        for row in windows:
            model(row[None, :])
    acc.remove()
    H = acc.hessians()
    X, top = _routed_tokens(model, 1, windows)
    experts = model.model.layers[1].mlp.experts
    for e in range(4):
        rows = (top == e).any(-1)
        x = X[rows].double()
        expected = 2 * x.T @ x / rows.sum()
        for half in ("gate", "up"):  # both halves see the same routed hidden states
            got = H[f"model.layers.1.mlp.experts.gate_up_proj[{e}].{half}"].double()
            assert torch.allclose(got, expected.float().double(), rtol=1e-4, atol=1e-6), e
        gate, up = F.linear(X[rows], experts.gate_up_proj[e]).chunk(2, -1)
        h = (experts.act_fn(gate) * up).double()
        expected_down = 2 * h.T @ h / rows.sum()
        assert torch.allclose(H[f"model.layers.1.mlp.experts.down_proj[{e}]"].double(), expected_down, rtol=1e-4,
                              atol=1e-6)
    routing = acc.routing()["model.layers.1.mlp.experts"]
    assert routing["tokens"] == len(X) and sum(routing["routed"]) == len(X) * 2  # top-2: two experts per token
    assert routing["routed"] == [int((top == e).any(-1).sum()) for e in range(4)]


def test_gptq_on_expert_slices_beats_rtn_on_routed_tokens(tmp_path):
    """GPTQ (one-shot, the expert's own routed-token Hessian) against RTN:
    lower output error tr(dW H dW^T) summed over the experts."""
    from bitalloc.formats.affine import QuantOption
    from bitalloc.formats.affine_rtn import dequantize, fake_quantize
    from bitalloc.quantizers.gptq import gptq_quantize
    from bitalloc.model.units import get_weight

    loaded = api.load(save(build("MixtralConfig"), tmp_path / "m"))
    settings = api.PlanSettings(Budget(3.0), calib=CalibSettings(4, 64))
    ctx = api.scoring_context(loaded, settings, progress=False)
    opt = QuantOption(3, 32)
    err = {"rtn": 0.0, "gptq": 0.0}
    for u in loaded.inventory.units:
        if u.index is None:
            continue
        W, H = get_weight(loaded.model, u), ctx.hessians[u.name].double()
        for name, Q in (("rtn", fake_quantize(W, opt)), ("gptq", dequantize(gptq_quantize(W, H.float(), opt)[0]))):
            dW = (W - Q).double()
            err[name] += float(torch.trace(dW @ H @ dW.T))
    assert err["gptq"] < err["rtn"]


def test_unreached_expert_is_reported_and_gets_its_peers_mean(tmp_path, monkeypatch):
    """A router that never picks expert 3 (forced by a hook): its slices get
    no Gram matrix of their own; the context says so and uses the mean of the
    reached experts of the same projection."""
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))  # the same weights were calibrated unhooked
    model = build("MixtralConfig")

    def never_three(_module, _args, out):
        logits, weights, index = out
        return logits, weights, torch.where(index == 3, torch.zeros_like(index), index)

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(never_three)
    loaded = api.load(save(build("MixtralConfig"), tmp_path / "m"))
    loaded.model = model
    settings = api.PlanSettings(Budget(3.0), scorer="output", calib=CalibSettings(4, 64))
    ctx = api.scoring_context(loaded, settings, progress=False)
    H = ctx.hessians
    name = "model.layers.0.mlp.experts.down_proj[3]"
    peers = torch.stack([H[f"model.layers.0.mlp.experts.down_proj[{e}]"] for e in range(3)]).mean(0)
    assert torch.equal(H[name], peers)
    gate = [H[f"model.layers.0.mlp.experts.gate_up_proj[{e}].gate"] for e in range(3)]
    assert torch.equal(H["model.layers.0.mlp.experts.gate_up_proj[3].gate"], torch.stack(gate).mean(0))
    assert len(ctx.notices) == 1 and "6 expert slice(s) received no calibration token" in ctx.notices[0]


def test_bad_expert_tensor_shape_is_one_clear_error():
    from torch import nn

    from bitalloc.calib.grams import ExpertGrams
    from bitalloc.errors import BitallocError
    from bitalloc.model.units import find_units

    model = build("MixtralConfig")
    experts = model.model.layers[0].mlp.experts
    experts.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach().reshape(4, -1, 32)[:, :, :32].contiguous())
    inv = find_units(model)
    units = [u for u in inv.units if u.param == "model.layers.0.mlp.experts.down_proj"]
    ExpertGrams(model, "model.layers.0.mlp.experts", units)  # the down_proj layout is fine
    experts.down_proj = nn.Parameter(torch.zeros(4, 64))
    with pytest.raises(BitallocError, match="is not the fused"):
        ExpertGrams(model, "model.layers.0.mlp.experts", units)


def test_pmq_weighs_the_output_error_by_routing(tmp_path, monkeypatch):
    """pmq = f * w * tr(dW H dW^T): f and w recomputed here from the router's
    own softmax/top-k on the hidden states entering the MoE block."""
    from bitalloc.calib.grams import calibration_windows
    from bitalloc.scorers import score

    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    loaded = api.load(save(build("MixtralConfig"), tmp_path / "m"))
    settings = api.PlanSettings(Budget(3.0), scorer="pmq", calib=CalibSettings(3, 48))
    ctx = api.scoring_context(loaded, settings, progress=False)
    tables = score(ctx, ["pmq", "output"])
    windows = calibration_windows(loaded.tokenizer, ctx.calib_text, settings.calib)
    X, top = _routed_tokens(loaded.model, 0, windows)
    probs = F.softmax(X @ loaded.model.model.layers[0].mlp.gate.weight.detach().T, dim=-1)
    weights = probs.gather(1, top) / probs.gather(1, top).sum(-1, keepdim=True)  # Mixtral renormalises the top-k
    names = [u.name for u in loaded.inventory.units]
    for e in range(4):
        routed = (top == e)
        f = float(routed.any(-1).float().mean())
        w = float(weights[routed].sum() / routed.any(-1).sum())
        i = names.index(f"model.layers.0.mlp.experts.down_proj[{e}]")
        assert tables["pmq"].importance[i] == pytest.approx(f * w, rel=1e-4)
        np.testing.assert_allclose(tables["pmq"].distortion[i], tables["output"].distortion[i])
    attention = names.index("model.layers.0.self_attn.q_proj")
    assert tables["pmq"].importance[attention] == 1.0


def test_moe_fixture_with_all_experts_is_the_dense_model():
    """bench/moe_fixture.py on a tiny Llama: k = E reproduces the dense
    logits (routing weights ~1/E, outputs scaled by E); every neuron lands in
    exactly one expert (or the shared one); fewer experts change the output."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from moe_fixture import moefy

    from conftest import tiny_llama

    dense = tiny_llama(intermediate_size=128)
    g = torch.Generator().manual_seed(0)
    calib, test = torch.randint(0, 128, (4, 32), generator=g), torch.randint(0, 128, (2, 32), generator=g)
    moe, layout = moefy(dense, experts=4, top_k=4, calib_windows=calib)
    for shared, groups in layout:  # 64 shared neurons, 4 experts of 16
        assert shared.shape == (64,) and groups.shape == (4, 16)
        assert sorted(torch.cat([shared, groups.reshape(-1)]).tolist()) == list(range(128))
    with torch.no_grad():
        a, b = dense(test).logits, moe(test).logits
    assert torch.allclose(a, b, atol=1e-5 * float(a.abs().max()))  # float tolerance (2e-7 of 1.3 measured)
    half, _ = moefy(dense, experts=4, top_k=2, calib_windows=calib)
    with torch.no_grad():
        assert not torch.allclose(a, half(test).logits, atol=1e-3 * float(a.abs().max()))


def test_structural_moe_rule_promotes_shared_experts_and_end_layers():
    """QuantMoE-Bench's prior as a baseline: shared experts and the first and
    last MoE layers one bit up, the rest at a base option, within the budget."""
    from bitalloc.solve.baselines import moe_rule_plan, structural_moe_units
    from bitalloc.formats.affine import build_menu
    from bitalloc.model.units import find_units

    inv = find_units(build("Qwen2MoeConfig", num_hidden_layers=3))
    promoted = structural_moe_units(inv)
    assert all(n.startswith(("model.layers.0.", "model.layers.2.")) or "shared_expert" in n for n in promoted)
    assert any("model.layers.1.mlp.shared_expert" in n for n in promoted)
    assert not any(n.startswith("model.layers.1.") and "shared_expert" not in n for n in promoted)
    options = build_menu((2, 3, 4), (32,), ("sym",))
    plan = moe_rule_plan(inv, options, api.PlanSettings(Budget(3.45)), "tiny")
    bits = {n: o.bits for n, o in plan.assignment.items()}
    base = min(bits.values())
    assert all(bits[n] == (base + 1 if n in promoted else base) for n in bits)
    assert plan.sizes(inv).quantized_bits <= 3.45 * inv.quantized_numel
