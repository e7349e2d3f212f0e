"""Scorers that measure the model's output: linearity (Q-Palette/HIGGS
noise-injection slope) and kl (exllamav3-style measured KL)."""

from __future__ import annotations

import numpy as np
import torch

from bitalloc.errors import GroupSizeError
from bitalloc.formats.affine import QuantOption
from bitalloc.formats.affine_rtn import fake_quantize
from bitalloc.scorers.context import ScoringContext, make_table
from bitalloc.scoring import ErrorTable
from bitalloc.units import get_weight

def score_linearity(ctx: ScoringContext, name: str) -> ErrorTable:
    """Q-Palette/HIGGS: KL ~ a_l * relative MSE; a_l fitted through the origin
    from Gaussian noise injected into one unit at a time."""
    levels = np.array(ctx.settings.noise_levels)

    def measure(i: int) -> list[float]:
        unit = ctx.inventory.units[i]
        W = get_weight(ctx.model, unit)
        g = torch.Generator().manual_seed(ctx.settings.seed * 100_003 + i)
        noise = torch.randn(W.shape, generator=g)
        noise *= (W.double().pow(2).sum() / noise.double().pow(2).sum()).sqrt().float()  # ||noise|| = ||W||
        return [ctx.with_weight(i, W + float(np.sqrt(r)) * noise) for r in levels]

    kls = ctx.measure_per_unit("linearity", measure, len(levels))
    slope = np.array([np.dot(levels, kls[u.name]) / np.dot(levels, levels) for u in ctx.inventory.units])
    rel = ctx.reductions(["mse"])["mse"] / ctx.norms[:, None]
    return make_table(ctx, name, rel, np.maximum(slope, 0.0))


def _relative_error(ctx: ScoringContext, option: QuantOption) -> np.ndarray:
    """(units,) ||W - RTN(W)||^2 / ||W||^2, a ragged last group allowed (as the kl probes do)."""
    out = []
    for u in ctx.inventory.units:
        W = get_weight(ctx.model, u)
        out.append(float(((W - fake_quantize(W, option, allow_ragged=True)) ** 2).sum() / (W**2).sum()))
    return np.array(out)


def score_kl(ctx: ScoringContext, name: str) -> ErrorTable:
    """exllamav3-style measured KL, each unit quantized alone at a few probe
    options by the plan's quantizer (RTN, or GPTQ with the unit's Hessian);
    other options interpolated by a power law in the unit's relative RTN
    error, KL = c * rel^p, fitted in log-log through the probes."""
    probes = [QuantOption.parse(o) for o in ctx.settings.kl_probe_options]

    def measure(i: int) -> list[float]:
        unit = ctx.inventory.units[i]
        W = get_weight(ctx.model, unit)
        out = []
        for opt in probes:
            try:
                out.append(ctx.with_weight(i, ctx.probe_weight(unit, W, opt)))
            except GroupSizeError:
                out.append(float("nan"))
        return out

    kls = ctx.measure_per_unit("kl" if ctx.quantizer == "rtn" else f"kl-{ctx.quantizer}", measure, len(probes))
    rel = ctx.reductions(["mse"])["mse"] / ctx.norms[:, None]  # (units, options)
    def probe_column(o: QuantOption) -> np.ndarray:
        if o in ctx.options and np.isfinite(col := rel[:, ctx.options.index(o)]).all():
            return col  # already measured in the weight-error sweep
        return _relative_error(ctx, o)

    probe_rel = np.stack([probe_column(o) for o in probes], axis=1)  # (units, probes)
    distortion = np.empty_like(rel)
    for i, u in enumerate(ctx.inventory.units):
        y = np.log(np.maximum(np.array(kls[u.name]), 1e-12))
        x = np.log(np.maximum(probe_rel[i], 1e-30))
        p, c = np.polyfit(x, y, 1) if len(set(x)) > 1 else (1.0, y[0] - x[0])
        distortion[i] = np.exp(c + p * np.log(np.maximum(rel[i], 1e-30)))
        for j, opt in enumerate(ctx.options):  # measured values where a probe matches exactly
            if opt in probes:
                distortion[i, j] = max(kls[u.name][probes.index(opt)], 0.0)
    distortion[np.isnan(rel)] = np.nan
    return make_table(ctx, name, distortion)
