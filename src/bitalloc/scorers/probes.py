"""Scorers that measure the model's output: linearity (Q-Palette/HIGGS
noise-injection slope) and kl (exllamav3-style measured KL)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from bitalloc.errors import GroupSizeError
from bitalloc.formats import storage_bits
from bitalloc.formats.affine import QuantOption
from bitalloc.formats.affine_rtn import SCALE_SEARCH_VERSION, fake_quantize
from bitalloc.model.units import get_weight
from bitalloc.quantizers import quantizer
from bitalloc.scorers.context import ScoringContext, importance_digest, make_table
from bitalloc.table import ErrorTable


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
    """(units,) ||W - RTN(W)||^2 / ||W||^2, a ragged last group allowed (as the
    kl probes do), scales searched under the unit's importance vector if any."""
    out = []
    for u in ctx.inventory.units:
        W = get_weight(ctx.model, u)
        dW = W - fake_quantize(W, option, allow_ragged=True, importance=ctx.importance_of(u, option))
        out.append(float((dW**2).sum() / (W**2).sum()))
    return np.array(out)


def unit_probes(ctx: ScoringContext, i: int) -> list:
    """The options at which unit ``i`` is measured: the settings' probe
    options on an integer affine menu; on any other menu (GGUF types, whose
    availability differs per unit) three of the unit's own fitting options,
    the cheapest, the median and the third quartile by stored bits, leaving
    out 16-bit storage, whose KL is too small to fit a power law to. With
    ``kl_probes`` below 3 the middle one is kept first, then the cheapest."""
    if all(o.is_affine for o in ctx.options):
        picks = [QuantOption.parse(o) for o in ctx.settings.kl_probe_options]
    else:
        unit = ctx.inventory.units[i]
        rel = ctx.reductions(["mse"])["mse"][i]
        fitting = sorted((o for j, o in enumerate(ctx.options) if np.isfinite(rel[j]) and o.bits < 16),
                         key=lambda o: storage_bits(unit.shape, o))
        if not fitting:
            fitting = [o for j, o in enumerate(ctx.options) if np.isfinite(rel[j])]
        picks = [fitting[0], fitting[len(fitting) // 2], fitting[(3 * len(fitting)) // 4]]
    keep = sorted((1, 0, 2)[: ctx.settings.kl_probes])
    return [picks[k] for k in keep]


def _menu_key(ctx: ScoringContext) -> str:
    """What decides how each unit's probes quantize besides the kind: '' on
    an integer menu with plain min/max scales; with an importance matrix, its
    digest and the version of the scale search (``SCALE_SEARCH_VERSION``), so
    probes measured with other scales are never reused; on a GGUF menu, the
    menu and the matrix, since both decide what each unit's probes are."""
    imatrix = importance_digest(ctx.importance)
    if all(o.is_affine for o in ctx.options):
        if not ctx.importance:
            return ""
        return f"-search{SCALE_SEARCH_VERSION}-{imatrix[:8]}"
    text = ",".join(o.name for o in ctx.options) + f";imatrix={imatrix}"
    return "-gguf-" + hashlib.sha256(text.encode()).hexdigest()[:8]


def score_kl(ctx: ScoringContext, name: str) -> ErrorTable:
    """exllamav3-style measured KL, each unit quantized alone at a few probe
    options by the plan's quantizer (RTN, or GPTQ with the unit's Hessian);
    other options interpolated by a power law in the unit's relative RTN
    error, KL = c * rel^p, fitted in log-log through the probes."""
    probe_sets = [unit_probes(ctx, i) for i in range(len(ctx.inventory.units))]

    def measure(i: int) -> list[float]:
        unit = ctx.inventory.units[i]
        W = get_weight(ctx.model, unit)
        out = []
        for opt in probe_sets[i]:
            try:
                out.append(ctx.with_weight(i, ctx.probe_weight(unit, W, opt)))
            except GroupSizeError:
                out.append(float("nan"))
        return out

    kind = "kl" + quantizer(ctx.quantizer).tag + ("-act" if ctx.act_order else "") \
        + _menu_key(ctx)
    kls = ctx.measure_per_unit(kind, measure, len(probe_sets[0]))
    rel = ctx.reductions(["mse"])["mse"] / ctx.norms[:, None]  # (units, options)
    def probe_column(o: QuantOption) -> np.ndarray:
        if o in ctx.options and np.isfinite(col := rel[:, ctx.options.index(o)]).all():
            return col  # already measured in the weight-error sweep
        return _relative_error(ctx, o)

    shared = probe_sets and all(s == probe_sets[0] for s in probe_sets)
    columns = {o: probe_column(o) for o in probe_sets[0]} if shared else {}
    distortion = np.empty_like(rel)
    for i, u in enumerate(ctx.inventory.units):
        probes = probe_sets[i]
        x_rel = np.array([columns[o][i] if shared else rel[i, ctx.options.index(o)] for o in probes])
        keep = np.isfinite(np.array(kls[u.name], dtype=float)) & np.isfinite(x_rel)
        y = np.log(np.maximum(np.array(kls[u.name], dtype=float)[keep], 1e-12))
        x = np.log(np.maximum(x_rel[keep], 1e-30))
        p, c = np.polyfit(x, y, 1) if len(set(x)) > 1 else (1.0, y[0] - x[0])
        distortion[i] = np.exp(c + p * np.log(np.maximum(rel[i], 1e-30)))
        for j, opt in enumerate(ctx.options):  # measured values where a probe matches exactly
            if opt in probes and np.isfinite(kls[u.name][probes.index(opt)]):
                distortion[i, j] = max(kls[u.name][probes.index(opt)], 0.0)
    distortion[np.isnan(rel)] = np.nan
    return make_table(ctx, name, distortion)
