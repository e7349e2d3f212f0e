import numpy as np
import pytest
import torch

from bitalloc.scorers.alpha import alpha_importance, farms_eigenvalues, gram_eigenvalues, hill_alpha, ks_alpha


def pareto_eigs(alpha, n, seed):
    """Eigenvalues with density ~ l^-alpha above 1 (Pareto tail index alpha - 1)."""
    rng = np.random.default_rng(seed)
    return (1 - rng.random(n)) ** (-1.0 / (alpha - 1.0))


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_hill_recovers_a_pareto_exponent(alpha):
    est = np.mean([hill_alpha(pareto_eigs(alpha, 20000, s), k=2000) for s in range(5)])
    assert est == pytest.approx(alpha, rel=0.05)


@pytest.mark.parametrize("alpha", [2.0, 3.5])
def test_ks_fit_recovers_a_pareto_exponent(alpha):
    est, xmin = ks_alpha(pareto_eigs(alpha, 3000, 1))
    assert est == pytest.approx(alpha, rel=0.05) and xmin >= 1.0


@pytest.mark.parametrize("alpha", [2.5, 4.0])
def test_matrix_with_prescribed_power_law_spectrum(alpha):
    """W = U diag(sqrt(l)) V^T has W^T W eigenvalues l exactly."""
    n = 1500
    lam = np.sort(pareto_eigs(alpha, n, 2))
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(n + 200, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    W = U @ torch.diag(torch.from_numpy(np.sqrt(lam))) @ V.T  # (n + 200, n)
    eigs = gram_eigenvalues(W)
    assert np.allclose(np.sort(eigs), lam, rtol=1e-6)
    assert hill_alpha(eigs, k=300) == pytest.approx(alpha, rel=0.05)
    assert ks_alpha(eigs)[0] == pytest.approx(alpha, rel=0.05)


def test_farms_is_seeded_and_importance_orders_by_tail():
    W = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(farms_eigenvalues(W, seed=3), farms_eigenvalues(W, seed=3))
    s = alpha_importance(np.array([2.0, 4.0, 8.0]), gamma=1.0)
    assert s[0] > s[1] > s[2] and s[1] == pytest.approx(1.0)
