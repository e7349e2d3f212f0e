"""Sequential GPTQ: the per-layer driver (one forward over the calibration
text per layer) against the one-pass driver (one forward in all), on the
embedded SmolLM2-135M.

    .venv/bin/python bench/gptq_sequential.py [--windows 16] [--seq-len 512] [--option int4-g64-sym]
        [--threads 1] [--out bench/gptq-sequential-smollm2.json]

Both drivers run in the same process on the same plan and calibration
windows, with the weights restored after each run, in the order one-pass,
per-layer, one-pass (the first run in a process also pays for growing the
heap); the ratio of the per-layer time to the second one-pass time is what to
compare across machines. One torch thread by default: on a shared 2-core
machine a 2-thread pool stalls on every small GPTQ op whenever the other core
is busy (one unit measured 0.08 s, then 6.4 s), which swamps the comparison. The differences are the
largest absolute difference of any dequantized weight, and of the final
logits on the first window of the evaluation text.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch


def timed_run(model, quantize, eval_row: torch.Tensor) -> tuple[float, tuple[dict, torch.Tensor]]:
    """(seconds, (stored form per unit, logits (seq, vocab) on ``eval_row``)), weights restored after."""
    from bitalloc.quantizers.apply import restored

    with restored(model):
        t0 = time.perf_counter()
        stored = quantize()
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            logits = model(eval_row[None, :]).logits[0]  # (seq, vocab)
    return seconds, (stored, logits)


def differences(a: tuple[dict, torch.Tensor], b: tuple[dict, torch.Tensor]) -> dict:
    """How two runs' (stored form per unit, logits) differ."""
    from bitalloc.formats.affine_rtn import dequantize

    (old, old_logits), (new, new_logits) = a, b
    weight_diff = max(float((dequantize(old[n]) - dequantize(new[n])).abs().max()) for n in old)
    return {
        "same_units_in_same_order": list(old) == list(new),
        "units_with_identical_codes": sum(torch.equal(old[n].codes, new[n].codes) for n in old),
        "units": len(old),
        "max_abs_diff_dequantized_weight": weight_diff,
        "max_abs_diff_logits": float((old_logits - new_logits).abs().max()),
        "max_abs_logit": float(old_logits.abs().max()),
    }


def run(windows: int, seq_len: int, option: str) -> dict:
    from bitalloc import api
    from bitalloc.calib.grams import CalibSettings, calibration_windows
    from bitalloc.evaluate import EvalSettings, token_windows
    from bitalloc.formats.affine import QuantOption
    from bitalloc.solve.problem import Budget
    from bitalloc.quantizers.apply import _quantize_sequential, _quantize_unit
    from bitalloc.quantizers.sequential import quantize_sequential

    loaded = api.load(None)
    model, inventory = loaded.model, loaded.inventory
    settings = api.PlanSettings(Budget(16.0), quantizer="gptq", sequential=True)  # loose: the one option fits
    plan = api.uniform_plan(inventory, [QuantOption.parse(option)], settings, loaded.source.label)
    calib = CalibSettings(windows, seq_len)
    rows = calibration_windows(loaded.tokenizer, api.calibration_text(None), calib)  # (windows, seq_len)
    eval_row = token_windows(loaded.tokenizer, api.eval_text(None)[0], EvalSettings(seq_len, 1))[0]  # (seq_len,)

    one_pass = lambda: quantize_sequential(model, inventory, plan, rows, _quantize_unit)  # noqa: E731
    per_layer = lambda: _quantize_sequential(model, inventory, plan, rows, _quantize_unit, None)  # noqa: E731
    # The one-pass driver runs first and again last: the first run of anything in a fresh process pays
    # for growing the heap (page faults), which would otherwise count against whichever driver ran first.
    seconds, results = {}, {}
    for label, quantize in (("one_pass_first", one_pass), ("per_layer", per_layer), ("one_pass", one_pass)):
        print(f"{label} ...", file=sys.stderr)
        seconds[label], results[label] = timed_run(model, quantize, eval_row)
        print(f"  {seconds[label]:.1f} s", file=sys.stderr)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, no GPU",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "model": loaded.source.label,
        "plan": f"uniform {option}, GPTQ sequential, act_order {plan.act_order}",
        "units": len(inventory.units),
        "calibration": {**calib.to_dict(), "text": "gensim enwiki sample, calibration half"},
        "eval_window": f"first {seq_len}-token window of the evaluation half",
        "per_layer_s": seconds["per_layer"],
        "one_pass_s": seconds["one_pass"],
        "one_pass_first_run_s": seconds["one_pass_first"],
        "speedup": seconds["per_layer"] / seconds["one_pass"],
        "timing_note": "same process, in the order one-pass, per-layer, one-pass; speedup uses the second one-pass run",
        **differences(results["per_layer"], results["one_pass"]),
        "one_pass_first_vs_second_run": differences(results["one_pass_first"], results["one_pass"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16, help="calibration windows (CalibSettings default 16)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per window (CalibSettings default 512)")
    ap.add_argument("--option", default="int4-g64-sym", help="the uniform plan's option")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (see the module docstring)")
    ap.add_argument("--out", default=None, help="write the result here as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.windows, args.seq_len, args.option)
    if args.out:
        from bitalloc.fileio import write_json

        write_json(args.out, result)
    print(f"per-layer {result['per_layer_s']:.1f} s, one-pass {result['one_pass_s']:.1f} s, "
          f"speed-up {result['speedup']:.2f}x; max |dW| {result['max_abs_diff_dequantized_weight']:.3g}, "
          f"max |dlogits| {result['max_abs_diff_logits']:.3g}")


if __name__ == "__main__":
    main()
