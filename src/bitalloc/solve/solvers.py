"""Solvers for the grouped multiple-choice knapsack of ``problem.Problem``.

All take (cost (G, O) int bits, error (G, O), allowed (G, O) bool, budget bits)
and return one option index per group whose total cost never exceeds the
budget (checked in integer arithmetic).

- ``ilp``: exact, SciPy ``milp`` (HiGHS branch and bound).
- ``lagrangian``: minimise error + lambda*cost per group (the minimiser always
  lies on the group's lower convex hull of (cost, error)), bisect lambda to the
  smallest value whose choice fits, then greedily spend the leftover bits on
  the upgrades with the best error drop per bit.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from bitalloc.errors import BitallocError, InfeasibleBudgetError


@dataclass(frozen=True)
class Solution:
    choice: np.ndarray  # (groups,) option index
    cost_bits: int
    objective: float
    solver: str
    seconds: float
    lower_bound: float | None = None  # proven bound on the optimum (ILP dual bound / Lagrangian dual)


def _check(cost, error, allowed, budget) -> None:
    if cost.shape != error.shape or cost.shape != allowed.shape:
        raise BitallocError(f"cost {cost.shape}, error {error.shape} and allowed {allowed.shape} must agree.")
    lo = int(np.where(allowed, cost, np.iinfo(np.int64).max).min(axis=1).sum())
    if lo > budget:
        raise InfeasibleBudgetError(f"Budget of {budget} bits is below the smallest allowed assignment ({lo} bits).")


def _evaluate(cost, error, choice) -> tuple[int, float]:
    rows = np.arange(len(choice))
    return int(cost[rows, choice].sum()), float(error[rows, choice].sum())


def solve(problem, solver: str = "ilp", **kwargs) -> Solution:
    """The problem solved by the registered solver ``solver`` (``SOLVERS``)."""
    if solver not in SOLVERS:
        raise BitallocError(f"The 'solver' parameter must be one of {list(SOLVERS)}. Got {solver!r} instead.")
    return SOLVERS[solver](problem.cost, problem.error, problem.allowed, problem.budget_bits, **kwargs)


def solve_ilp(cost: np.ndarray, error: np.ndarray, allowed: np.ndarray, budget: int, *,
              time_limit: float = 120.0, mip_rel_gap: float = 0.0) -> Solution:
    """Exact multiple-choice knapsack through HiGHS. Errors are rescaled to
    [0, 1] and costs to units of the budget for numerical stability; the
    budget is then re-checked in exact integers and tightened if HiGHS's
    tolerances let it slip by a few bits."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    _check(cost, error, allowed, budget)
    t0 = time.perf_counter()
    g_idx, o_idx = np.nonzero(allowed)  # one binary variable per allowed (group, option)
    n_groups = cost.shape[0]
    err = error[g_idx, o_idx]
    offset = np.where(allowed, error, np.inf).min(axis=1)  # subtract each group's best: same argmin, smaller numbers
    err = err - offset[g_idx]
    scale = err.max() if err.size and err.max() > 0 else 1.0
    c = err / scale
    onehot = csr_matrix((np.ones(len(g_idx)), (g_idx, np.arange(len(g_idx)))), shape=(n_groups, len(g_idx)))
    base = np.where(allowed, cost, np.iinfo(np.int64).max).min(axis=1)  # cheapest per group
    extra = (cost[g_idx, o_idx] - base[g_idx]).astype(np.float64)  # bits above the cheapest choice
    slack_budget = budget - int(base.sum())
    norm = max(float(slack_budget), 1.0)
    margin = 0
    for _ in range(5):
        cap = (slack_budget - margin) / norm
        with _quiet_native_stdout():
            res = milp(
                c,
                integrality=np.ones(len(c)),
                bounds=Bounds(0, 1),
                constraints=[LinearConstraint(onehot, 1, 1), LinearConstraint(extra[None, :] / norm, -np.inf, cap)],
                options={"time_limit": time_limit, "mip_rel_gap": mip_rel_gap},
            )
        if res.x is None:
            raise BitallocError(f"The ILP solver found no solution ({res.message}). Try --solver lagrangian.")
        x = res.x > 0.5
        choice = np.empty(n_groups, dtype=np.int64)
        choice[g_idx[x]] = o_idx[x]
        total, obj = _evaluate(cost, error, choice)
        if total <= budget:
            bound = getattr(res, "mip_dual_bound", None)
            lower = None if bound is None else float(bound) * scale + float(offset.sum())
            return Solution(choice, total, obj, "ilp", time.perf_counter() - t0, lower)
        margin += total - budget + 1  # tolerance overrun: tighten and solve again
    raise BitallocError("The ILP solver could not meet the budget exactly after 5 tightenings. Try --solver lagrangian.")


@contextlib.contextmanager
def _quiet_native_stdout():
    """HiGHS prints solver internals straight to file descriptor 1; hide them."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)


def _argmin_choice(cost, error, allowed, lam: float) -> np.ndarray:
    score = np.where(allowed, error + lam * cost, np.inf)
    return score.argmin(axis=1)


def solve_lagrangian(cost: np.ndarray, error: np.ndarray, allowed: np.ndarray, budget: int, *,
                     iterations: int = 100) -> Solution:
    _check(cost, error, allowed, budget)
    t0 = time.perf_counter()
    rows = np.arange(cost.shape[0])
    costf = cost.astype(np.float64)
    choice = _argmin_choice(costf, error, allowed, 0.0)
    lower = None
    if cost[rows, choice].sum() > budget:
        # lambda is an error-per-bit price; bracket it, then bisect geometrically.
        finite_err = np.where(allowed, error, np.nan)
        span = np.nanmax(finite_err) - np.nanmin(finite_err)
        lo, hi = 0.0, max(span, 1e-300)
        while cost[rows, _argmin_choice(costf, error, allowed, hi)].sum() > budget:
            hi *= 2.0
        for _ in range(iterations):
            mid = 0.5 * (lo + hi) if lo == 0.0 else np.sqrt(lo * hi)
            if mid <= lo or mid >= hi:
                break
            if cost[rows, _argmin_choice(costf, error, allowed, mid)].sum() > budget:
                lo = mid
            else:
                hi = mid
        choice = _argmin_choice(costf, error, allowed, hi)
        score = np.where(allowed, error + hi * costf, np.inf).min(axis=1)
        lower = float(score.sum() - hi * budget)  # Lagrangian dual bound on the optimum
    choice = _greedy_fill(cost, error, allowed, budget, choice)
    total, obj = _evaluate(cost, error, choice)
    return Solution(choice, total, obj, "lagrangian", time.perf_counter() - t0, lower)


def _greedy_fill(cost, error, allowed, budget, choice) -> np.ndarray:
    """Spend leftover bits: repeatedly take the affordable switch with the
    largest error drop per added bit (switches that save bits and error first)."""
    choice = choice.copy()
    rows = np.arange(cost.shape[0])
    left = budget - int(cost[rows, choice].sum())
    d_cost = cost - cost[rows, choice][:, None]  # (G, O)
    d_err = error - error[rows, choice][:, None]
    for _ in range(10 * cost.shape[0] + 10):
        ok = allowed & (d_err < 0) & (d_cost <= left)
        if not ok.any():
            break
        gain = np.where(ok, np.where(d_cost <= 0, np.inf, -d_err / np.maximum(d_cost, 1)), -np.inf)  # free moves first
        g, o = np.unravel_index(np.argmax(gain), gain.shape)
        left -= int(d_cost[g, o])
        choice[g] = o
        d_cost[g] = cost[g] - cost[g, o]
        d_err[g] = error[g] - error[g, o]
    return choice


# The registry: name -> solver of (cost, error, allowed, budget bits). A new solver is one function and one line.
SOLVERS = {"ilp": solve_ilp, "lagrangian": solve_lagrangian}
