"""Bit allocation on the real-weight MoE fixture (bench/moe_fixture.py --save):
uniform vs AlphaQ (paper rule and alpha-rel) vs MC-MoE's PMQ vs the
data-free weight error vs QuantMoE-Bench's structural rule, RTN, at several budgets; and whether AlphaQ's alpha
ranks experts the way routing does (Spearman of each expert's alpha
importance with its routing frequency on the calibration half).

    .venv/bin/python bench/moe_fixture.py --save out/smollm2-moe --out bench/moe-fixture-smollm2.json
    .venv/bin/python bench/moe_quality.py --model out/smollm2-moe --out bench/moe-quality-smollm2.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    from scipy.stats import spearmanr

    from bitalloc import api
    from bitalloc.baselines import moe_rule_plan
    from bitalloc.errors import BitallocError
    from bitalloc.evaluate import EvalSettings
    from bitalloc.fileio import write_json
    from bitalloc.problem import Budget, Constraints
    from bitalloc.report import run_report
    from bitalloc.scorers import score
    from bitalloc.scorers.moe import routing_importance

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--budgets", default="2.5,3.0,3.5")
    p.add_argument("--scorers", default="rtn-mse-rel,alpha,alpha-rel,pmq")
    p.add_argument("--tie", default="", help="'experts' for the per-layer mode")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    t0 = time.perf_counter()
    scorers = a.scorers.split(",")
    budgets = [float(b) for b in a.budgets.split(",")]
    ties = tuple(t for t in a.tie.split(",") if t)
    settings = api.PlanSettings(Budget(budgets[0]), scorer=scorers[0], constraints=Constraints(ties=ties),
                                guard=False)
    loaded = api.load(a.model)
    report = api.run(settings=settings, scorers=scorers, budgets=budgets, loaded=loaded,
                     eval_settings=EvalSettings(a.seq_len, a.windows))
    _, bench = api.reference_block(loaded, EvalSettings(a.seq_len, a.windows), None, settings.keep_bits, True)
    options = [o for o in api.resolve_menu(loaded.inventory, settings.menu)[0]]
    for entry in report["budgets"]:  # QuantMoE-Bench's structural rule beside uniform
        s = api.PlanSettings(Budget(entry["budget"]["value"]), constraints=Constraints(ties=ties), guard=False)
        try:
            rule = moe_rule_plan(loaded.inventory, options, s, loaded.source.label)
        except BitallocError as e:  # every promoted unit one bit up does not fit this budget
            report.setdefault("moe_rule_infeasible", []).append(str(e))
            continue
        entry["allocated"]["moe-rule"] = api.plan_row(loaded, rule, bench, True, f"moe-rule {entry['budget']['value']}")
        entry["allocated"]["moe-rule"]["rule"] = rule.scorer
    ctx = api.scoring_context(loaded, settings)
    tables = score(ctx, ["alpha"])
    units = loaded.inventory.units
    experts = np.array([u.index is not None for u in units])
    freq = routing_importance(units, ctx.routing, a=1.0, b=0.0)  # f alone
    pmq = routing_importance(units, ctx.routing)
    alpha_imp = tables["alpha"].importance
    report["moe"] = {
        "note": "the fixture is an MoE made from the dense SmolLM2-135M, not a trained MoE; guard off, so each row is "
                "its table's own allocation",
        "ties": list(ties),
        "spearman_alpha_importance_vs_routing_frequency": float(spearmanr(alpha_imp[experts], freq[experts]).statistic),
        "spearman_alpha_importance_vs_pmq_importance": float(spearmanr(alpha_imp[experts], pmq[experts]).statistic),
        "experts": int(experts.sum()),
        "unreached_notices": ctx.notices,
        "seconds": time.perf_counter() - t0,
    }
    print(run_report(report))
    print(report["moe"])
    write_json(a.out, report)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
