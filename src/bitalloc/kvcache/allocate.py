"""From the KV error table to a plan: the budget, the solver, the guard
against the best uniform codec, and the llama.cpp K/V type pair.

Budgets are average stored bits per cached value (``bpe``), every codec's
scales and norms included, over all layers, heads, keys and values; a
budget in bytes at a context length converts to that exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from bitalloc.errors import BitallocError, InfeasibleBudgetError
from bitalloc.formats.kv import GGML_CACHE_TYPES, KVCodec, parse_codec
from bitalloc.kvcache.layout import KVLayout, bits_per_element
from bitalloc.kvcache.score import KVTable
from bitalloc.solve.solvers import solve_ilp

LLAMACPP_TYPES = ("f16", *GGML_CACHE_TYPES)


def budget_token_bits(layout: KVLayout, budget_bpe: float) -> int:
    """The bits one token may add to the cache (rounded down: never above the budget)."""
    return int(math.floor(budget_bpe * layout.elements_per_token + 1e-9))


def bpe_from_bytes(layout: KVLayout, budget_bytes: float, context: int) -> float:
    """The bits per value that a cache of ``budget_bytes`` at ``context`` tokens allows (seeds not counted)."""
    if context < 1:
        raise BitallocError(f"The 'context' parameter must be at least 1. Got {context} instead.")
    return budget_bytes * 8 / (context * layout.elements_per_token)


def feasible_bpe(layout: KVLayout, codecs: Sequence[KVCodec]) -> tuple[float, float]:
    bits = [c.vector_bits(layout.head_dim) / layout.head_dim for c in codecs if c.available(layout.head_dim)]
    return min(bits), max(bits)


def solve_kv(layout: KVLayout, table: KVTable, budget_bpe: float) -> tuple[list[KVCodec], float]:
    """The per-unit codecs of least total error whose bits fit the budget (HiGHS, exact), and that error."""
    codecs = [parse_codec(n) for n in table.codecs]
    allowed = np.array([[c.available(layout.head_dim) for c in codecs]] * len(layout.units))  # (U, O)
    if not allowed.any(axis=1).all():
        raise BitallocError(f"No codec of {list(table.codecs)} stores a head dimension of {layout.head_dim}.")
    lo, hi = feasible_bpe(layout, codecs)
    if budget_bpe < lo - 1e-9:
        raise InfeasibleBudgetError(f"A KV budget of {budget_bpe} bits per value is below what the codecs "
                                    f"{list(table.codecs)} reach: [{lo:.4f}, {hi:.4f}]. Raise the budget or add a "
                                    "cheaper codec.")
    cost = np.array([[c.vector_bits(layout.head_dim) for c in codecs]] * len(layout.units), dtype=np.int64)
    solution = solve_ilp(cost, table.errors, allowed, budget_token_bits(layout, budget_bpe))
    return [codecs[i] for i in solution.choice], solution.objective


def uniform_candidates(layout: KVLayout, codecs: Sequence[KVCodec], budget_bpe: float) -> list[KVCodec]:
    """The codecs that fit the budget when every unit uses them, most bits first."""
    fits = [c for c in codecs if c.available(layout.head_dim)
            and bits_per_element(layout, [c] * len(layout.units)) <= budget_bpe + 1e-9]
    return sorted(fits, key=lambda c: -c.vector_bits(layout.head_dim))


@dataclass(frozen=True)
class Pair:
    """One llama.cpp cache: ``--cache-type-k`` and ``--cache-type-v``."""

    k: str
    v: str

    @property
    def flags(self) -> str:
        return f"--cache-type-k {self.k} --cache-type-v {self.v}" + (" --flash-attn on" if self.v != "f16" else "")

    def bpe(self, head_dim: int) -> float:
        return (parse_codec(self.k).vector_bits(head_dim) + parse_codec(self.v).vector_bits(head_dim)) / (2 * head_dim)


def pair_estimates(layout: KVLayout, table: KVTable, budget_bpe: float) -> list[tuple[float, Pair]]:
    """(estimated error, pair) for every llama.cpp K/V type pair within the budget,
    best first; the estimate sums the table's errors of the K units at the K type
    and the V units at the V type (the table must hold llama.cpp's types)."""
    missing = [t for t in LLAMACPP_TYPES if t not in table.codecs]
    if missing:
        raise BitallocError(f"The KV table lacks llama.cpp's cache types {missing}; score with them in the menu.")
    err = table.errors  # (U, O)
    is_k = np.array([".k." in u for u in layout.units])
    out = []
    for k in LLAMACPP_TYPES:
        for v in LLAMACPP_TYPES:
            pair = Pair(k, v)
            if not (parse_codec(k).available(layout.head_dim) and parse_codec(v).available(layout.head_dim)):
                continue
            if pair.bpe(layout.head_dim) > budget_bpe + 1e-9:
                continue
            e = err[is_k, table.codecs.index(k)].sum() + err[~is_k, table.codecs.index(v)].sum()
            out.append((float(e), pair))
    if not out:
        raise InfeasibleBudgetError(f"No llama.cpp K/V cache type pair fits {budget_bpe} bits per value at head "
                                    f"dimension {layout.head_dim}; the cheapest is "
                                    f"{Pair('q4_0', 'q4_0').bpe(layout.head_dim):.3f}.")
    return sorted(out, key=lambda t: (t[0], -t[1].bpe(layout.head_dim)))
