"""How alike two error tables of one model rank its units: Spearman's rank
correlation over the units, for each option both tables hold.

    python3 bench/table_spearman.py A.json B.json

Tables are `bitalloc plan --save-table` files. A unit or option whose value
is not finite in either table is left out of that option's correlation.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from scipy.stats import spearmanr


def _read(path: str) -> tuple[str, list[str], dict[str, list[float]]]:
    data = json.load(open(path))
    if data.get("format") != "bitalloc.error-table":
        raise SystemExit(f"{path} is not a bitalloc error table (plan --save-table writes one).")
    return data["scorer"], data["options"], {k: v["distortion"] for k, v in data["units"].items()}


def main(a_path: str, b_path: str) -> None:
    a_scorer, a_opts, a = _read(a_path)
    b_scorer, b_opts, b = _read(b_path)
    units = sorted(set(a) & set(b))
    if not units:
        raise SystemExit("The two tables share no unit: they are not tables of the same model.")
    print(f"{a_scorer} ({a_path}) vs {b_scorer} ({b_path}): {len(units)} units")
    print("| option | units | Spearman |\n|---|---|---|")
    for opt in [o for o in a_opts if o in b_opts]:
        x = np.array([a[u][a_opts.index(opt)] for u in units], dtype=float)
        y = np.array([b[u][b_opts.index(opt)] for u in units], dtype=float)
        ok = np.isfinite(x) & np.isfinite(y)
        rho = spearmanr(x[ok], y[ok]).statistic if ok.sum() > 2 else float("nan")
        print(f"| {opt} | {int(ok.sum())} | {rho:+.3f} |")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
