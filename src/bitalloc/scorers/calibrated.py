"""Scorers from calibration statistics: OBS/BAQ loss (hessian), output
error (output), first-order Taylor (taylor), and the mixed column-group
variants of SliM-LLM (salience) and BAQ (baq)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from bitalloc.formats.affine import QuantOption
from bitalloc.formats.affine_rtn import fake_quantize
from bitalloc.model.units import get_weight
from bitalloc.scorers.context import ScoringContext, make_table
from bitalloc.table import ErrorTable


def score_reduction(ctx: ScoringContext, name: str) -> ErrorTable:
    kind = {"hessian": "obs", "output": "output", "taylor": "taylor"}[name]
    return make_table(ctx, name, ctx.reductions([kind])[kind])


def group_obs_errors(W: torch.Tensor, obs_weight: torch.Tensor, option: QuantOption,
                     bits_range: Sequence[int], importance: torch.Tensor | None = None) -> np.ndarray:
    """(len(bits_range), groups): the OBS loss 1/2 sum d_j dW_ij^2 of each
    column group when the whole tensor is quantized at each bit-width (scales
    searched under ``importance`` when given, as the plan will quantize). The
    loss is separable over column groups (so is the search), so any mix is a
    sum of entries."""
    g = option.group_size
    out = []
    for b in bits_range:
        dW = W - fake_quantize(W, QuantOption(b, g, option.symmetric), importance=importance)  # (out, in)
        col = (dW.double() ** 2).sum(0) * obs_weight.double()  # (in,)
        out.append(0.5 * col.reshape(-1, g).sum(1).numpy())
    return np.array(out)


def score_mixed(ctx: ScoringContext, name: str) -> ErrorTable:
    """OBS-loss table whose menu adds, for every grouped option, a mixed
    variant with per-column-group bit-widths of the same mean."""
    from bitalloc.scorers.mixed import MAX_BITS, MIN_BITS, group_salience, slim_bits, waterfill_bits

    kind = "slim" if name == "salience" else "baq"
    mixed = [QuantOption(o.bits, o.group_size, o.symmetric, kind) for o in ctx.options if o.group_size > 0]
    options = ctx.options + tuple(mixed)
    base = ctx.reductions(["obs"])["obs"]  # (units, base options)
    distortion = np.full((len(ctx.inventory.units), len(options)), np.nan)
    distortion[:, : len(ctx.options)] = base
    column_bits: dict[str, dict[str, tuple[int, ...]]] = {}
    bits_range = list(range(MIN_BITS, MAX_BITS + 1))
    for i, unit in enumerate(ctx.iterate(ctx.inventory.units, f"scoring ({name} column groups)")):
        W = get_weight(ctx.model, unit)
        d = ctx.obs_weights[unit.name]
        per_layout: dict[tuple[int, bool], np.ndarray] = {}
        for j, opt in enumerate(mixed, start=len(ctx.options)):
            if W.shape[1] % opt.group_size:
                continue
            layout = (opt.group_size, opt.symmetric)
            if layout not in per_layout:
                per_layout[layout] = group_obs_errors(W, d, opt, bits_range, ctx.importance_of(unit, opt))
            E = per_layout[layout]  # (bits, groups)
            cost = lambda bits: float(sum(E[b - MIN_BITS, k] for k, b in enumerate(bits)))  # noqa: E731
            sal = group_salience(W, d, opt.group_size)
            bits = slim_bits(sal, opt.bits, cost) if kind == "slim" else waterfill_bits(sal, opt.bits)
            distortion[i, j] = cost(bits)
            column_bits.setdefault(unit.name, {})[opt.name] = bits
    names = tuple(u.name for u in ctx.inventory.units)
    return ErrorTable(name, ctx.inventory.content_id, names, options, distortion, np.ones(len(names)), None, column_bits)


# name -> (what it needs, function). "data-free": weights only.
