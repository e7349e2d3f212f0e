"""GPTQ (Frantar et al., 2023): quantize columns one by one and push each
column's error onto the columns not yet quantized, weighted by the inverse
Hessian of the layer's output error. Honours any option (bits, group size,
symmetry); with ``act_order`` columns go in order of decreasing H_jj, with
group scales fixed up front from the original weight ("static groups") so the
stored format stays contiguous groups along the input dimension. With
``search`` (plans made with the importance matrix) each group's scale and
zero come from the clipping search weighted by diag(H) (over the updated
weights when the group starts, or the original ones for static groups), the
same search RTN makes with llama.cpp's importance vector.
"""

from __future__ import annotations

import torch

from bitalloc.errors import BitallocError
from bitalloc.formats.affine import QuantOption, group_count
from bitalloc.formats.affine_rtn import (
    QuantizedWeight,
    group_bits_of,
    group_qparams,
    group_size_of,
    grouped,
    grouped_importance,
    pack_weight,
)

BLOCK = 128  # columns per lazy-update block; a multiple of every group size <= 128


def inverse_hessian_factor(H: torch.Tensor, damp: float,
                           dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor U of (H + damp*mean(diag H)*I)^-1, so that
    H^-1 = U^T U; dead-column mask). Columns whose input is always zero
    (H_jj = 0) get H_jj = 1. Factored in ``dtype`` (float32 as reference GPTQ
    does, 3x faster on CPU), in float64 if a float32 factorization fails.

    One Cholesky and one triangular inverse instead of a Cholesky, an inverse
    and a second Cholesky: with P the order-reversing permutation and
    P H P = L L^T, V = P L^-1 P is upper triangular with a positive diagonal
    and V^T V = P (P H P)^-1 P = H^-1, so V is that unique factor."""
    H = H.double().clone()  # (cols, cols)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    for kind in dict.fromkeys((dtype, torch.float64)):  # the float64 retry only if the first one fails
        L, info = torch.linalg.cholesky_ex(H.flip(0, 1).to(kind))
        if int(info) == 0:
            L_inv = torch.linalg.solve_triangular(L, torch.eye(H.shape[0], dtype=kind), upper=False)
            if torch.isfinite(L_inv).all():
                return L_inv.flip(0, 1), dead
    raise BitallocError("A unit's damped Hessian is not positive definite even in float64 (degenerate calibration "
                        "activations); give more calibration text (--calib-windows) or use --quantizer rtn.")


_last_factor: list = []  # [(H, damp, factor)]: units that share one Hessian tensor (q/k/v) factor it once


def _shared_factor(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 factor of H, reused when the very same tensor comes again
    (the cache holds H itself, so identity cannot be a recycled id)."""
    if _last_factor and _last_factor[0][0] is H and _last_factor[0][1] == damp:
        return _last_factor[0][2]
    factor = inverse_hessian_factor(H, damp, torch.float32)
    _last_factor[:] = [(H, damp, factor)]
    return factor


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, option: QuantOption, *, damp: float = 0.01,
                  act_order: bool = False, allow_ragged: bool = False,
                  column_bits: tuple[int, ...] | None = None, search: bool = False) -> tuple[QuantizedWeight, float]:
    """Quantize W (rows, cols) given H (cols, cols) = 2 X^T X / n. Returns the
    stored weight and GPTQ's loss sum((w - q)^2 / [chol(H^-1)]_jj^2) / 2.
    ``search``: group scales by the clipping search (with refits) weighted by diag(H)."""
    rows, cols = W.shape
    n_groups = group_count(cols, option, allow_ragged=allow_ragged and not option.mixed)
    gbits = group_bits_of(option, n_groups, column_bits)  # (groups,)
    g = group_size_of(cols, option)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    if act_order:  # the factor of the permuted H: a permuted factor of H is not triangular
        U, dead = inverse_hessian_factor(H[perm][:, perm], damp, torch.float32)
        dead = dead[torch.argsort(perm)]  # back to column order
    else:
        U, dead = _shared_factor(H, damp)  # the column sweep runs in float32 too
    U = U.float().contiguous()  # row-major, as the sweep's slices and products expect (and as before act-order)
    W = W.detach().float().clone()
    W[:, dead] = 0.0
    static = act_order or g > BLOCK or BLOCK % g != 0
    scale = torch.zeros(rows, n_groups)
    zero = torch.zeros(rows, n_groups)
    weights = grouped_importance(torch.diag(H).float(), cols, g) if search else None  # (groups, g)
    if static:
        scale, zero = group_qparams(grouped(W, g), option, gbits.float(), weights)
    W = W[:, perm]  # U is already in the order columns are quantized
    qmax = (2.0**gbits - 1).tolist()  # (groups,) largest code
    codes = torch.zeros(rows, cols)
    loss = 0.0
    for i1 in range(0, cols, BLOCK):
        i2 = min(i1 + BLOCK, cols)
        W1 = W[:, i1:i2].clone()  # (rows, B)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        diag = U1.diagonal().tolist()
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            k = col // g
            if not static and col % g == 0:  # a group starts: its scale from the updated weights
                Wk = W1[:, i : i + g][:, None, :]  # (rows, 1, width): a ragged last group is narrower
                s, z = group_qparams(Wk, option, gbits[k : k + 1].float(),
                                     None if weights is None else weights[k : k + 1, : Wk.shape[-1]])
                scale[:, k], zero[:, k] = s[:, 0], z[:, 0]
            w, sk, zk = W1[:, i], scale[:, k], zero[:, k]
            q = torch.round(w / sk + zk).clamp_(0.0, qmax[k])  # as quantize_codes
            codes[:, col] = q
            err = (w - (q - zk) * sk).div_(diag[i])
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)  # push the error onto the columns not yet quantized
            Err1[:, i] = err
        loss += float(Err1.double().pow(2).sum()) / 2  # sum (w - deq)^2 / d^2 / 2
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
    return pack_weight(codes, scale, zero, option, column_bits), loss
