"""Heavy-tail exponent alpha of a weight's eigenvalue spectrum (AlphaQ, after
Heavy-Tailed Self-Regularization): pure numpy/torch functions."""

from __future__ import annotations

import numpy as np
import torch


def gram_eigenvalues(W: torch.Tensor) -> np.ndarray:
    """Eigenvalues of the smaller Gram matrix (W^T W or W W^T), float64, ascending."""
    W = W.double()  # (out, in)
    G = W.T @ W if W.shape[1] <= W.shape[0] else W @ W.T  # (m, m), m = min(out, in)
    return np.clip(torch.linalg.eigvalsh(G).numpy(), 0.0, None)


def hill_alpha(eigs: np.ndarray, k: int | None = None) -> float:
    """Hill estimator of the density exponent (p(l) ~ l^-alpha) of the upper
    tail: alpha = 1 + k / sum_{top k} ln(l_i / l_(N-k)), k = max(10, N/10)."""
    lam = np.sort(np.asarray(eigs, dtype=np.float64))[::-1]  # descending
    lam = lam[lam > 0]
    n = len(lam)
    k = k or max(10, n // 10)
    k = min(k, n - 1)
    if k < 2:
        return float("nan")
    return float(1.0 + k / np.sum(np.log(lam[:k] / lam[k])))


def ks_alpha(eigs: np.ndarray, min_tail: int = 10) -> tuple[float, float]:
    """Power-law fit choosing xmin by the smallest Kolmogorov-Smirnov distance
    (Clauset, Shalizi & Newman 2009; as weightwatcher). Returns (alpha, xmin)."""
    lam = np.sort(np.asarray(eigs, dtype=np.float64))
    lam = lam[lam > 0]
    n = len(lam)
    best = (np.inf, float("nan"), float("nan"))
    for i in range(0, n - min_tail):
        xmin, tail = lam[i], lam[i:]
        m = len(tail)
        alpha = 1.0 + m / np.sum(np.log(tail / xmin))
        fitted = 1.0 - (tail / xmin) ** (1.0 - alpha)  # model CDF on the tail
        empirical = np.arange(m) / m
        d = np.max(np.abs(fitted - empirical))
        if d < best[0]:
            best = (d, alpha, xmin)
    return float(best[1]), float(best[2])


def farms_eigenvalues(W: torch.Tensor, blocks: int = 8, seed: int = 0) -> np.ndarray:
    """FARMS: pool the spectra of square sub-blocks (side = min(out, in)/2)
    sampled with a seeded generator, so a rectangular aspect ratio does not
    distort the spectrum."""
    rows, cols = W.shape
    side = max(2, min(rows, cols) // 2)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(blocks):
        r0, c0 = rng.integers(0, rows - side + 1), rng.integers(0, cols - side + 1)
        out.append(gram_eigenvalues(W[r0 : r0 + side, c0 : c0 + side]))
    return np.concatenate(out)


def unit_alpha(W: torch.Tensor, *, fit: str = "hill", farms: bool = False, seed: int = 0) -> float:
    eigs = farms_eigenvalues(W, seed=seed) if farms else gram_eigenvalues(W)
    return hill_alpha(eigs) if fit == "hill" else ks_alpha(eigs)[0]


def alpha_importance(alphas: np.ndarray, gamma: float) -> np.ndarray:
    """AlphaQ's s = (median alpha / alpha)^gamma: heavier tails (small alpha) matter more."""
    return (np.nanmedian(alphas) / alphas) ** gamma
