"""The quality recipe (GPTQ, kl+refined) against the best uniform model of
the same size, whichever quantizer gives it: paired verdicts over the same
evaluation windows, read from `bench/quality.py` reports of the same texts
(one run with --quantizers gptq, one with rtn).

    .venv/bin/python bench/cross_quantizer.py
"""

from __future__ import annotations

import json

from bitalloc.compare.report import versus

PAIRS = [("bench/quality-spread-gptq-smollm2.json", "bench/quality-spread-rtn-smollm2.json"),
         ("bench/quality-spread-gptq-rest-smollm2.json", "bench/quality-spread-rtn-rest-smollm2.json")]


def row(report: dict, budget: float, method: str) -> dict:
    return next(r for r in report["rows"] if r["budget"] == budget and r["method"] == method)


def main() -> None:
    for gptq_file, rtn_file in PAIRS:
        gptq, rtn = (json.load(open(f)) for f in (gptq_file, rtn_file))
        for recipe in (r for r in gptq["rows"] if r["method"] == "kl+refined"):
            b = recipe["budget"]
            uniform, same = row(rtn, b, "uniform"), row(rtn, b, "kl+refined")
            o, ou = recipe["other_texts"]["second"], uniform["other_texts"]["second"]
            print(f"{b:g} bpw: recipe {recipe['ppl']:.2f} vs uniform RTN {uniform['ppl']:.2f}: "
                  f"{versus(recipe, uniform) or 'within noise'} | second text {o['ppl']:.2f} vs {ou['ppl']:.2f}: "
                  f"{versus(o, ou) or 'within noise'} | vs RTN kl+refined {same['ppl']:.2f}: "
                  f"{versus(recipe, same) or 'within noise'}")


if __name__ == "__main__":
    main()
