"""Markdown tables from bench/moe_quality.py reports, for BENCHMARKS.md: per
run (quantizer, tie mode) and budget, uniform and every table's plan with
intervals and the paired verdict; then the Spearman correlations.

    .venv/bin/python bench/moe_table.py bench/moe-quality-smollm2.json [more.json ...]
"""

from __future__ import annotations

import json
import sys


def cell(row: dict, key: str, digits: int) -> str:
    value = row[key]
    if key == "ppl" and value >= 1000:
        return f"{value:,.0f}" + (f" [{row['ppl_ci'][0]:,.0f}, {row['ppl_ci'][1]:,.0f}]" if value < 1e5 else "")
    lo, hi = row[f"{key}_ci"]
    return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def main() -> None:
    from bitalloc.report import versus

    for path in sys.argv[1:]:
        report = json.loads(open(path, encoding="utf-8").read())
        print(f"{path}")
        print("| quantizer | ties | budget | method | ppl [95 %] | KL [95 %] | top-1 | bpw | vs uniform |")
        print("|---|---|---|---|---|---|---|---|---|")
        for run in report.get("runs", []):
            for entry in run["budgets"]:
                b = entry["budget"]["value"]
                rows = [(f"uniform {entry['uniform']['option']}", entry["uniform"])]
                rows += [(name, row) for name, row in entry["allocated"].items()]
                for name, row in rows:
                    verdict = "" if row is entry["uniform"] else versus(row, entry["uniform"])
                    print(f"| {run['quantizer']} | {run['tie_mode']} | {b:g} | {name} | {cell(row, 'ppl', 1)} | "
                          f"{cell(row, 'kl', 2)} | {row['top1']:.3f} | {row['bpw']:.4f} | {verdict} |")
        if "moe" in report:
            print()
            for k, v in report["moe"]["spearman"].items():
                print(f"- {k}: {v:+.2f}")
            for part, values in report["moe"].get("by_part", {}).items():
                print(f"- {part}: " + ", ".join(f"{k} {v:+.2f}" for k, v in values.items()))
        print()


if __name__ == "__main__":
    main()
