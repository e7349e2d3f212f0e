"""The KV units of a model and what a codec choice costs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from bitalloc.errors import BitallocError
from bitalloc.formats.kv import KVCodec

KINDS = ("k", "v")


@dataclass(frozen=True)
class KVLayout:
    """Layers, KV heads and head dimension of a model's attention cache."""

    layers: int
    kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for field, value in (("layers", self.layers), ("kv_heads", self.kv_heads), ("head_dim", self.head_dim)):
            if int(value) < 1:
                raise BitallocError(f"The KV layout's {field!r} must be at least 1. Got {value} instead.")

    @property
    def units(self) -> tuple[str, ...]:
        """Unit names, layer-major: layer0.k.head0, layer0.k.head1, …, layer0.v.head0, …"""
        return tuple(unit_name(layer, kind, head) for layer in range(self.layers) for kind in KINDS
                     for head in range(self.kv_heads))

    @property
    def elements_per_token(self) -> int:
        """Cached values per token over every layer, keys and values."""
        return self.layers * len(KINDS) * self.kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return {"layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim}

    @classmethod
    def from_dict(cls, d: Mapping) -> "KVLayout":
        return cls(int(d["layers"]), int(d["kv_heads"]), int(d["head_dim"]))


def unit_name(layer: int, kind: str, head: int) -> str:
    return f"layer{layer}.{kind}.head{head}"


def layout_of(config) -> KVLayout:
    """The cache layout of a transformers config: every layer must be full
    attention with one shared head dimension (what the cache here handles)."""
    text = getattr(config, "get_text_config", lambda: config)()
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    if not layers or not heads:
        raise BitallocError(f"The model's config ({type(config).__name__}) names no num_hidden_layers / "
                            "num_attention_heads; the KV cache commands need a decoder-only attention model.")
    layer_types = getattr(text, "layer_types", None)
    if layer_types and any(t not in ("full_attention", "sliding_attention") for t in layer_types):
        odd = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
        raise BitallocError(f"The model has layers of kind {odd}; the KV cache commands handle attention layers "
                            "only (no recurrent or linear-attention layers).")
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return KVLayout(int(layers), int(kv_heads), int(head_dim))


def token_bits(layout: KVLayout, codecs: Sequence[KVCodec]) -> int:
    """Bits one token adds to the cache, with ``codecs`` in ``layout.units`` order."""
    if len(codecs) != len(layout.units):
        raise BitallocError(f"{len(codecs)} codecs were given for {len(layout.units)} KV units.")
    return sum(c.vector_bits(layout.head_dim) for c in codecs)


def fixed_bits(codecs: Sequence[KVCodec]) -> int:
    """Bits stored once whatever the context (each distinct codec's seed)."""
    return sum(c.fixed_bits for c in set(codecs))


def cache_bytes(layout: KVLayout, codecs: Sequence[KVCodec], context: int) -> float:
    """Bytes of the cache holding ``context`` tokens, seeds included."""
    return (context * token_bits(layout, codecs) + fixed_bits(codecs)) / 8


def bits_per_element(layout: KVLayout, codecs: Sequence[KVCodec]) -> float:
    """Average stored bits per cached value (scales and norms included, seeds not:
    they do not grow with the context)."""
    return token_bits(layout, codecs) / layout.elements_per_token
