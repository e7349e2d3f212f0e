"""Bit allocation on the real-weight MoE fixture (bench/moe_fixture.py --save):
uniform vs AlphaQ (paper rule and alpha-rel) vs MC-MoE's PMQ vs measured KL
vs the data-free weight error vs QuantMoE-Bench's structural rule, with RTN
and GPTQ (one-shot, each expert slice with its routed-token Hessian), per
expert and per layer (``--tie experts``), at several budgets; and whether
AlphaQ's alpha ranks experts the way routing and measurement do (Spearman of
each expert slice's alpha importance, routing frequency on the calibration
half, and measured KL when that slice alone is quantized).

    .venv/bin/python bench/moe_fixture.py --save out/smollm2-moe --out bench/moe-fixture-smollm2.json
    .venv/bin/python bench/moe_quality.py --model out/smollm2-moe --out bench/moe-quality-smollm2.json
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np


def main() -> None:
    from scipy.stats import spearmanr

    from bitalloc import api
    from bitalloc.solve.baselines import moe_rule_plan
    from bitalloc.errors import BitallocError
    from bitalloc.evaluate import EvalSettings
    from bitalloc.fileio import write_json
    from bitalloc.solve.problem import Budget, Constraints
    from bitalloc.compare.report import run_report, versus
    from bitalloc.scorers import score
    from bitalloc.scorers.moe import routing_importance

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--budgets", default="2.5,3.0,3.5")
    p.add_argument("--scorers", default="rtn-mse-rel,alpha,alpha-rel,pmq,kl")
    p.add_argument("--ties", default="per-expert,experts", help="tie modes to run: per-expert and/or experts (per layer)")
    p.add_argument("--quantizers", default="rtn,gptq")
    p.add_argument("--gptq-scorers", default="rtn-mse-rel,alpha,alpha-rel,pmq",
                   help="tables for the GPTQ runs (kl with GPTQ probes re-measures every unit: ~45 min here)")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    t0 = time.perf_counter()
    scorers = a.scorers.split(",")
    budgets = [float(b) for b in a.budgets.split(",")]
    loaded = api.load(a.model)
    out: dict = {"runs": []}
    for quantizer in [q for q in a.quantizers.split(",") if q]:
        for mode in a.ties.split(","):
            ties = () if mode == "per-expert" else (mode,)
            t = time.perf_counter()
            settings = api.PlanSettings(Budget(budgets[0]), scorer=scorers[0], constraints=Constraints(ties=ties),
                                        quantizer=quantizer, guard=False)
            names = scorers if quantizer == "rtn" else a.gptq_scorers.split(",")
            settings = replace(settings, scorer=names[0])
            report = api.run(settings=settings, scorers=names, budgets=budgets, loaded=loaded,
                             eval_settings=EvalSettings(a.seq_len, a.windows))
            _, bench = api.reference_block(loaded, EvalSettings(a.seq_len, a.windows), None, settings.keep_bits, True)
            if quantizer == "gptq":
                bench.hessians = api.scoring_context(loaded, settings, progress=False).hessians
            options = [o for o in api.resolve_menu(loaded.inventory, settings.menu)[0]]
            for entry in report["budgets"]:  # QuantMoE-Bench's structural rule beside uniform
                s = replace(settings, budget=Budget(entry["budget"]["value"]))
                try:
                    rule = moe_rule_plan(loaded.inventory, options, s, loaded.source.label)
                except BitallocError as e:  # every promoted unit one bit up does not fit this budget
                    report.setdefault("moe_rule_infeasible", []).append(str(e))
                    continue
                row = api.plan_row(loaded, rule, bench, True, f"moe-rule {entry['budget']['value']}")
                row["verdict"] = versus(row, entry["uniform"])
                entry["allocated"]["moe-rule"] = {**row, "rule": rule.scorer}
            report.update(quantizer=quantizer, tie_mode=mode, seconds=time.perf_counter() - t)
            print(f"== {quantizer}, {mode} ==")
            print(run_report(report))
            out["runs"].append(report)
            write_json(a.out, out)
    settings = api.PlanSettings(Budget(budgets[0]), scorer=scorers[0], guard=False)
    ctx = api.scoring_context(loaded, settings)
    tables = score(ctx, ["alpha"])
    units = loaded.inventory.units
    experts = np.array([u.index is not None for u in units])
    freq = routing_importance(units, ctx.routing, a=1.0, b=0.0)  # f alone
    pmq = routing_importance(units, ctx.routing)
    alpha_imp = tables["alpha"].importance
    # measured: the KL of the model when one expert slice alone is RTN-quantized at the middle probe option
    # (cached by the kl table above; nothing is re-measured)
    probe = ctx.settings.kl_probe_options[1]
    kls = ctx.measure_per_unit("kl", lambda i: (_ for _ in ()).throw(RuntimeError("kl not cached")), 3)
    measured = np.array([kls[u.name][1] for u in units])

    def rho(x, y) -> float:
        return float(spearmanr(x[experts], y[experts]).statistic)

    out["moe"] = {
        "note": "the fixture is an MoE made from the dense SmolLM2-135M, not a trained MoE; guard off, so each row is "
                "its table's own allocation; GPTQ is one-shot per unit with its (routed-token) Hessian",
        "spearman": {"alpha_importance_vs_routing_frequency": rho(alpha_imp, freq),
                     "alpha_importance_vs_pmq_importance": rho(alpha_imp, pmq),
                     f"alpha_importance_vs_measured_kl_{probe}": rho(alpha_imp, measured),
                     f"routing_frequency_vs_measured_kl_{probe}": rho(freq, measured),
                     f"pmq_importance_vs_measured_kl_{probe}": rho(pmq, measured)},
        "by_part": {part: {f"alpha_vs_measured_kl": float(spearmanr(alpha_imp[m], measured[m]).statistic),
                           "frequency_vs_measured_kl": float(spearmanr(freq[m], measured[m]).statistic)}
                    for part in ("gate", "up", "down")
                    if (m := np.array([u.part == part for u in units])).sum() > 2},
        "experts": int(experts.sum()),
        "unreached_notices": ctx.notices,
        "seconds": time.perf_counter() - t0,
    }
    print(out["moe"])
    write_json(a.out, out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
