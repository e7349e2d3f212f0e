"""Scorers, one module per family: each fills an error table (importance x distortion per unit and
option) from a shared, lazily computed ``ScoringContext``.

| scorer | importance | distortion (RTN error dW = W - Q(W)) |
|---|---|---|
| rtn-mse | 1 | sum dW^2 |
| rtn-mse-rel | 1 / ||W||^2 | sum dW^2 |
| alpha | AlphaQ (median a / a)^gamma | Var(W) 2^(-2b), as in the paper |
| alpha-rel | AlphaQ (median a / a)^gamma | sum dW^2 / ||W||^2 |
| hessian | 1 | BAQ/OBS: 1/2 sum_ij dW_ij^2 / [chol(H^-1)]_jj^2 |
| output | 1 | tr(dW H dW^T) |
| taylor | 1 | sum |g * dW|, g the calibration-loss gradient |
| linearity | slope of KL vs injected relative noise | sum dW^2 / ||W||^2 |
| kl | 1 | measured end-to-end KL, unit quantized alone |
| kl-block | 1 | the unit's block-output error, block run alone, times KL per block error measured end to end on a few anchor layers |
| salience | 1 | OBS loss; adds SliM-LLM variants (column groups at b-1/b/b+1 by salience) |
| baq | 1 | OBS loss; adds BAQ variants (column-group bits by equal-loss water-filling) |
| pmq | MC-MoE: f^a w^b per expert (routing frequency, mean routing weight); 1 for dense units | tr(dW H dW^T), H from the expert's routed tokens |

The weight-error pass computes every requested reduction of dW in one sweep
over units and options. Probe measurements (linearity, kl, kl-block) run on a few
windows of *calibration* text and are cached on disk, resumably.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from bitalloc.errors import BitallocError
from bitalloc.scorers.calibrated import score_mixed, score_reduction
from bitalloc.scorers.context import ScorerSettings, ScoringContext
from bitalloc.scorers.moe import score_pmq
from bitalloc.scorers.probes import score_kl, score_kl_block, score_linearity
from bitalloc.scorers.weights import score_alpha, score_weight_error
from bitalloc.table import ErrorTable

__all__ = ["SCORERS", "Scorer", "ScorerSettings", "ScoringContext", "any_calibrated", "any_reads", "check_scorer", "score"]


@dataclass(frozen=True)
class Scorer:
    """One row of the registry: what the scorer measures from (``data``:
    "data-free", "calibration" Grams, or "probe" forwards on calibration text,
    which need the Grams too), the settings it reads, and its table builder
    ``build(ctx, name) -> ErrorTable``."""

    name: str
    data: str
    build: Callable[[ScoringContext, str], ErrorTable]
    reads: frozenset[str] = frozenset()  # ScorerSettings fields that change its table
    mixes_bits: bool = False  # its options give column groups of one tensor different bit-widths
    stronger: str = ""  # how a user gets a table that measures more than the others (the guard's advice)

    @property
    def calibrated(self) -> bool:
        return self.data != "data-free"


_ALPHA = frozenset({"alpha_gamma", "alpha_fit", "alpha_farms"})
_PROBES = frozenset({"probe_windows", "probe_seq_len"})
SCORERS: dict[str, Scorer] = {s.name: s for s in (
    Scorer("rtn-mse", "data-free", score_weight_error),
    Scorer("rtn-mse-rel", "data-free", score_weight_error),
    Scorer("alpha", "data-free", score_alpha, _ALPHA),
    Scorer("alpha-rel", "data-free", score_alpha, _ALPHA),
    Scorer("hessian", "calibration", score_reduction),
    Scorer("output", "calibration", score_reduction),
    Scorer("taylor", "calibration", score_reduction,
           stronger="--scorer taylor (needs a backward pass through the model)"),
    Scorer("linearity", "probe", score_linearity, _PROBES),
    Scorer("kl", "probe", score_kl, _PROBES | {"kl_probes"},
           stronger="--recipe quality (measured tables, refinement and GPTQ; much slower)"),
    Scorer("kl-block", "probe", score_kl_block, _PROBES | {"kl_probes", "kl_anchors"}),
    Scorer("salience", "calibration", score_mixed, mixes_bits=True),
    Scorer("baq", "calibration", score_mixed, mixes_bits=True),
    Scorer("pmq", "calibration", score_pmq),
)}


def any_calibrated(names: Sequence[str]) -> bool:
    """Whether any of the scorers ``names`` needs calibration text."""
    return any(SCORERS[n].calibrated for n in names if n in SCORERS)


def stronger_than(table: str) -> list[str]:
    """Advice for a user whose ``table`` allocation lost to uniform: the ways
    to a table that measures more, leaving out the scorer that made it (a
    table's name is its scorer's, perhaps with "+refined")."""
    used = table.split("+", 1)[0]
    return [s.stronger for s in SCORERS.values() if s.stronger and s.name != used]


def any_reads(names: Sequence[str], setting: str) -> bool:
    """Whether any of the scorers ``names`` reads ``ScorerSettings.<setting>``."""
    return any(setting in SCORERS[n].reads for n in names if n in SCORERS)


def check_scorer(name: str) -> None:
    if name not in SCORERS:
        raise BitallocError(f"The 'scorer' parameter must be one of {sorted(SCORERS)}. Got {name!r} instead.")


def score(ctx: ScoringContext, names: Sequence[str]) -> dict[str, ErrorTable]:
    for n in names:
        check_scorer(n)
    return {n: SCORERS[n].build(ctx, n) for n in names}
