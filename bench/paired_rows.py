"""Two rows of one compare report against each other, window by window:
the paired bootstrap the report uses against its baseline, for any pair.

    .venv/bin/python bench/paired_rows.py compare.json "bitalloc kl-block" "bitalloc kl"

Rows are matched by method name within each preset (GGUF compares) or budget
(integer compares); every group holding both is printed.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

from bitalloc.evaluate.stats import WindowSums, compare_windows, verdict_label


def _sums(row: dict) -> WindowSums:
    w = row["window_sums"]
    return WindowSums(tuple(w["tokens"]), tuple(w["nll_sum"]), tuple(w["kl_sum"]), tuple(w["top1_agree"]))


def main(path: str, a: str, b: str) -> None:
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in json.load(open(path))["rows"]:
        group = row.get("preset") or f"{row.get('quantizer', '')} {row.get('budget', '')}".strip()
        groups[str(group)][row["method"]] = row
    pairs = [(g, rows[a], rows[b]) for g, rows in groups.items() if a in rows and b in rows]
    if not pairs:
        raise SystemExit(f"No preset or budget of {path} holds both {a!r} and {b!r}.")
    print(f"{a} minus {b}, paired over windows (95 % bootstrap):\n")
    print("| at | KL a | KL b | KL difference [95 %] | log-ppl difference [95 %] | top-1 difference [95 %] | verdict for a |")
    print("|---|---|---|---|---|---|---|")
    for group, ra, rb in pairs:
        d = compare_windows(_sums(ra), _sums(rb))
        cells = [f"{d[m].difference:+.4f} [{d[m].lo:+.4f}, {d[m].hi:+.4f}]" for m in ("kl", "ppl", "top1")]
        print(f"| {group} | {ra['kl']:.4f} | {rb['kl']:.4f} | {' | '.join(cells)} | {verdict_label(d)} |")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
