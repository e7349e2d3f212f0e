"""The allocation problem: units x options, costs in bits, errors, a budget
and side constraints, reduced to groups (tied units share one option).

Every size figure counts every stored bit. Two bpw measures exist and are
always named: ``quantized`` (stored bits of the quantized units / their
weights) and ``model`` (stored bits of the whole model, kept tensors at their
precision, tied tensors once / all its weights).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from bitalloc.errors import BitallocError, InfeasibleBudgetError
from bitalloc.formats import storage_bits
from bitalloc.formats.affine import QuantOption
from bitalloc.model.units import Inventory, layer_index

BUDGET_KINDS = ("bpw", "bytes")
BPW_OVER = ("quantized", "model")


@dataclass(frozen=True)
class Budget:
    """``value`` bits per weight (averaged over ``over``) or total model bytes."""

    value: float
    kind: str = "bpw"
    over: str = "quantized"

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise BitallocError(f"The budget 'kind' must be one of {list(BUDGET_KINDS)}. Got {self.kind!r} instead.")
        if self.over not in BPW_OVER:
            raise BitallocError(f"The budget 'over' must be one of {list(BPW_OVER)}. Got {self.over!r} instead.")
        if not (self.value > 0 and np.isfinite(self.value)):
            raise BitallocError(f"The budget must be a finite positive number. Got {self.value} instead.")

    def describe(self) -> str:
        if self.kind == "bytes":
            return f"{self.value / 1e6:.3f} MB (whole model)"
        return f"{self.value:g} bpw over the {self.over} weights"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Budget":
        return cls(float(d["value"]), d.get("kind", "bpw"), d.get("over", "quantized"))


@dataclass(frozen=True)
class Constraints:
    """Side constraints. ``allow`` maps an fnmatch pattern on unit names to the
    option-name patterns allowed there (every matching rule must hold).
    ``ties`` names tie groups of the architecture table ('qkv', 'gate_up', ...)
    or 'all'."""

    allow: tuple[tuple[str, tuple[str, ...]], ...] = ()
    min_bits: int | None = None
    max_bits: int | None = None
    ties: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"allow": [[p, list(o)] for p, o in self.allow], "min_bits": self.min_bits,
                "max_bits": self.max_bits, "ties": list(self.ties)}

    @classmethod
    def from_dict(cls, d: dict) -> "Constraints":
        return cls(tuple((p, tuple(o)) for p, o in d.get("allow", ())), d.get("min_bits"), d.get("max_bits"),
                   tuple(d.get("ties", ())))


def parse_allow_rule(text: str) -> tuple[str, tuple[str, ...]]:
    """'*.v_proj=int6*,int8*' -> ('*.v_proj', ('int6*', 'int8*'))."""
    if "=" not in text:
        raise BitallocError(
            f"An --allow rule must look like 'UNIT_PATTERN=OPTION_PATTERN[,...]', e.g. '*.v_proj=int6*,int8*'. Got {text!r}."
        )
    unit_pat, opts = text.split("=", 1)
    return unit_pat.strip(), tuple(o.strip() for o in opts.split(",") if o.strip())


@dataclass(frozen=True)
class Sizes:
    """Exact storage of one assignment, with both bpw measures."""

    quantized_bits: int
    quantized_numel: int
    code_bits: int  # bits of the integer codes alone (no scales/zeros)
    kept_bits: int
    kept_numel: int

    @property
    def quantized_bpw(self) -> float:
        return self.quantized_bits / self.quantized_numel

    @property
    def code_bpw(self) -> float:
        return self.code_bits / self.quantized_numel

    @property
    def model_bits(self) -> int:
        return self.quantized_bits + self.kept_bits

    @property
    def model_bpw(self) -> float:
        return self.model_bits / (self.quantized_numel + self.kept_numel)

    @property
    def model_bytes(self) -> float:
        return self.model_bits / 8

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(quantized_bpw=self.quantized_bpw, code_bpw=self.code_bpw, model_bpw=self.model_bpw,
                 model_bytes=self.model_bytes)
        return d


def cost_matrix(inventory: Inventory, options: Sequence[QuantOption], *, allow_ragged: bool) -> np.ndarray:
    """(units, options) exact stored bits; -1 where the option does not fit."""
    from bitalloc.errors import GroupSizeError

    cost = np.full((len(inventory.units), len(options)), -1, dtype=np.int64)
    for i, u in enumerate(inventory.units):
        for j, o in enumerate(options):
            try:
                cost[i, j] = storage_bits(u.shape, o, allow_ragged=allow_ragged, name=u.param)
            except GroupSizeError:
                pass
    return cost


def sizes_of(inventory: Inventory, assignment: dict[str, QuantOption], *, keep_bits: int = 16,
             allow_ragged: bool = False) -> Sizes:
    qbits = code = 0
    for u in inventory.units:
        opt = assignment[u.name]
        qbits += storage_bits(u.shape, opt, allow_ragged=allow_ragged, name=u.param)
        code += u.numel * opt.bits
    return Sizes(qbits, inventory.quantized_numel, code, inventory.kept_numel * keep_bits, inventory.kept_numel)


def budget_bits(budget: Budget, inventory: Inventory, *, keep_bits: int = 16) -> int:
    """The budget as a cap on the quantized units' stored bits (floored)."""
    kept = inventory.kept_numel * keep_bits
    if budget.kind == "bytes":
        return int(np.floor(budget.value * 8)) - kept
    if budget.over == "quantized":
        return int(np.floor(budget.value * inventory.quantized_numel + 1e-9))
    total = inventory.quantized_numel + inventory.kept_numel
    return int(np.floor(budget.value * total + 1e-9)) - kept


def express_bits(bits: int, budget: Budget, inventory: Inventory, *, keep_bits: int = 16) -> float:
    """Quantized-unit bits in the budget's own measure (inverse of budget_bits)."""
    kept = inventory.kept_numel * keep_bits
    if budget.kind == "bytes":
        return (bits + kept) / 8
    if budget.over == "quantized":
        return bits / inventory.quantized_numel
    return (bits + kept) / (inventory.quantized_numel + inventory.kept_numel)


@dataclass(frozen=True)
class Problem:
    """Grouped multiple-choice knapsack: pick one allowed option per group so
    that sum(cost) <= budget_bits and sum(error) is least."""

    groups: tuple[tuple[int, ...], ...]  # unit indices per group
    cost: np.ndarray  # (groups, options) int64 bits
    error: np.ndarray  # (groups, options) float64
    allowed: np.ndarray  # (groups, options) bool
    budget_bits: int
    options: tuple[QuantOption, ...]

    def min_max_bits(self) -> tuple[int, int]:
        big = np.iinfo(np.int64).max
        lo = np.where(self.allowed, self.cost, big).min(axis=1).sum()
        hi = np.where(self.allowed, self.cost, -1).max(axis=1).sum()
        return int(lo), int(hi)


def allowed_mask(inventory: Inventory, options: Sequence[QuantOption], cost: np.ndarray,
                 errors: np.ndarray, constraints: Constraints) -> np.ndarray:
    allowed = (cost >= 0) & np.isfinite(errors)
    bits = np.array([o.bits for o in options])
    if constraints.min_bits is not None:
        allowed &= bits[None, :] >= constraints.min_bits
    if constraints.max_bits is not None:
        allowed &= bits[None, :] <= constraints.max_bits
    for pattern, opt_patterns in constraints.allow:
        rows = np.array(inventory.matching(pattern))  # unit names, or on-disk per-expert keys
        if not rows.any():
            raise BitallocError(f"The --allow pattern {pattern!r} matches no unit. Unit names look like {inventory.units[0].name!r}.")
        cols = np.array([any(fnmatch.fnmatchcase(o.name, p) for p in opt_patterns) for o in options])
        if not cols.any():
            raise BitallocError(f"The --allow options {list(opt_patterns)} match no option of the menu {[o.name for o in options]}.")
        allowed[rows] &= cols[None, :]
    return allowed


def is_tie_pattern(tie: str) -> bool:
    """A --tie entry naming units (a glob over unit names or on-disk expert keys), not a family's tie group."""
    return any(c in tie for c in "*?[.")


def tie_groups_for(inventory: Inventory, ties: Sequence[str]) -> list[tuple[str, ...]]:
    """Unit-name groups to tie: the family's named groups (or 'all'), and for
    each pattern the units it matches, one group per layer; overlapping groups
    merge (a unit is in at most one group, so its bits count once)."""
    if not ties:
        return []
    wanted = {t for t in ties if not is_tie_pattern(t)}
    known = {tie for tie, _ in inventory.tie_groups}
    if "all" not in wanted and not wanted <= known:
        raise BitallocError(
            f"Unknown tie group(s) {sorted(wanted - known)} for family {inventory.arch!r}; known: "
            f"{sorted(known) or 'none'}, 'all', or a pattern over unit names (e.g. 'model.layers.*.mlp.experts.down_proj*')."
        )
    groups = [members for tie, members in inventory.tie_groups if "all" in wanted or tie in wanted]
    for pattern in (t for t in ties if is_tie_pattern(t)):
        hits = inventory.matching(pattern)
        if not any(hits):
            keys = [k for u in inventory.units if (k := inventory.disk_key(u.name))]
            raise BitallocError(
                f"The --tie pattern {pattern!r} matches no unit. Unit names look like {inventory.units[0].name!r}"
                + (f" and {inventory.units[-1].name!r}" if len(inventory.units) > 1 else "")
                + (f"; per-expert on-disk keys like {keys[0]!r} match too" if keys else "") + "."
            )
        by_layer: dict[int | None, list[str]] = {}
        for u, hit in zip(inventory.units, hits):
            if hit:
                by_layer.setdefault(layer_index(u.name), []).append(u.name)
        groups += [tuple(g) for g in by_layer.values() if len(g) > 1]
    return merge_groups(groups)


def merge_groups(groups: Sequence[Sequence[str]]) -> list[tuple[str, ...]]:
    """Union of groups that share a member, members in first-seen order."""
    merged: list[list[str]] = []
    where: dict[str, int] = {}
    for g in groups:
        hit = sorted({where[n] for n in g if n in where})
        target = hit[0] if hit else len(merged)
        if not hit:
            merged.append([])
        for other in hit[1:]:  # fold later groups this one bridges into the first
            for n in merged[other]:
                merged[target].append(n)
                where[n] = target
            merged[other] = []
        for n in g:
            if n not in where:
                merged[target].append(n)
                where[n] = target
    return [tuple(g) for g in merged if g]


def build_problem(inventory: Inventory, options: Sequence[QuantOption], errors: np.ndarray, budget: Budget,
                  constraints: Constraints = Constraints(), *, keep_bits: int = 16,
                  allow_ragged: bool = False) -> Problem:
    """Collapse ties, apply constraints, convert the budget; raise with the
    feasible range when no assignment can meet it."""
    cost = cost_matrix(inventory, options, allow_ragged=allow_ragged)
    allowed = allowed_mask(inventory, options, cost, errors, constraints)
    index = {u.name: i for i, u in enumerate(inventory.units)}
    tied = tie_groups_for(inventory, constraints.ties)
    in_tie = {n for g in tied for n in g}
    groups = [tuple(index[n] for n in g) for g in tied] + [(i,) for i, u in enumerate(inventory.units) if u.name not in in_tie]
    groups.sort(key=lambda g: g[0])
    g_cost = np.stack([cost[list(g)].sum(axis=0) for g in groups])
    g_err = np.stack([np.where(np.isfinite(errors[list(g)]), errors[list(g)], 0).sum(axis=0) for g in groups])
    g_allowed = np.stack([allowed[list(g)].all(axis=0) for g in groups])
    empty = [inventory.units[g[0]].name for g, ok in zip(groups, g_allowed.any(axis=1)) if not ok]
    if empty:
        raise InfeasibleBudgetError(
            f"No option is allowed for {len(empty)} unit(s), e.g. {empty[0]!r}: the constraints (--allow, --min-bits, "
            "--max-bits, group sizes, ties) exclude every option. Loosen them."
        )
    problem = Problem(tuple(groups), g_cost, g_err, g_allowed, budget_bits(budget, inventory, keep_bits=keep_bits),
                      tuple(options))
    lo, hi = problem.min_max_bits()
    if problem.budget_bits < lo:
        raise InfeasibleBudgetError(
            f"Budget {budget.describe()} is infeasible: the smallest allowed assignment needs "
            f"{_fmt(express_bits(lo, budget, inventory, keep_bits=keep_bits), budget, 'lo')}; feasible budgets run from "
            f"{_fmt(express_bits(lo, budget, inventory, keep_bits=keep_bits), budget, 'lo')} to "
            f"{_fmt(express_bits(hi, budget, inventory, keep_bits=keep_bits), budget, 'hi')} (beyond that every unit gets its "
            "largest option). Raise the budget or allow smaller options."
        )
    if problem.budget_bits > hi:
        raise InfeasibleBudgetError(
            f"Budget {budget.describe()} is above the largest allowed assignment, "
            f"{_fmt(express_bits(hi, budget, inventory, keep_bits=keep_bits), budget, 'hi')} (every unit at its largest "
            f"option), so it would not be spent. Give a budget from "
            f"{_fmt(express_bits(lo, budget, inventory, keep_bits=keep_bits), budget, 'lo')} to "
            f"{_fmt(express_bits(hi, budget, inventory, keep_bits=keep_bits), budget, 'hi')}, or allow larger options."
        )
    return problem


def _fmt(value: float, budget: Budget, side: str) -> str:
    """A bound of the feasible range as shown, rounded inwards (``side`` 'lo'
    up, 'hi' down) so that the figure a user copies is itself feasible."""
    if budget.kind == "bytes":
        n = int(np.ceil(value)) if side == "lo" else int(np.floor(value))
        return f"{n / 1e6:.4f} MB ({n} bytes)"
    return f"{shown_bound(value, side):.4f} bpw over the {budget.over} weights"


def shown_bound(value: float, side: str, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` decimals inwards: up for a lower bound, down for an upper one."""
    scale = 10 ** digits
    rounded = (math.ceil if side == "lo" else math.floor)(round(value * scale, 6)) / scale
    return rounded


def feasible_range(inventory: Inventory, options: Sequence[QuantOption], budget_like: Budget, *, keep_bits: int = 16,
                   allow_ragged: bool = False) -> tuple[float, float]:
    cost = cost_matrix(inventory, options, allow_ragged=allow_ragged)
    lo = int(np.where(cost >= 0, cost, np.iinfo(np.int64).max).min(axis=1).sum())
    hi = int(cost.max(axis=1).sum())
    return (express_bits(lo, budget_like, inventory, keep_bits=keep_bits),
            express_bits(hi, budget_like, inventory, keep_bits=keep_bits))
