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
with fp16 scales and zeros; ``gguf_types``: llama.cpp's own types, quantized
by ggml itself through ``ggml``). This package imports nothing heavy; a format
loads its backend the first time it is used.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable


@runtime_checkable
class Format(Protocol):
    """What the solver and the quantizers need from a way of storing a weight."""

    @property
    def name(self) -> str: ...

    def available(self, shape: Sequence[int]) -> bool: ...

    def storage_bits(self, shape: Sequence[int]) -> int: ...

    def quantize(self, W: Any, importance: Any = None) -> Any: ...

    def dequantize(self, stored: Any) -> Any: ...


__all__ = ["Format"]
