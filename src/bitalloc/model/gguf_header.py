"""A GGUF file's header read in milliseconds: its metadata (scalars and
strings; arrays by element type and length) and every tensor's name, shape,
type and byte range, without touching the tensor data.

gguf-py's ``GGUFReader`` builds a numpy view per array element, which takes
seconds on a real model's vocabulary (SmolLM2's 49,152 tokens and merges:
about 3 s); the checks, sizes and names bitalloc needs before loading a model
read only this. Layout (GGUF v2/v3): magic, version, tensor count, metadata
count, the metadata key/values, the tensor infos, padding to the alignment,
then the data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class ArrayInfo:
    """A metadata array, by element type (GGUF's value type id) and length."""

    element_type: int
    length: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: the row length (fastest dimension) first
    type_id: int
    offset: int  # from the start of the file
    n_bytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict  # key -> int | float | bool | str | ArrayInfo
    tensors: tuple[TensorInfo, ...]
    data_start: int

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def field(self, suffix: str):
        """The value of ``<architecture>.<suffix>`` (e.g. "context_length"), or None."""
        return self.metadata.get(f"{self.architecture}.{suffix}")

    @property
    def tensor_data_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)


class _Reader:
    def __init__(self, f: BinaryIO, endian: str):
        self.f, self.endian = f, endian

    def unpack(self, code: str):
        size = struct.calcsize(code)
        raw = self.f.read(size)
        if len(raw) != size:
            raise ValueError("the header ends early")
        return struct.unpack(self.endian + code, raw)[0]

    def string(self) -> str:
        n = self.unpack("Q")
        raw = self.f.read(n)
        if len(raw) != n:
            raise ValueError("a string runs past the end of the file")
        return raw.decode("utf-8")

    def value(self, type_id: int):
        if type_id in _SCALARS:
            return self.unpack(_SCALARS[type_id])
        if type_id == _STRING:
            return self.string()
        if type_id == _ARRAY:
            element, length = self.unpack("I"), self.unpack("Q")
            self.skip_array(element, length)
            return ArrayInfo(element, length)
        raise ValueError(f"unknown metadata value type {type_id}")

    def skip_array(self, element: int, length: int) -> None:
        if element in _SCALARS:
            self.f.seek(struct.calcsize(_SCALARS[element]) * length, 1)
        elif element == _STRING:
            for _ in range(length):
                self.f.seek(self.unpack("Q"), 1)
        else:  # nested arrays: read each
            for _ in range(length):
                self.value(element)


def _tensor_bytes(type_id: int, shape: tuple[int, ...]) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    n = 1
    for d in shape:
        n *= d
    if n % block:
        raise ValueError(f"a tensor of {n} elements is not whole blocks of {block}")
    return n // block * type_size


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """The header of a GGUF file; ``ValueError`` (or ``struct.error``,
    ``UnicodeDecodeError``) if it is not one or is damaged."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError("it does not start with the GGUF magic bytes")
        raw = f.read(4)
        if len(raw) != 4:
            raise ValueError("the header ends early")
        endian = "<" if struct.unpack("<I", raw)[0] & 0xFFFF else ">"  # a big-endian version reads 0x30000
        r = _Reader(f, endian)
        version = struct.unpack(endian + "I", raw)[0]
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not 2 or 3")
        n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
        metadata = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(r.unpack("I"))
        infos = []
        for _ in range(n_tensors):
            name = r.string()
            shape = tuple(r.unpack("Q") for _ in range(r.unpack("I")))
            infos.append((name, shape, r.unpack("I"), r.unpack("Q")))
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise ValueError(f"general.alignment is {alignment!r}")
        data_start = -(-f.tell() // alignment) * alignment
    tensors = tuple(TensorInfo(name, shape, type_id, data_start + offset, _tensor_bytes(type_id, shape))
                    for name, shape, type_id, offset in infos)
    return GGUFHeader(version, metadata, tensors, data_start)
