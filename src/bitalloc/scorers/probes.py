"""Scorers that measure the model's output: linearity (Q-Palette/HIGGS
noise-injection slope), kl (exllamav3-style measured KL) and kl-block (block
output error turned into KL by a few end-to-end probes, exllamav2-style)."""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import numpy as np
import torch

from bitalloc.errors import BitallocError, GroupSizeError
from bitalloc.formats import storage_bits
from bitalloc.formats.affine import QuantOption
from bitalloc.formats.affine_rtn import SCALE_SEARCH_VERSION, fake_quantize
from bitalloc.model.units import get_weight, layer_index
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


# An option whose weight error is below this share of a larger option's re-stores the source's own grid (a Q4_K
# tensor of a Q4_K_M file requantized to Q4_K: 100-10,000x below Q5_K on Qwen2.5-Coder-1.5B): its KL is noise.
RESTORES_SOURCE = 0.1
PROBE_PICK_VERSION = 2  # 2: options that re-store the source are never probed (1 probed them: KL ~ 0, table flat)


def restores_source(errors: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """(options,) True where an option's weight error is below
    ``RESTORES_SOURCE`` times that of an option storing more bits: it
    re-stores a grid the source already sits on, not a measure of the unit."""
    out = np.zeros(len(errors), dtype=bool)
    for j in range(len(errors)):
        larger = np.isfinite(errors) & (bits > bits[j])
        out[j] = bool(np.isfinite(errors[j]) and larger.any() and errors[j] < RESTORES_SOURCE * errors[larger].max())
    return out


def unit_probes(ctx: ScoringContext, i: int) -> list:
    """The options at which unit ``i`` is measured: the settings' probe
    options on an integer affine menu; on any other menu (GGUF types, whose
    availability differs per unit) three of the unit's own fitting options,
    the cheapest, the median and the third quartile by stored bits, leaving
    out 16-bit storage, whose KL is too small to fit a power law to, and
    options that re-store an already-quantized source (``restores_source``),
    whose KL is zero up to noise. With ``kl_probes`` below 3 the middle one
    is kept first, then the cheapest."""
    if all(o.is_affine for o in ctx.options):
        picks = [QuantOption.parse(o) for o in ctx.settings.kl_probe_options]
    else:
        unit = ctx.inventory.units[i]
        rel = ctx.reductions(["mse"])["mse"][i]
        bits = np.array([storage_bits(unit.shape, o) if np.isfinite(rel[j]) else 0
                         for j, o in enumerate(ctx.options)], dtype=float)
        restoring = restores_source(rel, bits)
        usable = [j for j, o in enumerate(ctx.options) if np.isfinite(rel[j]) and o.bits < 16]
        fitting = [ctx.options[j] for j in sorted((j for j in usable if not restoring[j]), key=lambda j: bits[j])] \
            or [ctx.options[j] for j in sorted(usable, key=lambda j: bits[j])] \
            or [o for j, o in enumerate(ctx.options) if np.isfinite(rel[j])]
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
    text = ",".join(o.name for o in ctx.options) + f";imatrix={imatrix};picks={PROBE_PICK_VERSION}"
    return "-gguf-" + hashlib.sha256(text.encode()).hexdigest()[:8]


def _probed(ctx: ScoringContext, probe_sets: list, probe: Callable[[int, torch.Tensor], float]):
    """``measure(unit index)``: ``probe(i, W')`` at each of the unit's probe
    options, W' the weight as the plan's quantizer stores it; NaN where an
    option cannot store the unit."""
    def measure(i: int) -> list[float]:
        unit = ctx.inventory.units[i]
        W = get_weight(ctx.model, unit)
        out = []
        for opt in probe_sets[i]:
            try:
                out.append(probe(i, ctx.probe_weight(unit, W, opt)))
            except GroupSizeError:
                out.append(float("nan"))
        return out
    return measure


def _kl_kind(ctx: ScoringContext) -> str:
    """The cache kind of end-to-end kl probes: quantizer, column order, menu."""
    return "kl" + quantizer(ctx.quantizer).tag + ("-act" if ctx.act_order else "") + _menu_key(ctx)


def score_kl(ctx: ScoringContext, name: str) -> ErrorTable:
    """exllamav3-style measured KL, each unit quantized alone at a few probe
    options by the plan's quantizer (RTN, or GPTQ with the unit's Hessian);
    other options interpolated by a power law in the unit's relative RTN
    error, KL = c * rel^p, fitted in log-log through the probes."""
    probe_sets = [unit_probes(ctx, i) for i in range(len(ctx.inventory.units))]
    kls = ctx.measure_per_unit(_kl_kind(ctx), _probed(ctx, probe_sets, ctx.with_weight), len(probe_sets[0]))
    return make_table(ctx, name, _power_law(ctx, probe_sets, kls))


def anchor_layers(layers: Sequence[int], count: int) -> list[int]:
    """``count`` of the distinct ``layers``, spread evenly from the first to
    the last (all of them when there are no more)."""
    distinct = sorted(set(layers))
    if count >= len(distinct):
        return distinct
    return sorted({distinct[k] for k in np.linspace(0, len(distinct) - 1, count).round().astype(int)})


def depth_ratios(layers: Sequence[int], kls: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(anchor layers, log of KL per block error at each): the median over a
    layer's probes where both are positive; a layer without one is left out."""
    logs: dict[int, list[float]] = {}
    for layer, kl, err in zip(layers, kls, errors):
        ok = np.isfinite(kl) & np.isfinite(err) & (kl > 0) & (err > 0)
        logs.setdefault(layer, []).extend(np.log(kl[ok] / err[ok]))
    xs = sorted(k for k, v in logs.items() if v)
    return np.array(xs, dtype=float), np.array([np.median(logs[k]) for k in xs])


def score_kl_block(ctx: ScoringContext, name: str) -> ErrorTable:
    """Block-local kl (exllamav2-style): each unit's probes measure how far
    its own block's output moves, that block run alone on its kept input (a
    forward of one block, not of the tail and the output matrix); the units
    of ``kl_anchors`` layers spread over the depth are probed end to end too,
    and their median KL per block error, interpolated over depth in log
    space, turns every other unit's block error into KL. Units outside the
    blocks (embedding, output matrix) and the anchors keep their measured
    KL. The same power law in the relative weight error as ``kl`` then fills
    the other options."""
    units = ctx.inventory.units
    probe_sets = [unit_probes(ctx, i) for i in range(len(units))]
    width = len(probe_sets[0])
    layer = [layer_index(u.name) for u in units]
    anchors = set(anchor_layers([k for k in layer if k is not None], ctx.settings.kl_anchors))
    ends = [i for i, k in enumerate(layer) if k is None or k in anchors]
    inside = [i for i, k in enumerate(layer) if k is not None]
    kls = ctx.measure_per_unit(_kl_kind(ctx), _probed(ctx, probe_sets, ctx.with_weight), width, only=ends)
    errors = ctx.measure_per_unit(_kl_kind(ctx) + "-block", _probed(ctx, probe_sets, ctx.block_error), width,
                                  only=inside)
    anchored = [i for i in ends if layer[i] is not None]
    xs, ys = depth_ratios([layer[i] for i in anchored], np.array([kls[units[i].name] for i in anchored], dtype=float),
                          np.array([errors[units[i].name] for i in anchored], dtype=float))
    if not len(xs):
        raise BitallocError(f"kl-block: no unit of the anchor layers {sorted(anchors)} measured a positive KL and "
                            "block error, so block errors cannot be turned into KL. Use more --kl-anchors, longer "
                            "probes (--probe-seq-len), or the kl scorer.")
    values = {units[i].name: list(kls[units[i].name]) for i in ends}
    for i in sorted(set(inside) - set(ends)):
        factor = float(np.exp(np.interp(layer[i], xs, ys)))
        values[units[i].name] = [factor * e for e in errors[units[i].name]]
    return make_table(ctx, name, _power_law(ctx, probe_sets, values))


def _power_law(ctx: ScoringContext, probe_sets: list, kls: dict[str, list[float]]) -> np.ndarray:
    """(units, options) KL: each unit's probes fitted by KL = c * rel^p in
    log-log over its relative RTN error (p = 1 through one probe), measured
    values kept where a probe is the option itself; NaN where an option does
    not fit."""
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
    return distortion
