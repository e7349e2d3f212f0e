"""Spread over evaluation windows: intervals for perplexity, KL and top-1, and
a paired comparison of two methods evaluated on the same windows.

The window is the unit of resampling: tokens inside one window share their
context and are strongly correlated, while the windows are disjoint slices
of the text. Every statistic here is a ratio of sums over windows (NLL over
tokens, KL over tokens, agreements over tokens), so a bootstrap resample
draws windows with replacement and recomputes the ratio of the drawn sums.

- Interval: 95 % percentile bootstrap, ``RESAMPLES`` = 2000 resamples. Each
  tail then holds 50 resamples, enough for its 2.5 % quantile to move by a
  small fraction of the interval's width from one seed to another (Efron &
  Tibshirani advise at least 1000 for percentile intervals); the cost is a
  (2000, windows) index array, microseconds.
- Seed: ``SEED`` = 0 through ``numpy.random.default_rng``. The indices
  depend only on the seed and the number of windows, so every row of a
  report is resampled identically, calls are reproducible, and the paired
  comparison uses the same draws for both methods.
- Standard error: the textbook standard error of a ratio estimator
  (linearisation), which for windows of equal length is the sample standard
  deviation of the per-window ratios over sqrt(windows). For perplexity it is
  carried from log-perplexity by the delta method (``ppl * se(nll)``).
- Paired comparison: the per-window difference of the two methods' sums,
  resampled as one ratio; "better"/"worse" only when the interval excludes 0.

With few windows the percentile bootstrap is optimistic (narrower than a
Student-t interval); with one window nothing can be said about the spread,
so the interval collapses to the point, the standard error is None and the
verdict is "within noise".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitalloc.errors import BitallocError

RESAMPLES = 2000
SEED = 0
CONFIDENCE = 0.95
VERDICTS = ("better", "worse", "within noise")
METRIC_LABELS = {"ppl": "ppl", "kl": "KL", "top1": "top-1"}


@dataclass(frozen=True)
class WindowSums:
    """Per-window sums of one evaluation; entry i belongs to window i."""

    tokens: tuple[int, ...]  # predicted tokens
    nll_sum: tuple[float, ...]  # negative log-likelihood, nats
    kl_sum: tuple[float, ...] | None = None  # KL(reference || model), nats
    top1_agree: tuple[int, ...] | None = None  # positions where both argmax agree

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if n < 1:
            raise BitallocError("Window sums need at least one window. Got 0 instead.")
        for name in ("nll_sum", "kl_sum", "top1_agree"):
            values = getattr(self, name)
            if values is not None and len(values) != n:
                raise BitallocError(f"The '{name}' window sums must have {n} entries, one per window. "
                                    f"Got {len(values)} instead.")

    def to_dict(self) -> dict:
        return {k: None if v is None else list(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> WindowSums:
        opt = lambda k: None if d.get(k) is None else tuple(d[k])  # noqa: E731
        return cls(tokens=tuple(d["tokens"]), nll_sum=tuple(d["nll_sum"]), kl_sum=opt("kl_sum"),
                   top1_agree=opt("top1_agree"))


@dataclass(frozen=True)
class Interval:
    """A statistic over all windows with its bootstrap interval and standard error."""

    estimate: float
    lo: float
    hi: float
    se: float | None  # None with a single window
    windows: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class PairedDifference:
    """Statistic of method a minus that of method b on the same windows.

    For perplexity the difference is in log-perplexity (nats per token), so
    ``exp(difference)`` is the ratio of the two perplexities."""

    metric: str
    difference: float
    lo: float
    hi: float
    windows: int
    verdict: str  # one of VERDICTS, for method a against method b

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def resample_indices(windows: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, windows) window indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, windows, size=(resamples, windows))


def bootstrap_ratios(numer, denom, indices: np.ndarray) -> np.ndarray:
    """(resamples,) ratio sum(numer[drawn]) / sum(denom[drawn]) for each row of ``indices``."""
    numer, denom = np.asarray(numer, dtype=np.float64), np.asarray(denom, dtype=np.float64)
    return numer[indices].sum(axis=1) / denom[indices].sum(axis=1)


def ratio_se(numer, denom) -> float | None:
    """Standard error of R = sum(numer) / sum(denom) over n windows:
    sqrt(n / (n - 1) * sum((numer_i - R denom_i)^2)) / sum(denom); None if n < 2."""
    numer, denom = np.asarray(numer, dtype=np.float64), np.asarray(denom, dtype=np.float64)
    n = len(numer)
    if n < 2:
        return None
    ratio = numer.sum() / denom.sum()
    return float(np.sqrt(n / (n - 1) * np.sum((numer - ratio * denom) ** 2)) / denom.sum())


def ratio_interval(numer, denom, *, exponentiate: bool = False, confidence: float = CONFIDENCE,
                   indices: np.ndarray | None = None) -> Interval:
    """sum(numer) / sum(denom) with a percentile-bootstrap interval over windows;
    ``exponentiate`` reports exp of the ratio (perplexity from NLL sums)."""
    n = len(numer)
    indices = resample_indices(n) if indices is None else indices
    point = float(np.sum(numer) / np.sum(denom))
    lo, hi = np.quantile(bootstrap_ratios(numer, denom, indices), [(1 - confidence) / 2, (1 + confidence) / 2])
    se = ratio_se(numer, denom)
    if exponentiate:
        point, lo, hi = np.exp(point), np.exp(lo), np.exp(hi)
        se = None if se is None else point * se  # delta method
    return Interval(float(point), float(lo), float(hi), se, n)


def intervals(w: WindowSums, *, confidence: float = CONFIDENCE) -> dict[str, Interval | None]:
    """Perplexity, KL and top-1 agreement of one evaluation, each with its interval."""
    return {
        "ppl": ratio_interval(w.nll_sum, w.tokens, exponentiate=True, confidence=confidence),
        "kl": None if w.kl_sum is None else ratio_interval(w.kl_sum, w.tokens, confidence=confidence),
        "top1": None if w.top1_agree is None else ratio_interval(w.top1_agree, w.tokens, confidence=confidence),
    }


def paired_difference(numer_a, numer_b, denom, *, metric: str = "", higher_is_better: bool = False,
                      confidence: float = CONFIDENCE, indices: np.ndarray | None = None) -> PairedDifference:
    """Ratio statistic of a minus that of b on the same windows (same ``denom``):
    the bootstrap of the per-window difference of the sums. The verdict is
    "better"/"worse" for a only when the interval excludes 0 and there are at
    least two windows, else "within noise"."""
    diff = np.asarray(numer_a, dtype=np.float64) - np.asarray(numer_b, dtype=np.float64)
    iv = ratio_interval(diff, denom, confidence=confidence, indices=indices)
    verdict = "within noise"
    if iv.windows >= 2 and (iv.lo > 0 or iv.hi < 0):
        a_higher = iv.lo > 0
        verdict = "better" if a_higher == higher_is_better else "worse"
    return PairedDifference(metric, iv.estimate, iv.lo, iv.hi, iv.windows, verdict)


def compare_windows(a: WindowSums, b: WindowSums, *, confidence: float = CONFIDENCE) -> dict[str, PairedDifference]:
    """Method a against method b, evaluated on the same windows: log-perplexity,
    KL (lower is better) and top-1 agreement (higher is better) where both have them."""
    if a.tokens != b.tokens:
        raise BitallocError("A paired comparison needs both results evaluated on the same windows; "
                            f"their token counts differ ({len(a.tokens)} and {len(b.tokens)} windows).")
    out = {"ppl": paired_difference(a.nll_sum, b.nll_sum, a.tokens, metric="ppl", confidence=confidence)}
    if a.kl_sum is not None and b.kl_sum is not None:
        out["kl"] = paired_difference(a.kl_sum, b.kl_sum, a.tokens, metric="kl", confidence=confidence)
    if a.top1_agree is not None and b.top1_agree is not None:
        out["top1"] = paired_difference(a.top1_agree, b.top1_agree, a.tokens, metric="top1",
                                        higher_is_better=True, confidence=confidence)
    return out


def verdict_label(diffs: dict[str, PairedDifference]) -> str:
    """One line from several paired comparisons: "better (ppl, KL)",
    "worse (ppl)", "better (KL); worse (top-1)" or "within noise"."""
    parts = []
    for word in ("better", "worse"):
        names = [METRIC_LABELS.get(m, m) for m, d in diffs.items() if d.verdict == word]
        if names:
            parts.append(f"{word} ({', '.join(names)})")
    return "; ".join(parts) or "within noise"


def method_note(windows: int, tokens: int, *, baseline: str = "the uniform row of the same budget",
                confidence: float = CONFIDENCE, column: str = "vs uniform") -> str:
    """How the intervals and verdicts were computed, for the foot of a table."""
    pct = f"{confidence * 100:g} %"
    return (f"[lo, hi]: {pct} percentile bootstrap over the {windows} evaluation windows ({tokens} predicted "
            f"tokens; {RESAMPLES} resamples of whole windows, seed {SEED}).\n{column}: paired bootstrap of the "
            f"per-window difference to {baseline} in log-perplexity, KL and top-1; "
            f"'better'/'worse' names the metrics whose {pct} interval of the difference excludes 0, otherwise "
            f"'within noise' (always so with one window). Few windows make the intervals optimistic.")
