"""`bitalloc kv`: the KV cache as units. On one model and text: the error
table of the cache units, a plan per budget (solver + guard against the best
uniform codec), and side by side at long context the full-precision cache,
uniform codecs, the plans and the per-token policy, each with intervals and
paired verdicts; optionally the llama.cpp K/V type pair bitalloc picks,
measured in llama.cpp itself against q8_0/q8_0 and q4_0/q4_0."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bitalloc.compare.report import versus
from bitalloc.errors import BitallocError, InfeasibleBudgetError
from bitalloc.evaluate import (
    EvalSettings,
    evaluate,
    reference_logprobs,
    reference_result,
    spread_windows,
    token_windows,
)
from bitalloc.evaluate.probe import block_stack
from bitalloc.evaluate.rows import progress_bar
from bitalloc.evaluate.stats import method_note
from bitalloc.evaluate.text import calibration_text
from bitalloc.formats.kv import DEFAULT_MENU, KVCodec, parse_codec
from bitalloc.kvcache.allocate import (
    LLAMACPP_TYPES,
    Pair,
    feasible_bpe,
    pair_estimates,
    solve_kv,
    uniform_candidates,
)
from bitalloc.kvcache.cache import CachedModel, KVAssignment
from bitalloc.kvcache.layout import KVLayout, bits_per_element, cache_bytes, layout_of
from bitalloc.kvcache.plan import KVPlan
from bitalloc.kvcache.policy import DEFAULT_LADDER, DEFAULT_SINK, fit_policy
from bitalloc.kvcache.score import SCORERS, KVTable, build_table

DEFAULT_UNIFORM = ("int8", "int4", "rot4", "rot3", "rot2")


@dataclass(frozen=True)
class KVCompareSettings:
    budgets: tuple[float, ...] = (3.25, 4.25)
    menu: tuple[str, ...] = DEFAULT_MENU
    uniform: tuple[str, ...] = DEFAULT_UNIFORM
    scorer: str = "kv-kl"
    eval: EvalSettings = EvalSettings(seq_len=2048, windows=4)
    calib: EvalSettings = EvalSettings(seq_len=512, windows=2)
    token_policy: bool = True
    ladder: tuple[str, ...] = DEFAULT_LADDER
    sink: int = DEFAULT_SINK
    llamacpp_gguf: str | None = None  # a .gguf of the same model: measure the K/V pair in llama.cpp
    llamacpp_budget: float = 6.5
    context: int = 8192  # the context at which cache bytes are reported

    def __post_init__(self) -> None:
        if self.scorer not in SCORERS:
            raise BitallocError(f"The 'scorer' parameter must be one of {list(SCORERS)}. Got {self.scorer!r} "
                                "instead.")
        for name in (*self.menu, *self.uniform, *self.ladder):
            parse_codec(name)
        if not self.budgets and not self.uniform:
            raise BitallocError("Nothing to compare: give at least one budget or one uniform codec.")
        for b in (*self.budgets, self.llamacpp_budget):
            if not 0 < b <= 32:
                raise BitallocError(f"A KV budget must be in (0, 32] bits per value. Got {b} instead.")
        if self.context < 1:
            raise BitallocError(f"The 'context' parameter must be at least 1. Got {self.context} instead.")


def check_budgets(layout: KVLayout, menu: list[KVCodec], budgets) -> None:
    """Every budget within what the menu reaches at this head dimension: refused before anything is measured."""
    if not menu:
        raise BitallocError(f"No codec of the menu stores a head dimension of {layout.head_dim}. Add f16, int<b> "
                            "or rot<b> to --codecs.")
    lo, hi = feasible_bpe(layout, menu)
    bad = [b for b in budgets if b < lo - 1e-9]
    if bad:
        raise InfeasibleBudgetError(f"KV budget {bad[0]:g} is below what the codecs {[c.name for c in menu]} reach at "
                                    f"head dimension {layout.head_dim}: [{lo:.4f}, {hi:.4f}] bits per value. Raise "
                                    "it or add a cheaper codec.")


def _row(model, layout: KVLayout, windows: torch.Tensor, reference: list, assign: Callable, desc: str,
         progress: Callable | None) -> dict:
    t0 = time.perf_counter()
    result = evaluate(CachedModel(model, assign), windows, reference, progress=progress, desc=desc)
    return {**result.to_dict(), "seconds": time.perf_counter() - t0}


def _static(layout: KVLayout, codecs: list[KVCodec], context: int) -> dict:
    return {"bpe": bits_per_element(layout, codecs), "cache_mb": cache_bytes(layout, codecs, context) / 1e6,
            "codecs_used": {c.name: sum(1 for x in codecs if x == c) for c in dict.fromkeys(codecs)}}


def calib_kl(model, layout: KVLayout, codecs: list[KVCodec], calib: torch.Tensor, calib_ref: list) -> float:
    assignment = KVAssignment.per_unit(layout, codecs)
    return evaluate(CachedModel(model, lambda ids: assignment), calib, calib_ref).kl


def plan_for_budget(model, layout: KVLayout, table: KVTable, budget: float, calib: torch.Tensor, calib_ref: list,
                    label: str, uniform_kl: dict[str, float]) -> KVPlan:
    """The solver's plan, kept only if its calibration KL is below the best uniform codec's within the budget."""
    codecs, objective = solve_kv(layout, table, budget)
    candidates = uniform_candidates(layout, [parse_codec(n) for n in table.codecs], budget)
    guard: dict = {"measured_on": "calibration windows, KL to the full-precision cache"}
    plan_kl = calib_kl(model, layout, codecs, calib, calib_ref)
    if candidates:
        for c in candidates:
            if c.name not in uniform_kl:
                uniform_kl[c.name] = calib_kl(model, layout, [c] * len(layout.units), calib, calib_ref)
        best = min(candidates, key=lambda c: uniform_kl[c.name])
        guard.update({"uniform": best.name, "uniform_kl": uniform_kl[best.name], "plan_kl": plan_kl,
                      "kept": "plan" if plan_kl < uniform_kl[best.name] else "uniform"})
        if plan_kl >= uniform_kl[best.name]:
            codecs = [best] * len(layout.units)
    else:
        guard.update({"uniform": None, "plan_kl": plan_kl, "kept": "plan"})
    return KVPlan(model=label, layout=layout, assignment=dict(zip(layout.units, (c.name for c in codecs))),
                  budget_bpe=float(budget), scorer=table.scorer, objective=objective, guard=guard)


def compare_kv(loaded, settings: KVCompareSettings, *, calib_text_path: str | None = None, encoding: str = "utf-8",
               eval_text: tuple[str, str], progress: bool = True, out_dir: str | None = None) -> dict:
    """Everything ``bitalloc kv`` measures; ``loaded`` is an ``api.Loaded``,
    ``eval_text`` (text, label). Plans are written to ``out_dir`` as they are made."""
    t_start = time.perf_counter()
    bar = progress_bar(progress)
    model, tok = loaded.model, loaded.tokenizer
    if tok is None:
        raise BitallocError(f"{loaded.source.label} has no tokenizer files; the KV comparison runs on text.")
    layout = layout_of(model.config)
    menu = [c for c in map(parse_codec, settings.menu) if c.available(layout.head_dim)]
    check_budgets(layout, menu, settings.budgets)
    scored = menu + [parse_codec(t) for t in LLAMACPP_TYPES if settings.llamacpp_gguf
                     and parse_codec(t) not in menu and parse_codec(t).available(layout.head_dim)]
    calib_label = calib_text_path or "gensim enwiki sample, calibration half (odd-numbered articles)"
    calib, calib_ref, windows, ref, seconds = _references(model, tok, settings, calib_text_path, encoding,
                                                          eval_text[0], bar)
    table = build_table(model, layout, calib, scored, settings.scorer, calib_ref, progress=bar,
                        stack=block_stack(model, loaded.inventory))
    seconds.update({f"table_{k}": v for k, v in (table.seconds or {}).items()})
    menu_table = _sub_table(table, [c.name for c in menu])
    report: dict = {
        "format": "bitalloc.kv-report", "version": 1, "model": loaded.source.label,
        "model_note": "the reference is the model as loaded with its cache in float32; for the embedded default its "
                      "weights already sit on a 4-bit grid (Q4_1 GGUF)",
        "layout": layout.to_dict(), "text": eval_text[1], "calibration_text": calib_label,
        "eval": settings.eval.to_dict(), "calib": settings.calib.to_dict(), "scorer": settings.scorer,
        "probe": table.probe, "tail_only_probes": table.tail_only, "menu": [c.name for c in menu], "context": settings.context,
        "bpe_note": "bpe: stored bits per cached value over all layers, heads, keys and values, scales and norms "
                    "included; cache_mb: the cache at `context` tokens, rotation seeds included",
        "reference": {**reference_result(windows, ref).to_dict(), "cache": "float32 (as computed)"},
        "rows": [], "seconds": seconds, "notices": [],
    }
    rows = report["rows"]
    t0 = time.perf_counter()
    rows.extend(uniform_rows(model, layout, windows, ref, settings, bar))
    seconds["uniform_rows"] = time.perf_counter() - t0
    _budget_rows(model, tok, loaded.source.label, layout, menu_table, settings, (calib, calib_ref), (windows, ref),
                 report, out_dir, bar)
    if settings.llamacpp_gguf:
        t0 = time.perf_counter()
        report["llamacpp"] = llamacpp_pairs(settings.llamacpp_gguf, layout, table, settings.llamacpp_budget,
                                            windows, progress)
        seconds["llamacpp"] = time.perf_counter() - t0
    _verdicts(report)
    seconds["total"] = time.perf_counter() - t_start
    report["method_note"] = method_note(settings.eval.windows, int(report["reference"]["tokens"]),
                                        baseline="the best uniform codec within the same budget")
    return report


def _budget_rows(model, tok, label: str, layout: KVLayout, menu_table: KVTable, settings: KVCompareSettings,
                 calib_pair: tuple, eval_pair: tuple, report: dict, out_dir: str | None, bar: Callable | None) -> None:
    """For each budget: the plan (saved to ``out_dir``), its row and the per-token row, into ``report``."""
    (calib, calib_ref), (windows, ref) = calib_pair, eval_pair
    rows, seconds = report["rows"], report["seconds"]
    uniform_kl: dict[str, float] = {}
    for budget in settings.budgets:
        t0 = time.perf_counter()
        plan = plan_for_budget(model, layout, menu_table, budget, calib, calib_ref, label, uniform_kl)
        seconds[f"plan_{budget}"] = time.perf_counter() - t0
        if out_dir:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            plan.save(str(Path(out_dir) / f"kvplan-{budget:g}.json"))
        t0 = time.perf_counter()
        rows.append(plan_row(model, layout, plan, windows, ref, settings.context, f"bitalloc {budget:g}", bar))
        seconds[f"plan_row_{budget}"] = time.perf_counter() - t0
        if settings.token_policy:
            try:
                rows.append(_policy_row(model, layout, tok, calib, windows, ref, budget, settings, bar))
            except BitallocError as e:  # this ladder cannot reach the budget: the other rows still stand
                report["notices"].append(f"no per-token row at {budget:g} bits: {' '.join(str(e).split())}")


def _references(model, tok, settings: KVCompareSettings, calib_text_path: str | None, encoding: str, text: str,
                bar: Callable | None) -> tuple:
    """(calibration windows, their float32-cache log-probs, evaluation windows, theirs, seconds)."""
    calib = spread_windows(tok, calibration_text(calib_text_path, encoding), settings.calib)
    windows = token_windows(tok, text, settings.eval)
    t0 = time.perf_counter()
    calib_ref = reference_logprobs(model, calib, progress=bar)
    ref = reference_logprobs(model, windows, progress=bar)
    return calib, calib_ref, windows, ref, {"reference": time.perf_counter() - t0}


def uniform_rows(model, layout: KVLayout, windows: torch.Tensor, ref: list, settings: KVCompareSettings,
                 bar: Callable | None) -> list[dict]:
    """f16 and every uniform codec of ``settings`` that stores this head dimension, one row each."""
    rows = []
    for name in dict.fromkeys(("f16", *settings.uniform)):
        codec = parse_codec(name)
        if not codec.available(layout.head_dim):
            continue
        assignment = KVAssignment.uniform(layout, codec)
        rows.append({"method": "uniform", "name": name, **_static(layout, [codec] * len(layout.units),
                                                                  settings.context),
                     **_row(model, layout, windows, ref, lambda ids, a=assignment: a, name, bar)})
    return rows


def evaluate_plan(loaded, plan: KVPlan, settings: KVCompareSettings, *, eval_text: tuple[str, str],
                  progress: bool = True) -> dict:
    """A saved KV plan on the evaluation windows, beside f16 and the uniform codecs."""
    bar = progress_bar(progress)
    model, tok = loaded.model, loaded.tokenizer
    if tok is None:
        raise BitallocError(f"{loaded.source.label} has no tokenizer files; the KV evaluation runs on text.")
    layout = layout_of(model.config)
    if layout != plan.layout:
        raise BitallocError(f"The KV plan is for a cache of {plan.layout.to_dict()}; {loaded.source.label} has "
                            f"{layout.to_dict()}. Make a plan for this model with `bitalloc kv --model ...`.")
    windows = token_windows(tok, eval_text[0], settings.eval)
    t0 = time.perf_counter()
    ref = reference_logprobs(model, windows, progress=bar)
    report: dict = {"format": "bitalloc.kv-report", "version": 1, "model": loaded.source.label,
                    "layout": layout.to_dict(), "text": eval_text[1], "eval": settings.eval.to_dict(),
                    "context": settings.context, "scorer": plan.scorer, "probe": None,
                    "calib": {"windows": 0, "seq_len": 0}, "calibration_text": "(the plan's)",
                    "reference": {**reference_result(windows, ref).to_dict(), "cache": "float32 (as computed)"},
                    "rows": uniform_rows(model, layout, windows, ref, settings, bar)}
    report["rows"].append(plan_row(model, layout, plan, windows, ref, settings.context,
                                   f"plan {plan.budget_bpe:g}", bar))
    _verdicts(report)
    report["seconds"] = {"total": time.perf_counter() - t0}
    report["method_note"] = method_note(settings.eval.windows, int(report["reference"]["tokens"]),
                                        baseline="the best uniform codec within the same budget")
    return report


def plan_row(model, layout: KVLayout, plan: KVPlan, windows: torch.Tensor, ref: list, context: int, name: str,
             bar: Callable | None) -> dict:
    """One plan evaluated on the windows, with its bits, guard record and the per-unit bits for the figure."""
    assignment = KVAssignment.per_unit(layout, plan.codecs)
    return {"method": "bitalloc", "name": name, "budget_bpe": plan.budget_bpe, "guard": plan.guard,
            **_static(layout, plan.codecs, context), "heatmap": _heatmap(layout, plan),
            **_row(model, layout, windows, ref, lambda ids: assignment, name, bar)}


def _sub_table(table: KVTable, names: list[str]) -> KVTable:
    idx = [table.codecs.index(n) for n in names]
    return KVTable(table.units, tuple(names), table.distortion[:, idx], table.importance, table.scorer,
                   table.probe, table.seconds, table.tail_only)


def _heatmap(layout: KVLayout, plan: KVPlan) -> dict:
    """Bits per value of each unit: {"k": [[layer][head]], "v": ...}, for the figure."""
    bits = [c.vector_bits(layout.head_dim) / layout.head_dim for c in plan.codecs]
    h = layout.kv_heads
    return {kind: [[bits[(layer * 2 + k) * h + head] for head in range(h)] for layer in range(layout.layers)]
            for k, kind in enumerate(("k", "v"))}


def _policy_row(model, layout, tok, calib, windows, ref, budget, settings: KVCompareSettings, bar) -> dict:
    policy = fit_policy(calib, _vocab(model, tok), layout.head_dim, budget, settings.ladder, settings.sink)
    codecs = policy.codecs
    static = KVAssignment.uniform(layout, None)
    bpe = float(np.mean([policy.bits_per_element(row, layout.head_dim) for row in windows]))
    row = _row(model, layout, windows, ref, lambda ids: static.with_tokens(codecs, policy.levels(ids[0], layout.head_dim)),
               f"per-token {budget:g}", bar)
    return {"method": "per-token", "name": f"per-token {budget:g}", "budget_bpe": budget, "bpe": bpe,
            "cache_mb": bpe * layout.elements_per_token * settings.context / 8e6, "policy": policy.to_dict(),
            "bpe_note": "realized on the evaluation windows (the thresholds were fitted on calibration text)", **row}


def _vocab(model, tok) -> int:
    return int(getattr(getattr(model, "config", None), "vocab_size", 0) or len(tok))


def _verdicts(report: dict) -> None:
    """Each plan and per-token row against the best uniform row within its budget (by measured KL),
    and each per-token row against the plan of its budget."""
    uniform = [r for r in report["rows"] if r["method"] == "uniform"]
    plans = {r["budget_bpe"]: r for r in report["rows"] if r["method"] == "bitalloc"}
    for r in report["rows"]:
        if r["method"] == "uniform":
            continue
        fits = [u for u in uniform if u["bpe"] <= r["budget_bpe"] + 1e-9]
        if fits:
            best = min(fits, key=lambda u: u["kl"])
            r["vs_uniform"] = {"baseline": best["name"], "verdict": versus(r, best),
                               "kl_change": r["kl"] / best["kl"] - 1 if best["kl"] else None}
        if r["method"] == "per-token" and r["budget_bpe"] in plans:
            r["vs_plan"] = {"baseline": plans[r["budget_bpe"]]["name"], "verdict": versus(r, plans[r["budget_bpe"]])}


def llamacpp_pairs(gguf: str, layout: KVLayout, table: KVTable, budget: float, windows: torch.Tensor,
                   progress: bool) -> dict:
    """The K/V type pair the table predicts best within ``budget``, and llama.cpp's own measurement of it
    beside q8_0/q8_0, q4_0/q4_0 and the best same-type pair within the budget, against its f16 cache."""
    from bitalloc.evaluate.llamacpp import LlamaCpp, options_dict

    ranked = pair_estimates(layout, table, budget)
    chosen = ranked[0][1]
    same = [p for _, p in ranked if p.k == p.v]
    rows_to_run = {"q8_0/q8_0": Pair("q8_0", "q8_0"), "q4_0/q4_0": Pair("q4_0", "q4_0")}
    if same:
        rows_to_run[f"{same[0].k}/{same[0].v}"] = same[0]
    rows_to_run[f"{chosen.k}/{chosen.v}"] = chosen
    with LlamaCpp(progress=progress_bar(progress)) as runner:
        runner.set_cache("f16", "f16", flash_attn=True)
        reference = runner.logprobs(gguf, windows, desc="llama.cpp f16 cache")
        rows = []
        for name, pair in rows_to_run.items():
            runner.set_cache(pair.k, pair.v, flash_attn=True)
            result = runner.evaluate(gguf, windows, reference, desc=f"llama.cpp {name}")
            rows.append({"name": name, "k": pair.k, "v": pair.v, "bpe": pair.bpe(layout.head_dim),
                         "flags": pair.flags, "picked": pair == chosen, "same_type_best": bool(same) and pair == same[0],
                         **result.to_dict()})
        info = options_dict(runner)
    by_name = {r["name"]: r for r in rows}
    pick = by_name[f"{chosen.k}/{chosen.v}"]
    for r in rows:
        if r is not pick:
            r["picked_vs_this"] = versus(pick, r)
    return {"gguf": gguf, "budget_bpe": budget, "picked": {"k": chosen.k, "v": chosen.v, "flags": chosen.flags},
            "estimates": [{"k": p.k, "v": p.v, "bpe": p.bpe(layout.head_dim), "estimated_error": e}
                          for e, p in ranked[:8]],
            "reference": "the same GGUF in llama.cpp with an f16 cache (flash attention on in every row)",
            "rows": rows, "runtime": info}
