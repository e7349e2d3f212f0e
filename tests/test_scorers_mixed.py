import numpy as np
import pytest

from bitalloc.scorers.mixed import integer_bits, slim_bits, waterfill_bits, waterfill_rates


@pytest.mark.parametrize("seed", range(5))
def test_waterfilling_meets_its_rate_and_equalises_loss(seed):
    rng = np.random.default_rng(seed)
    L = rng.lognormal(0, 2, 12)
    R = waterfill_rates(L, 3.0, theta=2.0)
    assert R.mean() == pytest.approx(3.0)
    final = L * 2.0 ** (-2.0 * R)  # the distortion model the closed form equalises
    assert np.allclose(final, final[0])


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("mean", [2, 3, 4, 6])
def test_integer_water_filling_keeps_the_exact_mean_and_order(seed, mean):
    rng = np.random.default_rng(seed)
    L = rng.lognormal(0, 3, int(rng.integers(2, 30)))
    bits = waterfill_bits(L, mean)
    assert sum(bits) == mean * len(L) and min(bits) >= 2 and max(bits) <= 8
    order = np.argsort(L)
    assert all(bits[a] <= bits[b] + 1 for a, b in zip(order, order[1:]))  # more loss, not fewer bits (up to rounding)


def test_integer_bits_from_exact_integers_is_identity():
    assert integer_bits(np.array([2.0, 4.0, 3.0]), np.ones(3), 3) == (2, 4, 3)


def test_slim_pairs_keep_the_mean_and_pick_the_best_pair_count():
    sal = np.array([10.0, 1.0, 5.0, 0.1])
    # error falls when salient groups get more bits: weighted 2^-2b per group
    error = lambda bits: float(sum(s * 2.0 ** (-2 * b) for s, b in zip(sal, bits)))  # noqa: E731
    bits = slim_bits(sal, 3, error)
    assert sum(bits) == 12 and bits[0] == 4 and bits[3] == 2
    brute = min(((4, 3, 3, 2), (4, 2, 4, 2), (3, 3, 3, 3)), key=error)
    assert error(bits) <= error(brute) + 1e-12
    assert slim_bits(sal, 8, error) == (8, 8, 8, 8)  # no room above 8 bits
