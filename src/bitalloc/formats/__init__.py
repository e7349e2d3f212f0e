"""Storage formats: the ways one weight tensor can be stored.

A format is a small object with

- ``name``: a short stable string, e.g. ``"Q4_K"``;
- ``available(shape) -> bool``: whether a tensor of that shape can be stored
  this way (GGUF types need the row length to be a multiple of their block);
- ``storage_bits(shape) -> int``: the exact number of bits stored for a tensor
  of that shape, codes and every scale, minimum and codebook index included;
- ``quantize(W, importance=None) -> stored``: W is ``(out, in)``; importance,
  when the format uses one, is ``(in,)`` (llama.cpp's importance matrix:
  mean squared activation of each input column);
- ``dequantize(stored) -> W``: float32 ``(out, in)``.

Families live in submodules (``affine`` + ``affine_rtn``: integer affine codes
with fp16 scales and zeros; ``wna16``: the schemes vLLM serves from
compressed-tensors checkpoints, the same codes at that format's cost; ``gguf_types``: llama.cpp's own types, quantized
by ggml itself through ``ggml``). This package imports nothing heavy; a format
loads its backend the first time it is used.
"""

from __future__ import annotations

import re
from typing import Any, Protocol, Sequence, runtime_checkable


@runtime_checkable
class Format(Protocol):
    """What the solver and the quantizers need from a way of storing a weight."""

    @property
    def name(self) -> str: ...

    def available(self, shape: Sequence[int]) -> bool: ...

    def storage_bits(self, shape: Sequence[int], *, allow_ragged: bool = False, name: str = "") -> int: ...

    is_affine: bool  # integer codes with fp16 scales (GPTQ, mixed column groups, the affine probes)
    uses_importance: bool

    def quantize(self, W: Any, importance: Any = None) -> Any: ...

    def dequantize(self, stored: Any) -> Any: ...


def parse_option(name: str):
    """An option by name: ``int4-g64-sym`` (integer affine), ``w4a16-g128-sym``
    (a scheme vLLM serves) or a GGUF type (``Q4_K``)."""
    from bitalloc.errors import BitallocError
    from bitalloc.formats.affine import QuantOption
    from bitalloc.formats.gguf_types import GGUF_TYPE_NAMES, GGUFType
    from bitalloc.formats.wna16 import WNA16Option

    text = str(name).strip()
    if text.upper() in GGUF_TYPE_NAMES:
        return GGUFType(text.upper())
    if re.match(r"^w\d+a16-", text):
        return WNA16Option.parse(text)
    try:
        return QuantOption.parse(text)
    except BitallocError:
        raise BitallocError(f"Unknown option name {name!r}. Expected an integer affine option "
                            "int<bits>-g<group>|pc-asym|sym (e.g. 'int4-g128-asym'), a vLLM scheme "
                            "w<4|8>a16-g<group>|pc-asym|sym (e.g. 'w4a16-g128-sym') or a GGUF type "
                            f"({', '.join(GGUF_TYPE_NAMES)}).") from None


def is_gguf(option: Any) -> bool:
    from bitalloc.formats.gguf_types import GGUFType

    return isinstance(option, GGUFType)


def storage_bits(shape: Sequence[int], option: Any, *, allow_ragged: bool = False, name: str = "") -> int:
    """Exact stored bits of a (out, in) weight under any option; raises
    ``GroupSizeError`` where the option does not fit the shape."""
    return option.storage_bits(shape, allow_ragged=allow_ragged, name=name)


def fits(shape: Sequence[int], option: Any, *, allow_ragged: bool = False) -> bool:
    """Whether ``option`` can store a weight of ``shape`` (out, in)."""
    from bitalloc.errors import GroupSizeError

    try:
        storage_bits(shape, option, allow_ragged=allow_ragged)
    except GroupSizeError:
        return False
    return True


__all__ = ["Format", "fits", "is_gguf", "parse_option", "storage_bits"]
