"""Scorers: each fills an error table (importance x distortion per unit and
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
| salience | 1 | OBS loss; adds SliM-LLM variants (column groups at b-1/b/b+1 by salience) |
| baq | 1 | OBS loss; adds BAQ variants (column-group bits by equal-loss water-filling) |

The weight-error pass computes every requested reduction of dW in one sweep
over units and options. Probe measurements (linearity, kl) run on a few
windows of *calibration* text and are cached on disk, resumably.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from bitalloc.alpha import alpha_importance, unit_alpha
from bitalloc.calib import CalibSettings, cached_hessians, calibration_windows
from bitalloc.errors import BitallocError, GroupSizeError
from bitalloc.evaluate import EvalSettings, evaluate, reference_logprobs, token_windows
from bitalloc.fileio import write_json
from bitalloc.gptq import inverse_hessian_factor
from bitalloc.options import QuantOption, group_count
from bitalloc.quant import fake_quantize
from bitalloc.scoring import WEIGHT_ERROR_IMPORTANCE, ErrorTable
from bitalloc.text import cache_dir
from bitalloc.units import check_finite, get_weight, set_weight

PROBE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ScorerSettings:
    alpha_gamma: float = 1.0  # AlphaQ's CLI default; its ablation favours 10-15 on MoE models
    alpha_fit: str = "hill"  # or "ks"
    alpha_farms: bool = False
    probe_windows: int = 2  # linearity / kl probe set, from the calibration text
    probe_seq_len: int = 128
    noise_levels: tuple[float, ...] = (0.01, 0.05)  # relative MSE of injected noise (linearity)
    kl_probe_options: tuple[str, ...] = ("int2-g64-asym", "int3-g64-asym", "int4-g64-asym")
    damp: float = 0.01
    taylor_windows: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.alpha_fit not in ("hill", "ks"):
            raise BitallocError(f"The 'alpha_fit' parameter must be 'hill' or 'ks'. Got {self.alpha_fit!r} instead.")

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


class ScoringContext:
    """Everything scorers share, computed once on first use."""

    def __init__(self, model, tokenizer, inventory, options: Sequence[QuantOption], *, calib_text: str | None = None,
                 calib: CalibSettings = CalibSettings(), settings: ScorerSettings = ScorerSettings(),
                 allow_ragged: bool = False, progress: Callable | None = None):
        self.model, self.tokenizer, self.inventory = model, tokenizer, inventory
        self.options = tuple(options)
        self.calib_text, self.calib, self.settings = calib_text, calib, settings
        self.allow_ragged, self.progress = allow_ragged, progress
        self._reductions: dict[str, np.ndarray] = {}

    def iterate(self, items, desc: str):
        return self.progress(items, desc=desc, unit="tensor") if self.progress else items

    def _need_text(self) -> str:
        if self.calib_text is None or self.tokenizer is None:
            raise BitallocError("This scorer needs calibration text and a tokenizer (--calib-text, or the default text).")
        return self.calib_text

    # ---- calibration data -------------------------------------------------
    @cached_property
    def hessians(self) -> dict[str, torch.Tensor]:
        return cached_hessians(self.model, self.inventory, self.tokenizer, self._need_text(), self.calib,
                               progress=self.progress)

    @cached_property
    def obs_weights(self) -> dict[str, torch.Tensor]:
        """1 / [chol(H^-1)]_jj^2 per input column (cols,), per unit."""
        out = {}
        for name, H in self.hessians.items():
            U, _ = inverse_hessian_factor(H, self.settings.damp)
            out[name] = (1.0 / torch.diag(U) ** 2).float()
        return out

    @cached_property
    def gradients(self) -> dict[str, torch.Tensor]:
        """Mean gradient of the calibration NLL w.r.t. each unit's (out, in) weight."""
        windows = calibration_windows(self.tokenizer, self._need_text(),
                                      CalibSettings(self.settings.taylor_windows, self.calib.seq_len))
        params = {u.param for u in self.inventory.units}
        for name, p in self.model.named_parameters():
            p.requires_grad_(name in params)
            p.grad = None
        rows = self.progress(list(windows), desc="gradients", unit="window") if self.progress else windows
        for row in rows:
            loss = self.model(row[None, :], labels=row[None, :]).loss / len(windows)
            loss.backward()
        out = {}
        for u in self.inventory.units:
            p = self.model.get_parameter(u.param)
            g = p.grad if u.index is None else p.grad[u.index]
            out[u.name] = (g.t() if u.transposed else g).detach().float().clone()
        for p in self.model.parameters():
            p.grad = None
            p.requires_grad_(False)
        return out

    @cached_property
    def probe(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(windows, reference log-probs) of the probe set (calibration text)."""
        text = self._need_text()
        # the first windows of the calibration text: never evaluation text
        windows = token_windows(self.tokenizer, text, EvalSettings(self.settings.probe_seq_len,
                                                                   self.settings.probe_windows, "auto"))
        return windows, reference_logprobs(self.model, windows)

    def probe_kl(self) -> float:
        """Mean KL(reference || current model) on the probe set, nats/token."""
        windows, ref = self.probe
        return evaluate(self.model, windows, ref).kl

    # ---- one sweep of RTN errors, several reductions ---------------------
    def reductions(self, kinds: Sequence[str]) -> dict[str, np.ndarray]:
        """(units, options) arrays: 'mse' sum dW^2, 'obs' OBS loss, 'output'
        tr(dW H dW^T), 'taylor' sum |g dW|; NaN where an option does not fit."""
        todo = [k for k in kinds if k not in self._reductions]
        if todo:
            self._sweep(todo)
        return {k: self._reductions[k] for k in kinds}

    @cached_property
    def norms(self) -> np.ndarray:
        return np.array([float((get_weight(self.model, u).double() ** 2).sum()) for u in self.inventory.units])

    def _sweep(self, kinds: list[str]) -> None:
        units = self.inventory.units
        out = {k: np.full((len(units), len(self.options)), np.nan) for k in kinds}
        extra = {"obs": lambda: self.obs_weights, "output": lambda: self.hessians, "taylor": lambda: self.gradients}
        data = {k: extra[k]() for k in kinds if k in extra}
        for i, unit in enumerate(self.iterate(units, "scoring (RTN errors)")):
            W = get_weight(self.model, unit)  # (out, in)
            check_finite(W, unit)
            for j, opt in enumerate(self.options):
                try:
                    group_count(W.shape[1], opt, allow_ragged=self.allow_ragged, name=unit.param)
                except GroupSizeError:
                    continue
                dW = W - fake_quantize(W, opt, allow_ragged=self.allow_ragged)  # (out, in)
                sq = dW.double() ** 2
                for k in kinds:
                    if k == "mse":
                        out[k][i, j] = float(sq.sum())
                    elif k == "obs":
                        out[k][i, j] = 0.5 * float((sq.sum(0) * data["obs"][unit.name].double()).sum())
                    elif k == "output":
                        out[k][i, j] = float(((dW @ data["output"][unit.name]) * dW).sum(dtype=torch.float64))
                    elif k == "taylor":
                        out[k][i, j] = float((data["taylor"][unit.name] * dW).abs().sum(dtype=torch.float64))
        self._reductions.update(out)

    # ---- probe measurements (cached on disk, resumable) -------------------
    def _probe_cache(self, kind: str) -> Path:
        key = f"{kind}-{self.inventory.content_id}-{self.settings.key()}-{hashlib.sha256(self._need_text().encode()).hexdigest()[:10]}"
        return Path(cache_dir()) / "probes" / f"{key}.json"

    def measure_per_unit(self, kind: str, measure: Callable[[int], list[float]], width: int) -> dict[str, list[float]]:
        """Run ``measure(unit index)`` (``width`` numbers) for every unit not
        yet in the cache file; the file is rewritten every few units so an
        interrupted run resumes. Entries that are not ``width`` numbers for a
        unit of this model are dropped and measured again."""
        path = self._probe_cache(kind)
        done = _cached_measurements(path, {u.name for u in self.inventory.units}, width)
        units = self.inventory.units
        todo = [i for i, u in enumerate(units) if u.name not in done]
        for n, i in enumerate(self.iterate(todo, f"probing ({kind})")):
            done[units[i].name] = measure(i)
            if n % 10 == 9 or n == len(todo) - 1:
                write_json(path, {"version": PROBE_FORMAT_VERSION, "units": done})
        return done

    @torch.no_grad()
    def with_weight(self, unit_index: int, W_new: torch.Tensor) -> float:
        """Probe KL with one unit's weight replaced, then restore it."""
        unit = self.inventory.units[unit_index]
        W = get_weight(self.model, unit)
        set_weight(self.model, unit, W_new)
        try:
            return self.probe_kl()
        finally:
            set_weight(self.model, unit, W)


def _cached_measurements(path: Path, names: set[str], width: int) -> dict[str, list[float]]:
    """The valid entries of a probe cache file (none if it is damaged)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    units = data.get("units") if isinstance(data, dict) and data.get("version") == PROBE_FORMAT_VERSION else None
    if not isinstance(units, dict):
        return {}

    def ok(v) -> bool:
        return (isinstance(v, list) and len(v) == width
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v))

    return {k: v for k, v in units.items() if k in names and ok(v)}


# ---- the scorers ---------------------------------------------------------

def _table(ctx: ScoringContext, name: str, distortion: np.ndarray, importance: np.ndarray | None = None,
           norms: np.ndarray | None = None) -> ErrorTable:
    names = tuple(u.name for u in ctx.inventory.units)
    imp = np.ones(len(names)) if importance is None else importance
    return ErrorTable(name, ctx.inventory.content_id, names, ctx.options, distortion, imp, norms)


def score_weight_error(ctx: ScoringContext, name: str) -> ErrorTable:
    mse = ctx.reductions(["mse"])["mse"]
    return _table(ctx, name, mse, WEIGHT_ERROR_IMPORTANCE[name](ctx.norms), ctx.norms)


def alphas(ctx: ScoringContext) -> np.ndarray:
    s = ctx.settings
    return np.array([unit_alpha(get_weight(ctx.model, u), fit=s.alpha_fit, farms=s.alpha_farms, seed=s.seed + i)
                     for i, u in enumerate(ctx.iterate(ctx.inventory.units, "alpha (spectra)"))])


def score_alpha(ctx: ScoringContext, name: str) -> ErrorTable:
    importance = alpha_importance(alphas(ctx), ctx.settings.alpha_gamma)
    if name == "alpha":  # the paper: Var(W) 2^(-2b), blind to group size and overhead
        var = np.array([float(get_weight(ctx.model, u).double().var()) for u in ctx.inventory.units])
        bits = np.array([o.bits for o in ctx.options], dtype=float)
        distortion = var[:, None] * 2.0 ** (-2 * bits)[None, :]
        distortion[np.isnan(ctx.reductions(["mse"])["mse"])] = np.nan
    else:
        distortion = ctx.reductions(["mse"])["mse"] / ctx.norms[:, None]
    return _table(ctx, name, distortion, importance)


def score_reduction(ctx: ScoringContext, name: str) -> ErrorTable:
    kind = {"hessian": "obs", "output": "output", "taylor": "taylor"}[name]
    return _table(ctx, name, ctx.reductions([kind])[kind])


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
    return _table(ctx, name, rel, np.maximum(slope, 0.0))


def _relative_error(ctx: ScoringContext, option: QuantOption) -> np.ndarray:
    """(units,) ||W - RTN(W)||^2 / ||W||^2, a ragged last group allowed (as the kl probes do)."""
    out = []
    for u in ctx.inventory.units:
        W = get_weight(ctx.model, u)
        out.append(float(((W - fake_quantize(W, option, allow_ragged=True)) ** 2).sum() / (W**2).sum()))
    return np.array(out)


def score_kl(ctx: ScoringContext, name: str) -> ErrorTable:
    """exllamav3-style measured KL, each unit quantized alone at a few probe
    options; other options interpolated by a power law in the unit's relative
    RTN error, KL = c * rel^p, fitted in log-log through the probes."""
    probes = [QuantOption.parse(o) for o in ctx.settings.kl_probe_options]

    def measure(i: int) -> list[float]:
        unit = ctx.inventory.units[i]
        W = get_weight(ctx.model, unit)
        out = []
        for opt in probes:
            try:
                out.append(ctx.with_weight(i, fake_quantize(W, opt, allow_ragged=True)))
            except GroupSizeError:
                out.append(float("nan"))
        return out

    kls = ctx.measure_per_unit("kl", measure, len(probes))
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
    return _table(ctx, name, distortion)


def group_obs_errors(W: torch.Tensor, obs_weight: torch.Tensor, option: QuantOption,
                     bits_range: Sequence[int]) -> np.ndarray:
    """(len(bits_range), groups): the OBS loss 1/2 sum d_j dW_ij^2 of each
    column group when the whole tensor is quantized at each bit-width. The
    loss is separable over column groups, so any mix is a sum of entries."""
    g = option.group_size
    out = []
    for b in bits_range:
        dW = W - fake_quantize(W, QuantOption(b, g, option.symmetric))  # (out, in)
        col = (dW.double() ** 2).sum(0) * obs_weight.double()  # (in,)
        out.append(0.5 * col.reshape(-1, g).sum(1).numpy())
    return np.array(out)


def score_mixed(ctx: ScoringContext, name: str) -> ErrorTable:
    """OBS-loss table whose menu adds, for every grouped option, a mixed
    variant with per-column-group bit-widths of the same mean."""
    from bitalloc.mixed import MAX_BITS, MIN_BITS, group_salience, slim_bits, waterfill_bits

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
                per_layout[layout] = group_obs_errors(W, d, opt, bits_range)
            E = per_layout[layout]  # (bits, groups)
            cost = lambda bits: float(sum(E[b - MIN_BITS, k] for k, b in enumerate(bits)))  # noqa: E731
            sal = group_salience(W, d, opt.group_size)
            bits = slim_bits(sal, opt.bits, cost) if kind == "slim" else waterfill_bits(sal, opt.bits)
            distortion[i, j] = cost(bits)
            column_bits.setdefault(unit.name, {})[opt.name] = bits
    names = tuple(u.name for u in ctx.inventory.units)
    return ErrorTable(name, ctx.inventory.content_id, names, options, distortion, np.ones(len(names)), None, column_bits)


# name -> (what it needs, function). "data-free": weights only.
SCORERS: dict[str, tuple[str, Callable[[ScoringContext, str], ErrorTable]]] = {
    "rtn-mse": ("data-free", score_weight_error),
    "rtn-mse-rel": ("data-free", score_weight_error),
    "alpha": ("data-free", score_alpha),
    "alpha-rel": ("data-free", score_alpha),
    "hessian": ("calibration", score_reduction),
    "output": ("calibration", score_reduction),
    "taylor": ("calibration", score_reduction),
    "linearity": ("probe", score_linearity),
    "kl": ("probe", score_kl),
    "salience": ("calibration", score_mixed),
    "baq": ("calibration", score_mixed),
}


def check_scorer(name: str) -> None:
    if name not in SCORERS:
        raise BitallocError(f"The 'scorer' parameter must be one of {sorted(SCORERS)}. Got {name!r} instead.")


def score(ctx: ScoringContext, names: Sequence[str]) -> dict[str, ErrorTable]:
    for n in names:
        check_scorer(n)
    return {n: SCORERS[n][1](ctx, n) for n in names}
