"""Closed-loop refinement of a plan, and the guard that never returns an
allocation worse than uniform.

A first plan comes from an error table whose entries were measured with one
unit quantized alone (or estimated from the weights), while in the end every
unit is quantized together. The refinement measures, with the rest of the
plan in place, what moving each tied group one option up or down (along the
table's Pareto frontier of size against error) does to the calibration KL,
solves the knapsack over {down, stay, up} with those measured changes, applies
the solution and keeps it only if the measured KL of the whole plan went
down; then again, for a few rounds. Each round is recorded.

The guard measures an allocated plan and the uniform plan of the same size
on the same calibration windows and keeps the better one.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np

from bitalloc.errors import BitallocError
from bitalloc.evaluate.probe import CalibrationProbe, Measure
from bitalloc.plan import GuardVerdict, Plan
from bitalloc.quantizers import quantizer, stored_weight
from bitalloc.solve.problem import Problem
from bitalloc.solve.solvers import solve_ilp

OBJECTIVES = ("kl", "nll")


@dataclass(frozen=True)
class RefineSettings:
    rounds: int = 3  # at most; stops early when a round changes nothing or does not improve
    windows: int = 4  # calibration windows probed
    seq_len: int = 128
    candidates: int = 48  # groups probed per direction per round, chosen by the table; 0: every group
    objective: str = "kl"  # what the refinement minimises on calibration text: "kl" or "nll"

    def __post_init__(self) -> None:
        if self.rounds < 0 or self.windows < 1 or self.seq_len < 2 or self.candidates < 0:
            raise BitallocError(f"Refinement settings out of range: {self}.")
        if self.objective not in OBJECTIVES:
            raise BitallocError(f"The refinement objective must be one of {list(OBJECTIVES)}. Got {self.objective!r}.")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Round:
    index: int
    before: float  # objective of the plan entering the round
    after: float  # objective of the plan leaving it (= before when rejected)
    probes: int
    moves: tuple[tuple[str, str, str], ...]  # (first unit of the group, from option, to option), accepted ones
    accepted: bool
    seconds: float

    def to_dict(self) -> dict:
        return {**asdict(self), "moves": [list(m) for m in self.moves]}


def frontier_neighbours(cost: np.ndarray, error: np.ndarray, allowed: np.ndarray,
                        current: int) -> tuple[int | None, int | None]:
    """(down, up) for one group: the nearest cheaper and dearer options on the
    group's Pareto frontier (less cost, or less error), from its (options,)
    cost and error rows; None at either end."""
    idx = [j for j in np.argsort(cost, kind="stable") if allowed[j]]
    frontier, best = [], np.inf
    for j in idx:  # cheapest first; keep an option only if it lowers the error
        if error[j] < best:
            frontier.append(j)
            best = error[j]
    down = [j for j in frontier if cost[j] < cost[current]]
    up = [j for j in frontier if cost[j] > cost[current]]
    return (down[-1] if down else None), (up[0] if up else None)


def local_choice(deltas: dict[tuple[int, int], float], problem: Problem, choice: np.ndarray) -> np.ndarray:
    """The best set of measured single moves within the budget: a knapsack
    over {stay, each measured move} per group (exact, HiGHS)."""
    groups = sorted({g for g, _ in deltas})
    options = [[int(choice[g])] + [o for (gg, o) in deltas if gg == g] for g in groups]
    width = max(len(o) for o in options)
    cost = np.zeros((len(groups), width), dtype=np.int64)
    err = np.zeros((len(groups), width))
    allowed = np.zeros((len(groups), width), dtype=bool)
    for r, (g, opts) in enumerate(zip(groups, options)):
        for k, o in enumerate(opts):
            cost[r, k], allowed[r, k] = problem.cost[g, o], True
            err[r, k] = 0.0 if k == 0 else deltas[(g, o)]
    fixed = int(sum(problem.cost[g, choice[g]] for g in range(len(choice)) if g not in set(groups)))
    picked = solve_ilp(cost, err, allowed, problem.budget_bits - fixed).choice
    out = choice.copy()
    for r, g in enumerate(groups):
        out[g] = options[r][int(picked[r])]
    return out


def refine(probe: CalibrationProbe, problem: Problem, units: list, choice: np.ndarray, settings: RefineSettings, *,
           progress: Callable | None = None) -> tuple[np.ndarray, list[Round]]:
    """Rounds of measured single moves; returns the final choice (one option
    index per group of ``problem``) and the record of each round. The
    returned choice is never worse on the calibration objective than the one
    given (a round is kept only if it measured better)."""
    options = problem.options
    assign = lambda ch: {units[i].name: options[int(ch[g])] for g, members in enumerate(problem.groups)  # noqa: E731
                         for i in members}
    probe.apply(assign(choice))
    probe.enable_tail()
    rounds: list[Round] = []
    for r in range(settings.rounds):
        t0 = time.perf_counter()
        probe.apply(assign(choice))
        base = probe.measure().value(settings.objective)
        moves = _candidate_moves(problem, choice, settings.candidates)
        deltas = {}
        for g, o in (progress(moves, desc=f"refining (round {r + 1})", unit="probe") if progress else moves):
            group_units = [units[i] for i in problem.groups[g]]
            deltas[(g, o)] = probe.measure_moved(group_units, options[o]).value(settings.objective) - base
        new = local_choice(deltas, problem, choice) if deltas else choice
        changed = [g for g in range(len(choice)) if new[g] != choice[g]]
        after, accepted = base, False
        if changed:
            probe.apply(assign(new))
            after = probe.measure().value(settings.objective)
            accepted = after < base
        record = tuple((units[problem.groups[g][0]].name, options[int(choice[g])].name, options[int(new[g])].name)
                       for g in changed) if accepted else ()
        rounds.append(Round(r + 1, base, after if accepted else base, len(moves), record, accepted,
                            time.perf_counter() - t0))
        if not accepted:
            break
        choice = new
    probe.apply(assign(choice))
    return choice, rounds


def _candidate_moves(problem: Problem, choice: np.ndarray, candidates: int) -> list[tuple[int, int]]:
    """(group, option) single moves along each group's frontier: all of them,
    or the ``candidates`` best up-moves (error drop per bit) and cheapest
    down-moves (error rise per bit) by the table."""
    ups, downs = [], []
    for g in range(len(choice)):
        c = int(choice[g])
        down, up = frontier_neighbours(problem.cost[g], problem.error[g], problem.allowed[g], c)
        if up is not None:
            gain = (problem.error[g, c] - problem.error[g, up]) / max(problem.cost[g, up] - problem.cost[g, c], 1)
            ups.append((-gain, g, up))
        if down is not None:
            loss = (problem.error[g, down] - problem.error[g, c]) / max(problem.cost[g, c] - problem.cost[g, down], 1)
            downs.append((loss, g, down))
    if candidates:
        ups, downs = sorted(ups)[:candidates], sorted(downs)[:candidates]
    return [(g, o) for _, g, o in ups + downs]


def guard(probe: CalibrationProbe, allocated: Plan, uniform: Plan,
          objective: str = "kl") -> tuple[Plan, GuardVerdict]:
    """The allocated plan, or the uniform plan of the same size when the
    allocation measures worse on the calibration windows."""
    measures: dict[str, Measure] = {}
    for name, p in (("allocated", allocated), ("uniform", uniform)):
        probe.apply(dict(p.assignment))
        measures[name] = probe.measure()
    probe.restore()
    worse = measures["allocated"].value(objective) > measures["uniform"].value(objective)
    record = GuardVerdict(objective, asdict(measures["allocated"]), asdict(measures["uniform"]),
                          "uniform" if worse else "allocated", int(probe.windows.shape[0]), int(probe.windows.shape[1]))
    if worse:
        kept = replace(uniform, scorer=f"{allocated.scorer} (guard: uniform {uniform.only_option()} kept)")
        return kept, record
    return allocated, record


def assignment_choice(problem: Problem, units: list, plan: Plan) -> np.ndarray:
    """The plan's option per group of ``problem``."""
    index = {o: j for j, o in enumerate(problem.options)}
    return np.array([index[plan.assignment[units[members[0]].name]] for members in problem.groups], dtype=np.int64)


# ---- orchestration: what api.plan and api.run call --------------------------

def make_probe(loaded, settings, hessians: dict | None = None, *,
               cache_weights: bool | None = None) -> CalibrationProbe:
    """Calibration windows and reference log-probs for refinement and the
    guard; weights quantized by the plan's quantizer (GPTQ: one-shot, from
    the calibration Hessians). With GPTQ the windows lie in the gaps between
    the (spread) windows GPTQ calibrates on: a plan measured on the very
    windows its quantizer fitted looks better than it is (BENCHMARKS.md,
    3.25 bpw with GPTQ). Quantized weights are kept (``cache_weights``) where
    refinement will revisit them, by default only then: the guard alone
    measures each plan once, and keeping its weights holds a float32 model
    per plan measured."""
    if cache_weights is None:
        cache_weights = settings.refine.rounds > 0
    from bitalloc.evaluate import EvalSettings
    from bitalloc.evaluate.text import calibration_text

    importance = (getattr(loaded, "importance", None) or {}) if settings.menu.imatrix else {}
    calibrated = quantizer(settings.quantizer).calibrated

    def quantize_weight(unit, W, option):
        if calibrated and hessians is not None:  # GPTQ; a token embedding read by lookup (no H) is rounded
            return stored_weight(settings.quantizer, W, option, H=hessians.get(unit.name), search=settings.menu.imatrix,
                                 act_order=settings.act_order, allow_ragged=settings.menu.allow_ragged)
        return stored_weight(settings.quantizer, W, option, importance=importance.get(unit.name),
                             allow_ragged=settings.menu.allow_ragged)
    text = calibration_text(settings.calib_text, settings.text_encoding)
    r = settings.refine
    return CalibrationProbe(loaded.model, loaded.tokenizer, loaded.inventory, text, windows=r.windows,
                            seq_len=r.seq_len, quantize_weight=quantize_weight, cache_weights=cache_weights,
                            clear_of=EvalSettings(settings.calib.seq_len, settings.calib.windows) if calibrated else None)


def start_plan(start: Plan, inventory, table, settings) -> Plan:
    """A plan file to continue refining (``--refine-from``): made for this
    model, its options in the table's menu, one option per tied group, within
    the budget. It takes the settings' quantizer and budget; its recorded
    rounds stay in its provenance and new ones are appended."""
    from bitalloc.solve.problem import build_problem

    start.check_model(inventory)
    outside = sorted({o.name for o in start.assignment.values()} - {o.name for o in table.options})
    if outside:
        raise BitallocError(f"--refine-from: the plan uses options outside this menu ({', '.join(outside[:4])}); "
                            "give the menu flags it was made with (e.g. --fine-groups).")
    problem = build_problem(inventory, table.options, table.errors, settings.budget, settings.constraints,
                            keep_bits=settings.keep_bits, allow_ragged=settings.menu.allow_ragged)
    units = list(inventory.units)
    for members in problem.groups:
        if len({start.assignment[units[i].name].name for i in members}) > 1:
            raise BitallocError(f"--refine-from: units {units[members[0]].name} and its tied units have different "
                                "options in the plan; give the --tie settings it was made with.")
    choice = assignment_choice(problem, units, start)
    if not problem.allowed[np.arange(len(choice)), choice].all():
        raise BitallocError("--refine-from: the plan breaks this command's --allow/--min-bits/--max-bits constraints.")
    bits = int(problem.cost[np.arange(len(choice)), choice].sum())
    if bits > problem.budget_bits:
        raise BitallocError(f"--refine-from: the plan needs {bits:,} bits, over this budget's {problem.budget_bits:,} "
                            f"(it was made for {start.budget}); give its budget.")
    return replace(start, budget=settings.budget, keep_bits=settings.keep_bits, constraints=settings.constraints,
                   quantizer=settings.quantizer, act_order=settings.act_order, sequential=settings.sequential)


def finish_plan(loaded, table_plan: Plan, table, settings, *, probe: CalibrationProbe | None = None,
                hessians: dict | None = None, progress: Callable | None = None) -> Plan:
    """The table's plan, refined by measurement if ``settings.refine.rounds``,
    then checked against the uniform plan of the same size (``settings.guard``)."""
    from bitalloc.solve.problem import build_problem

    refining = settings.refine.rounds > 0
    if not (refining or settings.guard) or loaded.tokenizer is None:
        return table_plan
    if any(o.mixed for o in table.options) and refining:
        raise BitallocError("Refinement measures plain options only; use it with a scorer other than salience/baq.")
    probe = probe or make_probe(loaded, settings, hessians, cache_weights=refining)
    plan, provenance = table_plan, table_plan.provenance
    try:
        if refining:
            inv = loaded.inventory
            problem = build_problem(inv, table.options, table.errors, settings.budget, settings.constraints,
                                    keep_bits=settings.keep_bits, allow_ragged=settings.menu.allow_ragged)
            choice, rounds = refine(probe, problem, list(inv.units), assignment_choice(problem, list(inv.units), plan),
                                    settings.refine, progress=progress)
            assignment = {inv.units[i].name: problem.options[int(choice[g])]
                          for g, members in enumerate(problem.groups) for i in members}
            earlier = (provenance.refinement or {}).get("rounds", [])  # a plan continued with --refine-from
            rounds = [{**r.to_dict(), "index": len(earlier) + r.index} for r in rounds]
            provenance = replace(provenance, refinement={**settings.refine.to_dict(), "rounds": earlier + rounds})
            scorer = plan.scorer if plan.scorer.endswith("+refined") else f"{plan.scorer}+refined"
            plan = replace(plan, assignment=assignment, scorer=scorer, provenance=provenance)
        if settings.guard and not any(o.mixed for o in plan.assignment.values()):
            uniform = _guard_uniform(loaded, table, settings, plan.model_label)
            if uniform is not None:
                plan, record = guard(probe, plan, uniform, settings.refine.objective)
                plan = replace(plan, provenance=replace(provenance, guard=record))
    finally:
        probe.restore()
    return plan


def _guard_uniform(loaded, table, settings, label: str) -> Plan | None:
    """The uniform plan the guard compares with, if it meets the constraints."""
    from bitalloc.solve.baselines import uniform_plan
    from bitalloc.solve.problem import allowed_mask, cost_matrix

    uni = uniform_plan(loaded.inventory, [o for o in table.options if not o.mixed], settings, label, table)
    opt = next(iter(uni.assignment.values()))
    cost = cost_matrix(loaded.inventory, [opt], allow_ragged=settings.menu.allow_ragged)
    try:
        ok = allowed_mask(loaded.inventory, [opt], cost, np.zeros(cost.shape), settings.constraints).all()
    except BitallocError:  # an --allow rule that matches none of [opt]: uniform breaks it
        return None
    return uni if ok else None
