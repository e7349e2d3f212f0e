"""Lagrangian vs exact ILP: objective gap and time, on the real embedded
model's error tables and on random problems of 100k units.

    .venv/bin/python bench/solvers.py [--units 100000] [--json bench/solvers.json]

Both solvers run in the same process, one after the other, on the same
problem; the ratio of their times is what to compare across machines.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np

from bitalloc.formats.affine import build_menu, storage_bits
from bitalloc.solve.solvers import solve_ilp, solve_lagrangian


def random_problem(units: int, seed: int, budget_bpw: float):
    """Shapes like a real model's projections; errors follow the Gaussian rate
    law var * numel * 2^(-2b) with per-unit sensitivity and noise."""
    rng = np.random.default_rng(seed)
    menu = build_menu((2, 3, 4, 5, 6, 8), (32, 64, 128, 0), ("asym",))
    dims = np.array([512, 1024, 2048, 4096])
    rows, cols = rng.choice(dims, units), rng.choice(dims, units)
    # cost depends only on (rows, cols): compute for the 16 shapes and index
    shapes = {(r, c): np.array([storage_bits((r, c), o) for o in menu]) for r in dims for c in dims}
    cost = np.stack([shapes[(r, c)] for r, c in zip(rows, cols)]).astype(np.int64)
    bits = np.array([o.bits for o in menu], dtype=float)
    group_gain = np.array([{32: 0.8, 64: 0.87, 128: 0.93, 0: 1.0}[o.group_size] for o in menu])
    sens = rng.lognormal(0, 1.5, units)[:, None]
    numel = (rows * cols).astype(float)[:, None]
    error = sens * numel * 2.0 ** (-2 * bits)[None, :] * group_gain[None, :] * rng.uniform(0.9, 1.1, cost.shape)
    budget = int(budget_bpw * numel.sum())
    return cost, error, np.ones_like(cost, dtype=bool), budget


def compare(cost, error, allowed, budget, ilp_time_limit: float, mip_rel_gap: float = 1e-6) -> dict:
    t0 = time.perf_counter()
    fast = solve_lagrangian(cost, error, allowed, budget)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact = solve_ilp(cost, error, allowed, budget, time_limit=ilp_time_limit, mip_rel_gap=mip_rel_gap)
    t_exact = time.perf_counter() - t0
    return {
        "units": int(cost.shape[0]),
        "options": int(cost.shape[1]),
        "lagrangian_objective": fast.objective,
        "ilp_objective": exact.objective,
        "gap_vs_ilp": fast.objective / exact.objective - 1,
        "lagrangian_s": t_fast,
        "ilp_s": t_exact,
        "speedup": t_exact / t_fast,
        "lagrangian_certified_gap": None if not fast.lower_bound else fast.objective / fast.lower_bound - 1,
        "ilp_certified_gap": None if not exact.lower_bound else exact.objective / exact.lower_bound - 1,
        "ilp_mip_rel_gap_asked": mip_rel_gap,
        "ilp_time_limit_s": ilp_time_limit,
        "lagrangian_bits_left": int(budget - fast.cost_bits),
        "ilp_bits_left": int(budget - exact.cost_bits),
    }


def real_model(budgets) -> list[dict]:
    from bitalloc import api
    from bitalloc.solve.problem import Budget, build_problem

    loaded = api.load(None)
    options, _ = api.resolve_menu(loaded.inventory, api.MenuSettings())
    from bitalloc.scorers import score

    ctx = api.scoring_context(loaded, api.PlanSettings(Budget(4.0)), options, progress=False)
    tables = score(ctx, ["rtn-mse", "rtn-mse-rel"])
    rows = []
    for scorer, table in tables.items():
        for b in budgets:
            p = build_problem(loaded.inventory, table.options, table.errors, Budget(b))
            rows.append({"problem": f"SmolLM2-135M {scorer} @ {b} bpw", **compare(p.cost, p.error, p.allowed, p.budget_bits, 120)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=100_000)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--ilp-time-limit", type=float, default=300)
    ap.add_argument("--ilp-gap", type=float, default=1e-4, help="HiGHS mip_rel_gap on the random problems")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--json", default="bench/solvers.json")
    args = ap.parse_args()
    rows = [] if args.skip_real else real_model((2.5, 3.0, 3.5, 4.0, 4.5))
    for seed in range(args.seeds):
        cost, error, allowed, budget = random_problem(args.units, seed, 3.6)
        rows.append({"problem": f"random {args.units} units, seed {seed} @ 3.6 bpw", **compare(cost, error, allowed, budget, args.ilp_time_limit, args.ilp_gap)})
        print(rows[-1], file=sys.stderr)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {platform.processor() or '?'}, "
            f"{__import__('os').cpu_count()} cores", "python": platform.python_version(), "rows": rows}
    with open(args.json, "w") as f:
        json.dump(meta, f, indent=1)
    fmt = lambda v: "-" if v is None else f"{v:.1e}"  # noqa: E731
    print("| problem | units x options | Lagrangian / ILP objective - 1 | Lagrangian certified gap | ILP certified gap "
          "| Lagrangian s | ILP s | ILP / Lagrangian time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['problem']} | {r['units']} x {r['options']} | {r['gap_vs_ilp']:.1e} | {fmt(r['lagrangian_certified_gap'])} "
              f"| {fmt(r['ilp_certified_gap'])} | {r['lagrangian_s']:.4f} | {r['ilp_s']:.2f} | {r['speedup']:.0f} |")


if __name__ == "__main__":
    main()
