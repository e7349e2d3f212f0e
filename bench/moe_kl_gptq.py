"""The measured `kl` table's allocation quantized by GPTQ on the MoE fixture,
beside bench/moe_quality.py's GPTQ rows: the table is the one measured with
RTN probes (from the probe cache of the RTN run; re-measuring every unit with
GPTQ probes would take about 45 min more on a 2-core machine), the plans are
quantized by one-shot GPTQ with each slice's routed-token Hessian, and each
row gets a paired verdict against that report's uniform GPTQ row. The rows
are added to the report as ``kl (RTN probes)``.

    .venv/bin/python bench/moe_kl_gptq.py --model out/smollm2-moe --report bench/moe-quality-gptq-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace


def main() -> None:
    from bitalloc import api
    from bitalloc.evaluate import EvalSettings
    from bitalloc.fileio import write_json
    from bitalloc.solve.problem import Budget, Constraints
    from bitalloc.compare.report import versus
    from bitalloc.scorers import score

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--report", required=True, help="a bench/moe_quality.py report with GPTQ runs")
    a = p.parse_args()
    report = json.loads(open(a.report, encoding="utf-8").read())
    loaded = api.load(a.model)
    for run in report["runs"]:
        if run["quantizer"] != "gptq":
            continue
        t = time.perf_counter()
        ties = () if run["tie_mode"] == "per-expert" else (run["tie_mode"],)
        rtn = api.PlanSettings(Budget(run["budgets"][0]["budget"]["value"]), scorer="kl",
                               constraints=Constraints(ties=ties), guard=False)
        ctx = api.scoring_context(loaded, rtn)
        table = score(ctx, ["kl"])["kl"]  # RTN probes, from the cache
        _, bench = api.reference_block(loaded, EvalSettings(**{k: run["eval"][k] for k in ("seq_len", "windows")}),
                                       None, rtn.keep_bits, True)
        bench.hessians = ctx.hessians
        for entry in run["budgets"]:
            s = replace(rtn, budget=Budget(entry["budget"]["value"]), quantizer="gptq")
            plan = api.solve_plan(loaded.inventory, table, s, loaded.source.label)
            row = api.plan_row(loaded, plan, bench, True, f"kl (RTN probes) {entry['budget']['value']:g}")
            row["verdict"] = versus(row, entry["uniform"])
            entry["allocated"]["kl (RTN probes)"] = row
            print(f"{run['tie_mode']} {entry['budget']['value']:g}: ppl {row['ppl']:.1f} KL {row['kl']:.3f} "
                  f"top-1 {row['top1']:.3f} vs uniform {entry['uniform']['ppl']:.1f}: {row['verdict']}", flush=True)
        run.setdefault("extra_seconds", {})["kl (RTN probes)"] = time.perf_counter() - t
        write_json(a.report, report)
    print(f"wrote {a.report}")


if __name__ == "__main__":
    main()
