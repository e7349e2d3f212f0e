"""Markdown tables from bench/moe_quality.py reports, for BENCHMARKS.md: per
run (quantizer, tie mode) and budget, uniform and every table's plan with
intervals and the paired verdict; then the Spearman correlations.

    .venv/bin/python bench/moe_table.py bench/moe-quality-smollm2.json [more.json ...]
    .venv/bin/python bench/moe_table.py --wide a.json b.json   # one row per budget and method, a column per run
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


def short(verdict: str) -> str:
    """'better (ppl, KL, top-1)' -> '+ppl +KL +top-1'; 'within noise' -> '='."""
    out = []
    for part in verdict.split(";"):
        word, _, names = part.strip().partition(" (")
        sign = {"better": "+", "worse": "−"}.get(word)
        if sign:
            out += [sign + n.strip() for n in names.rstrip(")").split(",")]
    return " ".join(out) or "="


def wide(paths: list[str]) -> None:
    """Budget x method rows; per run: ppl, KL and the paired verdict against that run's uniform."""
    from bitalloc.compare.report import versus

    runs = [r for p in paths for r in json.loads(open(p, encoding="utf-8").read()).get("runs", [])]
    labels = [f"{r['quantizer'].upper()} {r['tie_mode']}" for r in runs]
    print("| budget | method | " + " | ".join(f"{l}: ppl, KL, top-1, vs uniform" for l in labels) + " |")
    print("|---|---|" + "---|" * len(runs))
    budgets = [e["budget"]["value"] for e in runs[0]["budgets"]]
    for i, b in enumerate(budgets):
        methods = ["uniform"] + [m for m in runs[0]["budgets"][i]["allocated"]]
        for r in runs:
            methods += [m for m in r["budgets"][i]["allocated"] if m not in methods]
        for m in methods:
            cells = []
            for r in runs:
                e = r["budgets"][i]
                row = e["uniform"] if m == "uniform" else e["allocated"].get(m)
                if row is None:
                    cells.append("")
                    continue
                ppl = f"{row['ppl']:,.0f}" if row["ppl"] >= 1000 else f"{row['ppl']:.1f}"
                tail = "" if m == "uniform" else ", " + short(versus(row, e["uniform"]))
                cells.append(f"{ppl}, {row['kl']:.2f}, {row['top1']:.3f}{tail}")
            name = f"uniform ({runs[0]['budgets'][i]['uniform']['option']})" if m == "uniform" else m
            print(f"| {b:g} | {name} | " + " | ".join(cells) + " |")


def main() -> None:
    from bitalloc.compare.report import versus

    if sys.argv[1:2] == ["--wide"]:
        wide(sys.argv[2:])
        return
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
