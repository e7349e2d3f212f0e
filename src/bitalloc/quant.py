"""Round-to-nearest integer affine quantization: pure tensor functions.

Weights are 2-D (rows, cols) = (out, in); groups run along ``cols``. Scales
and zero points are rounded to fp16 *before* the codes are chosen, so the
codes, scales and zeros that are stored reproduce exactly the weight that was
evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bitalloc.options import QuantOption, group_count

FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal)
FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantizedWeight:
    """Stored form of one weight: codes (rows, cols) uint8, scales and zeros
    (rows, groups) fp16 (zeros is None when symmetric)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    option: QuantOption


def grouped(W: torch.Tensor, group: int) -> torch.Tensor:
    """(rows, cols) -> (rows, groups, group); a ragged tail is padded by
    repeating the last column, which leaves each group's min/max unchanged."""
    rows, cols = W.shape
    groups = -(-cols // group)
    pad = groups * group - cols
    if pad:
        W = torch.cat([W, W[:, -1:].expand(rows, pad)], dim=1)
    return W.reshape(rows, groups, group)


def group_size_of(cols: int, option: QuantOption) -> int:
    return cols if option.group_size == 0 else min(option.group_size, cols)


def choose_qparams(Wg: torch.Tensor, option: QuantOption) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per group of Wg (rows, groups, g), both (rows,
    groups) float32 holding fp16-representable values. Codes are unsigned:
    q = clamp(round(w / scale + zero), 0, 2^b - 1), w ~ (q - zero) * scale."""
    qmax = 2**option.bits - 1
    if option.symmetric:
        # Signed scale, as llama.cpp's Q4_0: the largest-magnitude weight maps
        # exactly onto the most negative code, so all 2^b levels are used;
        # the zero point is the constant 2^(b-1) and is not stored.
        half = 2 ** (option.bits - 1)
        peak = Wg.gather(-1, Wg.abs().argmax(dim=-1, keepdim=True))[..., 0]  # (rows, groups), signed
        magnitude = (peak.abs() / half).clamp(FP16_TINY, FP16_MAX)
        scale = torch.where(peak > 0, -magnitude, magnitude).half().float()
        return scale, torch.full_like(scale, float(half))
    wmin, wmax = Wg.amin(dim=-1), Wg.amax(dim=-1)
    flat = wmax == wmin
    # A constant group c is stored exactly: scale |c|/qmax, zero 0 or qmax.
    scale = torch.where(flat, wmin.abs() / qmax, (wmax - wmin) / qmax)
    scale = scale.clamp(FP16_TINY, FP16_MAX).half().float()
    zero = torch.where(flat & (wmin < 0), torch.full_like(wmin, qmax), torch.round(-wmin / scale))
    return scale, zero.clamp(0, qmax)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (as float) for weights w given broadcastable scale and zero."""
    return torch.clamp(torch.round(w / scale + zero), 0, 2**bits - 1)


def quantize_rtn(W: torch.Tensor, option: QuantOption, *, allow_ragged: bool = False) -> QuantizedWeight:
    """Round-to-nearest codes for W (rows, cols) under ``option``."""
    rows, cols = W.shape
    group_count(cols, option, allow_ragged=allow_ragged)  # validates divisibility
    Wg = grouped(W.detach().float(), group_size_of(cols, option))  # (rows, groups, g)
    scale, zero = choose_qparams(Wg, option)
    q = quantize_codes(Wg, scale[..., None], zero[..., None], option.bits)
    return pack_weight(q.reshape(rows, -1)[:, :cols], scale, zero, option)


def pack_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, option: QuantOption) -> QuantizedWeight:
    """The stored form: uint8 codes, fp16 scales, fp16 zeros (asymmetric only)."""
    return QuantizedWeight(codes.to(torch.uint8), scale.half(), None if option.symmetric else zero.half(), option)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """Float32 weight (rows, cols) from stored codes, scales and zeros."""
    rows, cols = qw.codes.shape
    q = grouped(qw.codes.float(), group_size_of(cols, qw.option))  # (rows, groups, g)
    zero = float(2 ** (qw.option.bits - 1)) if qw.option.symmetric else qw.zeros.float()[..., None]
    W = (q - zero) * qw.scales.float()[..., None]
    return W.reshape(rows, -1)[:, :cols].contiguous()


def fake_quantize(W: torch.Tensor, option: QuantOption, *, allow_ragged: bool = False) -> torch.Tensor:
    """W after a round trip through storage, in W's dtype."""
    return dequantize(quantize_rtn(W, option, allow_ragged=allow_ragged)).to(W.dtype)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (< 2**bits) into a dense uint8 stream, LSB first:
    exactly ceil(n*bits/8) bytes."""
    flat = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    planes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1  # (n, bits)
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    planes = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint16).astype(np.uint8)
