"""llama.cpp's own weight types (Q4_K, IQ4_XS, ...) as bitalloc formats.

Each GGUF type stores a row of input weights in blocks (32 weights for
Q4_0..Q8_0 and IQ4_NL, 256 for the K-quants and most IQ types); a tensor whose
row length is not a whole number of blocks cannot use that type. Quantizing
and dequantizing are ggml's own (``bitalloc.formats.ggml``), so what is
stored here is byte for byte what llama.cpp would store, and the storage cost
is ggml's row size: every scale, minimum and grid index counted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

import bitalloc.formats.ggml as ggml
from bitalloc.errors import BitallocError, GroupSizeError

# The GGUF types offered as options, where the installed ggml supports them.
GGUF_TYPE_NAMES: tuple[str, ...] = (
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "F16",
)
# llama.cpp's presets (llama-quantize's file types) that `compare --format gguf` and the demo measure against.
PRESETS: tuple[str, ...] = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M",
                            "Q6_K")
# ggml's quantizers for these discard the importance vector (ggml-quants.c:
# quantize_q8_0 rounds each block to nearest; F16 is a cast).
_IGNORES_IMPORTANCE = frozenset({"Q8_0", "F16"})


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; torch is not imported here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


@dataclass(frozen=True)
class GGUFStored:
    """One quantized tensor: ggml's rows back to back, as a GGUF file holds them."""

    type_name: str
    shape: tuple[int, ...]  # of the weight, (out, in); rows run along the last axis
    data: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class GGUFType:
    """A GGUF type as a format: ``GGUFType("Q4_K")``; ``parse_gguf_type`` takes any case."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in GGUF_TYPE_NAMES:
            raise BitallocError(f"The 'name' of a GGUF type must be one of {list(GGUF_TYPE_NAMES)}. "
                                f"Got {self.name!r} instead.")

    @property
    def ggml(self) -> ggml.GgmlType:
        """The installed ggml's description of this type (loads ggml on first use)."""
        return ggml.ggml_type(self.name)

    @property
    def block_size(self) -> int:
        return self.ggml.block_size

    @property
    def bpw(self) -> float:
        """Stored bits per weight of this type, block scales and minimums included."""
        return self.ggml.bpw

    @property
    def bits(self) -> int:
        """Nominal bits of the type's codes (Q4_K: 4, IQ3_S: 3, F16: 16); the
        exact cost, scales and grid indices included, is ``storage_bits``."""
        return int(re.search(r"\d+", self.name).group())

    @property
    def family(self) -> str:
        """Types that differ only in bits: the K-quants (Q2_K..Q6_K), the
        symmetric 32-weight blocks (Q4_0, Q5_0, Q8_0), the asymmetric ones
        (Q4_1, Q5_1); every other type is a family of its own."""
        if re.fullmatch(r"Q\d_K", self.name):
            return "Q_K"
        if re.fullmatch(r"Q\d_[01]", self.name):
            return "Q_" + self.name[-1]
        return self.name

    # What the planner asks of any option besides its cost: GGUF types are
    # neither mixed nor symmetric/affine in bitalloc's sense; their block
    # length plays the part of a group size.
    mixed = ""
    symmetric = False
    is_affine = False

    @property
    def group_size(self) -> int:
        return self.block_size

    @property
    def uses_importance(self) -> bool:
        """Whether ggml's quantizer for this type weighs its error by an importance vector."""
        return self.name not in _IGNORES_IMPORTANCE

    @property
    def requires_importance(self) -> bool:
        return self.ggml.requires_importance

    def available(self, shape: Sequence[int]) -> bool:
        return len(shape) >= 1 and shape[-1] > 0 and shape[-1] % self.block_size == 0

    def _check_shape(self, shape: Sequence[int]) -> None:
        if not self.available(shape):
            raise BitallocError(f"{self.name} stores rows in blocks of {self.block_size} weights, so the input "
                                f"dimension must be a multiple of {self.block_size}. Got shape {tuple(shape)} instead.")

    def storage_bits(self, shape: Sequence[int], *, allow_ragged: bool = False, name: str = "") -> int:
        """Exact stored bits of a tensor of ``shape``: rows × ggml's row size ×
        8. A row is whole blocks or nothing (``allow_ragged`` cannot apply)."""
        if not self.available(shape):
            raise GroupSizeError(f"{self.name} stores rows in blocks of {self.block_size} weights; the "
                                 f"{shape[-1]} input columns of {name or 'a tensor'} are not a multiple of "
                                 f"{self.block_size}.")
        rows = math.prod(shape[:-1])
        return rows * ggml.row_size(self.name, shape[-1]) * 8

    def quantize(self, W: Any, importance: Any = None, *, allow_ragged: bool = False,
                 column_bits: tuple[int, ...] | None = None) -> GGUFStored:
        """W (out, in), torch or numpy; importance (in,): mean squared input
        activation. A GGUF type has one code width and whole blocks only."""
        if column_bits is not None:
            raise BitallocError(f"{self.name} has one code width; bit-widths per column group apply to integer options.")
        W = _as_numpy(W)  # (out, in)
        if W.ndim < 2:
            raise BitallocError(f"A weight to quantize must be (out, in). Got shape {tuple(W.shape)} instead.")
        self._check_shape(W.shape)
        imp = None if importance is None else _as_numpy(importance)  # (in,)
        rows = ggml.quantize_rows(self.name, W.reshape(-1, W.shape[-1]), imp)  # (out, bytes per row)
        return GGUFStored(self.name, tuple(int(s) for s in W.shape), rows.tobytes())

    def dequantize(self, stored: GGUFStored) -> np.ndarray:
        """Stored -> float32 numpy array of the weight's shape, (out, in)."""
        if stored.type_name != self.name:
            raise BitallocError(f"This tensor was stored as {stored.type_name}, not {self.name}.")
        W = ggml.dequantize_rows(self.name, stored.data, stored.shape[-1])  # (rows, in)
        return W.reshape(stored.shape)

    def __str__(self) -> str:
        return self.name


def gguf_types() -> tuple[GGUFType, ...]:
    """The GGUF types of ``GGUF_TYPE_NAMES`` that the installed ggml supports."""
    installed = ggml.ggml_types()
    return tuple(GGUFType(n) for n in GGUF_TYPE_NAMES if n in installed)


def parse_gguf_type(name: str) -> GGUFType:
    """"q4_k" or "Q4_K" -> the type; a clear error lists what this machine offers."""
    key = str(name).strip().upper()
    available = [t.name for t in gguf_types()]
    if key not in available:
        raise BitallocError(f"Unknown or unsupported GGUF type {name!r}. The installed ggml offers: "
                            f"{', '.join(available)}.")
    return GGUFType(key)
