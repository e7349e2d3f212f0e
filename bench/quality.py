"""Allocation against the best single format, budget by budget, with noise.

For each budget: the uniform plan (the best single menu option of that size),
each error table's plan, and each table's plan refined in closed loop on
calibration text; with RTN and/or sequential GPTQ. Every row is evaluated on
the same windows of the evaluation half of the offline text (disjoint from
all calibration text), with 95 % bootstrap intervals and a paired verdict
against uniform. Seconds per stage and every refinement round are recorded.

    .venv/bin/python bench/quality.py --budgets 3.25,3.5,4.25,4.5 --out bench/quality-smollm2.json

The recipe (scorers, refinement settings) is fixed on the command line
before anything is evaluated; nothing here looks at the evaluation half to
choose it.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import replace

from bitalloc import api
from bitalloc.evaluate import EvalSettings
from bitalloc.fileio import write_json
from bitalloc.solve.problem import Budget
from bitalloc.solve.refine import RefineSettings, finish_plan, make_probe
from bitalloc.compare.report import measures, versus


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default="3.25,3.5,4.25,4.5")
    p.add_argument("--scorers", default="rtn-mse-rel,kl")
    p.add_argument("--quantizers", default="rtn", help="rtn and/or gptq (sequential)")
    p.add_argument("--refine-rounds", type=int, default=3)
    p.add_argument("--refine-windows", type=int, default=4)
    p.add_argument("--refine-seq-len", type=int, default=128)
    p.add_argument("--refine-candidates", type=int, default=48)
    p.add_argument("--refine-objective", default="kl")
    p.add_argument("--fine-groups", action="store_true")
    p.add_argument("--no-imatrix", action="store_true", help="plain min/max scales (no importance-weighted search)")
    p.add_argument("--windows", type=int, default=16, help="evaluation windows")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--text", help="evaluation text file (default: evaluation half of the offline sample)")
    p.add_argument("--second-text", help="a second evaluation text (never calibrated on) every row is also scored on")
    p.add_argument("--second-windows", type=int, default=14, help="windows of --second-text (GPL-3 holds 14 x 512)")
    p.add_argument("--out", required=True)
    return p.parse_args()


def main() -> None:
    a = parse()
    t0 = time.perf_counter()
    loaded = api.load(None)
    refine = RefineSettings(a.refine_rounds, a.refine_windows, a.refine_seq_len, a.refine_candidates,
                            a.refine_objective)
    budgets = [float(b) for b in a.budgets.split(",")]
    scorers = a.scorers.split(",")
    base = api.PlanSettings(Budget(budgets[0]), menu=api.MenuSettings(fine=a.fine_groups, imatrix=not a.no_imatrix),
                            refine=refine, guard=False)
    loaded, base = api.prepare(loaded, base)  # the importance matrix, unless --no-imatrix
    options, _ = api.preflight(loaded, base, budgets)
    seconds = {"load and importance matrix": time.perf_counter() - t0}
    report, bench = api.reference_block(loaded, EvalSettings(a.seq_len, a.windows), a.text, 16, True)
    others = {}
    if a.second_text:
        second, others["second"] = api.reference_block(loaded, EvalSettings(a.seq_len, a.second_windows),
                                                       a.second_text, 16, True)
        report["second_text"] = {"text": second["text"], "reference": second["reference"]}
    report.update(menu=[o.name for o in options], refine=refine.to_dict(), seconds=seconds, rows=[],
                  imatrix=base.menu.imatrix,
                  machine=f"{platform.machine()}, {platform.processor() or '?'}; see BENCHMARKS.md")
    for quantizer in a.quantizers.split(","):
        q = replace(base, quantizer=quantizer, sequential=quantizer == "gptq")
        ctx = api.scoring_context(loaded, q, options)  # the tables probe with this quantizer, as the recipe does
        tables = {}
        for s in scorers:
            t = time.perf_counter()
            tables[s] = api.score(ctx, [s])[s]
            seconds[f"score {s} ({quantizer})"] = time.perf_counter() - t
        hessians = ctx.hessians if quantizer == "gptq" else None
        bench.hessians = hessians
        if quantizer == "gptq":
            from bitalloc.calib.grams import calibration_windows

            bench.calib_windows = calibration_windows(loaded.tokenizer, ctx.calib_text, q.calib)
        t = time.perf_counter()
        probe = make_probe(loaded, q, hessians)
        seconds[f"probe setup {quantizer}"] = time.perf_counter() - t
        for value in budgets:
            s = replace(q, budget=replace(q.budget, value=value))
            uniform = api.uniform_plan(loaded.inventory, options, s, loaded.source.label, tables[scorers[0]])
            rows = [("uniform", uniform.scorer.split(":", 1)[1], uniform, 0.0)]
            for name in scorers:
                t = time.perf_counter()
                raw = api.solve_plan(loaded.inventory, tables[name], replace(s, scorer=name), loaded.source.label)
                rows.append((name, "table", raw, time.perf_counter() - t))
                t = time.perf_counter()
                refined = finish_plan(loaded, raw, tables[name], replace(s, scorer=name), probe=probe)
                rows.append((f"{name}+refined", "refined", refined, time.perf_counter() - t))
            uni_row = None
            for method, detail, plan, plan_s in rows:
                row = api.plan_row(loaded, plan, bench, True, f"{quantizer} {method} {value:g}", others)
                row.update(quantizer=quantizer, budget=value, method=method, detail=detail, plan_seconds=plan_s)
                uni_row = uni_row or row
                row["verdict"] = "" if row is uni_row else versus(row, uni_row)
                for name, other in row.get("other_texts", {}).items():
                    other["verdict"] = "" if row is uni_row else versus(other, uni_row["other_texts"][name])
                report["rows"].append(row)
                print(f"{quantizer} {value:g} {method:24s} {measures(row)}  bpw {row['bpw']:.4f}  {row['verdict']}",
                      flush=True)
                if "other_texts" in row:
                    o = row["other_texts"]["second"]
                    print(f"    second text: {measures(o)}  {o['verdict']}", flush=True)
            write_json(a.out, report)
    report["seconds"]["total"] = time.perf_counter() - t0
    write_json(a.out, report)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
