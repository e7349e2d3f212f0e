"""GGUF types as planner options (`--format gguf`), the embedding and output
matrix as units, the importance matrix, and `bitalloc export`.

Expected values come from elsewhere than the code under test: storage sizes
from gguf-py's own table of block sizes (GGML_QUANT_SIZES), dequantization
by gguf-py's numpy implementation, importance vectors from forward hooks
written here, token counts by hand."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bitalloc import api
from bitalloc.api import MenuSettings, PlanSettings
from bitalloc.calib.grams import CalibSettings, calibration_windows
from bitalloc.cli import main
from bitalloc.solve.problem import Budget
from bitalloc.evaluate.text import calibration_text
from bitalloc.model.units import find_units, get_weight

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python (ggml) is not installed")
sys.path.insert(0, str(Path(__file__).parent))

CALIB = CalibSettings(2, 64)
# hidden 256: the 256-weight block types (K-quants, IQ) fit every matrix, so the menu differs per type, not per unit
WIDE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def gguf_bits(type_name: str, shape) -> int:
    """Stored bits by gguf-py's table: rows × (cols / block) × bytes per block × 8."""
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    rows, cols = shape
    assert cols % block == 0, f"{type_name} does not fit {shape}"
    return rows * (cols // block) * type_size * 8


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    from conftest import char_tokenizer, tiny_llama

    path = tmp_path_factory.mktemp("wide") / "tiny-wide"
    tiny_llama(**WIDE).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


def gguf_settings(bpw: float, **menu) -> PlanSettings:
    return PlanSettings(Budget(bpw), menu=MenuSettings(format="gguf", embeddings=True, **menu), keep_bits=32,
                        calib=CALIB, refine=api.RefineSettings(rounds=0, windows=2, seq_len=64))


# ---- units ---------------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False])
def test_embedding_units_counted_once(tied):
    from conftest import tiny_llama

    model = tiny_llama(tie_word_embeddings=tied)
    plain, with_emb = find_units(model), find_units(model, embeddings=True)
    vocab, hidden = 128, 64  # conftest's tiny Llama
    extra = vocab * hidden * (1 if tied else 2)
    assert with_emb.quantized_numel == plain.quantized_numel + extra
    assert with_emb.kept_numel == plain.kept_numel - extra
    assert with_emb.quantized_numel + with_emb.kept_numel == sum(p.numel() for p in model.parameters())
    emb = [with_emb.unit(n) for n in with_emb.embedding_units]
    assert [u.shape for u in emb] == [(vocab, hidden)] * (1 if tied else 2)
    assert [u.lookup for u in emb] == ([False] if tied else [True, False])  # a tied pair is read as the head
    assert with_emb.units[0].name == emb[0].name  # the embedding comes first, in forward order


# ---- planning over GGUF types --------------------------------------------------

@pytest.fixture(scope="module")
def wide_loaded(wide_dir):
    return api.load(wide_dir, embeddings=True)


@pytest.mark.parametrize("bpw", [4.6, 5.5, 7.0])
def test_gguf_plan_fits_budget_and_shapes(wide_loaded, bpw):
    plan = api.plan(settings=gguf_settings(bpw), progress=False, loaded=wide_loaded)
    inv = wide_loaded.inventory
    assert set(plan.assignment) == {u.name for u in inv.units}
    assert "lm_head" in plan.assignment  # the tied embedding is planned
    bits = sum(gguf_bits(plan.assignment[u.name].name, u.shape) for u in inv.units)
    assert bits <= math.floor(bpw * inv.quantized_numel)
    assert bits == plan.sizes(inv).quantized_bits


def test_gguf_importance_is_mean_squared_input(wide_loaded):
    settings = gguf_settings(5.0)
    loaded, _ = api.prepare(wide_loaded, settings, progress=False)
    model = loaded.model
    windows = calibration_windows(loaded.tokenizer, calibration_text(None), CALIB)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    sums = {n: torch.zeros(model.get_submodule(n).in_features, dtype=torch.float64) for n in names}
    count = {n: 0 for n in names}
    hooks = []
    for n in names:
        def hook(_m, args, _out, n=n):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[n] += (x**2).sum(0)
            count[n] += x.shape[0]
        hooks.append(model.get_submodule(n).register_forward_hook(hook))
    with torch.no_grad():
        for row in windows:
            model(row[None, :])
    for h in hooks:
        h.remove()
    for n in names:
        assert count[n] == CALIB.windows * CALIB.seq_len
        np.testing.assert_allclose(loaded.importance[n].numpy(), (sums[n] / count[n]).numpy(), rtol=1e-4)


def test_gguf_quantize_is_ggml_with_importance(wide_loaded):
    from gguf.quants import dequantize

    from bitalloc.formats import ggml
    from bitalloc.quantizers.apply import quantize_model, restored

    settings = gguf_settings(5.0)
    loaded, settings = api.prepare(wide_loaded, settings, progress=False)
    plan = api.plan(settings=settings, progress=False, loaded=loaded)
    unit = loaded.inventory.unit("model.layers.0.mlp.up_proj")
    W = get_weight(loaded.model, unit).numpy()
    type_name = plan.assignment[unit.name].name
    imp = loaded.importance[unit.name].numpy() if plan.assignment[unit.name].uses_importance else None
    raw = ggml.quantize_rows(type_name, W, imp)  # ggml itself, directly
    expected = dequantize(raw.reshape(-1), gguf.GGMLQuantizationType[type_name]).reshape(W.shape)
    with restored(loaded.model):
        stored = quantize_model(loaded.model, loaded.inventory, plan, importance=loaded.importance)
        assert stored[unit.name].data == raw.tobytes()
        np.testing.assert_array_equal(get_weight(loaded.model, unit).numpy(), expected)


def test_keep_type_pins_the_embedding(wide_loaded):
    settings = gguf_settings(5.0, keep_type="Q8_0")
    plan = api.plan(settings=settings, progress=False, loaded=wide_loaded)
    assert plan.assignment["lm_head"].name == "Q8_0"
    assert ["lm_head", ["Q8_0"]] in plan.to_dict()["constraints"]["allow"]


def test_run_cli_gguf(wide_dir, tmp_path, capsys):
    report = tmp_path / "run.json"
    rc = main(["--quiet", "run", "--model", wide_dir, "--format", "gguf", "--bpw", "5", "--windows", "2",
               "--seq-len", "64", "--calib-windows", "2", "--calib-seq-len", "64", "--refine-windows", "2",
               "--refine-seq-len", "64", "--json", str(report)])
    assert rc == 0, capsys.readouterr().err
    data = json.loads(report.read_text())
    assert data["menu"][-1] == "F16" and "Q4_K" in data["menu"]
    assert data["allocated"]["bpw"] <= 5.0 and data["uniform"]["bpw"] <= 5.0
    for row in (data["allocated"], data["uniform"]):  # 2 windows x 63 predicted tokens, totals from the window sums
        sums = row["window_sums"]
        assert row["tokens"] == sum(sums["tokens"]) == 2 * 63
        assert row["ppl"] == pytest.approx(math.exp(sum(sums["nll_sum"]) / (2 * 63)), rel=1e-9)
        assert row["kl"] >= 0 and 0 <= row["top1"] <= 1


# ---- export ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from test_export_gguf import tiny_model, write_tiny_gguf

    path = tmp_path_factory.mktemp("gguf-src") / "tiny.gguf"
    write_tiny_gguf(tiny_model(), path)
    return path


def test_export_cli_writes_the_plan(tiny_gguf, tmp_path, capsys):
    from bitalloc.plan import Plan

    plan_path, out, types = tmp_path / "plan.json", tmp_path / "mix.gguf", tmp_path / "mix.types"
    assert main(["--quiet", "plan", "--model", str(tiny_gguf), "--format", "gguf", "--no-imatrix", "--bpw", "6",
                 "--out", str(plan_path)]) == 0, capsys.readouterr().err
    assert main(["--quiet", "export", str(plan_path), "--model", str(tiny_gguf), "--out", str(out),
                 "--tensor-types", str(types)]) == 0, capsys.readouterr().err
    plan = Plan.load(str(plan_path))
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    hf_to_gguf = {"lm_head": "token_embd.weight"}
    for n in range(2):
        for hf, g in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                      ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                      ("mlp.down_proj", "ffn_down")):
            hf_to_gguf[f"model.layers.{n}.{hf}"] = f"blk.{n}.{g}.weight"
    assert set(hf_to_gguf) == set(plan.assignment)
    planned_bytes = 0
    for unit, option in plan.assignment.items():
        t = tensors[hf_to_gguf[unit]]
        assert t.tensor_type.name == option.name
        planned_bytes += int(t.n_bytes)
    loaded = api.load(str(tiny_gguf), embeddings=True)
    assert planned_bytes * 8 == plan.sizes(loaded.inventory).quantized_bits
    norms = sum(int(t.n_bytes) for name, t in tensors.items() if name not in hf_to_gguf.values())
    assert norms == 4 * loaded.inventory.kept_numel  # F32 norms, as the plan counts them (keep_bits 32)
    lines = types.read_text().splitlines()
    assert len(lines) == len(plan.assignment) and r"^token_embd\.weight$=" + plan.assignment["lm_head"].name.lower() in lines
    from bitalloc.evaluate.llamacpp import llamacpp_logprobs

    # llama.cpp runs the mixed file as transformers does (gguf-py dequantizes the same bytes)
    from test_export_gguf import KL_TOLERANCE, _mean_kl, _transformers_logprobs

    rows = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    assert 0 <= _mean_kl(_transformers_logprobs(out, rows), llamacpp_logprobs(str(out), rows)) < KL_TOLERANCE


@pytest.mark.parametrize("argv, match", [
    (["plan", "--bits", "4"], "--bits would be ignored"),
    (["plan", "--types", "Q9_K"], "Unknown or unsupported GGUF type"),
    (["plan", "--quantizer", "gptq"], "not by GPTQ"),
    (["plan", "--keep-type", "int4-g32-sym"], "is not in the menu"),
])
def test_gguf_bad_plan_inputs(wide_dir, tmp_path, capsys, argv, match):
    out = tmp_path / "p.json"
    rc = main(["--quiet", argv[0], "--model", wide_dir, "--format", "gguf", "--bpw", "5", "--out", str(out),
               "--calib-windows", "2", "--calib-seq-len", "64", *argv[1:]])
    assert rc == 2 and match in capsys.readouterr().err and not out.exists()


def test_export_refuses_int_plan_and_non_gguf_source(wide_dir, tiny_gguf, tmp_path, capsys):
    int_plan, gguf_plan = tmp_path / "int.json", tmp_path / "g.json"
    assert main(["--quiet", "plan", "--model", wide_dir, "--bpw", "4", "--no-guard", "--out", str(int_plan)]) == 0
    out = tmp_path / "x.gguf"
    assert main(["--quiet", "export", str(int_plan), "--model", wide_dir, "--out", str(out)]) == 2
    assert "assigns integer options" in capsys.readouterr().err and not out.exists()
    assert main(["--quiet", "plan", "--model", wide_dir, "--format", "gguf", "--no-imatrix", "--no-guard", "--bpw",
                 "5", "--out", str(gguf_plan)]) == 0
    assert main(["--quiet", "export", str(gguf_plan), "--model", wide_dir, "--out", str(out)]) == 2
    assert "is not one. Convert it" in capsys.readouterr().err and not out.exists()
    assert main(["--quiet", "export", str(gguf_plan), "--model", str(tiny_gguf), "--out", str(out)]) == 2
    assert "another model" in capsys.readouterr().err and not out.exists()


def test_int_menu_with_embeddings_saves_and_reloads_identically(tmp_path, capsys):
    """--embeddings on the integer menu: the tied embedding is quantized,
    saved with the rest, and a reload gives the in-memory weights exactly."""
    from conftest import char_tokenizer, tiny_llama

    from bitalloc.plan import Plan
    from bitalloc.quantizers.apply import quantize_model
    from bitalloc.export.native import load_quantized

    src = tmp_path / "tiny"
    tiny_llama().save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    plan_path, out = tmp_path / "p.json", tmp_path / "q"
    assert main(["--quiet", "plan", "--model", str(src), "--embeddings", "--bpw", "4", "--no-guard",
                 "--out", str(plan_path)]) == 0, capsys.readouterr().err
    assert main(["--quiet", "quantize", "--model", str(src), "--plan", str(plan_path), "--out", str(out)]) == 0
    plan = Plan.load(str(plan_path))
    assert "lm_head" in plan.assignment
    loaded = api.load(str(src), embeddings=True)
    from bitalloc.calib.grams import CalibSettings

    calib = CalibSettings(**plan.provenance.importance.calib)  # made with the importance matrix (default)
    importance = api.ensure_importance(loaded, api.PlanSettings(plan.budget, calib=calib), progress=False)
    quantize_model(loaded.model, loaded.inventory, plan, importance=importance)
    model, _, _ = load_quantized(str(out))
    expected = loaded.model.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value.float(), expected[name].float()), name
    assert torch.equal(model.model.embed_tokens.weight, model.lm_head.weight)  # still tied
    original = tiny_llama().model.embed_tokens.weight
    assert not torch.equal(model.model.embed_tokens.weight.float(), original.float())  # and quantized


def test_kl_over_gguf_types_measures_each_units_own_types(wide_dir, tmp_path, monkeypatch):
    """kl on a GGUF menu probes three of each unit's fitting types (never
    F16); a probed entry is the KL of the model with that unit alone stored
    by ggml (with its importance vector), computed here from scratch."""
    from gguf.quants import dequantize

    from bitalloc.evaluate import evaluate, reference_logprobs, token_windows
    from bitalloc.formats import ggml
    from bitalloc.scorers import score
    from bitalloc.scorers.probes import unit_probes
    from bitalloc.model.units import set_weight

    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    settings = replace_scorer(gguf_settings(5.0, types=("Q4_0", "Q5_0", "Q8_0", "Q3_K", "Q4_K", "Q6_K", "F16")))
    loaded, settings = api.prepare(api.load(wide_dir, embeddings=True), settings, progress=False)
    ctx = api.scoring_context(loaded, settings, progress=False)
    table = score(ctx, ["kl"])["kl"]
    for i in (0, 5):  # the tied embedding/head, a projection
        unit = loaded.inventory.units[i]
        probes = unit_probes(ctx, i)
        assert len(probes) == 3 and all(o.name != "F16" for o in probes)
        opt = probes[1]
        W = get_weight(loaded.model, unit)
        imp = loaded.importance[unit.name].numpy() if opt.uses_importance else None
        raw = ggml.quantize_rows(opt.name, W.numpy(), imp)
        W_q = torch.from_numpy(dequantize(raw.reshape(-1), gguf.GGMLQuantizationType[opt.name]).reshape(W.shape))
        s = settings.scorer_settings
        windows = token_windows(loaded.tokenizer, ctx.calib_text, api.EvalSettings(s.probe_seq_len, s.probe_windows))
        ref = reference_logprobs(loaded.model, windows)
        set_weight(loaded.model, unit, W_q)
        try:
            expected = evaluate(loaded.model, windows, ref).kl
        finally:
            set_weight(loaded.model, unit, W)
        assert table.distortion[i, ctx.options.index(opt)] == pytest.approx(expected, rel=1e-4, abs=1e-9)


def replace_scorer(settings: PlanSettings) -> PlanSettings:
    from dataclasses import replace

    from bitalloc.scorers import ScorerSettings

    return replace(settings, scorer="kl", scorer_settings=ScorerSettings(probe_windows=1, probe_seq_len=48))


def test_export_refuses_a_type_that_does_not_fit(tiny_gguf, tmp_path, capsys):
    """A plan edited to give a 64-column tensor a 256-block type: one line, no file."""
    plan_path, out = tmp_path / "plan.json", tmp_path / "x.gguf"
    assert main(["--quiet", "plan", "--model", str(tiny_gguf), "--format", "gguf", "--no-imatrix", "--bpw", "6",
                 "--out", str(plan_path)]) == 0, capsys.readouterr().err
    data = json.loads(plan_path.read_text())
    data["units"]["model.layers.0.self_attn.q_proj"] = "Q4_K"
    plan_path.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["--quiet", "export", str(plan_path), "--model", str(tiny_gguf), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Q4_K, which stores rows in blocks of 256 weights; its 64 input columns" in err and not out.exists()


def test_both_families_speak_the_format_protocol():
    from bitalloc.formats import Format
    from bitalloc.formats.affine import QuantOption
    from bitalloc.formats.gguf_types import GGUFType

    sym, asym, k = QuantOption(4, 32, True), QuantOption(3, 0), GGUFType("Q4_K")
    assert all(isinstance(f, Format) for f in (sym, asym, k))
    assert sym.storage_bits((8, 64)) == 8 * 64 * 4 + 8 * 2 * 16  # codes + one fp16 scale per group of 32
    assert asym.storage_bits((8, 64)) == 8 * 64 * 3 + 8 * 1 * 32  # per channel: fp16 scale and zero per row
    assert sym.available((8, 64)) and not sym.available((8, 48)) and asym.available((8, 48))
    assert k.available((8, 256)) and not k.available((8, 64))
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    Q = sym.dequantize(sym.quantize(W))
    scale = W.reshape(8, 2, 32).abs().amax(-1) / 8  # symmetric int4: the largest magnitude sets a step of |w|/8
    # within half a step, or one step for values beyond +7 steps on the side opposite the largest magnitude
    assert ((Q - W).abs().reshape(8, 2, 32) <= scale[..., None] * 1.001).all()
    assert ((Q - W).abs().reshape(8, 2, 32) <= scale[..., None] / 2 * 1.001).float().mean() > 0.9


def test_kl_probes_skip_a_type_that_re_stores_the_source():
    """On an already-quantized source (a Q4_K tensor of a Q4_K_M file) the
    source's own type has almost no weight error and its KL is noise: it is
    never probed. Picks by hand from the menu sorted by stored bits."""
    from types import SimpleNamespace

    from bitalloc.formats.gguf_types import parse_gguf_type
    from bitalloc.model.units import Unit
    from bitalloc.scorers import ScorerSettings
    from bitalloc.scorers.probes import restores_source, unit_probes

    names = ["Q2_K", "Q3_K", "IQ4_XS", "Q4_0", "Q4_K", "Q5_0", "Q5_K", "Q6_K", "Q8_0"]  # by stored bits
    options = tuple(parse_gguf_type(n) for n in names)
    unit = Unit("model.layers.0.mlp.down_proj", "model.layers.0.mlp.down_proj.weight", (256, 512))
    plain = np.array([120.0, 38.0, 12.0, 11.0, 9.0, 3.2, 3.0, 0.6, 0.06])  # error falls with bits
    restored = plain.copy()
    restored[4] = 0.0136  # Q4_K re-stores the source's grid

    def picks(errors, probes):
        ctx = SimpleNamespace(options=options, inventory=SimpleNamespace(units=[unit]),
                              settings=ScorerSettings(kl_probes=probes),
                              reductions=lambda kinds: {"mse": errors[None, :]})
        return [o.name for o in unit_probes(ctx, 0)]

    assert picks(plain, 1) == ["Q4_K"] and picks(plain, 3) == ["Q2_K", "Q4_K", "Q5_K"]  # 9 types: 0, 4, 6
    assert picks(restored, 1) == ["Q5_0"] and picks(restored, 3) == ["Q2_K", "Q5_0", "Q6_K"]  # 8 types: 0, 4, 6
    bits = np.array([2.625, 3.4375, 4.25, 4.5, 4.5, 5.5, 5.5, 6.5625, 8.5])
    assert restores_source(restored, bits).tolist() == [n == "Q4_K" for n in names]
    assert not restores_source(plain, bits).any()
