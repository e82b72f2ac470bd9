import numpy as np
import pytest

from remlstop.qform import saddlepoint
from remlstop.reml import reml_fit
from remlstop.spectrum import KernelSpectrum
from remlstop.vctest import variance_component_test


def _null_ratio_draws(mu: np.ndarray, draws: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draws // 50_000):
        x2 = rng.standard_normal((50_000, mu.size)) ** 2
        out.append((x2 @ mu) / x2.sum(axis=1))
    return np.concatenate(out)


@pytest.mark.slow
def test_type_one_error_is_calibrated_on_a_real_mlp_kernel(mlp_H):
    """y = f0 + noise, so u0 is pure noise: rejection rate at alpha = 0.05 near 5%."""
    lam, V = np.linalg.eigh(mlp_H)
    lam = np.clip(lam, 0, None)
    rng = np.random.default_rng(2026)
    reps = 2000
    rejections = 0
    boundary_agrees = True
    for _ in range(reps):
        u0 = rng.standard_normal(mlp_H.shape[0]) * 0.7
        spec = KernelSpectrum.from_eigen(lam, V.T @ u0)
        test = variance_component_test(spec)
        rejections += test.train
        boundary_agrees &= (reml_fit(spec).t > 0) == (test.statistic > spec.mean_eigenvalue)
    rate = rejections / reps
    assert 0.035 <= rate <= 0.065, rate
    assert boundary_agrees


@pytest.mark.slow
def test_davies_and_saddlepoint_agree_with_monte_carlo_near_p_1e_3(mlp_H):
    mu = np.clip(np.linalg.eigvalsh(mlp_H), 0, None)
    draws = _null_ratio_draws(mu, 1_000_000, seed=7)
    r = float(np.quantile(draws, 1 - 1e-3))
    mc = float(np.mean(draws >= r))
    # Any u0 whose ratio statistic is r: put the mass on two eigenvectors to hit r exactly.
    lo, hi = 0, mu.size - 1
    a = (r - mu[lo]) / (mu[hi] - mu[lo])
    z = np.zeros(mu.size)
    z[lo], z[hi] = np.sqrt(1 - a), np.sqrt(a)
    test = variance_component_test(KernelSpectrum.from_eigen(mu, z))
    assert test.statistic == pytest.approx(r, rel=1e-10)
    assert test.method == "davies"
    assert test.pvalue == pytest.approx(mc, rel=0.10)
    assert saddlepoint(mu - r) == pytest.approx(mc, rel=0.20)


def test_ratio_statistic_and_null_mean():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((30, 30))
    H = A @ A.T / 30
    u0 = rng.standard_normal(30)
    test = variance_component_test(H, u0)
    assert test.statistic == pytest.approx(u0 @ H @ u0 / (u0 @ u0), rel=1e-10)
    assert test.null_mean == pytest.approx(np.trace(H) / 30, rel=1e-10)
    assert 0 <= test.pvalue <= 1 and 0 <= test.pvalue_satterthwaite <= 1
    assert "Variance-component test" in test.summary()


def test_signal_is_detected_and_covariates_are_projected_out():
    rng = np.random.default_rng(1)
    n = 120
    A = rng.standard_normal((n, 20))
    H = A @ A.T / n
    noise = rng.standard_normal(n)
    assert variance_component_test(H, H @ rng.standard_normal(n) * 2 + noise).train
    # A pure shift along a covariate the kernel loves: significant without, null with it.
    top = np.linalg.eigh(H)[1][:, -1]
    u0 = 30 * top + noise
    assert variance_component_test(H, u0).pvalue < 1e-6
    with_cov = variance_component_test(H, u0, covariates=top[:, None])
    assert with_cov.n_fixed == 1 and with_cov.dim == n - 1
    assert with_cov.pvalue > 0.01


def test_bad_arguments():
    H = np.eye(4) + 0.1
    with pytest.raises(ValueError, match="alpha"):
        variance_component_test(H, np.ones(4), alpha=1.5)
    with pytest.raises(ValueError, match="residual"):
        variance_component_test(H)
    spec = KernelSpectrum.from_kernel(H, np.arange(4.0))
    with pytest.raises(ValueError, match="already holds"):
        variance_component_test(spec, np.ones(4))


def test_a_kernel_that_is_a_multiple_of_the_identity_has_no_power():
    u = np.random.default_rng(0).standard_normal(8)
    test = variance_component_test(KernelSpectrum.from_kernel(2.0 * np.eye(8), u))
    assert test.pvalue == 1.0 and not test.train and "no power" in test.note
    Q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((8, 8)))
    rotated = Q @ (2.0 * np.eye(8)) @ Q.T  # eigenvalues 2 up to rounding
    assert variance_component_test(KernelSpectrum.from_kernel(rotated, u)).pvalue == 1.0
    counted = KernelSpectrum.from_eigen([2.0], [1.0], multiplicity=[3])
    assert variance_component_test(counted).pvalue == 1.0
