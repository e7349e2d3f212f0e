"""The stages as Python functions: load, score, plan, quantize, evaluate, run.

Orchestration only; the maths lives in options/quant/scoring/problem/solvers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from bitalloc.errors import BitallocError
from bitalloc.evaluate import EvalSettings, evaluate as evaluate_windows, reference_logprobs, reference_result, token_windows
from bitalloc.loading import ModelSource, load_model, resolve_source
from bitalloc.options import DEFAULT_GROUP_SIZES, SUPPORTED_BITS, QuantOption, build_menu, group_count
from bitalloc.plan import Plan
from bitalloc.problem import Budget, Constraints, budget_bits, build_problem, cost_matrix
from bitalloc.scoring import ErrorTable, check_scorer, score
from bitalloc.solvers import solve
from bitalloc.text import read_text_file, wiki_text
from bitalloc.units import Inventory, find_units


def _tqdm(enabled: bool) -> Callable | None:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return lambda it, **kw: tqdm(it, leave=False, **kw)


@dataclass(frozen=True)
class MenuSettings:
    """The options a unit may take. ``group_sizes=None`` means automatic: the
    standard sizes (32, 64, 128, per-channel) that divide every unit."""

    bits: tuple[int, ...] = SUPPORTED_BITS
    group_sizes: tuple[int, ...] | None = None
    schemes: tuple[str, ...] = ("asym", "sym")
    allow_ragged: bool = False


@dataclass(frozen=True)
class PlanSettings:
    budget: Budget
    scorer: str = "rtn-mse"
    solver: str = "ilp"
    menu: MenuSettings = field(default_factory=MenuSettings)
    constraints: Constraints = field(default_factory=Constraints)
    keep_bits: int = 16

    def __post_init__(self) -> None:
        check_scorer(self.scorer)


@dataclass
class Loaded:
    model: object
    tokenizer: object
    source: ModelSource
    inventory: Inventory


def load(model: str | None = None) -> Loaded:
    source = resolve_source(model)
    m, tok = load_model(source)
    return Loaded(m, tok, source, find_units(m))


def resolve_menu(inventory: Inventory, menu: MenuSettings) -> tuple[tuple[QuantOption, ...], list[str]]:
    """The option menu for this model, and notices about what was dropped."""
    notices = []
    groups = menu.group_sizes
    if groups is None:
        cols = {u.shape[1] for u in inventory.units}
        groups = tuple(g for g in DEFAULT_GROUP_SIZES if g == 0 or all(c % g == 0 for c in cols))
        dropped = sorted(set(DEFAULT_GROUP_SIZES) - set(groups))
        if dropped:
            notices.append(f"Group sizes {dropped} do not divide every unit's input size {sorted(cols)}; the menu uses {['channel' if g == 0 else g for g in groups]}.")
    elif not menu.allow_ragged:
        for u in inventory.units:
            for g in groups:
                group_count(u.shape[1], QuantOption(menu.bits[0], g), name=u.param)  # raises GroupSizeError
    return build_menu(menu.bits, groups, menu.schemes), notices


def error_tables(loaded: Loaded, options: Sequence[QuantOption], scorers: Sequence[str], *,
                 allow_ragged: bool = False, progress: bool = True) -> dict[str, ErrorTable]:
    return score(loaded.model, loaded.inventory, options, scorers, allow_ragged=allow_ragged, progress=_tqdm(progress))


def solve_plan(inventory: Inventory, table: ErrorTable, settings: PlanSettings, model_label: str) -> Plan:
    table.check_model(inventory)
    problem = build_problem(inventory, table.options, table.errors, settings.budget, settings.constraints,
                            keep_bits=settings.keep_bits, allow_ragged=settings.menu.allow_ragged)
    solution = solve(problem, settings.solver)
    assignment = {}
    for g, members in enumerate(problem.groups):
        for i in members:
            assignment[inventory.units[i].name] = table.options[int(solution.choice[g])]
    return Plan(assignment, inventory.identity, model_label, settings.budget, table.scorer, settings.solver,
                solution.objective, settings.keep_bits, settings.menu.allow_ragged, settings.constraints)


def uniform_plan(inventory: Inventory, options: Sequence[QuantOption], budget: Budget, model_label: str, *,
                 keep_bits: int = 16, allow_ragged: bool = False, table: ErrorTable | None = None) -> Plan:
    """The single option with the largest size not above the budget; among
    options of equal size, the one with the least total error in ``table``."""
    cost = cost_matrix(inventory, options, allow_ragged=allow_ragged)
    fits = (cost >= 0).all(axis=0)
    totals = cost.sum(axis=0)
    cap = budget_bits(budget, inventory, keep_bits=keep_bits)
    ok = fits & (totals <= cap)
    if not ok.any():
        raise BitallocError(f"No single option of the menu fits {budget.describe()}; the uniform baseline needs a larger budget.")
    best = totals[ok].max()
    candidates = [j for j in range(len(options)) if ok[j] and totals[j] == best]
    if table is not None:
        err = np.nansum(table.errors, axis=0)
        candidates.sort(key=lambda j: err[j])
    opt = options[candidates[0]]
    objective = None if table is None else float(np.nansum(table.errors[:, candidates[0]]))
    return Plan({u.name: opt for u in inventory.units}, inventory.identity, model_label, budget,
                f"uniform:{opt.name}", "uniform", objective, keep_bits, allow_ragged)


def plan(model: str | None = None, *, settings: PlanSettings, table_path: str | None = None,
         save_table: str | None = None, out: str | None = None, progress: bool = True,
         loaded: Loaded | None = None) -> Plan:
    """Score (or reuse a saved error table), solve, and write the plan file."""
    loaded = loaded or load(model)
    if table_path:
        table = ErrorTable.load(table_path)
        table.check_model(loaded.inventory)
        if table.scorer != settings.scorer:
            table = table.rescored(settings.scorer)
    else:
        options, _ = resolve_menu(loaded.inventory, settings.menu)
        table = error_tables(loaded, options, [settings.scorer], allow_ragged=settings.menu.allow_ragged,
                             progress=progress)[settings.scorer]
    if save_table:
        table.save(save_table)
    result = solve_plan(loaded.inventory, table, settings, loaded.source.label)
    if out:
        result.save(out, loaded.inventory)
    return result


def quantize(model: str | None = None, *, plan_path: str, out: str, progress: bool = True,
             loaded: Loaded | None = None) -> dict:
    from bitalloc.quantize import quantize_model, save_quantized

    loaded = loaded or load(model)
    the_plan = Plan.load(plan_path)
    stored = quantize_model(loaded.model, loaded.inventory, the_plan, progress=_tqdm(progress))
    folder = save_quantized(out, loaded.model, loaded.tokenizer, loaded.inventory, the_plan, stored)
    sizes = the_plan.sizes(loaded.inventory)
    return {"out": str(folder), "file_bytes": (folder / "model.safetensors").stat().st_size, "sizes": sizes.to_dict()}


def eval_text(text_path: str | None) -> tuple[str, str]:
    """(text, label): a user's file, or the evaluation part of the offline Wikipedia sample."""
    if text_path:
        return read_text_file(text_path), text_path
    return wiki_text("eval"), "gensim enwiki sample, evaluation half (even-numbered articles)"


def evaluate(model: str | None = None, *, quantized: str | None = None, reference_model: str | None = None,
             text_path: str | None = None, settings: EvalSettings = EvalSettings(), progress: bool = True) -> dict:
    """Perplexity of a model or a quantized folder; with ``reference_model``,
    also KL and top-1 agreement against it."""
    from bitalloc.quantize import load_quantized

    text, label = eval_text(text_path)
    if quantized:
        m, tok, _ = load_quantized(quantized)
        name = quantized
    else:
        loaded = load(model)
        m, tok, name = loaded.model, loaded.tokenizer, loaded.source.label
    if tok is None:
        raise BitallocError(f"{name} has no tokenizer files; it cannot be evaluated on text.")
    windows = token_windows(tok, text, settings)
    reference = None
    if reference_model is not None or (quantized and model):
        ref = load(reference_model or model)
        reference = reference_logprobs(ref.model, windows, progress=_tqdm(progress))
    result = evaluate_windows(m, windows, reference, progress=_tqdm(progress))
    return {"model": name, "text": label, "settings": settings.to_dict(), "result": result.to_dict()}


def _plan_row(loaded: Loaded, the_plan: Plan, windows, reference, progress: bool, desc: str) -> dict:
    from bitalloc.quantize import quantize_model, restored

    t0 = time.perf_counter()
    with restored(loaded.model):
        quantize_model(loaded.model, loaded.inventory, the_plan)
        result = evaluate_windows(loaded.model, windows, reference, progress=_tqdm(progress), desc=desc)
    sizes = the_plan.sizes(loaded.inventory)
    options = sorted({o.name for o in the_plan.assignment.values()})
    return {
        **result.to_dict(),
        "bpw": sizes.quantized_bpw,
        "code_bpw": sizes.code_bpw,
        "model_bpw": sizes.model_bpw,
        "model_mb": sizes.model_bytes / 1e6,
        "objective": the_plan.objective,
        "options_used": options,
        "seconds": time.perf_counter() - t0,
    }


def run(model: str | None = None, *, settings: PlanSettings, scorers: Sequence[str] | None = None,
        budgets: Sequence[float] | None = None, text_path: str | None = None,
        eval_settings: EvalSettings = EvalSettings(), progress: bool = True, loaded: Loaded | None = None,
        plans_dir: str | None = None) -> dict:
    """All stages: reference, the uniform baseline and the allocated plan for
    each budget (and scorer), evaluated on the same windows. One RTN
    measurement serves every scorer and budget."""
    loaded = loaded or load(model)
    scorers = list(scorers or [settings.scorer])
    budgets = list(budgets or [settings.budget.value])
    options, notices = resolve_menu(loaded.inventory, settings.menu)
    tables = error_tables(loaded, options, scorers, allow_ragged=settings.menu.allow_ragged, progress=progress)
    text, label = eval_text(text_path)
    if loaded.tokenizer is None:
        raise BitallocError(f"{loaded.source.label} has no tokenizer files; `run` evaluates text and needs one.")
    windows = token_windows(loaded.tokenizer, text, eval_settings)
    reference = reference_logprobs(loaded.model, windows, progress=_tqdm(progress))
    ref_result = reference_result(windows, reference)
    inv = loaded.inventory
    report = {
        "model": loaded.source.label,
        "model_note": "the reference is the model as loaded; for the embedded default its weights already sit on a 4-bit grid (Q4_1 GGUF), not an fp16 original",
        "text": label,
        "eval": eval_settings.to_dict(),
        "menu": [o.name for o in options],
        "notices": list(inv.notices) + notices,
        "units": len(inv.units),
        "quantized_numel": inv.quantized_numel,
        "kept_numel": inv.kept_numel,
        "bpw_note": "bpw: stored bits of the quantized units (codes + fp16 scales + fp16 zeros) / their weights; "
                    "code_bpw: codes only; model_bpw and model_mb: whole model, kept tensors (embeddings, norms) "
                    f"at {settings.keep_bits} bits, tied tensors once",
        "reference": {**ref_result.to_dict(), "model_mb": (inv.quantized_numel + inv.kept_numel) * 2 / 1e6,
                      "model_mb_note": "at fp16"},
        "budgets": [],
    }
    first = tables[scorers[0]]
    for value in budgets:
        budget = replace(settings.budget, value=value)
        uni = uniform_plan(inv, options, budget, loaded.source.label, keep_bits=settings.keep_bits,
                           allow_ragged=settings.menu.allow_ragged, table=first)
        entry = {"budget": budget.to_dict(), "uniform": {"option": uni.scorer.split(":", 1)[1],
                                                           **_plan_row(loaded, uni, windows, reference, progress, f"uniform {value:g}")},
                 "allocated": {}}
        for scorer in scorers:
            p = solve_plan(inv, tables[scorer], replace(settings, budget=budget, scorer=scorer), loaded.source.label)
            if plans_dir:
                p.save(f"{plans_dir}/plan-{scorer}-{value:g}.json", inv)
            entry["allocated"][scorer] = _plan_row(loaded, p, windows, reference, progress, f"{scorer} {value:g}")
        report["budgets"].append(entry)
    if len(budgets) == 1 and len(scorers) == 1:  # the flat shape of `bitalloc run --json`
        report["uniform"] = report["budgets"][0]["uniform"]
        report["allocated"] = report["budgets"][0]["allocated"][scorers[0]]
    return report
