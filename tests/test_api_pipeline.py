"""Plan -> quantize -> save -> load -> eval on a tiny random Llama, through
the Python API and the CLI."""

import json

import numpy as np
import pytest
import torch

from bitalloc import api
from bitalloc.cli import main
from bitalloc.errors import BadWeightsError, BitallocError, GroupSizeError, InfeasibleBudgetError, ModelNotFoundError, PlanMismatchError
from bitalloc.evaluate import EvalSettings, evaluate, reference_logprobs, token_windows
from bitalloc.plan import Plan
from bitalloc.solve.problem import Budget, Constraints
from bitalloc.quantizers.apply import quantize_model, restored
from bitalloc.export.native import load_quantized, save_quantized
from conftest import tiny_llama


def settings(bpw=3.5, **kw):
    return api.PlanSettings(Budget(bpw), **kw)


@pytest.fixture
def loaded(tiny_dir):
    return api.load(tiny_dir)


@pytest.mark.parametrize("bpw", [2.3, 3.0, 3.5, 4.25, 5.0, 7.9])
@pytest.mark.parametrize("solver", ["ilp", "lagrangian"])
def test_budget_never_exceeded(loaded, bpw, solver):
    p = api.plan(settings=settings(bpw, solver=solver), loaded=loaded, progress=False)
    sizes = p.sizes(loaded.inventory)
    assert sizes.quantized_bpw <= bpw
    assert sizes.quantized_bits <= bpw * loaded.inventory.quantized_numel


def test_budget_over_whole_model_and_bytes(loaded):
    inv = loaded.inventory
    p = api.plan(settings=api.PlanSettings(Budget(6.0, "bpw", "model")), loaded=loaded, progress=False)
    assert p.sizes(inv).model_bpw <= 6.0
    cap = 60_000
    p = api.plan(settings=api.PlanSettings(Budget(cap, "bytes")), loaded=loaded, progress=False)
    assert p.sizes(inv).model_bytes <= cap


def test_more_budget_never_hurts_the_objective(loaded):
    objectives = [api.plan(settings=settings(b), loaded=loaded, progress=False).objective for b in (2.5, 3.5, 4.5, 6)]
    assert all(a >= b for a, b in zip(objectives, objectives[1:]))


def test_ties_and_allow_rules_hold(loaded):
    c = Constraints(allow=(("*.v_proj", ("int8*",)),), min_bits=3, ties=("qkv", "gate_up"))
    p = api.plan(settings=settings(4.5, constraints=c), loaded=loaded, progress=False)
    for layer in range(2):
        pre = f"model.layers.{layer}."
        qkv = {p.assignment[pre + f"self_attn.{x}_proj"] for x in "qkv"}
        assert len(qkv) == 1 and next(iter(qkv)).bits == 8
        assert p.assignment[pre + "mlp.gate_proj"] == p.assignment[pre + "mlp.up_proj"]
    assert min(o.bits for o in p.assignment.values()) >= 3


def test_infeasible_budget_states_the_feasible_range(loaded):
    with pytest.raises(InfeasibleBudgetError, match=r"feasible budgets run from 2\.\d+ bpw"):
        api.plan(settings=settings(1.5), loaded=loaded, progress=False)


def test_non_dividing_group_size_names_the_tensor(tmp_path):
    model = tiny_llama(hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    model.save_pretrained(tmp_path / "m")
    s = api.PlanSettings(Budget(4.0), menu=api.MenuSettings(group_sizes=(32,)))
    with pytest.raises(GroupSizeError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight"):
        api.plan(str(tmp_path / "m"), settings=s, progress=False)
    ragged = api.PlanSettings(Budget(4.5), menu=api.MenuSettings(group_sizes=(32,), allow_ragged=True))
    p = api.plan(str(tmp_path / "m"), settings=ragged, progress=False)
    assert p.allow_ragged and all(o.group_size == 32 for o in p.assignment.values())


def test_plan_file_round_trip_and_refusal_for_another_model(loaded, tmp_path):
    p = api.plan(settings=settings(3.5), loaded=loaded, out=str(tmp_path / "plan.json"), progress=False)
    again = Plan.load(str(tmp_path / "plan.json"))
    assert again == p
    other = api.load(_other_model_dir(tmp_path))
    with pytest.raises(PlanMismatchError, match="another model"):
        quantize_model(other.model, other.inventory, again)


def _other_model_dir(tmp_path):
    path = tmp_path / "other"
    tiny_llama(intermediate_size=96).save_pretrained(path)
    return str(path)


def test_error_table_reuse_gives_the_same_plan(loaded, tmp_path):
    table = str(tmp_path / "table.json")
    a = api.plan(settings=settings(3.5), loaded=loaded, save_table=table, progress=False)
    b = api.plan(settings=settings(3.5), loaded=loaded, table_path=table, progress=False)
    assert a.assignment == b.assignment
    rel = api.plan(settings=settings(3.5, scorer="rtn-mse-rel"), loaded=loaded, table_path=table, progress=False)
    direct = api.plan(settings=settings(3.5, scorer="rtn-mse-rel"), loaded=loaded, progress=False)
    assert rel.assignment == direct.assignment


def test_saved_model_reloads_identically(loaded, tmp_path):
    p = api.plan(settings=settings(3.0, constraints=Constraints(ties=("qkv",))), loaded=loaded, progress=False)
    with restored(loaded.model):
        stored = quantize_model(loaded.model, loaded.inventory, p)
        folder = save_quantized(str(tmp_path / "q"), loaded.model, loaded.tokenizer, loaded.inventory, p, stored)
        expected = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    model, tok, plan2 = load_quantized(str(folder))
    got = model.state_dict()
    assert set(got) == set(expected)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert plan2 == p and tok is not None
    # the codes are bit-packed: the file is about the plan's size, not 8 bits per weight
    size = (folder / "model.safetensors").stat().st_size
    assert size < p.sizes(loaded.inventory).model_bytes * 1.05 + 20_000


def test_restored_puts_weights_back(loaded):
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    p = api.plan(settings=settings(2.5), loaded=loaded, progress=False)
    with restored(loaded.model):
        quantize_model(loaded.model, loaded.inventory, p)
        assert not torch.equal(loaded.model.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"])
    assert all(torch.equal(v, before[k]) for k, v in loaded.model.state_dict().items())


def test_nan_weights_are_refused(tiny_dir):
    loaded = api.load(tiny_dir)
    with torch.no_grad():
        loaded.model.model.layers[1].self_attn.o_proj.weight[0, 3] = float("nan")
    with pytest.raises(BadWeightsError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight"):
        api.plan(settings=settings(4), loaded=loaded, progress=False)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        api.load(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        api.load(str(tmp_path / "empty"))


def test_kl_to_itself_is_zero(loaded, text_file):
    from bitalloc.evaluate.text import read_text_file

    windows = token_windows(loaded.tokenizer, read_text_file(text_file), EvalSettings(seq_len=32, windows=3))
    assert windows.shape == (3, 32)
    ref = reference_logprobs(loaded.model, windows)
    r = evaluate(loaded.model, windows, ref)
    assert r.kl == pytest.approx(0, abs=1e-6) and r.top1 == 1.0 and r.tokens == 3 * 31
    assert np.isclose(np.log(r.ppl), r.nll)


def test_too_short_text_is_an_error(loaded, tmp_path):
    with pytest.raises(BitallocError, match="enough for"):
        token_windows(loaded.tokenizer, "short text", EvalSettings(seq_len=32, windows=2))


def test_cli_plan_quantize_eval_run(tiny_dir, text_file, tmp_path, capsys):
    plan = str(tmp_path / "plan.json")
    assert main(["--quiet", "plan", "--model", tiny_dir, "--bpw", "3.5", "--out", plan]) == 0
    data = json.loads(open(plan).read())
    assert data["format"] == "bitalloc.plan" and data["sizes"]["quantized_bpw"] <= 3.5
    assert main(["--quiet", "plan", "--model", tiny_dir, "--bpw", "3.5", "--dry-run"]) == 0
    assert "feasible range" in capsys.readouterr().out
    qdir = str(tmp_path / "q")
    assert main(["--quiet", "quantize", "--model", tiny_dir, "--plan", plan, "--out", qdir]) == 0
    out = str(tmp_path / "eval.json")
    assert main(["--quiet", "eval", "--quantized", qdir, "--reference", tiny_dir, "--text", text_file,
                 "--windows", "2", "--seq-len", "32", "--json", out]) == 0
    result = json.loads(open(out).read())["result"]
    assert result["kl"] > 0 and 0 <= result["top1"] <= 1
    run_json = str(tmp_path / "run.json")
    assert main(["--quiet", "run", "--model", tiny_dir, "--bpw", "3.5", "--text", text_file, "--windows", "2",
                 "--seq-len", "32", "--json", run_json]) == 0
    report = json.loads(open(run_json).read())
    assert report["allocated"]["bpw"] <= 3.5 and report["uniform"]["bpw"] <= 3.5
    assert {"ppl"} <= set(report["reference"]) and report["uniform"]["option"] in ("int3-g64-asym", "int3-g32-sym")  # both 3.5 bpw


def test_cli_errors_exit_non_zero_and_write_nothing(tiny_dir, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["--quiet", "plan", "--model", tiny_dir, "--bpw", "1.0", "--out", str(plan)]) == 2
    assert "infeasible" in capsys.readouterr().err and not plan.exists()
    assert main(["--quiet", "plan", "--model", str(tmp_path / "missing"), "--bpw", "3", "--out", str(plan)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert main(["--quiet", "quantize", "--model", tiny_dir, "--plan", str(tmp_path / "bad.json"), "--out", str(tmp_path / "q")]) == 2
    assert not (tmp_path / "q").exists()
    assert main(["--quiet", "plan", "--model", tiny_dir, "--bpw", "3", "--out", str(plan), "--scorer", "magic"]) == 2
    assert "scorer" in capsys.readouterr().err


def test_reference_perplexity_from_stored_logprobs_equals_a_fresh_pass(loaded, text_file):
    from bitalloc.evaluate import reference_result
    from bitalloc.evaluate.text import read_text_file

    windows = token_windows(loaded.tokenizer, read_text_file(text_file), EvalSettings(seq_len=32, windows=2))
    ref = reference_logprobs(loaded.model, windows)
    assert reference_result(windows, ref).nll == pytest.approx(evaluate(loaded.model, windows).nll, rel=1e-9)


def test_uncached_hub_id_offline_is_a_clear_error(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-m", "bitalloc", "--quiet", "plan", "--model", "someorg/not-cached",
                           "--bpw", "3", "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Hugging Face Hub" in proc.stderr and "not cached" in proc.stderr


@pytest.mark.parametrize("scorer", ["salience", "baq"])
@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_mixed_column_plans_meet_budget_and_reload(loaded, tmp_path, scorer, quantizer):
    from bitalloc.calib.grams import CalibSettings

    s = api.PlanSettings(Budget(3.5), scorer=scorer, quantizer=quantizer, calib=CalibSettings(4, 64))
    p = api.plan(settings=s, loaded=loaded, out=str(tmp_path / "plan.json"), progress=False)
    assert p.sizes(loaded.inventory).quantized_bpw <= 3.5
    mixed = [n for n, o in p.assignment.items() if o.mixed]
    assert mixed and set(mixed) == set(p.column_bits)
    for n in mixed:
        o = p.assignment[n]
        assert sum(p.column_bits[n]) == o.bits * len(p.column_bits[n])
    assert Plan.load(str(tmp_path / "plan.json")) == p
    with restored(loaded.model):
        info = api.quantize(plan_path=str(tmp_path / "plan.json"), out=str(tmp_path / "q"), loaded=loaded,
                            progress=False, settings=s)
        expected = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    model, _, _ = load_quantized(info["out"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_cli_quantize_uses_the_importance_matrix_the_plan_records(tiny_dir, text_file, tmp_path, capsys):
    """A default plan records its calibration; `bitalloc quantize` stores RTN
    with scales searched under E[x^2] per column, measured here by hooks on
    the same calibration windows; a --no-imatrix plan stores plain scales."""
    from bitalloc.calib.grams import CalibSettings, calibration_windows
    from bitalloc.formats.affine_rtn import dequantize, quantize_rtn
    from bitalloc.model.units import get_weight

    plans = {}
    for flag in ((), ("--no-imatrix",)):
        p = str(tmp_path / f"plan{len(flag)}.json")
        calib = () if flag else ("--calib-text", text_file, "--calib-windows", "4", "--calib-seq-len", "64")
        args = ["--quiet", "plan", "--model", tiny_dir, "--bpw", "3.5", *calib, "--no-guard", "--out", p, *flag]
        assert main(args) == 0, capsys.readouterr().err
        assert main(["--quiet", "quantize", "--model", tiny_dir, "--plan", p, "--out", p + ".q"]) == 0, \
            capsys.readouterr().err
        plans[bool(flag)] = (Plan.load(p), load_quantized(p + ".q")[0])
    recorded = plans[False][0].provenance.importance
    assert recorded.calib == {"windows": 4, "seq_len": 64} and recorded.text == text_file
    assert plans[True][0].provenance.importance is None and not plans[True][0].uses_importance
    loaded = api.load(tiny_dir)
    windows = calibration_windows(loaded.tokenizer, open(text_file).read(), CalibSettings(4, 64))
    sums = {}
    hooks = [loaded.model.get_submodule(u.name).register_forward_pre_hook(
        lambda m, a, name=u.name: sums.setdefault(name, []).append(a[0].detach().reshape(-1, a[0].shape[-1])))
        for u in loaded.inventory.units]
    with torch.no_grad():
        for row in windows:
            loaded.model(row[None])
    for h in hooks:
        h.remove()
    for unit in loaded.inventory.units:
        W = get_weight(loaded.model, unit)
        imp = torch.cat(sums[unit.name]).double().pow(2).mean(0).float()
        for no_imatrix, (plan, model) in plans.items():
            option = plan.assignment[unit.name]
            expect = quantize_rtn(W, option, importance=None if no_imatrix else imp)
            got = get_weight(model, unit)
            assert torch.equal(got, dequantize(expect).to(got.dtype)), (unit.name, no_imatrix)
    searched, plain = (get_weight(plans[k][1], loaded.inventory.units[0]) for k in (False, True))
    assert not torch.equal(searched, plain)  # the search changed the stored weights


def test_default_window_lengths_fit_the_model_and_typed_ones_are_checked(tmp_path, capsys):
    """A model with 64 positions: the default calibration and guard lengths
    (512, 128) are shortened to 64 and recorded in the plan; a typed
    --calib-seq-len 512 is refused with the limit."""
    from conftest import char_tokenizer

    src = tmp_path / "short"
    tiny_llama(max_position_embeddings=64).save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    out = tmp_path / "p.json"
    assert main(["--quiet", "plan", "--model", str(src), "--bpw", "3.5", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    plan = Plan.load(str(out))
    assert plan.provenance.importance.calib["seq_len"] == 64
    assert plan.provenance.guard.seq_len == 64
    assert main(["--quiet", "plan", "--model", str(src), "--bpw", "3.5", "--calib-seq-len", "512",
                 "--out", str(tmp_path / "q.json")]) == 2
    assert "position limit of 64" in capsys.readouterr().err and not (tmp_path / "q.json").exists()
