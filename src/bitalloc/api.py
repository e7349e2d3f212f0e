"""The stages as Python functions: load, score, plan, quantize, evaluate, run.

Orchestration only; the maths lives in options/quant/gptq/scorers/problem/solvers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from bitalloc.calib.grams import CalibSettings, importance_record
from bitalloc.errors import BitallocError
from bitalloc.evaluate import (
    EvalSettings,
    reference_logprobs,
    token_windows,
)
from bitalloc.evaluate import (
    evaluate as evaluate_windows,
)
from bitalloc.evaluate.rows import (  # noqa: F401  (public API)
    EvalBench,
    eval_text,
    evaluate_in_llamacpp,
    plan_row,
    reference_block,
)
from bitalloc.evaluate.rows import progress_bar as _tqdm
from bitalloc.evaluate.text import calibration_text
from bitalloc.formats import is_gguf
from bitalloc.formats.affine import QuantOption
from bitalloc.formats.menu import MenuSettings, keep_type_rules, resolve_menu, runtime_ties
from bitalloc.model.loading import ModelSource, load_model, resolve_source
from bitalloc.model.units import Inventory, find_units
from bitalloc.plan import Plan
from bitalloc.quantizers import gathers_every_gram, quantizer
from bitalloc.scorers import SCORERS, ScorerSettings, ScoringContext, check_scorer, score
from bitalloc.scorers.distributed import RaySettings, ray_runner
from bitalloc.solve.baselines import llama_rule_plan, uniform_plan  # noqa: F401  (public API)
from bitalloc.solve.problem import Budget, Constraints, build_problem
from bitalloc.solve.refine import RefineSettings, finish_plan, make_probe, start_plan
from bitalloc.solve.solvers import solve
from bitalloc.streaming import check_streamable  # noqa: F401  (public API)
from bitalloc.table import ErrorTable


@dataclass(frozen=True)
class PlanSettings:
    budget: Budget
    scorer: str = "rtn-mse-rel"
    solver: str = "ilp"
    menu: MenuSettings = field(default_factory=MenuSettings)
    constraints: Constraints = field(default_factory=Constraints)
    keep_bits: int = 16
    quantizer: str = "rtn"
    act_order: bool = False
    sequential: bool = False  # GPTQ: Hessians layer by layer from the partly quantized model
    calib_text: str | None = None  # a file; None: the calibration half of the offline text
    calib: CalibSettings = field(default_factory=CalibSettings)
    scorer_settings: ScorerSettings = field(default_factory=ScorerSettings)
    text_encoding: str = "utf-8"  # of calib_text (and, in run, of the evaluation text)
    refine: RefineSettings = field(default_factory=lambda: RefineSettings(rounds=0))  # rounds=0: no refinement
    guard: bool = True  # keep the uniform plan of the same size when the allocation measures worse
    ray: RaySettings | None = None  # the weight-error sweep as Ray tasks (a streamed model)

    def __post_init__(self) -> None:
        check_scorer(self.scorer)
        quantizer(self.quantizer)  # a known name
        if self.menu.gguf and not quantizer(self.quantizer).gguf:
            raise BitallocError("GGUF types are quantized by ggml's own quantizers (with the importance matrix), "
                                "not by GPTQ; drop --quantizer gptq or use the integer menu.")
        if self.menu.format != "int" and SCORERS[self.scorer].mixes_bits:
            raise BitallocError(f"The {self.scorer} scorer mixes bit-widths inside a tensor, which "
                                f"{'GGUF types' if self.menu.gguf else 'vLLM schemes'} cannot store; choose another "
                                f"scorer with --format {self.menu.format}.")


@dataclass
class Loaded:
    model: object
    tokenizer: object
    source: ModelSource
    inventory: Inventory
    importance: dict | None = None  # unit -> (in,) mean squared input (llama.cpp's imatrix)
    weights: object = None  # a streamed model: its WeightSource (``model`` is then a skeleton without weights)


def load(model: str | None = None, *, embeddings: bool = False, stream: bool = False,
         progress: bool = True) -> Loaded:
    """The model and its units; with ``stream``, a skeleton without weights
    and a reader that takes them from disk one tensor at a time."""
    source = resolve_source(model)
    if stream:
        from bitalloc.model.loading import load_tokenizer
        from bitalloc.model.source import check_streamable_source, open_source, skeleton, streamed_inventory

        check_streamable_source(source)
        m = skeleton(source)
        weights = open_source(source, m)
        inventory = streamed_inventory(m, weights, embeddings=embeddings, progress=_tqdm(progress))
        return Loaded(m, load_tokenizer(source), source, inventory, weights=weights)
    m, tok = load_model(source)
    return Loaded(m, tok, source, find_units(m, embeddings=embeddings))


def _with_embeddings(loaded: Loaded) -> Inventory:
    """The inventory with the embedding and output units (a streamed model keeps its identity: it holds no weights)."""
    return find_units(loaded.model, embeddings=True,
                      content_id=loaded.inventory.content_id if loaded.weights is not None else None)


def prepare(loaded: Loaded, settings: PlanSettings, progress: bool = True) -> tuple[Loaded, PlanSettings]:
    """What the menu needs before anything is measured: the embedding and
    output units (``menu.embeddings``), ``--keep-type`` as allow rules, the
    ties of vLLM's fused layers (``--format vllm``), and
    the importance matrix from the calibration text, taken from the model as
    loaded (integer options: for the weighted clipping search; a model without
    a tokenizer has no text to calibrate on and is quantized without it)."""
    if loaded.weights is not None:
        settings = check_streamable(settings)
    if settings.menu.embeddings and not loaded.inventory.embedding_units:
        loaded = replace(loaded, inventory=_with_embeddings(loaded), importance=None)
    if settings.menu.keep_type:
        options, _ = resolve_menu(loaded.inventory, settings.menu)
        rules = keep_type_rules(loaded.inventory, settings.menu, options)
        constraints = replace(settings.constraints, allow=tuple(settings.constraints.allow) + rules)
        settings = replace(settings, constraints=constraints)
    if settings.menu.format == "vllm":
        ties = tuple(t for t in runtime_ties(loaded.inventory) if t not in settings.constraints.ties)
        settings = replace(settings, constraints=replace(settings.constraints, ties=settings.constraints.ties + ties))
    if settings.menu.imatrix and loaded.tokenizer is None and not settings.menu.gguf:
        settings = replace(settings, menu=replace(settings.menu, imatrix=False))  # no text to calibrate on
    if settings.menu.imatrix:
        ensure_importance(loaded, settings, progress)
    return loaded, settings


def ensure_importance(loaded: Loaded, settings: PlanSettings, progress: bool = True) -> dict:
    """llama.cpp's importance vectors per unit, from the calibration text (``calib.importance_vectors``)."""
    if loaded.importance is None:
        from bitalloc.calib.grams import importance_vectors

        text = calibration_text(settings.calib_text, settings.text_encoding)
        loaded.importance = importance_vectors(loaded.model, loaded.inventory, loaded.tokenizer, text, settings.calib,
                                               progress=_tqdm(progress))
    return loaded.importance


def preflight(loaded: Loaded, settings: PlanSettings, budgets: Sequence[float] = (),
              options: Sequence[QuantOption] | None = None) -> tuple[tuple[QuantOption, ...], list[str]]:
    """Everything about the model that can make planning fail, checked before
    any scoring: the menu against the shapes, tie names, --allow patterns, and
    each budget against the feasible range (the error table does not change
    which assignments fit, so a zero table tells)."""
    notices: list[str] = []
    if options is None:
        options, notices = resolve_menu(loaded.inventory, settings.menu)
    zeros = np.zeros((len(loaded.inventory.units), len(options)))
    for value in budgets or [settings.budget.value]:
        s = replace(settings, budget=replace(settings.budget, value=value))
        build_problem(loaded.inventory, options, zeros, s.budget, s.constraints, keep_bits=s.keep_bits,
                      allow_ragged=s.menu.allow_ragged)
    return tuple(options), notices


def check_calibration_text(loaded: Loaded, settings: PlanSettings, scorers: Sequence[str]) -> None:
    """Tokenize the calibration text now if anything will need it, so that
    too little text fails before minutes of scoring, not after."""
    from bitalloc.calib.grams import calibration_windows
    from bitalloc.scorers import any_calibrated

    needs = quantizer(settings.quantizer).calibrated or any_calibrated(scorers)
    if needs and loaded.tokenizer is not None:
        text = calibration_text(settings.calib_text, settings.text_encoding)
        calibration_windows(loaded.tokenizer, text, settings.calib)


def scoring_context(loaded: Loaded, settings: PlanSettings, options: Sequence[QuantOption] | None = None, *,
                    progress: bool = True) -> ScoringContext:
    if options is None:
        options, _ = resolve_menu(loaded.inventory, settings.menu)
    runner = None
    if settings.ray is not None:
        if loaded.weights is None:
            raise BitallocError("--ray runs the sweep in workers that read the weights from disk themselves: add "
                                "--stream.")
        runner = ray_runner(loaded.source, settings.ray)
    text = calibration_text(settings.calib_text, settings.text_encoding) if loaded.tokenizer is not None else None
    return ScoringContext(loaded.model, loaded.tokenizer, loaded.inventory, options, calib_text=text,
                          calib=settings.calib, settings=settings.scorer_settings,
                          allow_ragged=settings.menu.allow_ragged, progress=_tqdm(progress),
                          quantizer=settings.quantizer, act_order=settings.act_order,
                          importance=loaded.importance if settings.menu.imatrix else None,
                          weights=loaded.weights.weight if loaded.weights is not None else None, runner=runner)


def solve_plan(inventory: Inventory, table: ErrorTable, settings: PlanSettings, model_label: str) -> Plan:
    table.check_model(inventory)
    problem = build_problem(inventory, table.options, table.errors, settings.budget, settings.constraints,
                            keep_bits=settings.keep_bits, allow_ragged=settings.menu.allow_ragged)
    solution = solve(problem, settings.solver)
    assignment, column_bits = {}, {}
    for g, members in enumerate(problem.groups):
        for i in members:
            name, opt = inventory.units[i].name, table.options[int(solution.choice[g])]
            assignment[name] = opt
            if opt.mixed:
                column_bits[name] = table.column_bits[name][opt.name]
    return Plan(assignment, inventory.identity, model_label, settings.budget, table.scorer, settings.solver,
                solution.objective, settings.keep_bits, settings.menu.allow_ragged, settings.constraints,
                quantizer=settings.quantizer, act_order=settings.act_order, sequential=settings.sequential,
                column_bits=column_bits, model_content=inventory.content_id, provenance=importance_record(settings))


def plan(model: str | None = None, *, settings: PlanSettings, table_path: str | None = None,
         table: ErrorTable | None = None, save_table: str | None = None, out: str | None = None,
         progress: bool = True, loaded: Loaded | None = None, start: Plan | None = None) -> Plan:
    """Score (or reuse a saved error table), solve, and write the plan file.
    Everything that can fail without scoring is checked before scoring.
    ``start``: refine this plan's allocation instead of the table's plan."""
    loaded, settings = prepare(loaded or load(model, embeddings=settings.menu.embeddings), settings, progress)
    menu_notices: list[str] = []
    if table_path:
        table = ErrorTable.load(table_path)
    if table is not None:
        table.check_model(loaded.inventory)
        if table.scorer != settings.scorer:
            table = table.rescored(settings.scorer)
        preflight(loaded, settings, options=table.options)
        ctx = scoring_context(loaded, settings, table.options, progress=progress)
    else:
        options, menu_notices = preflight(loaded, settings)
        check_calibration_text(loaded, settings, [settings.scorer])
        ctx = scoring_context(loaded, settings, options, progress=progress)
        table = score(ctx, [settings.scorer])[settings.scorer]
    if save_table:
        table.save(save_table)
    hessians = ctx.hessians if quantizer(settings.quantizer).calibrated and (settings.guard or settings.refine.rounds) else None
    first = solve_plan(loaded.inventory, table, settings, loaded.source.label) if start is None else \
        start_plan(start, loaded.inventory, table, settings)
    result = finish_plan(loaded, first, table, settings, hessians=hessians, progress=_tqdm(progress))
    if menu_notices or ctx.notices:
        result = replace(result, provenance=replace(result.provenance, notices=tuple(menu_notices + ctx.notices)))
    if out:
        result.save(out, loaded.inventory)
    return result


def _calibration_for(loaded: Loaded, the_plan: Plan, settings: PlanSettings | None, progress: bool) -> dict:
    """What quantize_model needs for this plan: Hessians (one-shot GPTQ) or
    calibration windows (sequential GPTQ); for RTN the importance vectors if
    the plan was made with them, else nothing."""
    s = settings or PlanSettings(the_plan.budget)
    if not quantizer(the_plan.quantizer).calibrated:

        return {"importance": ensure_importance(loaded, s, progress)} if the_plan.uses_importance else {}
    if the_plan.sequential:
        from bitalloc.calib.grams import calibration_windows

        text = calibration_text(s.calib_text, s.text_encoding)
        return {"calib_windows": calibration_windows(loaded.tokenizer, text, s.calib)}
    from bitalloc.calib.state import calibration_state

    if loaded.tokenizer is None:
        raise BitallocError("GPTQ needs calibration text and a tokenizer; this model was loaded without one.")
    text = calibration_text(s.calib_text, s.text_encoding)
    return {"hessians": calibration_state(loaded.model, loaded.inventory, loaded.tokenizer, text, s.calib,
                                          progress=_tqdm(progress)).hessians}


def quantize(model: str | None = None, *, plan_path: str, out: str, progress: bool = True,
             loaded: Loaded | None = None, settings: PlanSettings | None = None, to: str = "native") -> dict:
    """Quantize per a plan file (RTN or GPTQ, as the plan says) and save:
    bitalloc's own folder (``to="native"``) or, for a plan of vLLM schemes,
    the compressed-tensors folder vLLM and transformers load."""
    from bitalloc.export.compressed_tensors import check_exportable, save_compressed
    from bitalloc.export.native import save_quantized
    from bitalloc.quantizers.apply import quantize_model

    loaded = loaded or load(model)
    the_plan = Plan.load(plan_path)
    if any(is_gguf(o) for o in the_plan.assignment.values()):
        raise BitallocError(f"The plan {plan_path!r} assigns GGUF types; write it as a llama.cpp file with "
                            f"`bitalloc export {plan_path} --to gguf --out FILE.gguf`.")
    loaded = with_plan_units(loaded, the_plan)
    the_plan.check_model(loaded.inventory)
    if to == "compressed-tensors":
        check_exportable(the_plan, loaded.inventory, plan_path)  # before any weight is quantized
    notices = []
    if the_plan.model_content and the_plan.model_content != loaded.inventory.content_id:
        notices.append("The plan was made on another checkpoint of this architecture (its weights differ); its "
                       "allocation is applied as it is.")
    if loaded.weights is not None:  # one tensor resident at a time
        from bitalloc.quantizers.apply import quantize_streamed

        if to != "native":
            raise BitallocError("--stream writes bitalloc's own folder; export a compressed-tensors folder without "
                                "--stream.")
        stored = quantize_streamed(loaded.weights.weight, loaded.inventory, the_plan, progress=_tqdm(progress))
        folder = save_quantized(out, loaded.model, loaded.tokenizer, loaded.inventory, the_plan, stored,
                                kept_tensor=loaded.weights.parameter)
    else:
        calibration = _calibration_for(loaded, the_plan, settings, progress)
        stored = quantize_model(loaded.model, loaded.inventory, the_plan, progress=_tqdm(progress), **calibration)
        if to == "compressed-tensors":
            folder = save_compressed(out, loaded.model, loaded.tokenizer, loaded.inventory, the_plan, stored, plan_path)
        else:
            folder = save_quantized(out, loaded.model, loaded.tokenizer, loaded.inventory, the_plan, stored)
    sizes = the_plan.sizes(loaded.inventory)
    return {"out": str(folder), "file_bytes": (folder / "model.safetensors").stat().st_size, "sizes": sizes.to_dict(),
            "notices": notices}


def with_plan_units(loaded: Loaded, the_plan: Plan) -> Loaded:
    """The inventory a plan was made on: with the embedding units if it plans them."""
    if set(the_plan.assignment) - {u.name for u in loaded.inventory.units} and not loaded.inventory.embedding_units:
        return replace(loaded, inventory=_with_embeddings(loaded), importance=None)
    return loaded


def evaluate(model: str | None = None, *, quantized: str | None = None, reference_model: str | None = None,
             text_path: str | None = None, settings: EvalSettings = EvalSettings(), progress: bool = True,
             encoding: str = "utf-8") -> dict:
    """Perplexity of a model or a quantized folder; with ``reference_model``,
    also KL and top-1 agreement against it."""
    from bitalloc.export.native import load_quantized

    text, label = eval_text(text_path, encoding)
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


def run(model: str | None = None, *, settings: PlanSettings, scorers: Sequence[str] | None = None,
        budgets: Sequence[float] | None = None, text_path: str | None = None,
        eval_settings: EvalSettings = EvalSettings(), progress: bool = True, loaded: Loaded | None = None,
        plans_dir: str | None = None, encoding: str = "utf-8") -> dict:
    """All stages: reference, the uniform baseline and the allocated plan for
    each budget (and scorer), evaluated on the same windows. One measurement
    serves every scorer and budget. What can fail without scoring (budgets,
    menu, ties, too little text) fails before scoring."""
    loaded, settings = prepare(loaded or load(model, embeddings=settings.menu.embeddings), settings, progress)
    scorers = list(scorers or [settings.scorer])
    for name in scorers:
        check_scorer(name)
    budgets = list(budgets or [settings.budget.value])
    options, notices = preflight(loaded, settings, budgets)
    check_calibration_text(loaded, settings, scorers)
    report, bench = reference_block(loaded, eval_settings, text_path, settings.keep_bits, progress, encoding)
    ctx = scoring_context(loaded, settings, options, progress=progress)
    tables = score(ctx, scorers)
    if gathers_every_gram(settings.quantizer, settings.sequential):
        bench.hessians = ctx.hessians
    elif quantizer(settings.quantizer).calibrated:  # sequential: a block's Grams at a time, from these windows
        from bitalloc.calib.grams import calibration_windows

        bench.calib_windows = calibration_windows(loaded.tokenizer, ctx.calib_text, settings.calib)
    inv = loaded.inventory
    report.update(menu=[o.name for o in options], notices=list(inv.notices) + notices + ctx.notices,
                  quantizer=settings.quantizer,
                  budgets=[])
    probe = None
    for value in budgets:
        s = replace(settings, budget=replace(settings.budget, value=value))
        uni = uniform_plan(inv, options, s, loaded.source.label, table=tables[scorers[0]])
        entry = {"budget": s.budget.to_dict(),
                 "uniform": {"option": uni.only_option(),
                             **plan_row(loaded, uni, bench, progress, f"uniform {value:g}")},
                 "allocated": {}}
        for scorer in scorers:
            p = solve_plan(inv, tables[scorer], replace(s, scorer=scorer), loaded.source.label)
            probe = probe or (make_probe(loaded, settings, ctx.hessians if quantizer(settings.quantizer).calibrated else None)
                              if settings.guard or settings.refine.rounds else None)
            p = finish_plan(loaded, p, tables[scorer], replace(s, scorer=scorer), probe=probe, progress=_tqdm(progress))
            if plans_dir:
                p.save(f"{plans_dir}/plan-{scorer}-{value:g}.json", inv)
            entry["allocated"][scorer] = plan_row(loaded, p, bench, progress, f"{scorer} {value:g}")
        report["budgets"].append(entry)
    if len(budgets) == 1 and len(scorers) == 1:  # the flat shape of `bitalloc run --json`
        report["uniform"] = report["budgets"][0]["uniform"]
        report["allocated"] = report["budgets"][0]["allocated"][scorers[0]]
    return report
