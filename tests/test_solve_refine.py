"""Closed-loop refinement and the guard: frontier moves by hand, the local
knapsack against brute force, tail-only probes against full forwards, a
refined plan never worse on its own calibration measure than its start, and
the guard keeping uniform when an allocation measures worse."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from bitalloc import api
from bitalloc.cli import main
from bitalloc.errors import BitallocError
from bitalloc.formats.affine import QuantOption
from bitalloc.solve.problem import Budget, Problem, build_problem
from bitalloc.solve.refine import RefineSettings, assignment_choice, frontier_neighbours, guard, local_choice, make_probe, refine


def test_frontier_neighbours_by_hand():
    cost = np.array([10, 20, 20, 30, 40])
    error = np.array([5.0, 3.0, 4.0, 3.5, 1.0])  # option 2 is dominated by 1, option 3 by 1
    allowed = np.array([True, True, True, True, True])
    assert frontier_neighbours(cost, error, allowed, 1) == (0, 4)
    assert frontier_neighbours(cost, error, allowed, 0) == (None, 1)
    assert frontier_neighbours(cost, error, allowed, 4) == (1, None)
    assert frontier_neighbours(cost, error, allowed, 3) == (1, 4)  # off the frontier: nearest frontier options
    allowed[4] = False
    assert frontier_neighbours(cost, error, allowed, 1) == (0, None)


def test_local_choice_equals_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(20):
        groups, options = 6, 4
        cost = np.sort(rng.integers(10, 100, (groups, options)), axis=1)
        problem = Problem(tuple((g,) for g in range(groups)), cost, np.zeros((groups, options)),
                          np.ones((groups, options), bool), int(cost[:, 1].sum() + rng.integers(0, 20)),
                          tuple(QuantOption(b, 32) for b in (2, 3, 4, 5)))
        choice = np.ones(groups, dtype=np.int64)
        deltas = {}
        for g in range(groups):
            deltas[(g, 0)] = float(rng.uniform(0, 1))  # down: costs error
            deltas[(g, 2)] = float(-rng.uniform(0, 1))  # up: saves error
        got = local_choice(deltas, problem, choice)
        best = None
        for pick in itertools.product((0, 1, 2), repeat=groups):
            c = sum(cost[g, o] for g, o in enumerate(pick))
            if c <= problem.budget_bits:
                e = sum(0.0 if o == 1 else deltas[(g, o)] for g, o in enumerate(pick))
                best = e if best is None or e < best else best
        e_got = sum(0.0 if o == 1 else deltas[(g, int(o))] for g, o in enumerate(got))
        assert sum(cost[g, o] for g, o in enumerate(got)) <= problem.budget_bits
        assert e_got == pytest.approx(best, abs=1e-9)


@pytest.fixture
def loaded(tiny_dir):
    return api.load(tiny_dir)


def _settings(bpw=3.25, **kw):
    return api.PlanSettings(Budget(bpw), refine=RefineSettings(rounds=2, windows=2, seq_len=64), **kw)


def test_tail_only_probes_equal_full_forwards(loaded):
    probe = make_probe(loaded, _settings())
    opt = QuantOption(2, 32)
    probe.apply({u.name: QuantOption(4, 32) for u in loaded.inventory.units})
    probe.measure()
    units = [loaded.inventory.unit("model.layers.1.mlp.down_proj")]
    full = probe.measure_moved(units, opt)
    assert probe.enable_tail()
    probe.apply({u.name: QuantOption(4, 32) for u in loaded.inventory.units})
    probe.measure()
    tail = probe.measure_moved(units, opt)
    assert tail.kl == pytest.approx(full.kl, rel=1e-5) and tail.nll == pytest.approx(full.nll, rel=1e-6)
    assert full.kl > 0
    probe.restore()


def test_a_probe_copies_only_the_units_it_has_changed(loaded):
    """No copy of the model up front (a 1.5B model with two probes ran out of
    memory); a unit's original is kept while it holds something else, and
    every weight comes back bit for bit."""
    import torch

    from bitalloc.model.units import get_weight

    before = {u.name: get_weight(loaded.model, u) for u in loaded.inventory.units}
    probe = make_probe(loaded, _settings())
    assert probe._saved == {}
    down, q = loaded.inventory.unit("model.layers.1.mlp.down_proj"), loaded.inventory.units[0]
    probe.apply({down.name: QuantOption(2, 32)})
    assert set(probe._saved) == {down.name}
    assert not torch.equal(get_weight(loaded.model, down), before[down.name])
    probe.measure_moved([q], QuantOption(3, 32))
    probe.measure_weight(q, before[q.name] * 0.5)
    assert set(probe._saved) == {down.name}  # the moved units are back and their copies gone
    assert torch.equal(get_weight(loaded.model, q), before[q.name])
    probe.restore()
    assert probe._saved == {}
    assert all(torch.equal(get_weight(loaded.model, u), before[u.name]) for u in loaded.inventory.units)


@pytest.mark.parametrize("objective", ["kl", "nll"])
def test_refinement_never_ends_worse_than_it_started(loaded, objective):
    settings = replace(_settings(), refine=RefineSettings(rounds=3, windows=2, seq_len=64, objective=objective),
                       guard=False)
    table = api.score(api.scoring_context(loaded, settings, progress=False), ["rtn-mse"])["rtn-mse"]
    start = api.solve_plan(loaded.inventory, table, settings, "tiny")
    inv = loaded.inventory
    problem = build_problem(inv, table.options, table.errors, settings.budget)
    probe = make_probe(loaded, settings)
    probe.apply(dict(start.assignment))
    before = probe.measure().value(objective)
    choice, rounds = refine(probe, problem, list(inv.units), assignment_choice(problem, list(inv.units), start),
                            settings.refine)
    probe.apply({inv.units[i].name: problem.options[int(choice[g])] for g, m in enumerate(problem.groups) for i in m})
    after = probe.measure().value(objective)
    assert after <= before + 1e-12
    assert rounds and rounds[0].before == pytest.approx(before)
    for r in rounds:
        assert (r.after < r.before) == r.accepted
    size = sum(problem.cost[g, choice[g]] for g in range(len(choice)))
    assert size <= problem.budget_bits
    probe.restore()


def test_guard_keeps_uniform_when_the_allocation_is_worse(loaded):
    settings = _settings(4.25)
    options = api.resolve_menu(loaded.inventory, settings.menu)[0]
    uniform = api.uniform_plan(loaded.inventory, options, settings, "tiny")
    # the same size, spent badly: every unit at 2 bits except a few at 8
    worse = replace(uniform, assignment={u.name: QuantOption(2, 32) for u in loaded.inventory.units},
                    scorer="deliberately bad")
    probe = make_probe(loaded, settings)
    kept, record = guard(probe, worse, uniform)
    assert kept.assignment == uniform.assignment and record.kept == "uniform" and record.replaced
    assert record.allocated["kl"] > record.uniform["kl"]
    kept, record = guard(probe, uniform, worse)
    assert kept.assignment == uniform.assignment and record.kept == "allocated" and not record.replaced


def test_a_plan_the_guard_replaced_says_so_with_both_measurements(loaded, tiny_dir, tmp_path, monkeypatch, capsys):
    """The notice names the table, both calibration measurements as the
    guard recorded them, the sample and the ways to a stronger allocation;
    `bitalloc plan` prints it; a kept allocation gets none."""
    from bitalloc.solve import refine as refine_module
    from bitalloc.cli.plan import guard_notice

    settings = _settings(4.25)
    uniform = api.uniform_plan(loaded.inventory, api.resolve_menu(loaded.inventory, settings.menu)[0], settings, "t")
    worse = replace(uniform, assignment={u.name: QuantOption(2, 32) for u in loaded.inventory.units}, scorer="bad")
    kept, record = guard(make_probe(loaded, settings), worse, uniform)
    notice = guard_notice(record, "bad")
    a, u = record.allocated["kl"], record.uniform["kl"]
    assert notice.startswith("the guard measured the bad allocation worse than the uniform plan")
    assert f"kl {a:.4f} vs {u:.4f}" in notice and f"{settings.refine.windows} x {settings.refine.seq_len}" in notice
    assert "--scorer taylor" in notice and "--recipe quality" in notice and "--no-guard" in notice
    assert guard_notice(replace(record, kept="allocated"), "bad") is None and guard_notice(None, "bad") is None
    assert "--scorer taylor" not in guard_notice(record, "taylor")  # already used
    assert "--recipe quality" not in guard_notice(record, "kl")

    real = refine_module.guard

    def always_uniform(probe, allocated, uni, objective="kl"):
        _, rec = real(probe, allocated, uni, objective)
        return replace(uni, scorer=f"{allocated.scorer} (guard: uniform kept)"), replace(rec, kept="uniform")

    monkeypatch.setattr(refine_module, "guard", always_uniform)
    capsys.readouterr()
    assert main(["--quiet", "plan", "--model", tiny_dir, "--bpw", "4.25", "--out", str(tmp_path / "p.json")]) == 0
    assert "notice: the guard measured the rtn-mse-rel allocation worse" in capsys.readouterr().err


def test_plans_come_back_guarded_and_refined_through_the_api(loaded, tmp_path):
    p = api.plan(settings=_settings(3.25), loaded=loaded, out=str(tmp_path / "plan.json"), progress=False)
    assert p.sizes(loaded.inventory).quantized_bpw <= 3.25
    assert p.provenance.refinement is not None and p.provenance.guard is not None
    from bitalloc.plan import Plan

    assert Plan.load(str(tmp_path / "plan.json")) == p


def _rounds(plan):
    return [{k: r[k] for k in ("index", "before", "after", "moves", "accepted")}
            for r in plan.provenance.refinement["rounds"]]


def test_refinement_continued_from_a_plan_file_equals_one_longer_refinement(loaded, tmp_path):
    """Two rounds in one go, and one round continued by one more from the
    saved plan (--refine-from): the same rounds and the same plan."""
    from bitalloc.plan import Plan

    one_go = api.plan(settings=_settings(3.25, guard=False), loaded=loaded, progress=False)
    assert [r["accepted"] for r in _rounds(one_go)] == [True, True]  # else the comparison below proves less
    one = replace(_settings(3.25, guard=False), refine=RefineSettings(rounds=1, windows=2, seq_len=64))
    api.plan(settings=one, loaded=loaded, out=str(tmp_path / "first.json"), progress=False)
    continued = api.plan(settings=one, loaded=loaded, start=Plan.load(str(tmp_path / "first.json")), progress=False)
    assert continued.assignment == one_go.assignment
    assert _rounds(continued) == _rounds(one_go)
    assert continued.scorer == one_go.scorer


def test_refine_from_refuses_a_plan_over_the_budget_or_off_the_menu(loaded, tmp_path):
    from bitalloc.errors import BitallocError

    wide = api.plan(settings=replace(_settings(4.5), refine=RefineSettings(rounds=0)), loaded=loaded, progress=False)
    with pytest.raises(BitallocError, match="over this budget"):
        api.plan(settings=_settings(3.25), loaded=loaded, start=wide, progress=False)
    # an edited plan whose recorded budget still holds it (else it is refused as edited: test_cli_bad_inputs)
    odd = replace(wide, assignment={**wide.assignment, loaded.inventory.units[0].name: QuantOption(7, 32)},
                  budget=replace(wide.budget, value=8.0))
    with pytest.raises(BitallocError, match="options outside this menu"):
        api.plan(settings=_settings(8.0), loaded=loaded, start=odd, progress=False)


def test_cli_run_with_refinement_and_recipe_conflicts(tiny_dir, text_file, tmp_path, capsys):
    out = str(tmp_path / "run.json")
    assert main(["--quiet", "run", "--model", tiny_dir, "--bpw", "3.5", "--text", text_file, "--windows", "2",
                 "--seq-len", "32", "--refine-rounds", "1", "--refine-windows", "2", "--refine-seq-len", "64",
                 "--json", out]) == 0
    assert main(["--quiet", "run", "--model", tiny_dir, "--bpw", "3.5", "--recipe", "quality", "--scorer",
                 "rtn-mse"]) == 2
    assert "contradicts --recipe quality" in capsys.readouterr().err


def test_cli_run_with_the_quality_recipe_uses_what_it_names(tiny_dir, text_file, tmp_path):
    """`run --recipe quality`: the kl table, GPTQ, refinement on calibration
    NLL and the guard on the same objective (the scorer was once taken
    before the recipe was applied)."""
    import json

    out = str(tmp_path / "run.json")
    assert main(["--quiet", "run", "--model", tiny_dir, "--bpw", "3.5", "--recipe", "quality", "--text", text_file,
                 "--windows", "2", "--seq-len", "32", "--calib-windows", "2", "--calib-seq-len", "64",
                 "--refine-windows", "2", "--refine-seq-len", "64", "--probe-windows", "1", "--probe-seq-len", "32",
                 "--json", out]) == 0
    report = json.loads(open(out, encoding="utf-8").read())
    assert report["quantizer"] == "gptq"
    (budget,) = report["budgets"]
    assert list(budget["allocated"]) == ["kl"]
    provenance = budget["allocated"]["kl"]["provenance"]
    assert provenance["refinement"]["objective"] == "nll" and len(provenance["refinement"]["rounds"]) >= 1
    assert provenance["guard"]["objective"] == "nll"


def test_cli_compare_with_a_recipe_takes_its_scorer_and_quantizer(tiny_dir, text_file, tmp_path):
    """compare's own defaults (every scorer, RTN and GPTQ) come after the
    recipe's, so `compare --recipe quality` is not refused as contradicting
    itself and compares the recipe's table with the baselines under GPTQ."""
    import json

    out = tmp_path / "cmp"
    assert main(["--quiet", "compare", "--model", tiny_dir, "--recipe", "quality", "--budgets", "3.5", "--text",
                 text_file, "--windows", "2", "--seq-len", "32", "--calib-windows", "2", "--calib-seq-len", "64",
                 "--refine-windows", "2", "--refine-seq-len", "64", "--probe-windows", "1", "--probe-seq-len", "32",
                 "--out", str(out)]) == 0
    rows = json.loads((out / "compare.json").read_text(encoding="utf-8"))["rows"]
    assert {r["quantizer"] for r in rows} == {"gptq"}
    assert [r["method"] for r in rows] == ["uniform", "llama-rule", "kl"]


def test_default_plans_are_never_worse_than_uniform_on_calibration_kl(loaded):
    """`bitalloc plan --bpw B` with no other option, B from 2.5 to 4.5: the
    plan returned measures no worse than the uniform plan of the same size on
    the guard's calibration windows (measured here again, independently)."""
    from bitalloc.evaluate.probe import CalibrationProbe
    from bitalloc.formats.affine_rtn import fake_quantize
    from bitalloc.evaluate.text import calibration_text

    check = CalibrationProbe(loaded.model, loaded.tokenizer, loaded.inventory, calibration_text(None), windows=4,
                             seq_len=128, quantize_weight=lambda u, W, o: fake_quantize(W, o))
    for bpw in (2.5, 2.75, 3.0, 3.25, 3.5, 3.75, 4.0, 4.25, 4.5):
        settings = api.PlanSettings(Budget(bpw))
        p = api.plan(settings=settings, loaded=loaded, progress=False)
        options = api.resolve_menu(loaded.inventory, settings.menu)[0]
        uniform = api.uniform_plan(loaded.inventory, options, settings, "tiny")
        check.apply(dict(p.assignment))
        got = check.measure().kl
        check.apply(dict(uniform.assignment))
        assert got <= check.measure().kl + 1e-12, bpw
        check.restore()  # the model goes back to its own weights before the next plan measures it
        assert p.provenance.guard.kept in ("allocated", "uniform")
        assert p.provenance.guard.replaced == (p.only_option() is not None and p.scorer.endswith("kept)"))


def test_gptq_refinement_windows_lie_between_gptq_calibration_windows(loaded):
    """Calibration windows (importance matrix, GPTQ's Hessians) are spread
    evenly over the text; with GPTQ, refinement and the guard measure in the
    gaps they leave (tokens GPTQ did not fit), round-robin after each one;
    with RTN they start at the beginning. Positions checked against the
    text's own token ids."""
    from bitalloc.calib.grams import CalibSettings, calibration_windows
    from bitalloc.evaluate.text import calibration_text

    calib = CalibSettings(2, 32)
    text = calibration_text(None)
    ids = loaded.tokenizer(text, add_special_tokens=False).input_ids
    bos = 1 if loaded.tokenizer(text[:50]).input_ids[:1] == [loaded.tokenizer.bos_token_id] else 0
    fitted = calibration_windows(loaded.tokenizer, text, calib)
    stride, fb = len(ids) // 2, 32 - bos
    assert fitted[:, bos:].tolist() == [ids[:fb], ids[stride : stride + fb]]
    settings = _settings(quantizer="gptq", calib=calib)
    gptq = make_probe(loaded, settings, hessians={})
    rtn = make_probe(loaded, _settings(calib=calib))
    n, L = gptq.windows.shape
    body = L - bos
    starts = [(k % 2) * stride + fb + (k // 2) * body for k in range(n)]
    assert gptq.windows[:, bos:].tolist() == [ids[s : s + body] for s in starts]
    taken = {i for s in starts for i in range(s, s + body)}
    assert not taken & {i for s in (0, stride) for i in range(s, s + fb)}  # no token GPTQ was fitted on
    assert rtn.windows[0, bos:].tolist() == ids[:body]
    assert gptq.windows.shape == rtn.windows.shape


def test_spread_windows_need_room_and_say_which_flags():
    from bitalloc.evaluate import EvalSettings, spread_windows
    from conftest import char_tokenizer

    tok, text = char_tokenizer(), "abcdefghij" * 10  # 100 tokens
    rows = spread_windows(tok, text, EvalSettings(10, 4))
    ids = tok(text, add_special_tokens=False).input_ids
    assert rows.tolist() == [ids[s : s + 10] for s in (0, 25, 50, 75)]
    with pytest.raises(BitallocError, match="enough for 10 windows of 10, not 11"):
        spread_windows(tok, text, EvalSettings(10, 11))
    held = spread_windows(tok, text, EvalSettings(5, 6), clear_of=EvalSettings(10, 4))
    assert held.tolist() == [ids[s : s + 5] for s in (10, 35, 60, 85, 15, 40)]
    with pytest.raises(BitallocError, match="leave room for 12 held-out windows of 5, not 13"):
        spread_windows(tok, text, EvalSettings(5, 13), clear_of=EvalSettings(10, 4), flags="fewer --refine-windows")
