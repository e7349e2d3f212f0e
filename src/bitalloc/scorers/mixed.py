"""Bit-widths per group of input columns inside one tensor, keeping the
tensor's mean exactly: SliM-LLM's salience pairs and BAQ's equal-loss
water-filling. Pure functions of per-group statistics."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

MIN_BITS, MAX_BITS = 2, 8


def group_salience(W: torch.Tensor, obs_weight: torch.Tensor, group: int) -> np.ndarray:
    """SliM-LLM salience of each column group: sum_{j in group} sum_i w_ij^2 / [chol(H^-1)]_jj^2.
    W (out, in), obs_weight (in,) = 1 / [chol(H^-1)]_jj^2."""
    col = (W.double() ** 2).sum(0) * obs_weight.double()  # (in,)
    return col.reshape(-1, group).sum(1).numpy()


def waterfill_rates(losses: np.ndarray, mean_bits: float, theta: float = 2.0) -> np.ndarray:
    """BAQ's closed form: R_j = R + (1/theta) log2(L_j / geomean L). With
    distortion L_j 2^(-theta R_j) every group ends at the same loss, and the
    mean rate is exactly R."""
    logs = np.log2(np.maximum(losses, np.finfo(float).tiny))
    return mean_bits + (logs - logs.mean()) / theta


def integer_bits(rates: np.ndarray, losses: np.ndarray, mean_bits: int, lo: int = MIN_BITS, hi: int = MAX_BITS) -> tuple[int, ...]:
    """Integers near ``rates`` in [lo, hi] whose sum is exactly n * mean_bits:
    floor, give the spare bits to the largest remainders, then repair the sum
    after clipping (take from the least lossy groups, give to the most)."""
    n = len(rates)
    target = n * mean_bits
    bits = np.clip(np.floor(rates), lo, hi).astype(int)
    order_take = np.argsort(losses)  # least lossy first
    order_give = np.argsort(-(rates - np.floor(rates)) - 1e-9 * losses)  # largest remainder first
    while bits.sum() < target:
        for j in order_give:
            if bits[j] < hi and bits.sum() < target:
                bits[j] += 1
    while bits.sum() > target:
        for j in order_take:
            if bits[j] > lo and bits.sum() > target:
                bits[j] -= 1
    return tuple(int(b) for b in bits)


def waterfill_bits(losses: np.ndarray, mean_bits: int, theta: float = 2.0) -> tuple[int, ...]:
    return integer_bits(waterfill_rates(losses, mean_bits, theta), losses, mean_bits)


def slim_bits(salience: np.ndarray, mean_bits: int, error_of: Callable[[tuple[int, ...]], float]) -> tuple[int, ...]:
    """SliM-LLM's paired search: the p most salient groups get b+1 bits, the p
    least salient b-1 (the mean stays b); p is the one with least error."""
    n = len(salience)
    order = np.argsort(-salience)
    best, best_err = tuple([mean_bits] * n), error_of(tuple([mean_bits] * n))
    if mean_bits - 1 < MIN_BITS or mean_bits + 1 > MAX_BITS:
        return best
    for p in range(1, n // 2 + 1):
        bits = np.full(n, mean_bits)
        bits[order[:p]] += 1
        bits[order[n - p :]] -= 1
        err = error_of(tuple(int(b) for b in bits))
        if err < best_err:
            best, best_err = tuple(int(b) for b in bits), err
    return best
