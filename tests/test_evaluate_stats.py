"""Intervals over evaluation windows and paired verdicts, against hand
computations; per-window sums of evaluate(); the verdict words in the tables."""

import math

import numpy as np
import pytest
import torch

from bitalloc.compare.integer import markdown
from bitalloc.errors import BitallocError
from bitalloc.evaluate import EvalResult, evaluate, reference_logprobs, reference_result
from bitalloc.compare.report import num, run_report
from bitalloc.evaluate.stats import (WindowSums, bootstrap_ratios, compare_windows, paired_difference, ratio_interval, ratio_se,
                            resample_indices, verdict_label)
from conftest import tiny_llama


def test_identical_windows_collapse_the_interval_to_the_point():
    iv = ratio_interval([2.0] * 5, [10] * 5)
    assert iv.estimate == iv.lo == iv.hi == 0.2 and iv.se == 0.0 and iv.windows == 5
    ppl = ratio_interval([30.0] * 4, [10] * 4, exponentiate=True)
    assert ppl.lo == ppl.estimate == ppl.hi and ppl.estimate == pytest.approx(math.exp(3.0), rel=1e-15)


def test_standard_error_equals_the_textbook_formula():
    # equal windows: ratios 0.1 0.2 0.3 0.6, mean 0.3, squared deviations .04 .01 0 .09 -> s^2 = .14 / 3
    assert ratio_se([1, 2, 3, 6], [10] * 4) == pytest.approx(math.sqrt(0.14 / 3) / math.sqrt(4), rel=1e-12)
    # unequal windows: R = 4/6, residuals 1 - 4/3 = -1/3 and 3 - 8/3 = 1/3, sqrt(2/1 * 2/9) / 6 = 1/9
    assert ratio_se([1, 3], [2, 4]) == pytest.approx(1 / 9, rel=1e-12)
    assert ratio_se([5.0], [10]) is None
    # perplexity: the delta method carries se(nll) to exp(nll)
    ppl = ratio_interval([20.0, 40.0], [10, 10], exponentiate=True)
    assert ppl.estimate == pytest.approx(math.exp(3.0)) and ppl.se == pytest.approx(math.exp(3.0) * 1.0)


def test_bootstrap_ratios_and_percentiles_by_hand():
    idx = np.array([[0, 0], [0, 1], [1, 1], [1, 0]])
    # draws: (1+1)/(2+2), (1+3)/(2+4), (3+3)/(4+4), (3+1)/(4+2)
    assert bootstrap_ratios([1, 3], [2, 4], idx) == pytest.approx([0.5, 2 / 3, 0.75, 2 / 3])
    # 25 % and 75 % quantiles of sorted (.5, 2/3, 2/3, .75), linear: positions 0.75 and 2.25
    iv = ratio_interval([1, 3], [2, 4], confidence=0.5, indices=idx)
    assert iv.lo == pytest.approx(0.5 + 0.75 * (2 / 3 - 0.5)) and iv.hi == pytest.approx(2 / 3 + 0.25 * (0.75 - 2 / 3))
    assert iv.estimate == pytest.approx(4 / 6)


def test_two_windows_give_their_extremes_as_the_95_interval():
    # a quarter of the 2000 draws take window 0 twice, a quarter window 1 twice: both tails are pure
    iv = ratio_interval([3.0, 7.0], [10, 10])
    assert (iv.lo, iv.hi) == pytest.approx((0.3, 0.7)) and iv.estimate == pytest.approx(0.5)


def test_interval_is_deterministic_and_contains_the_point():
    rng = np.random.default_rng(1)
    nll = rng.lognormal(3.0, 0.3, size=8) * 100
    a, b = ratio_interval(nll, [100] * 8, exponentiate=True), ratio_interval(nll, [100] * 8, exponentiate=True)
    assert a == b and np.array_equal(resample_indices(8), resample_indices(8))
    assert a.lo < a.estimate < a.hi
    assert resample_indices(8).shape == (2000, 8)


def test_better_on_every_window_is_better_and_the_reverse_worse():
    base = np.array([300.0, 250.0, 410.0, 380.0, 290.0, 330.0])
    tokens = [100] * 6
    gain = np.array([3.0, 1.0, 4.0, 2.0, 5.0, 1.0])  # nats per window
    d = paired_difference(base - gain, base, tokens, metric="ppl")
    assert d.verdict == "better" and d.difference == pytest.approx(-16 / 600) and d.hi < 0
    assert paired_difference(base + gain, base, tokens).verdict == "worse"
    # top-1: more agreements is better
    assert paired_difference([60, 70, 80], [50, 60, 70], [100] * 3, higher_is_better=True).verdict == "better"
    assert paired_difference([50, 60, 70], [60, 70, 80], [100] * 3, higher_is_better=True).verdict == "worse"


def test_a_tiny_difference_with_a_large_spread_is_within_noise():
    base = np.array([300.0, 250.0, 410.0, 380.0])
    d = paired_difference(base + np.array([5.0, -5.0, 5.1, -5.0]), base, [100] * 4)
    assert d.verdict == "within noise" and d.lo < 0 < d.hi and d.difference == pytest.approx(0.1 / 400)


def test_one_window_says_nothing_about_noise():
    d = paired_difference([100.0], [200.0], [10])
    assert d.verdict == "within noise" and d.lo == d.hi == d.difference


def test_compare_windows_and_the_verdict_label():
    tokens = (100, 100, 100)
    base = WindowSums(tokens, (300.0, 350.0, 320.0), (20.0, 25.0, 22.0), (80, 82, 79))
    better = WindowSums(tokens, (290.0, 340.0, 311.0), (10.0, 14.0, 12.0), (81, 81, 80))  # top-1 mixed
    diffs = compare_windows(better, base)
    assert set(diffs) == {"ppl", "kl", "top1"} and verdict_label(diffs) == "better (ppl, KL)"
    assert verdict_label(compare_windows(base, better)) == "worse (ppl, KL)"
    assert verdict_label(compare_windows(base, base)) == "within noise"
    mixed = WindowSums(tokens, (300.0, 350.0, 320.0), (10.0, 14.0, 12.0), (70, 71, 69))
    assert verdict_label(compare_windows(mixed, base)) == "better (KL); worse (top-1)"
    with pytest.raises(BitallocError, match="same windows"):
        compare_windows(base, WindowSums((100, 100), (1.0, 2.0)))


def test_window_sums_round_trip_and_validation():
    w = WindowSums((10, 10), (1.5, 2.5), (0.1, 0.2), (7, 8))
    assert WindowSums.from_dict(w.to_dict()) == w
    assert WindowSums.from_dict(WindowSums((10,), (1.0,)).to_dict()).kl_sum is None
    with pytest.raises(BitallocError, match="'kl_sum' window sums must have 2 entries"):
        WindowSums((10, 10), (1.0, 2.0), (0.1,))


def test_evaluate_keeps_per_window_sums_that_add_up_to_the_totals():
    model, ref_model = tiny_llama(seed=0), tiny_llama(seed=1)
    windows = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))  # (windows, L)
    reference = reference_logprobs(ref_model, windows)
    r = evaluate(model, windows, reference)
    w = r.window_sums
    assert w.tokens == (15, 15, 15) and sum(w.tokens) == r.tokens
    assert sum(w.nll_sum) / r.tokens == pytest.approx(r.nll, rel=1e-12)
    assert sum(w.kl_sum) / r.tokens == pytest.approx(r.kl, rel=1e-12) and r.kl > 0
    assert sum(w.top1_agree) / r.tokens == pytest.approx(r.top1, rel=1e-12)
    for i in range(3):  # each window's sums are what that window alone gives
        one = evaluate(model, windows[i:i + 1], reference[i:i + 1])
        assert one.nll * one.tokens == pytest.approx(w.nll_sum[i], rel=1e-6)
        assert one.kl * one.tokens == pytest.approx(w.kl_sum[i], rel=1e-6)
    d = r.to_dict()
    for name in ("ppl", "kl", "top1"):
        lo, hi = d[f"{name}_ci"]
        assert lo <= d[name] <= hi and d[f"{name}_se"] >= 0
    assert WindowSums.from_dict(d["window_sums"]) == w and d["ci_method"]["resamples"] == 2000
    ref = reference_result(windows, reference).to_dict()
    assert ref["kl"] == 0.0 and ref["kl_ci"] == [0.0, 0.0] and ref["top1"] == 1.0 and ref["top1_ci"] == [1.0, 1.0]
    assert EvalResult(ppl=2.0, nll=math.log(2.0), tokens=4).to_dict() == {
        "ppl": 2.0, "nll": math.log(2.0), "tokens": 4, "kl": None, "top1": None}


def _row(w: WindowSums, **extra) -> dict:
    return {**EvalResult.from_windows(w).to_dict(), "bpw": 3.5, "code_bpw": 3.0, "model_bpw": 4.0, "model_mb": 1.0,
            "options_used": ["int3-g64-asym", "int4-g64-asym"], "seconds": 0.1, **extra}


def _synthetic_rows():
    tokens = (100,) * 4
    uni = WindowSums(tokens, (300.0, 350.0, 320.0, 330.0), (20.0, 25.0, 22.0, 21.0), (80, 82, 79, 81))
    good = WindowSums(tokens, (290.0, 340.0, 311.0, 321.0), (10.0, 14.0, 12.0, 11.0), (90, 91, 90, 92))
    noisy = WindowSums(tokens, (310.0, 340.0, 330.0, 320.0), (25.0, 15.0, 29.0, 13.0), (85, 75, 84, 76))
    bad = WindowSums(tokens, (310.0, 360.0, 330.0, 340.0), (20.0, 25.0, 22.0, 21.0), (80, 82, 79, 81))
    return uni, good, noisy, bad


def test_run_report_shows_intervals_and_verdicts():
    uni, good, noisy, bad = _synthetic_rows()
    ref = EvalResult.from_windows(WindowSums(uni.tokens, (250.0, 280.0, 260.0, 270.0), (0.0,) * 4, uni.tokens))
    report = {"model": "m", "model_note": "note", "units": 14, "quantized_numel": 1e6, "kept_numel": 1e5,
              "text": "t", "eval": {"windows": 4, "seq_len": 101}, "bpw_note": "bpw: stored bits",
              "reference": {**ref.to_dict(), "model_mb": 2.2},
              "budgets": [{"budget": {"kind": "bpw", "value": 3.5},
                           "uniform": _row(uni, option="int3-g64-asym"),
                           "allocated": {"a": _row(good), "b": _row(noisy), "c": _row(bad)}}]}
    text = run_report(report)
    assert "better (ppl, KL, top-1)" in text and "within noise" in text and "worse (ppl)" in text
    assert "95 % percentile bootstrap over the 4 evaluation windows (400 predicted tokens" in text
    uni_row = report["budgets"][0]["uniform"]
    assert f"{num(uni_row['ppl'], 4)} [{num(uni_row['ppl_ci'][0], 4)}, {num(uni_row['ppl_ci'][1], 4)}]" in text


def test_compare_markdown_shows_intervals_and_verdicts_per_quantizer():
    uni, good, noisy, bad = _synthetic_rows()
    ref = EvalResult.from_windows(WindowSums(uni.tokens, (250.0, 280.0, 260.0, 270.0), (0.0,) * 4, uni.tokens))
    rows = [_row(uni, quantizer="rtn", budget=3.5, method="uniform", detail="uniform:int3-g64-asym"),
            _row(good, quantizer="rtn", budget=3.5, method="alpha", detail="alpha"),
            _row(good, quantizer="gptq", budget=3.5, method="uniform", detail="uniform:int3-g64-asym"),
            _row(uni, quantizer="gptq", budget=3.5, method="alpha", detail="alpha")]
    text = markdown({"model": "m", "model_note": "n", "eval": {"windows": 4}, "reference": ref.to_dict(),
                     "rows": rows, "scoring_seconds": {"alpha": 0.1}})
    lines = [ln for ln in text.splitlines() if ln.startswith("| rtn") or ln.startswith("| gptq")]
    assert "better (ppl, KL, top-1)" in lines[1] and "worse (ppl, KL, top-1)" in lines[3]
    assert "same quantizer and budget" in text
