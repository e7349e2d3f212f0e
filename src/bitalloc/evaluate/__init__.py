"""Perplexity over non-overlapping windows, and KL divergence / top-1
agreement against a reference model's next-token distribution, each with
its spread over the windows (see bitalloc.evaluate.stats)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from bitalloc.errors import BitallocError
from bitalloc.evaluate.stats import CONFIDENCE, RESAMPLES, SEED, WindowSums, intervals
from bitalloc.evaluate.text import LARGE_TEXT_CAP, LargeText, Text, token_ids

BOS_MODES = ("auto", "yes", "no")


@dataclass(frozen=True)
class EvalSettings:
    seq_len: int = 512
    windows: int = 8
    bos: str = "auto"  # auto: prepend BOS only if the tokenizer adds one by itself

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise BitallocError(f"The 'seq_len' parameter must be at least 2. Got {self.seq_len} instead.")
        if self.windows < 1:
            raise BitallocError(f"The 'windows' parameter must be at least 1. Got {self.windows} instead.")
        if self.bos not in BOS_MODES:
            raise BitallocError(f"The 'bos' parameter must be one of {list(BOS_MODES)}. Got {self.bos!r} instead.")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EvalResult:
    ppl: float
    nll: float  # mean negative log-likelihood, nats per token
    tokens: int  # predicted tokens
    kl: float | None = None  # mean KL(reference || model), nats per token
    top1: float | None = None  # share of positions where both argmax agree
    window_sums: WindowSums | None = None  # the per-window sums behind the totals

    @classmethod
    def from_windows(cls, w: WindowSums) -> EvalResult:
        count = sum(w.tokens)
        mean = sum(w.nll_sum) / count
        return cls(ppl=math.exp(mean), nll=mean, tokens=count,
                   kl=None if w.kl_sum is None else sum(w.kl_sum) / count,
                   top1=None if w.top1_agree is None else sum(w.top1_agree) / count, window_sums=w)

    def to_dict(self) -> dict:
        """The totals; with window sums also, for ppl, kl and top1, ``<name>_ci``
        ([lo, hi], 95 % bootstrap over windows) and ``<name>_se`` (standard
        error; None with one window), the sums themselves, and how the
        intervals were drawn."""
        out = {k: getattr(self, k) for k in ("ppl", "nll", "tokens", "kl", "top1")}
        if self.window_sums is None:
            return out
        for name, iv in intervals(self.window_sums).items():
            out[f"{name}_ci"] = None if iv is None else [iv.lo, iv.hi]
            out[f"{name}_se"] = None if iv is None else iv.se
        out["window_sums"] = self.window_sums.to_dict()
        out["ci_method"] = {"kind": "percentile bootstrap over windows", "confidence": CONFIDENCE,
                            "resamples": RESAMPLES, "seed": SEED}
        return out


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def _text_ids(tokenizer, text: Text, settings: EvalSettings, *, spread: bool) -> tuple[list[int], int, bool]:
    """(token ids of the text, text tokens per window, whether rows start with
    BOS). A large file is tokenized only as far as the windows need: from the
    start (consecutive windows) or over its first part (``spread``)."""
    use_bos = settings.bos == "yes" or (settings.bos == "auto" and _adds_bos(tokenizer))
    if use_bos and tokenizer.bos_token_id is None:
        raise BitallocError("--bos yes was given but the tokenizer has no BOS token.")
    body = settings.seq_len - 1 if use_bos else settings.seq_len
    return token_ids(tokenizer, text, None if spread else settings.windows * body), body, use_bos


def _rows(tokenizer, ids: list[int], starts: list[int], body: int, use_bos: bool) -> torch.Tensor:
    rows = torch.tensor([ids[s : s + body] for s in starts], dtype=torch.long).reshape(len(starts), body)
    if use_bos:
        rows = torch.cat([torch.full((len(starts), 1), tokenizer.bos_token_id, dtype=torch.long), rows], dim=1)
    return rows


def token_windows(tokenizer, text: Text, settings: EvalSettings) -> torch.Tensor:
    """(windows, L) token ids: consecutive, non-overlapping slices of the text
    from its start; with BOS each row is [BOS] + seq_len - 1 text tokens."""
    ids, body, use_bos = _text_ids(tokenizer, text, settings, spread=False)
    available = len(ids) // body
    if available < settings.windows:
        has = f"The text has {len(ids)} tokens" if not isinstance(text, LargeText) else \
            f"The first {LARGE_TEXT_CAP >> 20} MB of {text.path!r} (all bitalloc reads of a large file) hold " \
            f"{len(ids)} tokens"
        raise BitallocError(
            f"{has}: enough for {available} windows of {settings.seq_len}, not "
            f"{settings.windows}. Use fewer --windows, a shorter --seq-len, or a longer --text."
        )
    return _rows(tokenizer, ids, [i * body for i in range(settings.windows)], body, use_bos)


def spread_windows(tokenizer, text: Text, settings: EvalSettings, clear_of: EvalSettings | None = None,
                   flags: str = "fewer --calib-windows, a shorter --calib-seq-len or a longer --calib-text"
                   ) -> torch.Tensor:
    """(windows, L) token ids spread over the whole text, for calibration: the
    token stream is cut into ``settings.windows`` equal strides and each
    window is the start of its stride, so the windows sample every part of
    the text (many articles), not its first pages. With ``clear_of`` (the
    spread windows to keep clear of, e.g. those GPTQ was fitted on), the
    windows lie in the gaps those leave instead, round-robin: the k-th right
    after window k mod W of ``clear_of``, later rounds further into the gap."""
    ids, body, use_bos = _text_ids(tokenizer, text, settings, spread=True)
    if clear_of is None:
        stride = len(ids) // settings.windows
        if stride < body:
            raise BitallocError(f"The text has {len(ids)} tokens: enough for {len(ids) // body} windows of "
                                f"{settings.seq_len}, not {settings.windows}. Use {flags}.")
        return _rows(tokenizer, ids, [i * stride for i in range(settings.windows)], body, use_bos)
    held = clear_of.windows
    fitted = clear_of.seq_len - (1 if use_bos else 0)
    stride = len(ids) // held
    room = held * max(stride - fitted, 0) // body
    if room < settings.windows:
        raise BitallocError(
            f"The text has {len(ids)} tokens: its {held} calibration windows of {clear_of.seq_len} (spread over "
            f"it) leave room for {room} held-out windows of {settings.seq_len}, not {settings.windows}. Use {flags}, "
            "fewer --calib-windows or a longer --calib-text.")
    starts = [(k % held) * stride + fitted + (k // held) * body for k in range(settings.windows)]
    return _rows(tokenizer, ids, starts, body, use_bos)


@torch.no_grad()
def window_logprobs(model, row: torch.Tensor) -> torch.Tensor:
    """(L-1, vocab) float32 log-probabilities of the next token."""
    logits = model(row[None, :]).logits[0, :-1].float()  # (L-1, V)
    return F.log_softmax(logits, dim=-1)


@torch.no_grad()
def reference_logprobs(model, windows: torch.Tensor, *, progress: Callable | None = None) -> list[torch.Tensor]:
    rows = progress(list(windows), desc="reference", unit="window") if progress else list(windows)
    return [window_logprobs(model, r) for r in rows]


def reference_result(windows: torch.Tensor, reference: list[torch.Tensor]) -> EvalResult:
    """Perplexity of the reference itself, from its stored log-probs (no second
    pass); KL is 0 and top-1 agreement 1 exactly, in every window."""
    nll = [float(-ref.gather(1, row[1:, None]).sum()) for row, ref in zip(windows, reference)]
    tokens = [row.numel() - 1 for row in windows]
    return EvalResult.from_windows(WindowSums(tuple(tokens), tuple(nll), (0.0,) * len(tokens), tuple(tokens)))


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, reference: list[torch.Tensor] | None = None, *,
             progress: Callable | None = None, desc: str = "evaluating") -> EvalResult:
    """Perplexity of ``model`` on ``windows``; with ``reference`` (log-probs of
    the reference model on the same windows) also KL and top-1 agreement.
    The result keeps the sums of every window for intervals and paired comparisons."""
    nll, kl, agree, tokens = [], [], [], []
    rows = progress(list(enumerate(windows)), desc=desc, unit="window") if progress else enumerate(windows)
    for i, row in rows:
        logp = window_logprobs(model, row)  # (L-1, V)
        targets = row[1:]  # (L-1,)
        nll.append(float(-logp.gather(1, targets[:, None]).sum()))
        tokens.append(targets.numel())
        if reference is not None:
            ref = reference[i]  # (L-1, V)
            kl.append(float((ref.exp() * (ref - logp)).sum()))
            agree.append(int((ref.argmax(-1) == logp.argmax(-1)).sum()))
    with_ref = reference is not None
    return EvalResult.from_windows(WindowSums(tuple(tokens), tuple(nll), tuple(kl) if with_ref else None,
                                              tuple(agree) if with_ref else None))
