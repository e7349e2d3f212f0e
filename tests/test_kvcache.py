"""The KV cache as units: codecs against independent computations, the cache
applying exactly the planned codec per layer/head/token, the solver against
brute force and within its budget, the plan file, the per-token policy."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_llama

from bitalloc.errors import BitallocError, InfeasibleBudgetError
from bitalloc.formats.kv import (
    FloatCodec,
    GgmlCacheCodec,
    IntCodec,
    RotationCodec,
    gaussian_lloyd_max,
    parse_codec,
    rotated_lloyd_max,
    rotation,
)
from bitalloc.kvcache.allocate import Pair, budget_token_bits, pair_estimates, solve_kv, uniform_candidates
from bitalloc.kvcache.cache import KVAssignment, quantizing_cache, record_kv
from bitalloc.kvcache.layout import KVLayout, bits_per_element, cache_bytes, layout_of
from bitalloc.kvcache.plan import KVPlan
from bitalloc.kvcache.policy import fit_policy, unigram_surprisal
from bitalloc.kvcache.score import KVTable, build_table

# ---- codecs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,published", [(1, 0.3634), (2, 0.1175), (3, 0.03454), (4, 0.009497)])
def test_lloyd_max_gaussian_matches_published_distortion(bits, published):
    # Max (1960) / Lloyd (1982): MSE of the optimal b-bit quantizer of N(0, 1)
    assert gaussian_lloyd_max(bits).distortion == pytest.approx(published, rel=1e-3)


def test_lloyd_max_one_bit_levels_are_the_half_normal_mean():
    # the 1-bit optimum of N(0,1) reconstructs at ±E|X| = ±sqrt(2/pi)
    assert gaussian_lloyd_max(1).levels == pytest.approx([-math.sqrt(2 / math.pi), math.sqrt(2 / math.pi)], abs=1e-5)


def test_rotated_marginal_matches_sampled_unit_vectors():
    # the density (1 - t^2/d)^((d-3)/2) behind rot<b>: the quantizer built on it has, on sampled random unit
    # vectors, the distortion it predicts
    d, bits = 64, 3
    lm = rotated_lloyd_max(bits, d)
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(20000, d, generator=gen, dtype=torch.float64)
    y = (u / u.norm(dim=1, keepdim=True) * math.sqrt(d)).flatten().numpy()  # coordinates of sqrt(d) * u
    idx = np.searchsorted(lm.thresholds, y)
    assert float(np.mean((y - lm.levels[idx]) ** 2)) == pytest.approx(lm.distortion, rel=0.02)
    assert float(np.var(y)) == pytest.approx(1.0, rel=0.01)


@pytest.mark.parametrize("d", [64, 48])
def test_rotation_is_orthogonal_and_seeded(d):
    R = rotation(d, 7)
    assert torch.allclose(R @ R.T, torch.eye(d), atol=1e-5)
    assert torch.equal(rotation(d, 7), R.clone())
    assert not torch.allclose(rotation(d, 8), R)


def test_hadamard_rotation_has_entries_of_one_over_sqrt_d():
    R = rotation(64, 3)
    assert torch.allclose(R.abs(), torch.full((64, 64), 1 / 8.0))


@pytest.mark.parametrize("name,d,bits", [
    ("f16", 64, 16 * 64), ("int4", 64, 4 * 64 + 16 + 16), ("int8", 128, 8 * 128 + 32), ("rot3", 64, 3 * 64 + 16),
    ("rot2", 128, 2 * 128 + 16),
    ("q8_0", 64, 2 * (2 + 32) * 8),  # per block of 32: fp16 scale + 32 int8
    ("q4_0", 64, 2 * (2 + 16) * 8),  # fp16 scale + 32 nibbles
    ("q4_1", 64, 2 * (4 + 16) * 8),  # fp16 scale and min + 32 nibbles
    ("q5_0", 128, 4 * (2 + 4 + 16) * 8),  # fp16 scale + 32 high bits + 32 nibbles
    ("q5_1", 64, 2 * (4 + 4 + 16) * 8),
])
def test_vector_bits_by_hand(name, d, bits):
    assert parse_codec(name).vector_bits(d) == bits


def test_int_codec_error_is_within_half_a_step():
    x = torch.randn(500, 64, generator=torch.Generator().manual_seed(0))
    for b in (2, 4, 8):
        xq = IntCodec(b).fake_quantize(x)
        step = (x.amax(1) - x.amin(1)) / ((1 << b) - 1)  # (500,)
        assert ((xq - x).abs().amax(1) <= step / 2 * 1.01 + 1e-3).all()


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_ggml_cache_codec_matches_gguf_py(name):
    # gguf-py's own numpy (de)quantizer of the type, independent of ggml
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(2))
    ref = dequantize(quantize(x.numpy(), GGMLQuantizationType[name]), GGMLQuantizationType[name])
    got = GgmlCacheCodec(name.lower()).fake_quantize(x).numpy()
    assert np.allclose(got, ref, atol=1e-6, rtol=1e-5)


def test_rotation_codec_error_matches_its_lloyd_max_distortion():
    x = torch.randn(4000, 64, generator=torch.Generator().manual_seed(3)) * 3.0
    for b in (2, 3, 4):
        rel = float(((RotationCodec(b).fake_quantize(x) - x) ** 2).sum() / (x * x).sum())
        assert rel == pytest.approx(rotated_lloyd_max(b, 64).distortion, rel=0.03)


def test_codec_names_and_refusals():
    assert parse_codec("ROT3") == RotationCodec(3)
    assert parse_codec("rot3-s9").seed == 9 and parse_codec("rot3-s9").name == "rot3-s9"
    assert parse_codec("bf16") == FloatCodec("bf16")
    for bad in ("int0", "int9", "rot", "q3_k", "fp8", "int4-s2"):
        with pytest.raises(BitallocError, match="Unknown KV cache codec"):
            parse_codec(bad)
    with pytest.raises(BitallocError, match="multiple of 32"):
        GgmlCacheCodec("q8_0").fake_quantize(torch.zeros(2, 48))


# ---- layout and cost ---------------------------------------------------------------------------


def test_layout_and_bytes_by_hand():
    model = tiny_llama(hidden_size=128)  # 4 heads of 32, 2 KV heads, 2 layers
    layout = layout_of(model.config)
    assert layout == KVLayout(2, 2, 32)
    assert layout.units[:3] == ("layer0.k.head0", "layer0.k.head1", "layer0.v.head0")
    codecs = [parse_codec("rot3")] * 4 + [parse_codec("int4")] * 4
    # 4 units × (3*32+16) + 4 units × (4*32+32) bits per token, at 100 tokens, + one 64-bit seed
    assert cache_bytes(layout, codecs, 100) == (100 * (4 * 112 + 4 * 160) + 64) / 8
    assert bits_per_element(layout, codecs) == pytest.approx((4 * 112 + 4 * 160) / (8 * 32))


# ---- the cache applies exactly the plan --------------------------------------------------------


def _ids(n: int = 40, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def test_cache_stores_each_unit_through_its_codec():
    # one layer: its keys and values depend on the embeddings only, so the recorded full-precision
    # vectors are exactly what each codec received
    model = tiny_llama(num_hidden_layers=1, hidden_size=128)
    layout = layout_of(model.config)
    ids = _ids()
    (K, V), = record_kv(model, ids)  # (heads, L, D)
    plan = [parse_codec(n) for n in ("rot2", "q4_0", "int8", None or "f16")]
    cache = quantizing_cache(KVAssignment.per_unit(layout, plan))
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    stored = (cache.layers[0].keys[0], cache.layers[0].values[0])
    for u, (kind, head) in enumerate(itertools.product((0, 1), range(2))):
        x = (K, V)[kind][head]
        assert torch.equal(stored[kind][head], plan[u].fake_quantize(x)), layout.units[u]


def test_cache_quantizes_only_the_units_named_and_attention_reads_them():
    model = tiny_llama(hidden_size=128)  # 2 layers
    layout = layout_of(model.config)
    ids = _ids()
    fp = record_kv(model, ids)
    with torch.no_grad():
        plain = model(ids).logits
        none = model(ids, cache=quantizing_cache(KVAssignment.uniform(layout, None)), use_cache=True).logits
    assert torch.equal(plain, none)  # no codec: the cache changes nothing
    codecs = [None] * 4 + [parse_codec("int2")] * 4  # layer 1 only
    cache = quantizing_cache(KVAssignment.per_unit(layout, codecs))
    with torch.no_grad():
        quant = model(ids, cache=cache, use_cache=True).logits
    assert torch.equal(cache.layers[0].keys[0], fp[0][0])  # layer 0 untouched
    assert torch.equal(cache.layers[1].keys[0], IntCodec(2).fake_quantize(fp[1][0]))
    assert not torch.allclose(quant, plain, atol=1e-4)  # attention read the quantized cache


def test_cache_applies_per_token_levels():
    model = tiny_llama(num_hidden_layers=1, hidden_size=128)
    layout = layout_of(model.config)
    ids = _ids(30)
    (K, _), = record_kv(model, ids)
    ladder = (parse_codec("int2"), parse_codec("int8"), parse_codec("f16"))
    levels = torch.tensor([2, 2] + [0, 1] * 14)
    cache = quantizing_cache(KVAssignment.uniform(layout, None).with_tokens(ladder, levels))
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    for p in range(30):
        want = ladder[int(levels[p])].fake_quantize(K[:, p:p + 1])
        assert torch.equal(cache.layers[0].keys[0][:, p:p + 1], want), p


def test_cache_also_quantizes_tokens_decoded_one_by_one():
    model = tiny_llama(num_hidden_layers=1, hidden_size=128)
    layout = layout_of(model.config)
    ids = _ids(12)
    (K, _), = record_kv(model, ids)
    cache = quantizing_cache(KVAssignment.uniform(layout, parse_codec("rot3")))
    with torch.no_grad():
        model(ids[:, :8], cache=cache, use_cache=True)
        for t in range(8, 12):
            model(ids[:, t:t + 1], cache=cache, use_cache=True)
    assert torch.allclose(cache.layers[0].keys[0], RotationCodec(3).fake_quantize(K), atol=1e-5)


# ---- solver, budget, plan file -----------------------------------------------------------------


def _table(layout: KVLayout, names, seed=0) -> KVTable:
    rng = np.random.default_rng(seed)
    dist = np.sort(rng.random((len(layout.units), len(names))), axis=1)[:, ::-1].copy()  # cheaper: larger error
    return KVTable(layout.units, tuple(names), dist, rng.random(len(layout.units)) + 0.1, "kv-mse")


@pytest.mark.parametrize("budget", [2.6, 3.3, 4.0, 5.1])
def test_solver_matches_brute_force_and_keeps_the_budget(budget):
    layout = KVLayout(2, 1, 64)  # 4 units
    names = ("int2", "rot3", "int4", "int8")  # cheapest first
    table = _table(layout, names)
    codecs, objective = solve_kv(layout, table, budget)
    assert bits_per_element(layout, codecs) <= budget
    costs = [parse_codec(n).vector_bits(64) for n in names]
    best = min(sum(table.errors[u, c] for u, c in enumerate(choice))
               for choice in itertools.product(range(4), repeat=4)
               if sum(costs[c] for c in choice) <= budget_token_bits(layout, budget))
    assert objective == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert sum(table.errors[u, names.index(c.name)] for u, c in enumerate(codecs)) == pytest.approx(best)


def test_infeasible_budget_names_the_range():
    layout = KVLayout(2, 1, 64)
    with pytest.raises(InfeasibleBudgetError, match=r"\[2\.2500, 8\.5000\]"):
        solve_kv(layout, _table(layout, ("rot2", "int8")), 2.0)


def test_uniform_candidates_fit_the_budget():
    layout = KVLayout(2, 2, 64)
    names = [c.name for c in uniform_candidates(layout, [parse_codec(n) for n in ("int8", "int4", "rot4", "rot3")],
                                                4.3)]
    assert names == ["rot4", "rot3"]


def test_llamacpp_pair_is_the_least_estimated_error_within_budget():
    layout = KVLayout(2, 1, 64)
    names = ("f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")
    table = _table(layout, names, seed=3)
    ranked = pair_estimates(layout, table, 6.5)
    assert all(p.bpe(64) <= 6.5 for _, p in ranked)
    is_k = [".k." in u for u in layout.units]
    brute = min((sum(table.errors[u, names.index(k if is_k[u] else v)] for u in range(4)), (k, v))
                for k in names for v in names if Pair(k, v).bpe(64) <= 6.5)
    assert (ranked[0][1].k, ranked[0][1].v) == brute[1]
    assert "--flash-attn on" in Pair("q8_0", "q4_0").flags


def test_plan_file_round_trip_and_refusals(tmp_path):
    layout = KVLayout(2, 1, 64)
    plan = KVPlan("tiny", layout, dict(zip(layout.units, ("rot2", "rot4", "int8", "rot3"))), 5.0, scorer="kv-kl",
                  objective=0.5, guard={"kept": "plan"}, llamacpp={"k": "q8_0", "v": "q4_0"})
    path = tmp_path / "kvplan.json"
    plan.save(str(path))
    again = KVPlan.load(str(path))
    assert again == plan
    data = json.loads(path.read_text())
    assert data["bpe"] == pytest.approx((2 * 64 + 16 + 4 * 64 + 16 + 8 * 64 + 32 + 3 * 64 + 16) / 256)
    data["assignment"]["layer0.k.head0"] = "int8"  # now above the budget
    path.write_text(json.dumps(data))
    with pytest.raises(BitallocError, match="above its budget"):
        KVPlan.load(str(path))
    data["assignment"] = {"layer9.k.head0": "int8"}
    path.write_text(json.dumps(data))
    with pytest.raises(BitallocError, match="every unit"):
        KVPlan.load(str(path))


# ---- per-token policy --------------------------------------------------------------------------


def test_policy_meets_its_budget_on_calibration_text():
    gen = torch.Generator().manual_seed(0)
    rows = torch.multinomial(torch.linspace(1, 0.01, 100), 4 * 1024, replacement=True, generator=gen).reshape(4, 1024)
    for budget in (3.0, 4.25, 6.0):
        policy = fit_policy(rows, 100, 64, budget, ("rot2", "rot4", "rot8", "f16"), sink=4)
        realized = np.mean([policy.bits_per_element(r, 64) for r in rows])
        assert realized <= budget + 1e-9
        assert realized >= budget - 0.15  # one token's share of the text, and the sinks' pay-back, at most
        assert (policy.levels(rows[0], 64)[:4] == 3).all()  # sink tokens take the top codec
    surprisal = unigram_surprisal(rows, 100)
    assert surprisal[0] < surprisal[99]  # the common token is the less surprising one


def test_policy_keeps_the_budget_on_text_unlike_its_calibration():
    # fitted on common tokens, run on tokens it never saw (all maximally surprising): the bucket holds the budget
    common = torch.randint(0, 20, (2, 256), generator=torch.Generator().manual_seed(0))
    rare = torch.randint(50, 100, (512,), generator=torch.Generator().manual_seed(1))
    policy = fit_policy(common, 100, 64, 3.25, ("rot2", "rot4", "rot8", "f16"), sink=4)
    levels = policy.levels(rare, 64)
    bits = torch.tensor([2.25, 4.25, 8.25, 16.0])[levels]
    assert float(bits.mean()) <= 3.25
    spent = torch.cumsum(bits, 0)
    assert (spent[100:] <= 3.25 * torch.arange(101, 513) + 1e-6).all()  # every prefix past the pay-back
    assert (levels[:4] == 3).all()


def test_policy_budget_outside_the_ladder_is_refused():
    rows = torch.randint(0, 50, (2, 64), generator=torch.Generator().manual_seed(0))
    with pytest.raises(BitallocError, match="outside what the ladder"):
        fit_policy(rows, 50, 64, 1.0, ("rot2", "rot4"))


# ---- the error table ---------------------------------------------------------------------------


def test_kv_kl_table_importance_is_the_measured_probe_kl():
    from bitalloc.evaluate import evaluate, reference_logprobs
    from bitalloc.kvcache.cache import CachedModel

    model = tiny_llama(hidden_size=128)
    layout = layout_of(model.config)
    calib = torch.cat([_ids(48, s) for s in (1, 2)])
    ref = reference_logprobs(model, calib)
    codecs = [parse_codec(n) for n in ("f16", "int4", "rot2")]
    from bitalloc.evaluate.probe import block_stack
    from bitalloc.model.units import find_units

    full = build_table(model, layout, calib, codecs, "kv-kl", ref)  # a full forward per probe
    table = build_table(model, layout, calib, codecs, "kv-kl", ref, stack=block_stack(model, find_units(model)))
    assert table.probe == "rot2" and table.tail_only and not full.tail_only
    assert np.allclose(table.errors, full.errors, rtol=1e-4, atol=1e-9)
    u = 5  # layer1.k.head1
    only = [None] * len(layout.units)
    only[u] = parse_codec("rot2")
    a = KVAssignment.per_unit(layout, only)
    kl = evaluate(CachedModel(model, lambda ids: a), calib, ref).kl
    assert table.errors[u, 2] == pytest.approx(kl, rel=1e-4)  # one batch vs window by window
    assert (table.errors[:, 0] < table.errors[:, 1]).all() and (table.errors[:, 1] < table.errors[:, 2]).all()


def test_plan_cache_generates_with_the_planned_codecs(tmp_path):
    model = tiny_llama(num_hidden_layers=1, hidden_size=128)
    layout = layout_of(model.config)
    plan = KVPlan("tiny", layout, dict(zip(layout.units, ("rot2", "int4", "q8_0", "f16"))), 16.0)
    ids = _ids(10)
    cache = plan.cache()
    with torch.no_grad():
        out = model.generate(ids, cache=cache, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 13)
    assert cache.get_seq_length(0) == 12  # the prompt and the two generated tokens fed back
    (K, V), = record_kv(model, ids)  # the prompt's vectors, computed as the prefill computed them
    assert torch.equal(cache.layers[0].keys[0, 0, :10], RotationCodec(2).fake_quantize(K[0]))
    assert torch.equal(cache.layers[0].values[0, 0, :10], GgmlCacheCodec("q8_0").fake_quantize(V[0]))


def test_proxy_tables_by_hand():
    model = tiny_llama(hidden_size=128)
    layout = layout_of(model.config)
    calib = torch.cat([_ids(48, s) for s in (1, 2)])
    codecs = [parse_codec("int4"), parse_codec("rot2")]
    mse = build_table(model, layout, calib, codecs, "kv-mse")
    var = build_table(model, layout, calib, codecs, "kv-var")
    layers = [record_kv(model, row[None]) for row in calib]
    x = torch.cat([layers[w][1][0][1] for w in range(2)])  # layer1.k.head1: (tokens, D)
    rel = float(((IntCodec(4).fake_quantize(x) - x) ** 2).sum() / (x * x).sum())
    assert mse.errors[5, 0] == pytest.approx(rel, rel=1e-5) and (mse.importance == 1).all()
    keys = [torch.cat([layers[w][layer][0][h] for w in range(2)]) for layer in range(2) for h in range(2)]
    mean_energy = np.mean([float((k * k).mean()) for k in keys])
    assert var.importance[5] == pytest.approx(float((x * x).mean()) / mean_energy, rel=1e-5)


def test_kv_command_on_a_tiny_model_writes_plans_within_budget(tiny_dir, text_file, tmp_path, capsys):
    """`bitalloc kv` end to end on a tiny folder: a plan per budget within it, rows for every uniform codec,
    and a budget the per-token ladder cannot reach reported as a notice, not a failure."""
    from bitalloc.cli import main

    out = tmp_path / "kv"
    argv = ["--quiet", "kv", "--model", tiny_dir, "--text", text_file, "--calib-text", text_file, "--windows", "2",
            "--seq-len", "64", "--calib-windows", "1", "--calib-seq-len", "32", "--budgets", "3.5,6",
            "--scorer", "kv-mse", "--uniform", "int4,rot3", "--ladder", "rot3,int8", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "kv.json").read_text())
    assert report["layout"] == {"layers": 2, "kv_heads": 2, "head_dim": 16}
    assert [r["name"] for r in report["rows"] if r["method"] == "uniform"] == ["f16", "int4", "rot3"]
    for budget in (3.5, 6.0):
        plan = KVPlan.load(str(out / f"kvplan-{budget:g}.json"))
        assert plan.bpe <= budget
    assert any("no per-token row at 3.5" in n for n in report["notices"])  # rot3..int8 with 4 sinks: above 3.5
    assert "notice: no per-token row at 3.5" in capsys.readouterr().err
