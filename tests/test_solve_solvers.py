import itertools

import numpy as np
import pytest

from bitalloc.errors import InfeasibleBudgetError
from bitalloc.solve.solvers import solve_ilp, solve_lagrangian


def random_problem(rng, units, options, *, p_disallow=0.15):
    """Costs grow with the option index, errors fall (mostly) - as real tables do."""
    cost = np.sort(rng.integers(10, 400, size=(units, options)), axis=1).astype(np.int64)
    error = np.sort(rng.exponential(1.0, size=(units, options)), axis=1)[:, ::-1].copy()
    error += rng.normal(0, 0.05, size=error.shape)  # some non-convexity and non-monotonicity
    allowed = rng.random((units, options)) > p_disallow
    allowed[np.arange(units), rng.integers(0, options, units)] = True
    lo = np.where(allowed, cost, 10**9).min(1).sum()
    hi = np.where(allowed, cost, -1).max(1).sum()
    budget = int(rng.integers(lo, hi + 1))
    return cost, error, allowed, budget


def brute_force(cost, error, allowed, budget):
    best, best_choice = np.inf, None
    for choice in itertools.product(*[np.nonzero(a)[0] for a in allowed]):
        rows = np.arange(len(choice))
        if cost[rows, choice].sum() <= budget:
            e = error[rows, choice].sum()
            if e < best - 1e-12:
                best, best_choice = e, np.array(choice)
    return best, best_choice


@pytest.mark.parametrize("seed", range(30))
def test_ilp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    units = int(rng.integers(1, 9))
    options = int(rng.integers(2, 4 if units > 6 else 5))
    cost, error, allowed, budget = random_problem(rng, units, options)
    best, _ = brute_force(cost, error, allowed, budget)
    sol = solve_ilp(cost, error, allowed, budget)
    assert sol.cost_bits <= budget
    assert allowed[np.arange(units), sol.choice].all()
    assert sol.objective == pytest.approx(best, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("seed", range(30))
def test_lagrangian_never_exceeds_budget_and_is_bounded_by_ilp(seed):
    rng = np.random.default_rng(100 + seed)
    cost, error, allowed, budget = random_problem(rng, int(rng.integers(1, 60)), int(rng.integers(2, 8)))
    exact = solve_ilp(cost, error, allowed, budget)
    fast = solve_lagrangian(cost, error, allowed, budget)
    assert fast.cost_bits <= budget
    assert allowed[np.arange(len(fast.choice)), fast.choice].all()
    assert fast.objective >= exact.objective - 1e-9
    if fast.lower_bound is not None:  # weak duality: the dual bound never exceeds the optimum
        assert fast.lower_bound <= exact.objective + 1e-6


def test_lagrangian_is_exact_on_convex_problems():
    """With convex, decreasing error curves and equal steps, the relaxation is tight."""
    rng = np.random.default_rng(7)
    units, options = 40, 6
    cost = np.tile(np.arange(options) * 10 + 20, (units, 1)).astype(np.int64)
    error = rng.uniform(0.5, 2.0, size=(units, 1)) * 2.0 ** (-2 * np.arange(options))[None, :]
    allowed = np.ones_like(cost, dtype=bool)
    budget = int(cost[:, 0].sum() + 10 * 77)  # 77 upgrades of one step
    exact = solve_ilp(cost, error, allowed, budget)
    fast = solve_lagrangian(cost, error, allowed, budget)
    assert fast.objective == pytest.approx(exact.objective, rel=1e-9)


def test_budget_exactly_at_the_minimum_and_maximum():
    rng = np.random.default_rng(3)
    cost, error, allowed, _ = random_problem(rng, 6, 4, p_disallow=0)
    lo, hi = int(cost.min(1).sum()), int(cost.max(1).sum())
    for solver in (solve_ilp, solve_lagrangian):
        assert solver(cost, error, allowed, lo).cost_bits == lo
        assert solver(cost, error, allowed, hi).objective == pytest.approx(error.min(1).sum())


@pytest.mark.parametrize("solver", [solve_ilp, solve_lagrangian])
def test_infeasible_budget_is_an_error(solver):
    cost = np.array([[10, 20], [10, 30]], dtype=np.int64)
    error = np.array([[2.0, 1.0], [2.0, 1.0]])
    with pytest.raises(InfeasibleBudgetError):
        solver(cost, error, np.ones_like(cost, dtype=bool), 19)
