"""Round-to-nearest integer affine quantization: pure tensor functions.

Weights are 2-D (rows, cols) = (out, in); groups run along ``cols``. Scales
and zero points are rounded to fp16 *before* the codes are chosen, so the
codes, scales and zeros that are stored reproduce exactly the weight that was
evaluated.

Given an importance vector (llama.cpp's imatrix: the mean squared input of
each column, from calibration text), each group's scale and zero point are
the ones, among the min/max range shrunk by the factors of ``SHRINK_GRID``,
whose importance-weighted squared error sum_j imp_j (w_j - deq_j)^2 is least
(the unshrunk range wins ties): the clipping search of llama.cpp's and AWQ's
quantizers, weighted by what the layer's output error actually depends on.
From each shrunk range the scale is also refitted ``REFIT_STEPS`` times, as
llama.cpp's ``make_qx_quants`` does: keep the codes that rounding gives, take
the scale that minimises the weighted error for those codes (weighted least
squares, zero point fixed), round again; every refitted scale is a candidate
too. Each step can only lower the error of its chain, so the search never
does worse than the shrink grid alone. The stored form is the same; only the
values of scales and zeros change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from bitalloc.errors import BitallocError
from bitalloc.formats.groups import group_count


class AffineSpec(Protocol):
    """What these primitives read of an integer affine option
    (``formats.affine.QuantOption``, which calls them)."""

    bits: int
    group_size: int
    symmetric: bool
    mixed: str

FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal)
FP16_MAX = 65504.0
SHRINK_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.0, 0.95, ..., 0.5 of the min/max range
REFIT_STEPS = 3  # least-squares scale refits from each shrunk range
SEARCH_SLICE = 1 << 17  # values the weighted search handles at a time (512 KB per float32 temporary)
SCALE_SEARCH_VERSION = 2  # 1: shrink grid; 2: + refits. Part of measurement cache keys: bump on any change


@dataclass(frozen=True)
class QuantizedWeight:
    """Stored form of one weight: codes (rows, cols) uint8, scales and zeros
    (rows, groups) fp16 (zeros is None when symmetric); for a mixed option,
    ``column_bits`` gives each column group's bit-width."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    option: AffineSpec
    column_bits: tuple[int, ...] | None = None

    def group_bits(self) -> torch.Tensor:
        return group_bits_of(self.option, self.scales.shape[1], self.column_bits)


def group_bits_of(option: AffineSpec, groups: int, column_bits=None) -> torch.Tensor:
    """(groups,) bit-width of each column group: all ``option.bits``, or the
    mixed option's vector (checked: right length, mean exactly ``bits``)."""
    if not option.mixed:
        return torch.full((groups,), float(option.bits))
    if column_bits is None or len(column_bits) != groups:
        raise BitallocError(f"Option {option.name} needs {groups} column-group bit-widths; got "
                            f"{None if column_bits is None else len(column_bits)}.")
    if sum(column_bits) != option.bits * groups or min(column_bits) < 1 or max(column_bits) > 8:
        raise BitallocError(f"The column bit-widths of {option.name} must lie in [1, 8] and average exactly "
                            f"{option.bits}; got {list(column_bits)}.")
    return torch.tensor(column_bits, dtype=torch.float32)


def grouped(W: torch.Tensor, group: int) -> torch.Tensor:
    """(rows, cols) -> (rows, groups, group); a ragged tail is padded by
    repeating the last column, which leaves each group's min/max unchanged."""
    rows, cols = W.shape
    groups = -(-cols // group)
    pad = groups * group - cols
    if pad:
        W = torch.cat([W, W[:, -1:].expand(rows, pad)], dim=1)
    return W.reshape(rows, groups, group)


def group_size_of(cols: int, option: AffineSpec) -> int:
    return cols if option.group_size == 0 else min(option.group_size, cols)


def choose_qparams(Wg: torch.Tensor, option: AffineSpec, bits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per group of Wg (rows, groups, g), both (rows,
    groups) float32 holding fp16-representable values; ``bits`` (groups,)
    overrides the option's bit-width per group. Codes are unsigned:
    q = clamp(round(w / scale + zero), 0, 2^b - 1), w ~ (q - zero) * scale."""
    if bits is None:
        bits = torch.full((Wg.shape[1],), float(option.bits))
    qmax = (2.0**bits - 1)[None, :].expand(Wg.shape[0], -1)  # (rows, groups)
    if option.symmetric:
        # Signed scale, as llama.cpp's Q4_0: the largest-magnitude weight maps
        # exactly onto the most negative code, so all 2^b levels are used;
        # the zero point is the constant 2^(b-1) and is not stored.
        half = (qmax + 1) / 2
        peak = Wg.gather(-1, Wg.abs().argmax(dim=-1, keepdim=True))[..., 0]  # (rows, groups), signed
        magnitude = (peak.abs() / half).clamp(FP16_TINY, FP16_MAX)
        scale = torch.where(peak > 0, -magnitude, magnitude).half().float()
        return scale, half.clone()
    wmin, wmax = Wg.amin(dim=-1), Wg.amax(dim=-1)
    flat = wmax == wmin
    # A constant group c is stored exactly: scale |c|/qmax, zero 0 or qmax.
    scale = torch.where(flat, wmin.abs() / qmax, (wmax - wmin) / qmax)
    scale = scale.clamp(FP16_TINY, FP16_MAX).half().float()
    zero = torch.where(flat & (wmin < 0), qmax, torch.round(-wmin / scale))
    return scale, torch.minimum(zero.clamp(min=0), qmax)


def grouped_importance(importance: torch.Tensor, cols: int, group: int) -> torch.Tensor:
    """(groups, group) importance of each column of each group; the padding
    of a ragged tail weighs nothing."""
    imp = importance.detach().float().reshape(1, -1)
    if imp.shape[1] != cols:
        raise BitallocError(f"An importance vector needs one value per input column ({cols}); got {imp.shape[1]}.")
    groups = -(-cols // group)
    imp = torch.cat([imp, imp.new_zeros(1, groups * group - cols)], dim=1)
    return imp.reshape(groups, group)


def centered_codes(Wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """(rows, groups, g) codes minus zero point, q - z, that rounding Wg under
    the (rows, groups) scale and zero gives (the arithmetic of quantize_codes)."""
    z = zero[..., None]
    q = Wg / scale[..., None]
    q.add_(z).round_().clamp_(min=0)
    torch.minimum(q, (2.0 ** bits - 1)[None, :, None], out=q)
    return q.sub_(z)


def codes_error(Wg: torch.Tensor, c: torch.Tensor, scale: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(rows, groups) weighted squared error of centered codes c under scale."""
    d = (c * scale[..., None]).sub_(Wg)
    return d.mul_(d).mul_(weights[None]).sum(-1)


def refit_scale(Wg: torch.Tensor, c: torch.Tensor, scale: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """For centered codes c = q - z, the scale minimising sum weights *
    (w - s c)^2: s = sum(weights w c) / sum(weights c^2), in fp16. The old
    scale stays where that is undefined (no weighted nonzero code) or would
    flip the scale's sign."""
    wc = c * weights[None]
    num, den = (wc * Wg).sum(-1), (wc * c).sum(-1)
    fitted = num / den.clamp(min=torch.finfo(den.dtype).tiny)
    magnitude = fitted.abs().clamp(FP16_TINY, FP16_MAX)
    fitted = torch.where(scale < 0, -magnitude, magnitude).half().float()
    return torch.where((den > 0) & (num * scale > 0), fitted, scale)


def shrunk_qparams(Wg: torch.Tensor, option: AffineSpec, bits: torch.Tensor, scale: torch.Tensor,
                   zero: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of the min/max range shrunk by ``factor``: the signed
    scale times it (symmetric), or both ends times it (asymmetric)."""
    if option.symmetric:
        magnitude = (scale.abs() * factor).clamp(FP16_TINY, FP16_MAX)
        return torch.where(scale < 0, -magnitude, magnitude).half().float(), zero
    qmax = (2.0**bits - 1)[None, :]
    wmin, wmax = Wg.amin(dim=-1) * factor, Wg.amax(dim=-1) * factor
    s = ((wmax - wmin) / qmax).clamp(FP16_TINY, FP16_MAX).half().float()
    return s, torch.minimum(torch.round(-wmin / s).clamp(min=0), qmax.expand_as(s))


def search_qparams(Wg: torch.Tensor, option: AffineSpec, bits: torch.Tensor,
                   weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the scale and zero with the least importance-weighted
    squared error (weights (groups, g)) among the shrunk ranges of
    ``SHRINK_GRID`` and the ``REFIT_STEPS`` least-squares refits from each;
    the plain min/max range (factor 1, no refit) wins ties."""
    base_scale, base_zero = scale, zero = choose_qparams(Wg, option, bits)
    best = None
    for factor in SHRINK_GRID:
        s, z = (base_scale, base_zero) if factor == 1.0 else \
            shrunk_qparams(Wg, option, bits, base_scale, base_zero, factor)
        for step in range(REFIT_STEPS + 1):
            c = centered_codes(Wg, s, z, bits)  # rounding under s: scored, then refitted
            err = codes_error(Wg, c, s, weights)
            if best is None:
                best = err
            else:
                better = err < best
                best = torch.where(better, err, best)
                scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
            if step < REFIT_STEPS:
                s = refit_scale(Wg, c, s, weights)
    return scale, zero


def group_qparams(Wg: torch.Tensor, option: AffineSpec, bits: torch.Tensor,
                  weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain min/max scales without importance; the weighted search with it,
    run on slices of ``SEARCH_SLICE`` values at a time. Every row is searched
    on its own, so the result is the whole tensor's, bit for bit, while the
    search's temporaries stay in the CPU's cache (the 1.5B model's integer
    sweep 1.30x faster on 2 cores than with whole tensors at once)."""
    if weights is None:
        return choose_qparams(Wg, option, bits)
    rows = max(1, SEARCH_SLICE // max(1, Wg.shape[1] * Wg.shape[2]))
    if rows >= Wg.shape[0]:
        return search_qparams(Wg, option, bits, weights)
    parts = [search_qparams(Wg[r : r + rows], option, bits, weights) for r in range(0, Wg.shape[0], rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits) -> torch.Tensor:
    """Unsigned codes (as float) for weights w given broadcastable scale, zero and bits."""
    qmax = 2.0**bits - 1
    q = torch.round(w / scale + zero).clamp(min=0)
    return torch.minimum(q, torch.as_tensor(qmax, dtype=q.dtype))


def quantize_rtn(W: torch.Tensor, option: AffineSpec, *, allow_ragged: bool = False,
                 column_bits: tuple[int, ...] | None = None, importance: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest codes for W (rows, cols) under ``option``; with
    ``importance`` (cols,), each group's scale by the weighted search."""
    rows, cols = W.shape
    groups = group_count(cols, option, allow_ragged=allow_ragged and not option.mixed)
    bits = group_bits_of(option, groups, column_bits)  # (groups,)
    g = group_size_of(cols, option)
    Wg = grouped(W.detach().float(), g)  # (rows, groups, g)
    weights = None if importance is None else grouped_importance(importance, cols, g)
    scale, zero = group_qparams(Wg, option, bits, weights)
    q = quantize_codes(Wg, scale[..., None], zero[..., None], bits[None, :, None])
    return pack_weight(q.reshape(rows, -1)[:, :cols], scale, zero, option, column_bits)


def pack_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, option: AffineSpec,
                column_bits: tuple[int, ...] | None = None) -> QuantizedWeight:
    """The stored form: uint8 codes, fp16 scales, fp16 zeros (asymmetric only)."""
    return QuantizedWeight(codes.to(torch.uint8), scale.half(), None if option.symmetric else zero.half(), option,
                           tuple(int(b) for b in column_bits) if option.mixed else None)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """Float32 weight (rows, cols) from stored codes, scales and zeros."""
    rows, cols = qw.codes.shape
    q = grouped(qw.codes.float(), group_size_of(cols, qw.option))  # (rows, groups, g)
    if qw.option.symmetric:
        zero = (2.0 ** (qw.group_bits() - 1))[None, :, None]
    else:
        zero = qw.zeros.float()[..., None]
    W = (q - zero) * qw.scales.float()[..., None]
    return W.reshape(rows, -1)[:, :cols].contiguous()


def fake_quantize(W: torch.Tensor, option, *, allow_ragged: bool = False,
                  column_bits: tuple[int, ...] | None = None, importance: torch.Tensor | None = None) -> torch.Tensor:
    """W after a round trip through storage, in W's dtype, for any format:
    an integer affine option rounds to nearest (scales by the weighted
    search given ``importance`` (in,)); a GGUF type runs ggml's own
    quantizer, weighing errors by ``importance`` when the type uses one."""
    extras = {k: v for k, v in (("allow_ragged", allow_ragged), ("column_bits", column_bits)) if v}
    imp = importance if option.uses_importance else None
    return torch.as_tensor(option.dequantize(option.quantize(W, imp, **extras))).to(W.dtype)


def pack_weight_codes(qw: QuantizedWeight) -> np.ndarray:
    """All codes bit-packed: one stream, or for a mixed option one stream per
    column group at its own width, concatenated."""
    codes = qw.codes.numpy()
    if qw.column_bits is None:
        return pack_bits(codes, qw.option.bits)
    g = qw.option.group_size
    return np.concatenate([pack_bits(codes[:, k * g : (k + 1) * g], b) for k, b in enumerate(qw.column_bits)])


@dataclass(frozen=True)
class PackedWeight:
    """A QuantizedWeight with its codes bit-packed (``pack_weight_codes``): what
    a saved folder stores, an eighth of the unpacked codes' memory at 1 bit."""

    packed: np.ndarray  # uint8
    scales: torch.Tensor
    zeros: torch.Tensor | None
    option: AffineSpec
    column_bits: tuple[int, ...] | None = None


def packed_weight(qw: "QuantizedWeight | PackedWeight") -> PackedWeight:
    if isinstance(qw, PackedWeight):
        return qw
    return PackedWeight(pack_weight_codes(qw), qw.scales, qw.zeros, qw.option, qw.column_bits)


def unpack_weight_codes(packed: np.ndarray, shape: tuple[int, int], option: AffineSpec,
                        column_bits: tuple[int, ...] | None) -> np.ndarray:
    rows, cols = shape
    if column_bits is None:
        return unpack_bits(packed, option.bits, rows * cols).reshape(rows, cols)
    g, out, at = option.group_size, np.empty((rows, cols), dtype=np.uint8), 0
    for k, b in enumerate(column_bits):
        n = -(-rows * g * b // 8)
        out[:, k * g : (k + 1) * g] = unpack_bits(packed[at : at + n], b, rows * g).reshape(rows, g)
        at += n
    return out


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (< 2**bits) into a dense uint8 stream, LSB first:
    exactly ceil(n*bits/8) bytes."""
    flat = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    planes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1  # (n, bits)
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    planes = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint16).astype(np.uint8)
