"""Data-free scorers: weight error (rtn-mse, rtn-mse-rel) and AlphaQ's
heavy-tail importance (alpha, alpha-rel)."""

from __future__ import annotations

import numpy as np

from bitalloc.scorers.alpha import alpha_importance, unit_alpha
from bitalloc.scorers.context import ScoringContext, make_table
from bitalloc.table import WEIGHT_ERROR_IMPORTANCE, ErrorTable


def score_weight_error(ctx: ScoringContext, name: str) -> ErrorTable:
    mse = ctx.reductions(["mse"])["mse"]
    return make_table(ctx, name, mse, WEIGHT_ERROR_IMPORTANCE[name](ctx.norms), ctx.norms)


def alphas(ctx: ScoringContext) -> np.ndarray:
    s = ctx.settings
    return np.array([unit_alpha(ctx.weight(u), fit=s.alpha_fit, farms=s.alpha_farms, seed=s.seed + i)
                     for i, u in enumerate(ctx.iterate(ctx.inventory.units, "alpha (spectra)"))])


def score_alpha(ctx: ScoringContext, name: str) -> ErrorTable:
    importance = alpha_importance(alphas(ctx), ctx.settings.alpha_gamma)
    if name == "alpha":  # the paper: Var(W) 2^(-2b), blind to group size and overhead
        var = np.array([float(ctx.weight(u).double().var()) for u in ctx.inventory.units])
        bits = np.array([o.bits for o in ctx.options], dtype=float)
        distortion = var[:, None] * 2.0 ** (-2 * bits)[None, :]
        distortion[np.isnan(ctx.reductions(["mse"])["mse"])] = np.nan
    else:
        distortion = ctx.reductions(["mse"])["mse"] / ctx.norms[:, None]
    return make_table(ctx, name, distortion, importance)
