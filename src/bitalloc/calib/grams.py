"""Calibration: each linear's input Gram matrix H = 2 X^T X / n, accumulated
by forward hooks one batch at a time (no activations are kept), cached on
disk keyed by the checkpoint's content hash, text and settings, and reused.
A cache file that does not hold what it should (damaged, another model's
units, wrong shapes, non-finite values) is measured again and replaced."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bitalloc.errors import BitallocError
from bitalloc.evaluate import EvalSettings, spread_windows
from bitalloc.evaluate.text import Text, cache_dir, text_digest
from bitalloc.fileio import write_atomic
from bitalloc.model.units import Inventory
from bitalloc.plan import ImportanceRecord, Provenance

CALIB_LAYOUT = "spread"  # calibration windows spread over the text (cache keys and plan records name it)


@dataclass(frozen=True)
class CalibSettings:
    windows: int = 16
    seq_len: int = 512

    def key(self, identity: str, text: Text) -> str:
        digest = text_digest(text)[:12]
        return f"{identity}-{digest}-{self.windows}x{self.seq_len}-{CALIB_LAYOUT}"

    def to_dict(self) -> dict:
        return asdict(self)


def calibration_windows(tokenizer, text: str, settings: CalibSettings) -> torch.Tensor:
    """The windows the importance matrix and GPTQ's Hessians are measured
    on: spread evenly over the calibration text (``spread_windows``)."""
    return spread_windows(tokenizer, text, EvalSettings(settings.seq_len, settings.windows, "auto"))


def unit_modules(inventory: Inventory) -> list[str]:
    """Module names whose input Gram matrix the units need (one per linear;
    none for a token embedding read by lookup; expert slices are measured by
    ``ExpertGrams`` on their experts module)."""
    return [u.name for u in inventory.units if not u.lookup and u.index is None]


def expert_modules(units) -> dict[str, list]:
    """Experts module name -> its expert-slice units (``...experts.down_proj[3]``, ``...experts.gate_up_proj[3].gate``)."""
    out: dict[str, list] = {}
    for u in units:
        if u.index is not None:
            out.setdefault(u.param.rsplit(".", 1)[0], []).append(u)
    return out


class ExpertGrams:
    """Per-expert X^T X of a fused experts module (transformers 5: parameters
    ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I), called as
    ``experts(hidden (T, H), top_k_index (T, k), top_k_weights (T, k))``),
    from only the tokens routed to each expert: the hidden states for
    both halves of ``gate_up_proj[e]``, act(gate) * up for ``down_proj[e]``. Also the routing
    statistics: tokens per expert and the routing-weight mass they carried."""

    def __init__(self, model: nn.Module, module_name: str, units: list, *, diagonal: bool = False):
        self.name, self.module, self.diagonal = module_name, model.get_submodule(module_name), diagonal
        for pname in {u.param.rsplit(".", 1)[1] for u in units}:
            if pname not in ("gate_up_proj", "down_proj") or getattr(self.module, pname).dim() != 3:
                raise BitallocError(f"Expert parameter {module_name}.{pname} is not the fused (E, out, in) "
                                    "gate_up_proj/down_proj layout bitalloc calibrates; use a data-free scorer "
                                    "(rtn-mse, rtn-mse-rel, alpha) with --quantizer rtn for this model.")
        self.names: dict[tuple[str, int], list[str]] = {}  # (parameter, expert) -> units (both halves share a Gram)
        for u in units:
            self.names.setdefault((u.param.rsplit(".", 1)[1], u.index), []).append(u.name)
        E = self.module.gate_up_proj.shape[0]
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.routed = torch.zeros(E, dtype=torch.long)  # tokens per expert
        self.mass = torch.zeros(E, dtype=torch.float64)  # sum of routing weights
        self.tokens = 0
        self.handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _add(self, names: list[str], X: torch.Tensor) -> None:
        if not names:
            return
        X = X.detach().float()  # (n, in)
        G = _gram(X, self.diagonal)  # as GramAccumulator: float32 per call, float64 sums
        for name in names:
            self.sums[name] = self.sums[name] + G if name in self.sums else G
            self.counts[name] = self.counts.get(name, 0) + X.shape[0]

    @torch.no_grad()
    def _hook(self, module, args, kwargs):
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = list(args) + [kwargs[n] for n in names[len(args):]]
        hidden, index, weights = values[:3]
        hidden = hidden.reshape(-1, hidden.shape[-1])  # (T, H)
        self.tokens += hidden.shape[0]
        for e in range(module.gate_up_proj.shape[0]):
            rows, slot = torch.where(index == e)
            if rows.numel() == 0:
                continue
            self.routed[e] += rows.numel()
            self.mass[e] += weights[rows, slot].double().sum()
            x = hidden[rows]  # (n, H)
            self._add(self.names.get(("gate_up_proj", e), []), x)
            if ("down_proj", e) in self.names:
                gate, up = F.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)
                self._add(self.names[("down_proj", e)], module.act_fn(gate) * up)  # (n, I)

    def remove(self) -> None:
        self.handle.remove()


class UnitGrams:
    """Input Gram matrices of any units: hooks on linears, and ``ExpertGrams``
    on experts modules. ``hessians()`` omits experts no token reached. With
    ``diagonal`` only their diagonals (sum of x_j^2 per input column: the
    importance matrix), at a fraction of the cost and memory."""

    def __init__(self, model: nn.Module, units, *, diagonal: bool = False):
        units = [u for u in units if not u.lookup]
        self.linears = GramAccumulator(model, [u.name for u in units if u.index is None], diagonal=diagonal)
        self.experts = [ExpertGrams(model, name, us, diagonal=diagonal) for name, us in expert_modules(units).items()]

    def remove(self) -> None:
        self.linears.remove()
        for e in self.experts:
            e.remove()

    def hessians(self) -> dict[str, torch.Tensor]:
        H = self.linears.hessians()
        for e in self.experts:
            H.update({n: (2.0 * s / e.counts[n]).float() for n, s in e.sums.items()})
        return H

    def routing(self) -> dict[str, dict]:
        """Experts module -> tokens seen, tokens and routing-weight mass per expert."""
        return {e.name: {"tokens": e.tokens, "routed": e.routed.tolist(), "mass": e.mass.tolist()}
                for e in self.experts}


def _gram(X: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """X^T X (in, in) of one call's tokens X (n, in) in float32, as float64
    for summing over calls; with ``diagonal`` only its diagonal (in,), sum of x_j^2."""
    return ((X * X).sum(0) if diagonal else X.T @ X).double()


class GramAccumulator:
    """Forward pre-hooks summing X^T X per module (each call's product in float32,
    twice as fast as float64 on CPU; the sums over calls in float64);
    ``hessians()`` gives 2 X^T X / n (its diagonal only with ``diagonal``)."""

    def __init__(self, model: nn.Module, module_names: list[str], *, diagonal: bool = False):
        self.diagonal = diagonal
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (input seen, its X^T X)
        self.handles = [model.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in module_names]

    def _gram(self, x: torch.Tensor) -> torch.Tensor:
        """X^T X of one input; modules fed the very same tensor (q/k/v,
        gate/up) share one product instead of computing it again."""
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        X = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        gram = _gram(X, self.diagonal)  # (in, in), or (in,): one call's tokens in float32, summed in float64
        self._last = (x, gram)
        return gram

    def _hook(self, name: str):
        def hook(_module, inputs):  # before the module runs: a caller may stop the forward once inputs are seen
            gram = self._gram(inputs[0])
            if name in self.sums:
                self.sums[name] += gram
            else:
                self.sums[name] = gram.clone()
            self.counts[name] = self.counts.get(name, 0) + inputs[0].numel() // inputs[0].shape[-1]

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self._last = None

    def hessians(self) -> dict[str, torch.Tensor]:
        """2 X^T X / n per module; modules fed the same inputs (q/k/v, gate/up,
        hooked one after another) get one shared tensor, so work keyed on it
        (GPTQ's inverse-Hessian factor) is done once."""
        out: dict[str, torch.Tensor] = {}
        last: tuple[str, torch.Tensor] | None = None
        for n, s in self.sums.items():
            if last and self.counts[n] == self.counts[last[0]] and torch.equal(s, self.sums[last[0]]):
                out[n] = last[1]
                continue
            out[n] = (2.0 * s / self.counts[n]).float()
            last = (n, out[n])
        return out


def _valid_hessians(H: dict[str, torch.Tensor], inventory: Inventory) -> bool:
    """One finite (in, in) matrix per unit, nothing else (an expert that no
    calibration token reached has none)."""
    units = [u for u in inventory.units if not u.lookup]
    names = {u.name for u in units}
    if not set(H) <= names or not {u.name for u in units if u.index is None} <= set(H):
        return False
    return all(H[u.name].shape == (u.shape[1], u.shape[1]) and bool(torch.isfinite(H[u.name]).all())
               for u in units if u.name in H)


@torch.no_grad()
def accumulate_hessians(model: nn.Module, inventory: Inventory, windows: torch.Tensor, *,
                        progress: Callable | None = None) -> dict[str, torch.Tensor]:
    return accumulate_calibration(model, inventory, windows, progress=progress)[0]


def accumulate_calibration(model: nn.Module, inventory: Inventory, windows: torch.Tensor, *,
                           progress: Callable | None = None, diagonal: bool = False
                           ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Hessians of every unit (only their diagonals with ``diagonal``) and,
    for MoE models, the routing statistics."""
    acc = UnitGrams(model, inventory.units, diagonal=diagonal)
    try:
        desc = "calibrating (imatrix)" if diagonal else "calibrating (X^T X)"
        rows = progress(list(windows), desc=desc, unit="window") if progress else windows
        for row in rows:
            model(row[None, :])
    finally:
        acc.remove()
    return acc.hessians(), acc.routing()


def cached_hessians(model: nn.Module, inventory: Inventory, tokenizer, text: str, settings: CalibSettings, *,
                    progress: Callable | None = None) -> dict[str, torch.Tensor]:
    """Hessians from the disk cache, or measured and cached (safetensors)."""
    return cached_calibration(model, inventory, tokenizer, text, settings, progress=progress)[0]


def cached_calibration(model: nn.Module, inventory: Inventory, tokenizer, text: str, settings: CalibSettings, *,
                       progress: Callable | None = None) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(Hessians, routing statistics) from the disk cache (safetensors + a
    JSON file beside it), or measured and cached."""
    import json

    from safetensors.torch import load_file, save_file

    path = _cache_path("hessians", inventory, text, settings)
    routing_path = path.with_suffix(".routing.json")
    if path.is_file():
        try:
            H = load_file(str(path))
            routing = json.loads(routing_path.read_text()) if routing_path.is_file() else None
        except Exception:  # safetensors raises its own error type for a damaged header; json a ValueError
            H = routing = None
        if H is not None and _valid_hessians(H, inventory) and _valid_routing(routing, inventory):
            return H, routing or {}
    H, routing = accumulate_calibration(model, inventory, calibration_windows(tokenizer, text, settings),
                                        progress=progress)
    write_atomic(path, lambda tmp: save_file(_unshared(H), tmp))
    write_atomic(routing_path, lambda tmp: Path(tmp).write_text(json.dumps(routing, sort_keys=True)))
    return H, routing


def _cache_path(kind: str, inventory: Inventory, text: str, settings: CalibSettings) -> Path:
    """Where one model's calibration is cached for one set of units: two
    inventories of the same weights (a GGUF menu plans the output matrix,
    the integer menu does not) each get their own file, instead of each
    finding the other's invalid and measuring again over it."""
    units = hashlib.sha256("\n".join(sorted(u.name for u in inventory.units)).encode()).hexdigest()[:8]
    return Path(cache_dir()) / kind / f"{settings.key(inventory.content_id, text)}-u{units}.safetensors"


def _unshared(H: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """H with a copy for every repeat of a tensor shared by several units
    (q/k/v): safetensors stores each tensor once and refuses shared memory."""
    seen: set[int] = set()
    out = {}
    for k, v in H.items():
        out[k] = v.clone() if v.data_ptr() in seen else v.contiguous()
        seen.add(v.data_ptr())
    return out


def _valid_routing(routing, inventory: Inventory) -> bool:
    """Statistics for every experts module of the units (a model without experts needs none)."""
    wanted = set(expert_modules(inventory.units))
    if not wanted:
        return True
    return (isinstance(routing, dict) and set(routing) == wanted
            and all(isinstance(r, dict) and {"tokens", "routed", "mass"} <= set(r) for r in routing.values()))


def importance_vectors(model: nn.Module, inventory: Inventory, tokenizer, text: str, settings: CalibSettings, *,
                       progress: Callable | None = None) -> dict[str, torch.Tensor]:
    """llama.cpp's importance vectors E[x_j^2] per unit (the diagonal of
    H = 2 X^T X / n, halved; none for a token embedding read by lookup), from
    their own calibration pass, which accumulates only the diagonals, and
    cached on disk like the Hessians (never taken from cached Hessians, whose
    float32 products round differently: the vectors must not depend on what
    else was measured before)."""
    import json

    from safetensors.torch import load_file, save_file

    path = _cache_path("imatrix", inventory, text, settings)
    if path.is_file():
        try:
            cached = load_file(str(path))
        except Exception:  # safetensors raises its own error type for a damaged header
            cached = None
        if cached is not None and _valid_importance(cached, inventory):
            return cached
    diag, _ = accumulate_calibration(model, inventory, calibration_windows(tokenizer, text, settings),
                                     progress=progress, diagonal=True)
    vectors = {name: d / 2 for name, d in diag.items()}
    write_atomic(path, lambda tmp: save_file(_unshared(vectors), tmp, metadata={"format": json.dumps(
        {"kind": "bitalloc.imatrix", "version": 1})}))
    return vectors


def _valid_importance(vectors: dict[str, torch.Tensor], inventory: Inventory) -> bool:
    """One finite, non-negative (in,) vector per unit that has inputs (experts no token reached may lack one)."""
    units = [u for u in inventory.units if not u.lookup]
    names = {u.name for u in units}
    if not set(vectors) <= names or not {u.name for u in units if u.index is None} <= set(vectors):
        return False
    return all(vectors[u.name].shape == (u.shape[1],) and bool(torch.isfinite(vectors[u.name]).all())
               and bool((vectors[u.name] >= 0).all()) for u in units if u.name in vectors)


DEFAULT_CALIB_LABEL = "default calibration half"  # a plan's record of the default calibration text


def importance_record(settings) -> Provenance:
    """A plan's record of the importance matrix it was made with (``settings``
    a PlanSettings): the calibration it comes from, which quantize and export
    recompute it from; empty with --no-imatrix."""
    if not settings.menu.imatrix:
        return Provenance()
    return Provenance(importance=ImportanceRecord(settings.calib.to_dict(), settings.calib_text or DEFAULT_CALIB_LABEL,
                                                  CALIB_LAYOUT))
