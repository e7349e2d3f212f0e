"""Key-value cache codecs: the ways one attention head's key or value vector
of one token can be stored in the cache.

A codec is a small frozen object with

- ``name``: ``f16``, ``q8_0`` (a llama.cpp cache type), ``int4`` (integer
  affine per token and head), ``rot3`` (rotation + Lloyd-Max);
- ``available(head_dim) -> bool``;
- ``vector_bits(head_dim) -> int``: the exact bits stored per head vector of
  one token, codes and every scale, minimum and norm included;
- ``fixed_bits``: bits stored once per model for the codec (a rotation's seed);
- ``fake_quantize(x) -> x̂``: x is ``(..., head_dim)``; each vector is
  quantized on its own and the float32 reconstruction returned, which is all
  an evaluation needs (each token's vectors are written once, as a runtime's
  cache does).

Families:

- ``FloatCodec`` — ``f16``/``bf16``: the vector in half precision.
- ``GgmlCacheCodec`` — llama.cpp's cache types (``q8_0``, ``q5_1``, ``q5_0``,
  ``q4_1``, ``q4_0``, ``iq4_nl``), quantized by ggml itself in blocks of 32
  along the head dimension, as ``--cache-type-k/-v`` stores them.
- ``IntCodec`` — ``int{b}``: b-bit codes with one fp16 scale and one fp16
  minimum per vector (KIVI's per-token layout, used for keys and values alike).
- ``RotationCodec`` — ``rot{b}`` (OCTOPUS / TurboQuant style): the vector's
  norm in fp16, the unit vector turned by a seeded random-sign Hadamard
  rotation (a seeded Haar rotation when the head dimension is not a power of
  two), then every coordinate quantized by the b-bit Lloyd-Max quantizer of
  the rotated coordinate's exact marginal: after a uniform random rotation
  ``sqrt(d) * u_i`` has density proportional to ``(1 - t^2/d)^((d-3)/2)``,
  close to N(0, 1). Data-oblivious and deterministic given the seed.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from bitalloc.errors import BitallocError

GGML_CACHE_TYPES = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")  # llama.cpp's --cache-type-k/-v values
CODEC_BITS = range(1, 9)
ROTATION_SEED = 0x5EED  # the default seed; a codec with another seed is another codec


# ---- Lloyd-Max scalar quantizers ----------------------------------------------------------------

@dataclass(frozen=True)
class LloydMax:
    levels: np.ndarray  # (2^b,) reconstruction points, increasing
    thresholds: np.ndarray  # (2^b - 1,) decision boundaries, the midpoints of neighbouring levels
    distortion: float  # E[(X - Q(X))^2]


def lloyd_max(bits: int, density: Callable[[np.ndarray], np.ndarray], lo: float, hi: float, *,
              points: int = 1 << 18, iterations: int = 2000) -> LloydMax:
    """The b-bit Lloyd-Max quantizer of a density on [lo, hi] (normalised here):
    alternate thresholds = midpoints and levels = cell centroids until still.
    Cell masses and moments come from cumulative sums on a fine grid, so an
    iteration costs O(levels log grid)."""
    x = np.linspace(lo, hi, points)  # (P,)
    w = density(x) * (x[1] - x[0])  # (P,) probability mass per grid point
    w = w / w.sum()
    c0, c1, c2 = (np.concatenate([[0.0], np.cumsum(w * x**k)]) for k in range(3))  # (P+1,) cumulative moments
    n = 1 << bits
    levels = np.interp((np.arange(n) + 0.5) / n, c0[1:], x)  # start at the quantiles
    for _ in range(iterations):
        thresholds = (levels[1:] + levels[:-1]) / 2
        edges = np.concatenate([[0], np.searchsorted(x, thresholds), [points]])  # (n+1,) grid cells per level
        mass, moment = np.diff(c0[edges]), np.diff(c1[edges])
        new = np.where(mass > 0, moment / np.maximum(mass, 1e-300), levels)
        if np.max(np.abs(new - levels)) < 1e-12:
            levels = new
            break
        levels = new
    thresholds = (levels[1:] + levels[:-1]) / 2
    edges = np.concatenate([[0], np.searchsorted(x, thresholds), [points]])
    mass, moment, second = np.diff(c0[edges]), np.diff(c1[edges]), np.diff(c2[edges])
    distortion = float(np.sum(second - 2 * levels * moment + levels**2 * mass))
    return LloydMax(levels=levels, thresholds=thresholds, distortion=distortion)


def gaussian_density(x: np.ndarray) -> np.ndarray:
    return np.exp(-x * x / 2) / math.sqrt(2 * math.pi)


@functools.lru_cache(maxsize=64)
def gaussian_lloyd_max(bits: int) -> LloydMax:
    return lloyd_max(bits, gaussian_density, -12.0, 12.0)


@functools.lru_cache(maxsize=64)
def rotated_lloyd_max(bits: int, head_dim: int) -> LloydMax:
    """Lloyd-Max for ``sqrt(d) * u_i``, one coordinate of a uniformly random
    unit vector of dimension d, scaled to unit variance."""
    d = float(head_dim)
    edge = math.sqrt(d)

    def density(t: np.ndarray) -> np.ndarray:
        return np.clip(1 - t * t / d, 0.0, None) ** ((d - 3) / 2)

    return lloyd_max(bits, density, -edge, edge)


# ---- the seeded rotation ------------------------------------------------------------------------

def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@functools.lru_cache(maxsize=64)
def rotation(head_dim: int, seed: int) -> torch.Tensor:
    """(d, d) float32 orthogonal matrix R, a function of (d, seed) only: the
    normalised Sylvester-Hadamard matrix times a diagonal of random signs when
    d is a power of two, else the Q of a seeded Gaussian matrix's QR (signs
    fixed so that it is Haar-distributed). Rows are applied as ``x @ R.T``."""
    gen = torch.Generator().manual_seed(int(seed))
    if _is_power_of_two(head_dim):
        H = torch.ones(1, 1, dtype=torch.float64)
        while H.shape[0] < head_dim:
            H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
        signs = torch.randint(0, 2, (head_dim,), generator=gen, dtype=torch.int64) * 2 - 1  # (d,)
        R = H / math.sqrt(head_dim) * signs.to(torch.float64)[None, :]
    else:
        G = torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64)
        Q, Rq = torch.linalg.qr(G)
        R = Q * torch.sign(torch.diagonal(Rq))[None, :]
    return R.to(torch.float32).contiguous()


# ---- codecs -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FloatCodec:
    name: str = "f16"
    fixed_bits: int = 0

    def available(self, head_dim: int) -> bool:
        return head_dim > 0

    def vector_bits(self, head_dim: int) -> int:
        return 16 * head_dim

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.float16 if self.name == "f16" else torch.bfloat16
        return x.to(dtype).to(x.dtype)


@dataclass(frozen=True)
class GgmlCacheCodec:
    """A llama.cpp cache type; ggml stores each token's row of all KV heads
    in blocks of 32 values, so a block never straddles two heads when 32
    divides the head dimension, and per-head storage is the same bytes."""

    name: str  # "q8_0"
    fixed_bits: int = 0

    def available(self, head_dim: int) -> bool:
        return head_dim % 32 == 0

    def vector_bits(self, head_dim: int) -> int:
        from bitalloc.formats.ggml import row_size

        self._check(head_dim)
        return 8 * row_size(self.name.upper(), head_dim)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        from bitalloc.formats.ggml import dequantize_rows, quantize_rows

        d = x.shape[-1]
        self._check(d)
        rows = x.detach().reshape(-1, d).to(torch.float32).numpy()  # (vectors, d)
        out = dequantize_rows(self.name.upper(), quantize_rows(self.name.upper(), rows), d)
        return torch.from_numpy(out).reshape(x.shape).to(x.dtype)

    def _check(self, head_dim: int) -> None:
        if not self.available(head_dim):
            raise BitallocError(f"The cache type {self.name} stores blocks of 32 values; a head dimension of "
                                f"{head_dim} is not a multiple of 32. Use f16, int<b> or rot<b> for this model.")


@dataclass(frozen=True)
class IntCodec:
    """b-bit integer codes, round to nearest between the vector's min and max,
    with an fp16 scale and an fp16 minimum per vector."""

    bits: int
    fixed_bits: int = 0

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def available(self, head_dim: int) -> bool:
        return head_dim > 0

    def vector_bits(self, head_dim: int) -> int:
        return self.bits * head_dim + 16 + 16

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.float32)
        lo = xf.amin(-1, keepdim=True).to(torch.float16).to(torch.float32)  # (..., 1) the stored minimum
        top = (1 << self.bits) - 1
        scale = ((xf.amax(-1, keepdim=True) - lo) / top).to(torch.float16).to(torch.float32)  # (..., 1)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round((xf - lo) / safe), 0, top)  # (..., d) codes
        return (q * scale + lo).to(x.dtype)


@dataclass(frozen=True)
class RotationCodec:
    """fp16 norm + seeded rotation + per-coordinate Lloyd-Max codes."""

    bits: int
    seed: int = ROTATION_SEED
    fixed_bits: int = 64  # the seed, stored once

    @property
    def name(self) -> str:
        return f"rot{self.bits}" if self.seed == ROTATION_SEED else f"rot{self.bits}-s{self.seed}"

    def available(self, head_dim: int) -> bool:
        return head_dim >= 8

    def vector_bits(self, head_dim: int) -> int:
        return self.bits * head_dim + 16

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        if not self.available(d):
            raise BitallocError(f"The rotation codec needs a head dimension of at least 8. Got {d} instead.")
        lm = rotated_lloyd_max(self.bits, d)
        xf = x.to(torch.float32)
        norm = xf.norm(dim=-1, keepdim=True)  # (..., 1)
        stored_norm = norm.to(torch.float16).to(torch.float32)
        R = rotation(d, self.seed)  # (d, d)
        y = (xf / torch.where(norm > 0, norm, torch.ones_like(norm))) @ R.T * math.sqrt(d)  # (..., d) ~ N(0, 1)
        idx = torch.bucketize(y, torch.from_numpy(lm.thresholds).to(torch.float32))  # (..., d) codes
        y_hat = torch.from_numpy(lm.levels).to(torch.float32)[idx]  # (..., d)
        return (y_hat @ R / math.sqrt(d) * stored_norm).to(x.dtype)


KVCodec = FloatCodec | GgmlCacheCodec | IntCodec | RotationCodec

DEFAULT_MENU = ("f16", "int8", "int4", "int2", "rot4", "rot3", "rot2")


def parse_codec(name: str) -> KVCodec:
    """A codec by name: f16, bf16, q8_0 … iq4_nl, int<1-8>, rot<1-8> (rot<b>-s<seed> for another seed)."""
    text = str(name).strip().lower()
    if text in ("f16", "bf16"):
        return FloatCodec(text)
    if text in GGML_CACHE_TYPES:
        return GgmlCacheCodec(text)
    m = re.fullmatch(r"(int|rot)(\d+)(?:-s(\d+))?", text)
    if m and int(m.group(2)) in CODEC_BITS and (m.group(1) == "rot" or m.group(3) is None):
        bits = int(m.group(2))
        if m.group(1) == "int":
            return IntCodec(bits)
        return RotationCodec(bits, seed=int(m.group(3)) if m.group(3) else ROTATION_SEED)
    raise BitallocError(
        f"Unknown KV cache codec {name!r}. Use f16, bf16, one of llama.cpp's cache types {list(GGML_CACHE_TYPES)}, "
        f"int<b> or rot<b> with b in 1..8 (e.g. int4, rot3).")


def bits_per_element(codec: KVCodec, head_dim: int) -> float:
    """Stored bits per cached value, the codec's scales and norms included."""
    return codec.vector_bits(head_dim) / head_dim
