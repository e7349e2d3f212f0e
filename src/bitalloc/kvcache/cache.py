"""A transformers cache that stores keys and values through KV codecs.

``QuantizingCache`` is a ``DynamicCache`` whose ``update`` passes the new
keys and values of each layer through the codec of each (layer, kind, head)
unit before they are stored, so attention (over the prompt as over later
tokens) reads what a quantized cache would hold; a per-token assignment
replaces the unit's codec at the positions it names. ``CachedModel`` wraps a
model so that every call starts from a fresh cache of that kind: it is what
``bitalloc.evaluate.evaluate`` runs. ``record_kv`` returns the cached keys
and values of a forward in full precision, for the codecs' own errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from bitalloc.errors import BitallocError
from bitalloc.formats.kv import KVCodec
from bitalloc.kvcache.layout import KINDS, KVLayout


@dataclass(frozen=True)
class KVAssignment:
    """Which codec stores what. ``codecs[layer][kind][head]`` is a unit's codec
    (None: kept as computed); ``token_codecs`` + ``token_levels`` (positions,)
    give the codec of every unit at the positions ``token_levels`` covers
    (level i -> ``token_codecs[i]``), as the per-token policy decides."""

    codecs: tuple[tuple[tuple[KVCodec | None, ...], ...], ...]  # (layers, 2, kv_heads)
    token_codecs: tuple[KVCodec, ...] = ()
    token_levels: torch.Tensor | None = None  # (positions,) int64

    @classmethod
    def per_unit(cls, layout: KVLayout, codecs: Sequence[KVCodec | None]) -> "KVAssignment":
        """From one codec per unit, in ``layout.units`` order."""
        if len(codecs) != len(layout.units):
            raise BitallocError(f"{len(codecs)} codecs were given for {len(layout.units)} KV units.")
        h = layout.kv_heads
        return cls(tuple(tuple(tuple(codecs[(layer * 2 + k) * h: (layer * 2 + k + 1) * h]) for k in range(2))
                         for layer in range(layout.layers)))

    @classmethod
    def uniform(cls, layout: KVLayout, codec: KVCodec | None) -> "KVAssignment":
        return cls.per_unit(layout, [codec] * len(layout.units))

    def with_tokens(self, token_codecs: Sequence[KVCodec], token_levels: torch.Tensor) -> "KVAssignment":
        return KVAssignment(self.codecs, tuple(token_codecs), token_levels.to(torch.int64))


def _apply_heads(x: torch.Tensor, codecs: Sequence[KVCodec | None]) -> torch.Tensor:
    """x (B, H, T, D) with head h stored by ``codecs[h]``; heads sharing a codec go through it together."""
    out = x.clone()
    for codec in set(c for c in codecs if c is not None):
        heads = [h for h, c in enumerate(codecs) if c == codec]
        out[:, heads] = codec.fake_quantize(x[:, heads])
    return out


def _apply_tokens(x: torch.Tensor, start: int, levels: torch.Tensor, codecs: Sequence[KVCodec]) -> torch.Tensor:
    """x (B, H, T, D) written at positions start..start+T-1: positions with a level take that level's codec."""
    T = x.shape[2]
    lv = levels[start: start + T]  # (≤T,)
    out = x.clone()
    for i, codec in enumerate(codecs):
        pos = torch.nonzero(lv == i).flatten()
        if pos.numel():
            out[:, :, pos] = codec.fake_quantize(x[:, :, pos])
    return out


def _cache_base():
    from transformers import DynamicCache

    return DynamicCache


def quantizing_cache(assignment: KVAssignment, config=None):
    """A fresh ``DynamicCache`` that stores through ``assignment``."""
    base = _cache_base()

    class QuantizingCache(base):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # (B, H, T, D) each
            if layer_idx >= len(assignment.codecs):
                raise BitallocError(f"The cache assignment covers {len(assignment.codecs)} layers; the model "
                                    f"wrote layer {layer_idx}. The plan belongs to another model.")
            start = self.get_seq_length(layer_idx) if layer_idx < len(self.layers) else 0
            states = []
            for kind, x in zip(KINDS, (key_states, value_states)):
                codecs = assignment.codecs[layer_idx][KINDS.index(kind)]
                if len(codecs) != x.shape[1]:
                    raise BitallocError(f"Layer {layer_idx} writes {x.shape[1]} KV heads; the assignment has "
                                        f"{len(codecs)}. The plan belongs to another model.")
                y = _apply_heads(x, codecs)
                if assignment.token_levels is not None:
                    y = _merge_tokens(y, x, start, assignment)
                states.append(y)
            return super().update(states[0], states[1], layer_idx, *args, **kwargs)

    return QuantizingCache(config=config) if config is not None else QuantizingCache()


def _merge_tokens(per_unit: torch.Tensor, x: torch.Tensor, start: int, assignment: KVAssignment) -> torch.Tensor:
    """Positions the per-token policy covers take its codec (applied to the raw
    vectors); the others keep the per-unit result."""
    T = x.shape[2]
    covered = torch.zeros(T, dtype=torch.bool)
    lv = assignment.token_levels[start: start + T]
    covered[: lv.numel()] = True
    token_part = _apply_tokens(x, start, assignment.token_levels, assignment.token_codecs)
    return torch.where(covered[None, None, :, None], token_part, per_unit)


def cache_argument(model) -> str:
    """The keyword a model's forward takes its cache by: ``cache`` from transformers 5.2x, before that
    ``past_key_values`` (which 5.2x still reads, with a deprecation warning)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class CachedModel:
    """``model`` called with a fresh quantizing cache each time; ``assign``
    maps the call's token ids (1, L) to the assignment (the per-token policy
    reads them; a static plan ignores them)."""

    def __init__(self, model, assign: Callable[[torch.Tensor], KVAssignment]):
        self.model, self.assign = model, assign

    def __call__(self, ids: torch.Tensor, **kwargs):
        cache = quantizing_cache(self.assign(ids), getattr(self.model, "config", None))
        return self.model(ids, **{cache_argument(self.model): cache}, use_cache=True, **kwargs)


@torch.no_grad()
def record_kv(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The keys and values a forward of ``ids`` (1, L) caches, per layer, each
    (kv_heads, L, head_dim) float32, as the model computed them."""
    cache = _cache_base()()
    model(ids, **{cache_argument(model): cache}, use_cache=True)
    return [(layer.keys[0].float().clone(), layer.values[0].float().clone()) for layer in cache.layers]
