"""Where KL and perplexity part ways: a token-level breakdown of two plans.

Two plans of the same size (by default the uniform plan and a table's plan)
are evaluated token by token on the same windows. Tokens are bucketed by the
reference's probability of the true next token; for each bucket the script
reports how much of the total change in NLL (perplexity's log) and in KL
each bucket carries. A plan can lower KL overall (it matches the reference's
whole distribution better) while raising NLL, if its losses sit on the tokens
the reference predicts confidently and its gains on tokens where the
reference itself is unsure.

    .venv/bin/python bench/divergence.py --bpw 3.25 --scorer kl --out bench/divergence-3.25.json
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from bitalloc import api
from bitalloc.evaluate import EvalSettings, token_windows
from bitalloc.fileio import write_json
from bitalloc.solve.problem import Budget
from bitalloc.quantizers.apply import quantize_model, restored

BUCKETS = (0.0, 0.01, 0.1, 0.5, 0.9, 1.0001)  # reference probability of the true next token


@torch.no_grad()
def token_stats(model, windows: torch.Tensor, ref_logp: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens,) NLL and KL(reference || model) of every predicted token."""
    nll, kl = [], []
    for row, ref in zip(windows, ref_logp):
        logp = F.log_softmax(model(row[None]).logits[0, :-1].float(), dim=-1)  # (T-1, V)
        nll.append(-logp.gather(1, row[1:, None])[:, 0])
        kl.append((ref.exp() * (ref - logp)).sum(-1))
    return torch.cat(nll).numpy(), torch.cat(kl).numpy()


def breakdown(p_ref: np.ndarray, a: dict, b: dict) -> list[dict]:
    d_nll, d_kl = b["nll"] - a["nll"], b["kl"] - a["kl"]
    rows = []
    for lo, hi in zip(BUCKETS, BUCKETS[1:]):
        m = (p_ref >= lo) & (p_ref < hi)
        rows.append({"p_ref": [lo, min(hi, 1.0)], "tokens": int(m.sum()),
                     "d_nll_sum": float(d_nll[m].sum()), "d_kl_sum": float(d_kl[m].sum()),
                     "d_nll_mean": float(d_nll[m].mean()) if m.any() else None,
                     "d_kl_mean": float(d_kl[m].mean()) if m.any() else None})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bpw", type=float, default=3.25)
    p.add_argument("--scorer", default="kl")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    loaded = api.load(None)
    settings = api.PlanSettings(Budget(a.bpw), scorer=a.scorer, guard=False)
    options, _ = api.preflight(loaded, settings)
    table = api.score(api.scoring_context(loaded, settings, options), [a.scorer])[a.scorer]
    plans = {"uniform": api.uniform_plan(loaded.inventory, options, settings, "smollm2", table),
             a.scorer: api.solve_plan(loaded.inventory, table, settings, "smollm2")}
    windows = token_windows(loaded.tokenizer, api.eval_text(None)[0], EvalSettings(a.seq_len, a.windows))
    with torch.no_grad():
        ref = [F.log_softmax(loaded.model(r[None]).logits[0, :-1].float(), -1) for r in windows]
    p_ref = torch.cat([lp.gather(1, r[1:, None])[:, 0].exp() for lp, r in zip(ref, windows)]).numpy()
    stats = {}
    for name, plan in plans.items():
        with restored(loaded.model):
            quantize_model(loaded.model, loaded.inventory, plan)
            nll, kl = token_stats(loaded.model, windows, ref)
        stats[name] = {"nll": nll, "kl": kl}
    rows = breakdown(p_ref, stats["uniform"], stats[a.scorer])
    d_nll = stats[a.scorer]["nll"] - stats["uniform"]["nll"]
    d_kl = stats[a.scorer]["kl"] - stats["uniform"]["kl"]
    report = {"bpw": a.bpw, "scorer": a.scorer, "tokens": int(len(p_ref)),
              "mean_nll": {k: float(v["nll"].mean()) for k, v in stats.items()},
              "mean_kl": {k: float(v["kl"].mean()) for k, v in stats.items()},
              "spearman_dkl_dnll": float(__import__("scipy.stats").stats.spearmanr(d_kl, d_nll).statistic),
              "buckets": rows, "note": "d_* = allocated minus uniform; p_ref = reference probability of the true token"}
    write_json(a.out, report)
    print(f"{a.scorer} vs uniform at {a.bpw} bpw over {len(p_ref)} tokens: mean NLL {report['mean_nll']}, "
          f"mean KL {report['mean_kl']}")
    for r in rows:
        print(f"p_ref {r['p_ref'][0]:.2f}-{r['p_ref'][1]:.2f}: {r['tokens']:5d} tokens  dNLL {r['d_nll_sum']:+9.2f}  "
              f"dKL {r['d_kl_sum']:+9.2f}")


if __name__ == "__main__":
    main()
