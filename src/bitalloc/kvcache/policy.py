"""Per-token precision (Don't Waste Bits): every token's keys and values, in
every layer and head, get one codec from a ladder (e.g. int2 < int4 < int8 <
f16), chosen when the token is written from features known at that moment.

The rule here uses two features a runtime has at write time:
- the first ``sink`` positions (attention sinks: every later query attends to
  them) take the ladder's top codec;
- every other token is scored by its surprisal under the calibration text's
  unigram counts (rare tokens — names, numbers — carry the content later
  tokens look up) and takes the upper of the two ladder codecs around the
  budget when its surprisal is above a threshold fitted on the calibration
  text, so that the calibration text's average bits equal the budget;
- a token bucket keeps it there on any text: a token steps down the ladder
  while its codec would lift the bits written so far above budget × tokens
  so far (the sinks are paid back first).

Thresholds are fitted once; the realized average on another text is at most
the budget (once a window is longer than the sinks' pay-back) and reports
give it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from bitalloc.errors import BitallocError
from bitalloc.formats.kv import KVCodec, parse_codec

DEFAULT_LADDER = ("int2", "int4", "int8", "f16")  # the paper's {2, 4, 8, 16} bits
DEFAULT_SINK = 4


@dataclass(frozen=True)
class TokenPolicy:
    ladder: tuple[str, ...]  # codec names, cheapest first
    low: int  # ladder index of the codec below the threshold
    high: int  # ladder index above it
    threshold: float  # surprisal (nats) at or above which a token takes ``high``
    sink: int
    surprisal: torch.Tensor  # (vocab,) float64 nats, from the calibration text's unigram counts
    budget_bpe: float

    @property
    def codecs(self) -> tuple[KVCodec, ...]:
        return tuple(parse_codec(n) for n in self.ladder)

    def levels(self, ids: torch.Tensor, head_dim: int) -> torch.Tensor:
        """(L,) ladder index of every position of ``ids`` (L,), decided in order
        as a runtime writes them: sinks take the top codec; any other token
        takes ``high`` when its surprisal reaches the threshold, else ``low``,
        and steps down the ladder while taking it would lift the bits written
        so far above ``budget × tokens so far`` (a token bucket: on any text
        the window stays within the budget once the sinks are paid back)."""
        bits = [c.vector_bits(head_dim) / head_dim for c in self.codecs]
        s = self.surprisal[ids.clamp(0, len(self.surprisal) - 1)].tolist()  # (L,)
        top, out, spent = len(self.ladder) - 1, [], 0.0
        for t, score in enumerate(s):
            level = top if t < self.sink else self.high if score >= self.threshold else self.low
            if t >= self.sink:
                while level > 0 and spent + bits[level] > self.budget_bpe * (t + 1) + 1e-9:
                    level -= 1
            out.append(level)
            spent += bits[level]
        return torch.tensor(out, dtype=torch.int64)

    def bits_per_element(self, ids: torch.Tensor, head_dim: int) -> float:
        """Average stored bits per cached value over the positions of ``ids`` (L,)."""
        bits = torch.tensor([c.vector_bits(head_dim) / head_dim for c in self.codecs])
        return float(bits[self.levels(ids, head_dim)].mean())

    def describe(self) -> str:
        return (f"first {self.sink} tokens {self.ladder[-1]}; others {self.ladder[self.high]} when unigram "
                f"surprisal >= {self.threshold:.2f} nats, else {self.ladder[self.low]}")

    def to_dict(self) -> dict:
        return {"ladder": list(self.ladder), "low": self.ladder[self.low], "high": self.ladder[self.high],
                "threshold_nats": self.threshold, "sink": self.sink, "feature": "unigram surprisal",
                "budget_bpe": self.budget_bpe, "rule": self.describe()}


def unigram_surprisal(calib_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """(vocab,) -log p(token) from the counts in ``calib_ids`` (any shape), add-one smoothed.
    Tokens of equal counts are told apart by their id (a BPE vocabulary's later
    merges are the rarer tokens), by less than any difference of counts, so a
    threshold can split them and the budget is met closely."""
    counts = torch.bincount(calib_ids.flatten().clamp(0, vocab - 1), minlength=vocab).to(torch.float64) + 1.0
    surprisal = -(counts / counts.sum()).log()  # (vocab,)
    smallest_gap = math.log1p(1.0 / (float(counts.max()) + 1))  # between two different counts
    return (surprisal + smallest_gap * 0.5 * torch.arange(vocab, dtype=torch.float64) / vocab).to(torch.float64)


def fit_policy(calib_rows: torch.Tensor, vocab: int, head_dim: int, budget_bpe: float,
               ladder: Sequence[str] = DEFAULT_LADDER, sink: int = DEFAULT_SINK) -> TokenPolicy:
    """The rule whose average bits on ``calib_rows`` (windows, L) equal ``budget_bpe``:
    the two ladder codecs around the budget, the share of the upper one chosen
    so the sink tokens and the rest average to the budget, its threshold the
    matching surprisal quantile of the calibration tokens."""
    codecs = [parse_codec(n) for n in ladder]
    bits = [c.vector_bits(head_dim) / head_dim for c in codecs]
    if any(b2 <= b1 for b1, b2 in zip(bits, bits[1:])):
        raise BitallocError(f"The per-token ladder {list(ladder)} must go from fewer to more bits per value "
                            f"(at head dimension {head_dim}: {[round(b, 3) for b in bits]}).")
    L = calib_rows.shape[1]
    n_sink = min(sink, L)
    rest = L - n_sink
    # the average the non-sink tokens must reach so that the whole window averages the budget
    target = (budget_bpe * L - bits[-1] * n_sink) / max(rest, 1)
    if not bits[0] <= target <= bits[-1] or rest == 0:
        lo_b = (bits[0] * rest + bits[-1] * n_sink) / L
        raise BitallocError(f"A per-token budget of {budget_bpe} bits per value is outside what the ladder "
                            f"{list(ladder)} reaches with {n_sink} sink tokens in windows of {L}: "
                            f"[{lo_b:.3f}, {bits[-1]:.3f}]. Choose a budget in that range.")
    high = next(i for i, b in enumerate(bits) if b >= target)
    low = max(high - 1, 0)
    share_high = 0.0 if high == low else (target - bits[low]) / (bits[high] - bits[low])  # of non-sink tokens
    surprisal = unigram_surprisal(calib_rows, vocab)
    scores = np.sort(surprisal[calib_rows[:, n_sink:].clamp(0, vocab - 1)].flatten().numpy())[::-1]  # descending
    k = int(math.floor(share_high * scores.size))  # tokens that take the upper codec
    # the k-th largest score: strictly-above-the-next ties are resolved downwards, so the budget is not exceeded
    threshold = float("inf") if k == 0 else float(np.nextafter(scores[k - 1], np.inf)) \
        if k < scores.size and scores[k] == scores[k - 1] else float(scores[k - 1])
    return TokenPolicy(tuple(ladder), low, high, threshold, n_sink, surprisal, float(budget_bpe))
