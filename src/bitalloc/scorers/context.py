"""What every scorer shares, computed once on first use: calibration
Hessians, OBS weights, gradients, the probe set, one sweep of RTN errors with
several reductions, and probe measurements cached on disk (resumable)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from bitalloc.calib.grams import CalibSettings
from bitalloc.calib.state import CalibrationState, calibration_gradients, calibration_state
from bitalloc.errors import BitallocError, GroupSizeError
from bitalloc.evaluate.text import cache_dir
from bitalloc.fileio import write_json
from bitalloc.formats import fits
from bitalloc.formats.affine import QuantOption
from bitalloc.formats.affine_rtn import SCALE_SEARCH_VERSION, fake_quantize
from bitalloc.model.units import check_finite, get_weight, stable_sum
from bitalloc.quantizers import quantizer as _quantizer
from bitalloc.quantizers import stored_weight
from bitalloc.quantizers.gptq import inverse_hessian_factor
from bitalloc.table import ErrorTable

PROBE_FORMAT_VERSION = 2  # 2: the reference is taken before any weight changes (v1 was not)
SWEEP_FORMAT_VERSION = 2  # cache files of the weight-error sweep; 2: sums the same on any thread count
_MISSING = object()  # a format needs an importance vector that this unit lacks


@dataclass(frozen=True)
class ScorerSettings:
    alpha_gamma: float = 1.0  # AlphaQ's CLI default; its ablation favours 10-15 on MoE models
    alpha_fit: str = "hill"  # or "ks"
    alpha_farms: bool = False
    probe_windows: int = 2  # linearity / kl probe set, from the calibration text
    probe_seq_len: int = 128
    noise_levels: tuple[float, ...] = (0.01, 0.05)  # relative MSE of injected noise (linearity)
    kl_probe_options: tuple[str, ...] = ("int2-g64-asym", "int3-g64-asym", "int4-g64-asym")
    kl_probes: int = 3  # options measured per unit (1: the middle one, KL taken proportional to the error)
    kl_anchors: int = 4  # kl-block: layers whose units are also probed end to end (the depth's KL per block error)
    damp: float = 0.01
    taylor_windows: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.alpha_fit not in ("hill", "ks"):
            raise BitallocError(f"The 'alpha_fit' parameter must be 'hill' or 'ks'. Got {self.alpha_fit!r} instead.")
        if self.kl_probes not in (1, 2, 3):
            raise BitallocError(f"The 'kl_probes' parameter must be 1, 2 or 3. Got {self.kl_probes!r} instead.")
        if self.kl_anchors < 1:
            raise BitallocError(f"The 'kl_anchors' parameter must be at least 1. Got {self.kl_anchors!r} instead.")

    def key(self) -> str:
        """What keys cached measurements: every setting but ``kl_anchors``, which only chooses which units are
        measured (each unit's probe reads the same either way)."""
        fields = {k: v for k, v in asdict(self).items() if k != "kl_anchors"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


class ScoringContext:
    """Everything scorers share, computed once on first use."""

    def importance_of(self, unit, option):
        """The importance vector ``option`` quantizes ``unit`` with: None for
        formats that take none (or units without one where it is optional),
        ``_MISSING`` where the format requires one and the unit has none."""
        if not getattr(option, "uses_importance", False):
            return None
        imp = self.importance.get(unit.name)
        return _MISSING if imp is None and option.requires_importance else imp

    def probe_weight(self, unit, W: torch.Tensor, option: QuantOption) -> torch.Tensor:
        """W as the plan's quantizer would store it at ``option`` (a ragged
        last group allowed, as the probes need options of any group size)."""
        imp = self.importance_of(unit, option)
        if imp is _MISSING or not fits(W.shape, option, allow_ragged=True):
            raise GroupSizeError(f"{option.name} cannot store {unit.name}.")
        H = self.hessians.get(unit.name) if _quantizer(self.quantizer).calibrated else None
        return stored_weight(self.quantizer, W, option, H=H, importance=imp, search=bool(self.importance),
                             act_order=self.act_order, allow_ragged=True, damp=self.settings.damp)

    def __init__(self, model, tokenizer, inventory, options: Sequence[QuantOption], *, calib_text: str | None = None,
                 calib: CalibSettings = CalibSettings(), settings: ScorerSettings = ScorerSettings(),
                 allow_ragged: bool = False, progress: Callable | None = None, quantizer: str = "rtn",
                 act_order: bool = False, importance: dict[str, torch.Tensor] | None = None,
                 weights: Callable | None = None, runner: Callable | None = None):
        self.model, self.tokenizer, self.inventory = model, tokenizer, inventory
        # unit -> its (out, in) float32 weight: from the loaded model, or read from disk (a streamed source)
        self.weight = weights or (lambda unit: get_weight(model, unit))
        # runner(units, kinds, options, allow_ragged) -> (unit, rows, ||W||^2): the sweep in other processes (Ray)
        self.runner = runner
        self.quantizer = quantizer  # the kl probes quantize as the plan will: RTN, or GPTQ with the unit's Hessian
        self.act_order = act_order and _quantizer(quantizer).orders_columns  # GPTQ's column order, as the plan's
        self.options = tuple(options)
        self.calib_text, self.calib, self.settings = calib_text, calib, settings
        self.allow_ragged, self.progress = allow_ragged, progress
        # unit -> (in,) mean squared input (llama.cpp's imatrix): RTN's weighted clipping search, GGUF types;
        # given, GPTQ searches its static scales by diag(H) (the plan's quantizer does the same)
        self.importance = importance or {}
        self.notices: list[str] = []  # what calibration could not measure, for the report
        self._reductions: dict[str, np.ndarray] = {}
        self._norms_seen: dict[str, float] = {}  # unit -> ||W||^2, as the sweep reads each weight

    def iterate(self, items, desc: str):
        return self.progress(items, desc=desc, unit="tensor") if self.progress else items

    def _need_text(self) -> str:
        if self.calib_text is None or self.tokenizer is None:
            raise BitallocError("This scorer needs calibration text and a tokenizer (--calib-text, or the default text).")
        return self.calib_text

    # ---- calibration data -------------------------------------------------
    @cached_property
    def calibration(self) -> CalibrationState:
        """The calibration state (Grams, routing), computed once; its notices join the context's."""
        state = calibration_state(self.model, self.inventory, self.tokenizer, self._need_text(), self.calib,
                                  progress=self.progress)
        self.notices.extend(state.notices)
        return state

    @property
    def hessians(self) -> dict[str, torch.Tensor]:
        """H per unit (unreached experts filled in: ``calib.state``)."""
        return self.calibration.hessians

    @property
    def routing(self) -> dict[str, dict]:
        """Experts module -> tokens seen, tokens routed to each expert and the
        routing-weight mass they carried (from the calibration pass)."""
        return self.calibration.routing

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
        return calibration_gradients(self.model, self.inventory, self.tokenizer, self._need_text(),
                                     CalibSettings(self.settings.taylor_windows, self.calib.seq_len),
                                     progress=self.progress)

    @cached_property
    def probe(self):
        """The probe set: the first windows of the calibration text (never
        evaluation text), the reference's log-probs on them taken *before*
        any weight is changed, and tail-only forwards from a unit's block."""
        from bitalloc.evaluate.probe import CalibrationProbe

        probe = CalibrationProbe(self.model, self.tokenizer, self.inventory, self._need_text(),
                                 windows=self.settings.probe_windows, seq_len=self.settings.probe_seq_len,
                                 quantize_weight=lambda unit, W, option: self.probe_weight(unit, W, option))
        probe.enable_tail()
        return probe

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
        seen = self._norms_seen  # filled by the sweep, which reads every weight anyway
        return np.array([seen[u.name] if u.name in seen else stable_sum(self.weight(u), squared=True)
                         for u in self.inventory.units])

    def _sweep(self, kinds: list[str]) -> None:
        """Fill the reductions ``kinds`` for every unit and option: read from
        the sweep's cache files where present, measured (and cached, every few
        units, so an interrupted sweep resumes) where not."""
        units = self.inventory.units
        lookup = [u.name for u in units if u.lookup]
        if lookup and {"obs", "output"} & set(kinds):
            raise BitallocError(f"The hessian and output scorers need every unit's input Gram matrix; the token "
                                f"embedding {lookup[0]!r} is read by lookup and has none. Use rtn-mse, rtn-mse-rel, "
                                "taylor, kl or linearity, or keep the embedding out of the plan.")
        paths = {k: self._sweep_cache(k) for k in kinds}
        names = {u.name for u in units}
        done = {k: _cached_measurements(paths[k], names, len(self.options), SWEEP_FORMAT_VERSION) for k in kinds}
        todo = [i for i, u in enumerate(units) if any(u.name not in done[k] for k in kinds)]
        for i in sorted(set(range(len(units))) - set(todo)):  # cached rows: weights changed in place keep their id
            check_finite(self.weight(units[i]), units[i])
        todo_units = [units[i] for i in todo]
        if self.runner is not None and todo_units:
            results = self.runner(todo_units, kinds, self.options, self.allow_ragged)
        else:
            results = ((u.name, self._unit_errors(u, kinds), self._norms_seen[u.name]) for u in todo_units)
        shown = self.progress(results, desc="scoring (RTN errors)", unit="tensor", total=len(todo)) \
            if self.progress and todo else results
        for n, (name, rows, norm2) in enumerate(shown):
            self._norms_seen[name] = norm2
            for k, row in rows.items():
                done[k][name] = row
            if n % 10 == 9 or n == len(todo) - 1:
                for k in kinds:
                    write_json(paths[k], {"version": SWEEP_FORMAT_VERSION, "units": done[k]})
        self._reductions.update({k: np.array([done[k][u.name] for u in units], dtype=float).reshape(len(units), -1)
                                 for k in kinds})

    def _unit_errors(self, unit, kinds: list[str]) -> dict[str, list[float]]:
        """One unit's row of each reduction: every option's quantization error
        W - Q(W), reduced; NaN where the option does not fit."""
        extra = {"obs": lambda: self.obs_weights, "output": lambda: self.hessians, "taylor": lambda: self.gradients}
        data = {k: extra[k]()[unit.name] for k in kinds if k in extra}
        out = {k: [float("nan")] * len(self.options) for k in kinds}
        W = self.weight(unit)  # (out, in): read once (a streamed model reads it from disk)
        check_finite(W, unit)
        self._norms_seen[unit.name] = stable_sum(W, squared=True)
        for j, opt in enumerate(self.options):
            imp = self.importance_of(unit, opt)
            if not fits(W.shape, opt, allow_ragged=self.allow_ragged) or imp is _MISSING:
                continue
            dW = W - fake_quantize(W, opt, allow_ragged=self.allow_ragged, importance=imp)  # (out, in)
            sq = dW.double() ** 2 if "obs" in kinds else None
            for k in kinds:
                if k == "mse":
                    out[k][j] = stable_sum(dW, squared=True)
                elif k == "obs":
                    out[k][j] = 0.5 * float((sq.sum(0) * data["obs"].double()).sum())
                elif k == "output":
                    out[k][j] = float(((dW @ data["output"]) * dW).sum(dtype=torch.float64))
                elif k == "taylor":
                    out[k][j] = float((data["taylor"] * dW).abs().sum(dtype=torch.float64))
        return out

    def _sweep_cache(self, kind: str) -> Path:
        """The cache file of one reduction: keyed by the weights, the menu, the
        ragged rule and the scales (importance digest, search version); the
        reductions that read calibration (obs, output, taylor) also by the
        scorer settings and the calibration."""
        parts = [kind, self.inventory.content_id, ",".join(o.name for o in self.options),
                 f"ragged={self.allow_ragged}", importance_digest(self.importance), f"search{SCALE_SEARCH_VERSION}"]
        if kind != "mse":
            parts += [self.settings.key(), self.calib.key(self.inventory.content_id, self._need_text())]
        key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
        return Path(cache_dir()) / "errors" / f"{kind}-{key}.json"

    # ---- probe measurements (cached on disk, resumable) -------------------
    def _probe_cache(self, kind: str) -> Path:
        calib = self.calib.key(self.inventory.content_id, self._need_text())  # GPTQ probes use its Hessians
        key = f"{kind}-{self.settings.key()}-{hashlib.sha256(calib.encode()).hexdigest()[:10]}"
        return Path(cache_dir()) / "probes" / f"{key}.json"

    def measure_per_unit(self, kind: str, measure: Callable[[int], list[float]], width: int,
                         only: Sequence[int] | None = None) -> dict[str, list[float]]:
        """Run ``measure(unit index)`` (``width`` numbers) for every unit (or
        every unit of ``only``) not yet in the cache file; the file is
        rewritten every few units so an interrupted run resumes. Entries that
        are not ``width`` numbers for a unit of this model are dropped and
        measured again."""
        path = self._probe_cache(kind)
        done = _cached_measurements(path, {u.name for u in self.inventory.units}, width)
        units = self.inventory.units
        todo = [i for i in (range(len(units)) if only is None else only) if units[i].name not in done]
        for n, i in enumerate(self.iterate(todo, f"probing ({kind})")):
            done[units[i].name] = measure(i)
            if n % 10 == 9 or n == len(todo) - 1:
                write_json(path, {"version": PROBE_FORMAT_VERSION, "units": done})
        return done

    def with_weight(self, unit_index: int, W_new: torch.Tensor) -> float:
        """Probe KL (mean per token, nats) with one unit's weight replaced, the
        rest of the model as loaded; the weight is put back."""
        return self.probe.measure_weight(self.inventory.units[unit_index], W_new).kl

    def block_error(self, unit_index: int, W_new: torch.Tensor) -> float:
        """The squared change of the unit's block output (mean per token) with
        its weight replaced, that block run alone; the weight is put back."""
        return self.probe.block_error(self.inventory.units[unit_index], W_new)


def importance_digest(importance: dict[str, torch.Tensor]) -> str:
    """A digest of every unit's importance vector (its exact values); 'none'
    without an importance matrix."""
    if not importance:
        return "none"
    h = hashlib.sha256()
    for name in sorted(importance):
        h.update(name.encode())
        h.update(importance[name].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _cached_measurements(path: Path, names: set[str], width: int,
                         version: int = PROBE_FORMAT_VERSION) -> dict[str, list[float]]:
    """The valid entries of a probe or sweep cache file (none if it is damaged)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    units = data.get("units") if isinstance(data, dict) and data.get("version") == version else None
    if not isinstance(units, dict):
        return {}

    def ok(v) -> bool:
        return (isinstance(v, list) and len(v) == width
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v))

    return {k: v for k, v in units.items() if k in names and ok(v)}


def make_table(ctx: ScoringContext, name: str, distortion: np.ndarray, importance: np.ndarray | None = None,
           norms: np.ndarray | None = None) -> ErrorTable:
    names = tuple(u.name for u in ctx.inventory.units)
    imp = np.ones(len(names)) if importance is None else importance
    return ErrorTable(name, ctx.inventory.content_id, names, ctx.options, distortion, imp, norms)


