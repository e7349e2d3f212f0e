"""`bitalloc plan --bpw B` with no other option, B from 2.5 to 4.5 bpw, on
the embedded SmolLM2: what the guard measured on its calibration windows
(allocation vs the uniform plan of the same size), which plan it returned,
and both plans evaluated on the evaluation half (intervals, paired verdict).

    .venv/bin/python bench/default_guard.py --out bench/default-guard-smollm2.json

The default table (`rtn-mse-rel`, data-free) is scored once and reused for
every budget, exactly as `bitalloc plan --bpw B` would score it;
`--scorer NAME` measures the same with another table (a candidate default).
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import asdict, replace

from bitalloc import api
from bitalloc.evaluate import EvalSettings
from bitalloc.fileio import write_json
from bitalloc.solve.problem import Budget
from bitalloc.compare.report import versus, with_ci


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default="2.5,2.75,3.0,3.25,3.5,3.75,4.0,4.25,4.5")
    p.add_argument("--windows", type=int, default=8, help="evaluation windows")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--scorer", default=None, help="another table than the default, everything else as `plan`")
    p.add_argument("--out", required=True)
    return p.parse_args()


def main() -> None:
    a = parse()
    t0 = time.perf_counter()
    loaded = api.load(None)
    defaults = api.PlanSettings(Budget(3.5))  # the defaults of `bitalloc plan` (scorer rtn-mse-rel, guard on)
    if a.scorer:
        defaults = replace(defaults, scorer=a.scorer)
    loaded, defaults = api.prepare(loaded, defaults)  # the importance matrix (default scales), as `plan` does
    options, _ = api.preflight(loaded, defaults)
    table = api.score(api.scoring_context(loaded, defaults, options), [defaults.scorer])[defaults.scorer]
    report, bench = api.reference_block(loaded, EvalSettings(a.seq_len, a.windows), None, 16, True)
    report.update(scorer=defaults.scorer, guard_windows=defaults.refine.windows, guard_seq_len=defaults.refine.seq_len,
                  rows=[], machine=f"{platform.machine()}, {platform.processor() or '?'}; see BENCHMARKS.md")
    for bpw in (float(b) for b in a.budgets.split(",")):
        s = replace(defaults, budget=Budget(bpw))
        t = time.perf_counter()
        returned = api.plan(settings=s, table=table, loaded=loaded, progress=False)
        seconds = time.perf_counter() - t
        record = asdict(returned.provenance.guard)
        allocated = api.solve_plan(loaded.inventory, table, s, loaded.source.label)
        uniform = api.uniform_plan(loaded.inventory, options, s, loaded.source.label, table)
        uni = api.plan_row(loaded, uniform, bench, True, f"uniform {bpw:g}")
        alloc = api.plan_row(loaded, allocated, bench, True, f"allocated {bpw:g}")
        row = {"budget": bpw, "uniform": uniform.only_option(), "guard": record, "plan_seconds": seconds,
               "returned": record["kept"], "eval_uniform": uni, "eval_allocated": alloc,
               "verdict_allocated": versus(alloc, uni)}
        report["rows"].append(row)
        print(f"{bpw:g}: calibration KL allocated {record['allocated']['kl']:.4f} uniform "
              f"{record['uniform']['kl']:.4f} -> returned {record['kept']}; eval ppl allocated "
              f"{with_ci(alloc, 'ppl')} uniform {with_ci(uni, 'ppl')} ({row['verdict_allocated'] or 'within noise'})",
              flush=True)
        write_json(a.out, report)
    report["seconds_total"] = time.perf_counter() - t0
    write_json(a.out, report)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
