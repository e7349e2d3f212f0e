"""Plain min/max scales against the importance-weighted clipping search, one
uniform option at a time, with RTN and with sequential GPTQ, on the embedded
SmolLM2: perplexity, KL and top-1 with 95 % intervals on the evaluation half
(and a second text), and a paired verdict of searched against plain.

    .venv/bin/python bench/imatrix.py --options int3-g64-sym,int4-g64-sym,int2-g32-sym \\
        --second-text /usr/share/common-licenses/GPL-3 --out bench/imatrix-smollm2.json
    .venv/bin/python bench/imatrix.py --table bench/imatrix-smollm2.json   # markdown for BENCHMARKS.md

Nothing here is tuned: the shrink grid and the weighting are fixed in
``bitalloc.formats.affine_rtn``; the importance matrix comes from the
calibration half, disjoint from both evaluation texts.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import replace

from bitalloc import api
from bitalloc.calib.grams import calibration_windows
from bitalloc.evaluate import EvalSettings
from bitalloc.fileio import write_json
from bitalloc.formats.affine import QuantOption
from bitalloc.solve.problem import Budget
from bitalloc.compare.report import measures, versus


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--options", default="int3-g64-sym,int4-g64-sym")
    p.add_argument("--quantizers", default="rtn,gptq")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--second-text", help="a second evaluation text, never calibrated on")
    p.add_argument("--second-windows", type=int, default=14)
    p.add_argument("--out")
    p.add_argument("--table", help="print a report written by --out as a markdown table, and exit")
    a = p.parse_args()
    if not (a.out or a.table):
        p.error("give --out (measure) or --table (print a report)")
    return a


def interval(row: dict, key: str, digits: int) -> str:
    lo, hi = row[f"{key}_ci"]
    return f"{row[key]:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def markdown(report: dict) -> str:
    lines = ["| quantizer | option | scales | ppl [95 %] | KL [95 %] | top-1 | verdict | 2nd text ppl [95 %] | 2nd KL | "
             "2nd verdict | s to quantize |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        o = r.get("other_texts", {}).get("second", {})
        second = [interval(o, "ppl", 2), f"{o['kl']:.4f}", o.get("verdict", "")] if o else ["", "", ""]
        lines.append("| " + " | ".join([r["quantizer"], r["option"], "searched" if r["imatrix"] else "min/max",
                                         interval(r, "ppl", 2), interval(r, "kl", 4), f"{r['top1']:.3f}",
                                         r["verdict"], *second, f"{r['quantize_s']:.0f}"]) + " |")
    return "\n".join(lines)


def main() -> None:
    a = parse()
    if a.table:
        import json

        print(markdown(json.load(open(a.table))))
        return
    t0 = time.perf_counter()
    loaded = api.load(None)
    base = api.PlanSettings(Budget(8.0), guard=False)
    loaded, base = api.prepare(loaded, base)  # the importance matrix
    report, bench = api.reference_block(loaded, EvalSettings(512, a.windows), None, 16, True)
    others = {}
    if a.second_text:
        second, others["second"] = api.reference_block(loaded, EvalSettings(512, a.second_windows), a.second_text,
                                                       16, True)
        report["second_text"] = {"text": second["text"], "reference": second["reference"]}
    report.update(rows=[], machine=f"{platform.machine()}; see BENCHMARKS.md", seconds={"setup": time.perf_counter() - t0})
    bench.calib_windows = calibration_windows(loaded.tokenizer, api.calibration_text(None), base.calib)
    for quantizer in a.quantizers.split(","):
        for name in a.options.split(","):
            option = QuantOption.parse(name)
            plain_row = None
            for imatrix in (False, True):
                s = replace(base, quantizer=quantizer, sequential=quantizer == "gptq",
                            menu=replace(base.menu, imatrix=imatrix))
                plan = api.uniform_plan(loaded.inventory, [option], s, loaded.source.label)
                row = api.plan_row(loaded, plan, bench, True, f"{quantizer} {name} imatrix={imatrix}", others)
                row.update(quantizer=quantizer, option=name, imatrix=imatrix)
                if plain_row is None:
                    plain_row, row["verdict"] = row, ""
                else:
                    row["verdict"] = versus(row, plain_row)
                    for key, other in row.get("other_texts", {}).items():
                        other["verdict"] = versus(other, plain_row["other_texts"][key])
                report["rows"].append(row)
                print(f"{quantizer} {name:14s} {'searched' if imatrix else 'plain   '} {measures(row)}  "
                      f"{row['quantize_s']:.0f} s  {row['verdict']}", flush=True)
                for other in row.get("other_texts", {}).values():
                    print(f"    second text: {measures(other)}  {other.get('verdict', '')}", flush=True)
                write_json(a.out, report)
    report["seconds"]["total"] = time.perf_counter() - t0
    write_json(a.out, report)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
