"""The runtime menu of vLLM: weight-only integer schemes as compressed-tensors stores them.

vLLM serves quantized weights from compressed-tensors checkpoints (what
llm-compressor writes) through its mixed-precision kernels (Marlin, Machete,
...): ``W4A16`` and ``W8A16``, integer weights of 4 or 8 bits, activations
left in 16 bits, one scale per group of 32, 64 or 128 input columns or per
output channel, symmetric or with an integer zero point. A scheme here is an
integer affine option (``formats.affine.QuantOption``: the same codes,
scales and zero points; GPTQ and RTN quantize into it unchanged) whose cost
is the layout of compressed-tensors' ``pack-quantized`` format, counted from
its tensors:

- ``weight_packed``: int32 ``(out, ceil(in * bits / 32))``, codes packed
  densely along each row;
- ``weight_scale``: 16-bit float ``(out, groups)``;
- ``weight_zero_point`` (asymmetric only): int32 ``(ceil(out * bits / 32),
  groups)``, the integer zero points packed down the columns;
- ``weight_shape``: int64 ``(2,)``.

Names: ``w4a16-g128-sym``, ``w8a16-pc-asym`` (pc: one group per output
channel, compressed-tensors' ``channel`` strategy).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

from bitalloc.errors import BitallocError
from bitalloc.formats.affine import QuantOption
from bitalloc.formats.groups import group_count

WNA16_BITS = (4, 8)  # what vLLM's WNA16 kernels take from compressed-tensors
WNA16_GROUP_SIZES = (32, 64, 128, 0)  # Marlin's group sizes; 0 = per output channel
SCALE_BITS = 16  # weight_scale in the checkpoint's 16-bit float type
SHAPE_BITS = 2 * 64  # weight_shape: two int64
WORD_BITS = 32  # packed codes and zero points fill int32 words

_NAME = re.compile(r"^w(\d+)a16-(?:g(\d+)|(pc))-(asym|sym)$")


@dataclass(frozen=True)
class WNA16Option(QuantOption):
    """One compressed-tensors weight-only integer scheme vLLM serves."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits not in WNA16_BITS or self.group_size not in WNA16_GROUP_SIZES or self.mixed:
            raise BitallocError(
                f"vLLM serves integer weights of {list(WNA16_BITS)} bits in groups of "
                f"{[g for g in WNA16_GROUP_SIZES if g]} columns or per channel; got {self.bits} bits, group size "
                f"{self.group_size}{' mixed' if self.mixed else ''}."
            )

    @property
    def name(self) -> str:
        group = "pc" if self.group_size == 0 else f"g{self.group_size}"
        return f"w{self.bits}a16-{group}-{'sym' if self.symmetric else 'asym'}"

    @classmethod
    def parse(cls, name: str) -> "WNA16Option":
        m = _NAME.match(name.strip())
        if not m:
            raise BitallocError(f"Unknown vLLM scheme {name!r}. Expected w<4|8>a16-g<32|64|128>|pc-sym|asym, e.g. "
                                "'w4a16-g128-sym' or 'w8a16-pc-asym'.")
        bits, group, pc, scheme = m.groups()
        return cls(bits=int(bits), group_size=0 if pc else int(group), symmetric=scheme == "sym")

    def storage_bits(self, shape: Sequence[int], *, allow_ragged: bool = False, name: str = "") -> int:
        return wna16_storage_bits(shape, self, name=name)

    def scheme_args(self) -> dict:
        """The ``weights`` entry of a compressed-tensors config group (QuantizationArgs fields)."""
        return {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
                "strategy": "channel" if self.group_size == 0 else "group",
                "group_size": None if self.group_size == 0 else self.group_size}


def wna16_storage_bits(shape: Sequence[int], option: WNA16Option, *, name: str = "") -> int:
    """Exact stored bits of a (rows, cols) weight in compressed-tensors'
    pack-quantized layout: packed int32 codes, 16-bit scales, packed int32
    zero points (asymmetric), and the int64 shape. A group size must divide
    the columns (vLLM's kernels take no ragged group)."""
    rows, cols = int(shape[0]), int(shape[1])
    groups = group_count(cols, option, name=name)
    codes = rows * math.ceil(cols * option.bits / WORD_BITS) * WORD_BITS
    zeros = 0 if option.symmetric else math.ceil(rows * option.bits / WORD_BITS) * groups * WORD_BITS
    return codes + rows * groups * SCALE_BITS + zeros + SHAPE_BITS


def wna16_menu(bits: Sequence[int], group_sizes: Sequence[int], schemes: Sequence[str]) -> tuple[WNA16Option, ...]:
    """Every scheme of those bits, group sizes and symmetries, cheapest first."""
    menu = {WNA16Option(b, g, s == "sym") for b in bits for g in group_sizes for s in schemes}
    return tuple(sorted(menu, key=lambda o: (o.bits, o.group_size == 0, -o.group_size, o.symmetric)))
