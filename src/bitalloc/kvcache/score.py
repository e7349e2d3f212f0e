"""The KV error table: for every unit (layer, kind, head) and codec, how much
model quality that choice costs.

- ``distortions``: each codec's relative squared error on the unit's own
  cached vectors, ``E||x - x̂||² / E||x||²``, recorded from calibration
  windows (cheap: one forward per window, then the codecs alone);
- ``kv-kl`` (measured): the unit's importance is the end-to-end KL to the
  full-precision cache when that unit alone is stored by a probe codec (the
  menu's cheapest), divided by the probe's distortion on it; error = importance
  × distortion (the linear model of Q-Palette / HIGGS, applied to the cache).
  One forward per unit and calibration window.
- ``kv-mse`` (proxy): error = distortion alone, every unit equally important;
- ``kv-var`` (proxy): importance = the unit's mean squared value relative to
  the mean over units of its kind (keys or values), so error is the codec's
  absolute squared error, keys and values each on their own scale.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from bitalloc.errors import BitallocError
from bitalloc.formats.kv import KVCodec
from bitalloc.kvcache.cache import CachedModel, KVAssignment, record_kv
from bitalloc.kvcache.layout import KINDS, KVLayout

SCORERS = ("kv-kl", "kv-mse", "kv-var")


@dataclass(frozen=True)
class KVTable:
    """errors[u, o] for ``units`` × ``codecs`` (names), with what made it."""

    units: tuple[str, ...]
    codecs: tuple[str, ...]
    distortion: np.ndarray  # (U, O) relative squared error
    importance: np.ndarray  # (U,) KL per unit of relative error (1 for kv-mse)
    scorer: str
    probe: str | None = None  # the probe codec of kv-kl
    seconds: dict | None = None
    tail_only: bool = False  # the probes ran from their layer on (checked against a full forward)

    @property
    def errors(self) -> np.ndarray:
        return self.importance[:, None] * self.distortion  # (U, O)

    def to_dict(self) -> dict:
        return {"format": "bitalloc.kvtable", "version": 1, "scorer": self.scorer, "probe": self.probe,
                "codecs": list(self.codecs), "seconds": self.seconds or {}, "tail_only_probes": self.tail_only,
                "units": [{"unit": u, "importance": float(self.importance[i]),
                           "distortion": dict(zip(self.codecs, map(float, self.distortion[i])))}
                          for i, u in enumerate(self.units)]}


def recorded_kv(model, calib_rows: torch.Tensor, layout: KVLayout) -> list[torch.Tensor]:
    """Per unit (``layout.units`` order), the (tokens, head_dim) vectors it caches over the calibration windows."""
    per_unit: list[list[torch.Tensor]] = [[] for _ in layout.units]
    for row in calib_rows:
        layers = record_kv(model, row[None, :])
        if len(layers) != layout.layers:
            raise BitallocError(f"The model cached {len(layers)} layers; its config says {layout.layers}.")
        for layer, kv in enumerate(layers):
            for k, x in enumerate(kv):  # (kv_heads, L, D)
                for h in range(layout.kv_heads):
                    per_unit[(layer * len(KINDS) + k) * layout.kv_heads + h].append(x[h])
    return [torch.cat(xs) for xs in per_unit]


def kind_relative_energy(layout: KVLayout, vectors: Sequence[torch.Tensor]) -> np.ndarray:
    """(U,) each unit's mean squared value over the mean of the units of its kind."""
    energy = np.array([float((x * x).mean()) for x in vectors])  # (U,)
    kind = np.array([u.split(".")[1] for u in layout.units])
    out = np.empty_like(energy)
    for k in KINDS:
        mean = energy[kind == k].mean()
        out[kind == k] = energy[kind == k] / (mean if mean > 0 else 1.0)
    return out


def distortions(vectors: Sequence[torch.Tensor], codecs: Sequence[KVCodec]) -> np.ndarray:
    """(U, O) relative squared error of each codec on each unit's vectors."""
    out = np.zeros((len(vectors), len(codecs)))
    for u, x in enumerate(vectors):  # (N, D)
        energy = float((x * x).sum()) or 1.0
        for o, codec in enumerate(codecs):
            out[u, o] = float(((codec.fake_quantize(x) - x) ** 2).sum()) / energy
    return out


class TailProbe:
    """KL to the full-precision cache of the calibration windows (one batch)
    when some units are stored by a codec. The hidden states entering every
    decoder block are kept from the reference forward, so a probe of units in
    layer L runs blocks L.. only: nothing before L reads the cache of L. The
    block list is swapped for its tail during the call, as
    ``bitalloc.evaluate.probe`` does for weights, and the shortcut is checked
    once against a full forward (off when it does not reproduce it)."""

    TOLERANCE = 1e-4  # relative difference of KL allowed between tail-only and full forwards

    def __init__(self, model, stack, windows: torch.Tensor, reference: list[torch.Tensor]):
        self.model, self.stack, self.windows = model, stack, windows  # windows (B, T)
        self.ref = torch.stack(reference)  # (B, T-1, V) log-probs of the full-precision cache
        self.inputs: dict[int, torch.Tensor] = {}
        self.tail_ok = False
        if stack is not None:
            hooks = [block.register_forward_pre_hook(self._keeper(i), with_kwargs=True)
                     for i, block in enumerate(stack[1])]
            try:
                with torch.no_grad():
                    self.model(windows)
            finally:
                for h in hooks:
                    h.remove()

    def _keeper(self, index: int):
        def hook(_module, args, kwargs):
            self.inputs[index] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    @torch.no_grad()
    def kl(self, assignment: KVAssignment, first_layer: int = 0) -> float:
        """Mean KL (nats/token) with the cache stored per ``assignment``, whose
        codecs all sit in layers >= ``first_layer``."""
        if not (self.tail_ok and first_layer in self.inputs and first_layer > 0):
            return self._kl(CachedModel(self.model, lambda ids: assignment)(self.windows).logits)
        parent, blocks, attr = self.stack
        kept = self.inputs[first_layer]

        def replace_input(_module, args, kwargs):
            return ((kept, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": kept})

        handle = blocks[first_layer].register_forward_pre_hook(replace_input, with_kwargs=True)
        setattr(parent, attr, torch.nn.ModuleList(list(blocks)[first_layer:]))
        try:
            return self._kl(CachedModel(self.model, lambda ids: assignment)(self.windows).logits)
        finally:
            setattr(parent, attr, blocks)
            handle.remove()

    def _kl(self, logits: torch.Tensor) -> float:
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
        return float((self.ref.exp() * (self.ref - logp)).sum()) / (logp.shape[0] * logp.shape[1])

    def enable_tail(self, layout: KVLayout, probe: KVCodec) -> bool:
        """Tail-only probes on if, for a unit of the middle layer, they give the full forward's KL."""
        if self.stack is None or layout.layers < 2 or len(self.stack[1]) != layout.layers:
            return False
        middle = layout.layers // 2
        codecs: list[KVCodec | None] = [None] * len(layout.units)
        codecs[middle * len(KINDS) * layout.kv_heads] = probe
        assignment = KVAssignment.per_unit(layout, codecs)
        full = self.kl(assignment)
        self.tail_ok = True
        tail = self.kl(assignment, middle)
        self.tail_ok = abs(tail - full) <= self.TOLERANCE * max(full, 1e-6) + 1e-7
        return self.tail_ok


def probe_kl(probe: TailProbe, layout: KVLayout, codec: KVCodec, progress: Callable | None = None) -> np.ndarray:
    """(U,) mean KL (nats/token) to the full-precision cache when unit u alone is stored by ``codec``."""
    units = list(enumerate(layout.units))
    out = np.zeros(len(units))
    per_layer = len(KINDS) * layout.kv_heads
    for u, _ in (progress(units, desc="KV probes", unit="unit") if progress else units):
        codecs: list[KVCodec | None] = [None] * len(units)
        codecs[u] = codec
        out[u] = probe.kl(KVAssignment.per_unit(layout, codecs), u // per_layer)
    return out


def build_table(model, layout: KVLayout, calib_rows: torch.Tensor, codecs: Sequence[KVCodec], scorer: str,
                reference: list[torch.Tensor] | None = None, progress: Callable | None = None,
                stack=None) -> KVTable:
    """The error table of ``scorer`` over ``codecs`` on the calibration windows;
    ``stack`` (parent, ModuleList of decoder blocks, attribute), when given,
    lets each probe run from its layer on."""
    if scorer not in SCORERS:
        raise BitallocError(f"The 'scorer' parameter must be one of {list(SCORERS)}. Got {scorer!r} instead.")
    t0 = time.perf_counter()
    vectors = recorded_kv(model, calib_rows, layout)
    dist = distortions(vectors, codecs)
    seconds = {"distortion": time.perf_counter() - t0}
    names = tuple(c.name for c in codecs)
    if scorer == "kv-mse":
        return KVTable(layout.units, names, dist, np.ones(len(layout.units)), scorer, seconds=seconds)
    if scorer == "kv-var":
        return KVTable(layout.units, names, dist, kind_relative_energy(layout, vectors), scorer, seconds=seconds)
    if reference is None:
        raise BitallocError("The kv-kl scorer needs the calibration windows' reference log-probabilities.")
    o = int(np.argmin([c.vector_bits(layout.head_dim) for c in codecs]))  # the cheapest codec probes
    t1 = time.perf_counter()
    probe = TailProbe(model, stack, calib_rows, reference)
    tail = probe.enable_tail(layout, codecs[o])
    kl = probe_kl(probe, layout, codecs[o], progress)
    seconds["probes"] = time.perf_counter() - t1
    importance = np.maximum(kl, 0.0) / np.maximum(dist[:, o], 1e-12)
    return KVTable(layout.units, names, dist, importance, scorer, probe=names[o], seconds=seconds, tail_only=tail)
