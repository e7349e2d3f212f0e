"""The KV cache plan: unit -> codec, a versioned JSON file a person can read
and edit, with the budget, the realized bits, how it was chosen and the
llama.cpp K/V pair of the same budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bitalloc.errors import BitallocError
from bitalloc.fileio import read_json, write_json
from bitalloc.formats.kv import KVCodec, parse_codec
from bitalloc.kvcache.layout import KVLayout, bits_per_element, cache_bytes
from bitalloc.schema import check_header, need, string_map

FORMAT, VERSION = "bitalloc.kvplan", 1


@dataclass(frozen=True)
class KVPlan:
    model: str
    layout: KVLayout
    assignment: dict[str, str]  # unit name -> codec name
    budget_bpe: float
    scorer: str = ""
    objective: float | None = None
    guard: dict = field(default_factory=dict)  # the uniform codec it was measured against, and the verdict
    llamacpp: dict = field(default_factory=dict)  # {"k": "q8_0", "v": "q4_0", "flags": ...}

    def __post_init__(self) -> None:
        units = set(self.layout.units)
        if set(self.assignment) != units:
            missing, extra = sorted(units - set(self.assignment)), sorted(set(self.assignment) - units)
            raise BitallocError(f"The KV plan must name every unit of its layout once: missing {missing[:3]}"
                                f"{'…' if len(missing) > 3 else ''}, unknown {extra[:3]}{'…' if len(extra) > 3 else ''}.")
        for unit, name in self.assignment.items():
            codec = parse_codec(name)
            if not codec.available(self.layout.head_dim):
                raise BitallocError(f"The KV plan stores {unit} as {name}, which cannot store a head dimension of "
                                    f"{self.layout.head_dim}.")

    @property
    def codecs(self) -> list[KVCodec]:
        """One codec per unit, in ``layout.units`` order."""
        return [parse_codec(self.assignment[u]) for u in self.layout.units]

    def cache(self, config=None):
        """A fresh transformers cache that stores every unit through this plan's
        codec: pass it as the model's cache (``model.generate(ids, cache=...)``,
        ``past_key_values=`` before transformers 5.2x). It holds the decoded
        values in the model's dtype: it reproduces the plan's quality, not its memory."""
        from bitalloc.kvcache.cache import KVAssignment, quantizing_cache

        return quantizing_cache(KVAssignment.per_unit(self.layout, self.codecs), config)

    @property
    def bpe(self) -> float:
        return bits_per_element(self.layout, self.codecs)

    def check_budget(self) -> None:
        if self.bpe > self.budget_bpe + 1e-9:
            raise BitallocError(f"The KV plan stores {self.bpe:.4f} bits per value, above its budget of "
                                f"{self.budget_bpe}. Edit it back under the budget or raise 'budget_bpe'.")

    def to_dict(self, context: int = 8192) -> dict:
        return {"format": FORMAT, "version": VERSION, "model": self.model, "layout": self.layout.to_dict(),
                "budget_bpe": self.budget_bpe, "bpe": self.bpe,
                "bytes_at": {"context": context, "bytes": cache_bytes(self.layout, self.codecs, context)},
                "bpe_note": "stored bits per cached value over every layer, head, key and value, scales and norms "
                            "included; bytes_at adds each rotation codec's 64-bit seed",
                "scorer": self.scorer, "objective": self.objective, "guard": self.guard, "llamacpp": self.llamacpp,
                "assignment": dict(self.assignment)}

    @classmethod
    def from_dict(cls, data: dict, where: str = "The KV plan") -> "KVPlan":
        data = check_header(data, FORMAT, VERSION, where, "KV cache plan")
        layout_d = need(data, "layout", "object", where)
        try:
            layout = KVLayout.from_dict(layout_d)
        except (KeyError, TypeError, ValueError) as e:
            raise BitallocError(f"{where}: field 'layout' must hold integers layers, kv_heads, head_dim ({e}).") \
                from None
        return cls(model=need(data, "model", "string", where), layout=layout,
                   assignment=string_map(need(data, "assignment", "object", where), where, "assignment"),
                   budget_bpe=float(need(data, "budget_bpe", "number", where)),
                   scorer=need(data, "scorer", "string", where, optional=True, default=""),
                   objective=need(data, "objective", "number", where, optional=True),
                   guard=need(data, "guard", "object", where, optional=True, default={}),
                   llamacpp=need(data, "llamacpp", "object", where, optional=True, default={}))

    def save(self, path: str) -> None:
        self.check_budget()
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> "KVPlan":
        if not Path(path).is_file():
            raise BitallocError(f"KV plan file {path!r} does not exist. Make one with `bitalloc kv --out DIR`.")
        plan = cls.from_dict(read_json(path, "KV plan file"), where=f"KV plan file {path!r}")
        plan.check_budget()
        return plan
