"""Markdown tables from bench/quality.py reports, for BENCHMARKS.md: one row
per plan with intervals, the share of uniform's perplexity gap it recovers
(on each text, against that text's reference), the paired verdict, and the
refinement's calibration objective per round.

    .venv/bin/python bench/quality_table.py bench/quality-rtn-kl-smollm2.json [more.json ...]
"""

from __future__ import annotations

import json
import sys


def interval(row: dict, key: str, digits: int) -> str:
    lo, hi = row[f"{key}_ci"]
    return f"{row[key]:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def gap(row: dict, uniform: dict, reference: float) -> str:
    """(uniform - row) / (uniform - reference), perplexity."""
    return f"{100 * (uniform['ppl'] - row['ppl']) / (uniform['ppl'] - reference):+.1f} %"


def table(report: dict) -> list[str]:
    ref = report["reference"]["ppl"]
    ref2 = report.get("second_text", {}).get("reference", {}).get("ppl")
    head = ["budget", "quantizer", "method", "ppl [95 %]", "KL [95 %]", "top-1", "gap", "verdict"]
    if ref2:
        head += ["2nd text ppl [95 %]", "2nd KL", "2nd gap", "2nd verdict"]
    head += ["s to plan", "s to quantize"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    uniform: dict = {}
    for row in report["rows"]:
        key = (row["quantizer"], row["budget"])
        if row["method"] == "uniform":
            uniform[key] = row
        u = uniform[key]
        cells = [f"{row['budget']:g}", row["quantizer"], row["method"], interval(row, "ppl", 2),
                 interval(row, "kl", 4), f"{row['top1']:.3f}", "" if row is u else gap(row, u, ref),
                 row.get("verdict", "")]
        if ref2:
            o, uo = row["other_texts"]["second"], u["other_texts"]["second"]
            cells += [interval(o, "ppl", 2), f"{o['kl']:.4f}", "" if row is u else gap(o, uo, ref2),
                      o.get("verdict", "")]
        cells += [f"{row.get('plan_seconds', 0):.0f}", f"{row.get('quantize_s', 0):.0f}"]
        out.append("| " + " | ".join(cells) + " |")
    rounds = [(row, row["provenance"]["refinement"]) for row in report["rows"]
              if "refinement" in row.get("provenance", {})]
    if rounds:
        out += ["", "| budget | quantizer | plan | objective per round (start → …) | moves per round |", "|---|---|---|---|---|"]
        for row, ref_rec in rounds:
            rs = ref_rec.get("rounds", [])
            values = " → ".join(f"{v:.4f}" for v in [rs[0]["before"]] + [r["after"] for r in rs]) if rs else ""
            moves = ", ".join(str(len(r.get("moves", []))) for r in rs)
            out.append(f"| {row['budget']:g} | {row['quantizer']} | {row['method']} | {values} | {moves} |")
    return out


def main() -> None:
    for path in sys.argv[1:]:
        report = json.loads(open(path, encoding="utf-8").read())
        print(f"{path}: reference ppl {report['reference']['ppl']:.2f}"
              + (f", second text ({report['second_text']['text']}) {report['second_text']['reference']['ppl']:.2f}"
                 if "second_text" in report else ""))
        print("\n".join(table(report)))
        print()


if __name__ == "__main__":
    main()
