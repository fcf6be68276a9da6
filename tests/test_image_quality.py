"""FID against scipy.linalg.sqrtm and a hand value; KID against the formula computed term by term."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.linalg

from avi_jax.errors import InputError
from avi_jax.metrics.image_quality import fid, frechet_distance, gaussian_stats, kid


def _scipy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """pytorch-fid's formula with scipy's general matrix square root of S1 S2."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


@pytest.mark.parametrize("n1,n2,d", [(300, 200, 12), (400, 400, 64)])
def test_fid_matches_scipy_sqrtm(n1, n2, d):
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(d, d))
    f1 = rng.normal(size=(n1, d)) @ mix
    f2 = rng.gamma(2.0, size=(n2, d)) @ (mix + 0.3 * rng.normal(size=(d, d))) + 0.5
    want = _scipy_fid(f1, f2)
    assert want > 1.0
    np.testing.assert_allclose(fid(f1, f2), want, rtol=1e-9)


def test_fid_singular_covariances_stay_real_and_close_to_scipy():
    # 20 samples of 64-d features: rank-19 covariances, as with a few frames of 2048-d Inception features.
    rng = np.random.default_rng(1)
    f1, f2 = rng.normal(size=(20, 64)), rng.normal(0.2, 1.3, size=(20, 64))
    got = fid(f1, f2)
    assert np.isfinite(got) and got > 0
    np.testing.assert_allclose(got, _scipy_fid(f1, f2), rtol=1e-6)
    assert abs(fid(f1, f1)) < 1e-9


def test_fid_hand_value_one_dimension():
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0, abs=1e-12)
    # Diagonal covariances: sum over dimensions.
    got = frechet_distance([0.0, 0.0], np.diag([1.0, 4.0]), [1.0, 2.0], np.diag([9.0, 16.0]))
    assert got == pytest.approx(1 + 4 + (1 - 3) ** 2 + (2 - 4) ** 2, abs=1e-12)


def test_gaussian_stats_and_bad_input():
    f = np.arange(12.0).reshape(4, 3)
    mu, sigma = gaussian_stats(f)
    np.testing.assert_allclose(mu, [4.5, 5.5, 6.5])
    np.testing.assert_allclose(sigma, np.full((3, 3), np.var(f[:, 0], ddof=1)))
    with pytest.raises(InputError, match="first feature set.*shape \\(1, 3\\)"):
        fid(f[:1], f)
    with pytest.raises(InputError, match="NaN"):
        fid(f, np.where(f > 5, np.nan, f))
    with pytest.raises(InputError, match="shapes"):
        frechet_distance([0.0, 1.0], np.eye(2), [0.0], np.eye(1))


def _kid_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, one term at a time."""
    m, d = x.shape

    def k(a, b):
        return (sum(a[i] * b[i] for i in range(d)) / d + 1.0) ** 3

    pairs = [(i, j) for i, j in itertools.product(range(m), repeat=2) if i != j]
    xx = sum(k(x[i], x[j]) for i, j in pairs) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in pairs) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i, j in itertools.product(range(m), repeat=2)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_the_formula_term_by_term():
    rng = np.random.default_rng(2)
    x, y = rng.uniform(0, 2, (7, 5)), rng.uniform(0.5, 2.5, (7, 5))
    want = _kid_by_hand(x, y)
    assert abs(want) > 1e-3
    # Subsets of all 7 features: every subset is a permutation of the whole set, so each equals the formula.
    got = kid(x, y, num_subsets=3, max_subset_size=50)
    assert got["subset_size"] == 7 and got["num_subsets"] == 3
    assert got["kid"] == pytest.approx(want, rel=1e-12) and got["kid_std"] < 1e-12


def test_kid_subsets_are_sized_and_seeded():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 6)), rng.normal(0.3, 1.0, size=(25, 6))
    a = kid(x, y, num_subsets=20, max_subset_size=10, seed=5)
    assert a["subset_size"] == 10 and a["kid_std"] > 0
    assert kid(x, y, num_subsets=20, max_subset_size=10, seed=5) == a
    assert kid(x, y, num_subsets=20, max_subset_size=1000)["subset_size"] == 25
    with pytest.raises(InputError, match="feature sizes"):
        kid(x, y[:, :5])
