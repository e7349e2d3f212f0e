
import pytest
import torch
from torch import nn

from bitalloc.units import find_units, get_weight, model_identity, set_weight

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def build(config_name, **kw):
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = getattr(transformers, config_name)(**kw)
    try:
        return AutoModelForCausalLM.from_config(cfg).eval()
    except ValueError:
        return AutoModel.from_config(cfg).eval()


DECODERS = {
    "LlamaConfig": SMALL,
    "MistralConfig": SMALL,
    "Qwen2Config": SMALL,
    "Qwen3Config": dict(SMALL, head_dim=8),
    "Gemma3TextConfig": dict(SMALL, head_dim=8),
}


@pytest.mark.parametrize("config_name", sorted(DECODERS))
def test_llama_like_families(config_name):
    model = build(config_name, **DECODERS[config_name])
    inv = find_units(model)
    assert not inv.notices, inv.notices
    assert len(inv.units) == 2 * 7  # q k v o gate up down per layer
    names = {u.name for u in inv.units}
    assert "model.layers.1.mlp.down_proj" in names and "lm_head" not in names
    assert {t for t, _ in inv.tie_groups} == {"qkv", "gate_up"}
    # every parameter is either a unit or kept, and the counts add up (tied once)
    total = sum(p.numel() for p in model.parameters())
    assert inv.quantized_numel + inv.kept_numel == total


def test_gpt2_conv1d_is_transposed():
    model = build("GPT2Config", n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=64)
    inv = find_units(model)
    assert not inv.notices
    unit = inv.unit("transformer.h.0.mlp.c_fc")
    assert unit.transposed and unit.shape == (128, 32)  # (out, in); stored (in, out)
    W = get_weight(model, unit)
    assert W.shape == (128, 32)
    set_weight(model, unit, W * 2)
    assert torch.allclose(model.transformer.h[0].mlp.c_fc.weight, (W * 2).t())


def test_bert_encoder():
    model = build("BertConfig", vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64)
    inv = find_units(model)
    assert not inv.notices, inv.notices
    assert len(inv.units) == 2 * 6
    assert [t for t, _ in inv.tie_groups] == ["qkv", "qkv"]


def test_fused_moe_experts_are_sliced_into_units():
    model = build("MixtralConfig", **SMALL, num_local_experts=4, num_experts_per_tok=2)
    inv = find_units(model)
    assert not inv.notices
    names = {u.name for u in inv.units}
    assert "model.layers.0.mlp.experts.gate_up_proj[3]" in names
    assert not any(n.endswith("mlp.gate") for n in names)  # the router is kept
    unit = inv.unit("model.layers.1.mlp.experts.down_proj[2]")
    assert unit.shape == (32, 64) and unit.index == 2
    before = model.model.layers[1].mlp.experts.down_proj.detach().clone()
    set_weight(model, unit, torch.zeros(32, 64))
    after = model.model.layers[1].mlp.experts.down_proj
    assert torch.all(after[2] == 0) and torch.equal(after[1], before[1])
    assert inv.quantized_numel + inv.kept_numel == sum(p.numel() for p in model.parameters())


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"model_type": "my-net"})()
        self.emb = nn.Embedding(10, 8)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight  # tied to the embedding: kept with it


def test_unknown_architecture_uses_generic_walk_with_notice():
    inv = find_units(Custom())
    assert inv.arch == "generic"
    assert any("not in bitalloc's table" in n for n in inv.notices)
    assert [u.name for u in inv.units] == ["body.0", "body.2"]
    assert inv.kept_numel == 10 * 8 + 16 + 8  # embedding once (tied), biases


def test_identity_depends_on_shapes_not_values():
    a, b = Custom(), Custom()
    assert model_identity(a) == model_identity(b)
    b.body[0] = nn.Linear(8, 17)
    assert model_identity(a) != model_identity(b)


def test_expert_tie_puts_all_experts_of_a_projection_in_one_option():
    """--tie experts (per-layer mode): one option per fused projection per
    layer, as llama.cpp and vLLM's fused MoE kernels need; the budget counts
    every expert's bits."""
    import numpy as np

    from bitalloc.formats.affine import QuantOption
    from bitalloc.problem import Budget, Constraints, build_problem
    from bitalloc.solvers import solve

    model = build("MixtralConfig", **SMALL, num_local_experts=4, num_experts_per_tok=2)
    inv = find_units(model)
    experts = [m for t, m in inv.tie_groups if t == "experts"]
    assert len(experts) == 2 * 2  # gate_up and down, two layers
    assert all(len(m) == 4 and len({n.split("[")[0] for n in m}) == 1 for m in experts)
    options = (QuantOption(2, 32), QuantOption(4, 32))
    rng = np.random.default_rng(0)
    errors = rng.random((len(inv.units), 2)) * np.array([10.0, 1.0])
    problem = build_problem(inv, options, errors, Budget(3.0), Constraints(ties=("experts",)))
    choice = solve(problem, "ilp").choice
    picked = {inv.units[i].name: options[int(choice[g])] for g, members in enumerate(problem.groups) for i in members}
    for members in experts:
        assert len({picked[n] for n in members}) == 1
    bits = sum(u.numel * picked[u.name].bits + (u.numel // 32) * 32 for u in inv.units)  # codes + fp16 scale, zero
    assert bits <= 3.0 * inv.quantized_numel
