"""How much do sequential GPTQ's codes depend on float rounding? The same
uniform plan quantized by one-pass sequential GPTQ with 1 and with 2 torch
threads (threaded float32 matmuls sum in another order), on the embedded
SmolLM2: units whose codes differ, and perplexity of both on the evaluation
half.

    .venv/bin/python bench/gptq_threads.py [--option int3-g64-sym] [--windows 8] --out bench/gptq-threads-smollm2.json
"""

from __future__ import annotations

import argparse
import time

import torch

from bitalloc import api
from bitalloc.calib.grams import calibration_windows
from bitalloc.evaluate import EvalSettings
from bitalloc.fileio import write_json
from bitalloc.formats.affine import QuantOption
from bitalloc.solve.problem import Budget
from bitalloc.quantizers.apply import _quantize_unit, restored
from bitalloc.quantizers.sequential import quantize_sequential


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--option", default="int3-g64-sym")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    loaded = api.load(None)
    option = QuantOption.parse(a.option)
    settings = api.PlanSettings(Budget(option.bits + 1.0), quantizer="gptq", sequential=True)
    plan = api.uniform_plan(loaded.inventory, [option], settings, loaded.source.label)
    ctx = api.scoring_context(loaded, settings, [option], progress=False)
    windows = calibration_windows(loaded.tokenizer, ctx.calib_text, settings.calib)
    report, bench = api.reference_block(loaded, EvalSettings(512, a.windows), None, 16, False)
    runs = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        t = time.perf_counter()
        with restored(loaded.model):
            stored = quantize_sequential(loaded.model, loaded.inventory, plan, windows, _quantize_unit)
            seconds = time.perf_counter() - t
            result = api.evaluate_windows(loaded.model, bench.windows, bench.reference)
        runs[threads] = (stored, result, seconds)
        print(f"{threads} thread(s): ppl {result.ppl:.2f}  KL {result.kl:.4f}  ({seconds:.0f} s)", flush=True)
    (s1, r1, t1), (s2, r2, t2) = runs[1], runs[2]
    differ = [n for n in s1 if not torch.equal(s1[n].codes, s2[n].codes)]
    share = sum(int((s1[n].codes != s2[n].codes).sum()) for n in s1) / sum(s1[n].codes.numel() for n in s1)
    report.update(option=a.option, runs={str(k): {"ppl": v[1].ppl, "kl": v[1].kl, "top1": v[1].top1,
                                                 "seconds": v[2]} for k, v in runs.items()},
                  units=len(s1), units_with_different_codes=len(differ), share_of_codes_different=share,
                  first_unit_different=differ[0] if differ else None)
    print(f"units with different codes: {len(differ)} of {len(s1)}; share of codes different {share:.4%}; "
          f"first: {differ[0] if differ else None}")
    write_json(a.out, report)


if __name__ == "__main__":
    main()
