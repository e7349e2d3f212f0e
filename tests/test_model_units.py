
import pytest
import torch
from torch import nn

from bitalloc.model.units import find_units, get_weight, model_identity, set_weight

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
    assert {"model.layers.0.mlp.experts.gate_up_proj[3].gate", "model.layers.0.mlp.experts.gate_up_proj[3].up"} <= names
    assert "model.layers.0.mlp.experts.gate_up_proj[3]" not in names  # the halves, not the fused slice
    assert not any(n.endswith("mlp.gate") for n in names)  # the router is kept
    unit = inv.unit("model.layers.1.mlp.experts.down_proj[2]")
    assert unit.shape == (32, 64) and unit.index == 2
    before = model.model.layers[1].mlp.experts.down_proj.detach().clone()
    set_weight(model, unit, torch.zeros(32, 64))
    after = model.model.layers[1].mlp.experts.down_proj
    assert torch.all(after[2] == 0) and torch.equal(after[1], before[1])
    assert inv.quantized_numel + inv.kept_numel == sum(p.numel() for p in model.parameters())


def test_gate_and_up_halves_are_units_that_read_and_write_their_rows():
    model = build("MixtralConfig", **SMALL, num_local_experts=4, num_experts_per_tok=2)
    inv = find_units(model)
    fused = model.model.layers[0].mlp.experts.gate_up_proj  # (E, 2I, H): gate rows, then up rows
    E, two_i, hidden = fused.shape
    gate, up = inv.unit("model.layers.0.mlp.experts.gate_up_proj[1].gate"), inv.unit(
        "model.layers.0.mlp.experts.gate_up_proj[1].up")
    assert gate.shape == up.shape == (two_i // 2, hidden) and (gate.part, up.part) == ("gate", "up")
    assert torch.equal(get_weight(model, gate), fused[1, : two_i // 2].float())
    assert torch.equal(get_weight(model, up), fused[1, two_i // 2:].float())
    before = fused.detach().clone()
    set_weight(model, up, torch.full(up.shape, 7.0))
    assert torch.all(fused[1, two_i // 2:] == 7) and torch.equal(fused[1, : two_i // 2], before[1, : two_i // 2])
    assert torch.equal(fused[0], before[0])
    # the fused module computes act(x W_gate^T) * (x W_up^T) from the two halves, as the units describe
    x = torch.randn(5, hidden)
    g, u = torch.nn.functional.linear(x, fused[2]).chunk(2, -1)
    assert torch.allclose(g, x @ get_weight(model, inv.unit("model.layers.0.mlp.experts.gate_up_proj[2].gate")).T,
                          atol=1e-5)
    assert torch.allclose(u, x @ get_weight(model, inv.unit("model.layers.0.mlp.experts.gate_up_proj[2].up")).T,
                          atol=1e-5)


@pytest.mark.parametrize("config, keys", [
    ("MixtralConfig", {"gate": "block_sparse_moe.experts.{e}.w1.weight", "up": "block_sparse_moe.experts.{e}.w3.weight",
                       "down": "block_sparse_moe.experts.{e}.w2.weight"}),
    ("Qwen2MoeConfig", {"gate": "mlp.experts.{e}.gate_proj.weight", "up": "mlp.experts.{e}.up_proj.weight",
                        "down": "mlp.experts.{e}.down_proj.weight"}),
])
def test_on_disk_expert_keys_map_to_slices_both_ways(config, keys):
    extra = dict(num_local_experts=4, num_experts_per_tok=2) if config == "MixtralConfig" else dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64)
    inv = find_units(build(config, **SMALL, **extra))
    # the keys of the original per-expert checkpoints (Mixtral-8x7B: w1 gate, w3 up, w2 down), written out by hand
    expected = {f"model.layers.{l}.mlp.experts.{p}[{e}]{h}": f"model.layers.{l}." + keys[k].format(e=e)
                for l in range(2) for e in range(4)
                for p, h, k in (("gate_up_proj", ".gate", "gate"), ("gate_up_proj", ".up", "up"),
                                ("down_proj", "", "down"))}
    for name, key in expected.items():
        assert inv.disk_key(name) == key and inv.unit_for_disk_key(key) == name
    assert inv.disk_key("model.layers.0.self_attn.q_proj") is None
    assert inv.unit_for_disk_key("model.layers.0.self_attn.q_proj.weight") is None
    # a pattern over on-disk keys selects the same units as one over in-memory names
    down = keys["down"].replace("{e}", "*")
    assert inv.matching(f"model.layers.1.{down}") == inv.matching("model.layers.1.mlp.experts.down_proj*")


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
    from bitalloc.solve.problem import Budget, Constraints, build_problem
    from bitalloc.solve.solvers import solve

    model = build("MixtralConfig", **SMALL, num_local_experts=4, num_experts_per_tok=2)
    inv = find_units(model)
    experts = [m for t, m in inv.tie_groups if t == "experts"]
    assert len(experts) == 2 * 3  # gate halves, up halves, down; two layers
    for m in experts:
        units = [inv.unit(n) for n in m]
        assert len({(u.param, u.part) for u in units}) == 1 and sorted(u.index for u in units) == [0, 1, 2, 3]
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


def test_tie_patterns_group_matches_per_layer_and_merge_with_named_ties():
    """A --tie pattern (over unit names or on-disk expert keys) ties its
    matches within each layer; a unit in two groups ends in one merged group,
    so its bits count once; the budget holds and every group shares one option."""
    import numpy as np

    from bitalloc.formats.affine import QuantOption
    from bitalloc.solve.problem import Budget, Constraints, build_problem, tie_groups_for
    from bitalloc.solve.solvers import solve

    inv = find_units(build("MixtralConfig", **SMALL, num_local_experts=4, num_experts_per_tok=2))
    # Mixtral's on-disk w2 is down_proj: per layer, the four down slices in one group
    by_key = tie_groups_for(inv, ["model.layers.*.block_sparse_moe.experts.*.w2.weight"])
    assert by_key == [tuple(f"model.layers.{l}.mlp.experts.down_proj[{e}]" for e in range(4)) for l in range(2)]
    # 'qkv' and a pattern over v/o share v_proj, another pattern repeats o: one attention group per layer
    ties = ("experts", "qkv", "model.layers.*.self_attn.[vo]_proj", "*.self_attn.o_proj")
    groups = tie_groups_for(inv, list(ties))
    flat = [n for g in groups for n in g]
    assert len(flat) == len(set(flat))  # every unit in one group at most
    layer0 = next(g for g in groups if "model.layers.0.self_attn.q_proj" in g)
    assert set(layer0) == {f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"}
    assert len(groups) == 2 * 3 + 2  # per layer: gate halves, up halves, down slices, attention
    options = (QuantOption(2, 32), QuantOption(4, 32))
    errors = np.random.default_rng(1).random((len(inv.units), 2)) * np.array([10.0, 1.0])
    problem = build_problem(inv, options, errors, Budget(3.0), Constraints(ties=ties))
    assert sorted(i for g in problem.groups for i in g) == list(range(len(inv.units)))
    choice = solve(problem, "ilp").choice
    picked = {inv.units[i].name: options[int(choice[g])] for g, members in enumerate(problem.groups) for i in members}
    assert all(len({picked[n] for n in g}) == 1 for g in groups)
    bits = sum(u.numel * picked[u.name].bits + (u.numel // 32) * 32 for u in inv.units)
    assert bits <= 3.0 * inv.quantized_numel


def test_tie_pattern_that_matches_nothing_is_one_clear_error():
    from bitalloc.errors import BitallocError
    from bitalloc.solve.problem import tie_groups_for

    inv = find_units(build("MixtralConfig", **SMALL, num_local_experts=4, num_experts_per_tok=2))
    with pytest.raises(BitallocError, match=r"--tie pattern '\*\.experts\.\*\.w9\.weight' matches no unit.*"
                                            r"on-disk keys like 'model\.layers\.0\.block_sparse_moe\.experts\.0\.w1"):
        tie_groups_for(inv, ["*.experts.*.w9.weight"])
    with pytest.raises(BitallocError, match="Unknown tie group"):
        tie_groups_for(inv, ["gate_up"])  # Mixtral's experts are fused; no dense gate/up pair
