"""Storage options and the exact cost model.

An option is one way to store a 2-D weight of shape (rows, cols) = (out, in):
integer codes of ``bits`` bits, in groups of ``group_size`` consecutive input
columns, each group with an fp16 scale and (asymmetric only) an fp16 zero
point. ``storage_bits`` counts every stored bit: codes + scales + zeros.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from bitalloc.errors import BitallocError, GroupSizeError
from bitalloc.formats.groups import group_count

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
DEFAULT_GROUP_SIZES = (32, 64, 128, 0)  # 0 = one group per output channel
SCALE_BITS = 16  # fp16 scale per group
ZERO_BITS = 16  # fp16 zero point per group (asymmetric only)
COLUMN_BITS_ENTRY = 8  # a mixed option stores each column group's bit-width in one byte
MIXED_KINDS = ("slim", "baq")  # SliM-LLM salience pairs, BAQ water-filling

_NAME = re.compile(r"^int(\d+)-(?:g(\d+)|(pc))-(asym|sym)(?:~(slim|baq))?$")


@dataclass(frozen=True)
class QuantOption:
    """Integer affine quantization of a weight: bits, group size, symmetry.

    ``group_size == 0`` means per-channel: one group spans all input columns.
    """

    bits: int
    group_size: int
    symmetric: bool = False
    # "" for one bit-width; "slim"/"baq": each group of input columns (all
    # rows) has its own bit-width, ``bits`` on average (the vector is per unit)
    mixed: str = ""

    def __post_init__(self) -> None:
        if self.mixed and (self.mixed not in MIXED_KINDS or self.group_size == 0):
            raise BitallocError(
                f"A mixed option must be one of {list(MIXED_KINDS)} with a positive group size. Got {self.mixed!r} "
                f"with group size {self.group_size}."
            )
        if self.bits not in SUPPORTED_BITS:
            raise BitallocError(
                f"The 'bits' of an option must be one of {list(SUPPORTED_BITS)}. Got {self.bits} instead."
            )
        if self.group_size < 0:
            raise BitallocError(
                f"The 'group_size' of an option must be 0 (per-channel) or positive. Got {self.group_size} instead."
            )

    @property
    def name(self) -> str:
        group = "pc" if self.group_size == 0 else f"g{self.group_size}"
        return f"int{self.bits}-{group}-{'sym' if self.symmetric else 'asym'}" + (f"~{self.mixed}" if self.mixed else "")

    @property
    def base(self) -> "QuantOption":
        return QuantOption(self.bits, self.group_size, self.symmetric)

    @property
    def family(self) -> str:
        """Options that differ only in bits: same groups, scheme and mixing."""
        return self.name.split("-", 1)[1]

    @property
    def overhead_bits_per_group(self) -> int:
        return SCALE_BITS + (0 if self.symmetric else ZERO_BITS)

    @classmethod
    def parse(cls, name: str) -> "QuantOption":
        m = _NAME.match(name.strip())
        if not m:
            raise BitallocError(
                f"Unknown option name {name!r}. Expected int<bits>-g<group>|pc-asym|sym, e.g. 'int4-g128-asym' or 'int8-pc-sym'."
            )
        bits, group, pc, scheme, mixed = m.groups()
        return cls(bits=int(bits), group_size=0 if pc else int(group), symmetric=scheme == "sym", mixed=mixed or "")

    def __str__(self) -> str:
        return self.name

    # ---- the Format protocol (bitalloc.formats) ------------------------------
    uses_importance = True  # scales by the importance-weighted search (affine_rtn.search_qparams)
    requires_importance = False
    is_affine = True  # integer codes with fp16 scales: what GPTQ and the affine probes handle

    def available(self, shape: Sequence[int]) -> bool:
        """Whether the group size divides the input columns (per-channel always does)."""
        try:
            group_count(int(shape[-1]), self)
        except GroupSizeError:
            return False
        return True

    def storage_bits(self, shape: Sequence[int], *, allow_ragged: bool = False, name: str = "") -> int:
        return storage_bits(shape, self, allow_ragged=allow_ragged, name=name)

    def quantize(self, W, importance=None, *, allow_ragged: bool = False, column_bits: tuple[int, ...] | None = None):
        """Round-to-nearest codes, fp16 scales and zeros; with ``importance``
        (in,), each group's scale and zero by the weighted clipping search;
        ``column_bits``: a mixed option's bit-width per column group."""
        from bitalloc.formats.affine_rtn import quantize_rtn

        return quantize_rtn(W, self, allow_ragged=allow_ragged, column_bits=column_bits, importance=importance)

    def dequantize(self, stored):
        from bitalloc.formats.affine_rtn import dequantize

        return dequantize(stored)


def storage_bits(shape: Sequence[int], option: QuantOption, *, allow_ragged: bool = False, name: str = "") -> int:
    """Exact stored bits of a (rows, cols) weight under ``option``:
    rows*cols*bits for codes + rows*groups*(16 [+16]) for fp16 scales [and
    zeros] (+ one byte per column group for a mixed option's bit-widths,
    whose mean is exactly ``bits``)."""
    rows, cols = int(shape[0]), int(shape[1])
    groups = group_count(cols, option, allow_ragged=allow_ragged and not option.mixed, name=name)
    table = groups * COLUMN_BITS_ENTRY if option.mixed else 0
    return rows * cols * option.bits + rows * groups * option.overhead_bits_per_group + table


def build_menu(
    bits: Iterable[int] = DEFAULT_BITS,
    group_sizes: Iterable[int] = DEFAULT_GROUP_SIZES,
    schemes: Iterable[str] = ("asym", "sym"),
) -> tuple[QuantOption, ...]:
    """All combinations, sorted by (bits, overhead) so cheaper options come first."""
    schemes = tuple(schemes)
    for s in schemes:
        if s not in ("asym", "sym"):
            raise BitallocError(f"The 'schemes' parameter must be a subset of ['asym', 'sym']. Got {s!r} instead.")
    menu = {
        QuantOption(b, g, s == "sym")
        for b in bits
        for g in group_sizes
        for s in schemes
    }
    return tuple(sorted(menu, key=lambda o: (o.bits, o.group_size == 0, -o.group_size, o.symmetric)))
