import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import linalg, optimize

from remlstop.flow import effective_df, weighted_mean_eigenvalue
from remlstop.gcv import gcv_fit
from remlstop.reml import profile_loglik, reml_fit
from remlstop.spectrum import KernelSpectrum
from tests.conftest import random_psd


def _signal_case(seed: int = 0, n: int = 150, noise: float = 0.5):
    rng = np.random.default_rng(seed)
    H = random_psd(n, 30, rng)
    u0 = H @ rng.standard_normal(n) * 3 + noise * rng.standard_normal(n)
    return H, u0


def test_duality_blup_equals_gradient_flow():
    """M3: (e^{tH} - I)(e^{tH})^{-1} u0 equals the closed-form flow (I - e^{-tH}) u0."""
    rng = np.random.default_rng(0)
    for t in (0.1, 1.0, 7.0):
        H = random_psd(25, 25, rng)
        H /= np.linalg.eigvalsh(H)[-1]
        u0 = rng.standard_normal(25)
        E = linalg.expm(t * H)
        blup = (E - np.eye(25)) @ np.linalg.solve(E, u0)
        lam, V = np.linalg.eigh(H)
        flow = V @ ((1 - np.exp(-t * lam)) * (V.T @ u0))
        np.testing.assert_allclose(blup, flow, rtol=1e-9, atol=1e-11)


def test_estimating_equation_holds_at_t_hat():
    H, u0 = _signal_case()
    fit = reml_fit(KernelSpectrum.from_kernel(H, u0))
    assert fit.converged and not fit.boundary and fit.t > 0
    g = weighted_mean_eigenvalue(fit.spectrum, fit.t)
    assert abs(g - fit.mean_eigenvalue) <= 1e-10 * fit.mean_eigenvalue
    # Spectral decorrelation: Cov_j(lambda_j, w_j) vanishes relative to its natural scale.
    scale = fit.mean_eigenvalue * fit.sigma2
    assert abs(fit.decorrelation) <= 1e-9 * scale


def test_trajectory_form_vanishes_at_t_hat():
    """M4: D(t) = u0^T H r_t - lambda-bar u0^T r_t = 0 at t-hat, with r_t = e^{-tH} u0."""
    H, u0 = _signal_case(1)
    fit = reml_fit(KernelSpectrum.from_kernel(H, u0))
    lam, V = np.linalg.eigh(H)
    lam_bar = np.trace(H) / len(u0)

    def D(t):
        r = V @ (np.exp(-t * lam) * (V.T @ u0))
        return u0 @ H @ r - lam_bar * (u0 @ r)

    assert D(0.9 * fit.t) > 0 > D(1.1 * fit.t)
    assert abs(D(fit.t)) <= 1e-7 * abs(D(0.0))


def test_loglik_is_maximal_at_t_hat_on_a_dense_grid():
    H, u0 = _signal_case(2)
    fit = reml_fit(KernelSpectrum.from_kernel(H, u0))
    grid = np.concatenate([[0.0], np.geomspace(fit.t * 1e-3, fit.t * 1e3, 4001)])
    values = fit.loglik_at(grid)
    assert np.all(values <= fit.loglik + 1e-9 * abs(fit.loglik))
    assert fit.loglik == pytest.approx(profile_loglik(fit.spectrum, fit.t))


def test_interval_contains_t_hat_and_is_a_likelihood_interval():
    H, u0 = _signal_case(3)
    fit = reml_fit(KernelSpectrum.from_kernel(H, u0))
    lo, hi = fit.interval
    assert 0 < lo < fit.t < hi < math.inf
    drop = 0.5 * 3.841458820694124
    assert fit.loglik - fit.loglik_at(lo) == pytest.approx(drop, rel=1e-6)
    assert fit.loglik - fit.loglik_at(hi) == pytest.approx(drop, rel=1e-6)


@pytest.mark.parametrize("seed", range(20))
def test_boundary_exactly_when_ratio_statistic_below_mean_eigenvalue(seed):
    rng = np.random.default_rng(seed)
    n = 40
    H = random_psd(n, 8, rng)
    u0 = rng.standard_normal(n) + (seed % 2) * 0.3 * H @ rng.standard_normal(n)
    spec = KernelSpectrum.from_kernel(H, u0)
    fit = reml_fit(spec)
    R = (u0 @ H @ u0) / (u0 @ u0)
    assert fit.statistic == pytest.approx(R, rel=1e-10)
    assert (fit.t == 0.0) == (spec.mean_eigenvalue >= R) == fit.boundary


@pytest.mark.parametrize("c", [1e-5, 1e-3, 1e-1, 1e1, 1e3, 1e5])
def test_scaling_the_kernel_divides_t_hat(c):
    H, u0 = _signal_case(4)
    base = reml_fit(KernelSpectrum.from_kernel(H, u0))
    scaled = reml_fit(KernelSpectrum.from_kernel(c * H, u0))
    assert scaled.t == pytest.approx(base.t / c, rel=1e-9)
    assert scaled.sigma2 == pytest.approx(base.sigma2, rel=1e-9)


def test_brute_force_unprofiled_likelihood_gives_the_same_t_hat():
    """Maximise l(t, sigma2) = -1/2 log det(2 pi sigma2 e^{tH}) - u0^T e^{-tH} u0 / (2 sigma2)."""
    H, u0 = _signal_case(5, n=80)
    fit = reml_fit(KernelSpectrum.from_kernel(H, u0))
    n = len(u0)
    trH = np.trace(H)

    def negloglik(params):
        t, s2 = np.exp(params)
        quad = u0 @ linalg.expm(-t * H) @ u0
        return 0.5 * n * np.log(2 * np.pi * s2) + 0.5 * t * trH + quad / (2 * s2)

    x0 = np.log([fit.t * 2.0, np.var(u0)])
    res = optimize.minimize(
        negloglik,
        x0,
        method="Nelder-Mead",
        options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 4000},
    )
    assert np.exp(res.x[0]) == pytest.approx(fit.t, rel=1e-4)
    assert np.exp(res.x[1]) == pytest.approx(fit.sigma2, rel=1e-4)
    assert -res.fun == pytest.approx(fit.loglik, rel=1e-8)


def test_steps_converts_time_with_the_step_size():
    H, u0 = _signal_case(6)
    fit = reml_fit(KernelSpectrum.from_kernel(H, u0))
    assert fit.steps(0.01) == pytest.approx(fit.t / 0.01)
    with pytest.raises(ValueError, match="positive finite"):
        fit.steps(0.0)


def test_no_finite_root_is_reported_not_nan():
    # u0 only in the direction of the largest eigenvalue: l(t) rises for ever.
    spec = KernelSpectrum.from_eigen([0.1, 0.2, 5.0], [0.0, 0.0, 1.0])
    fit = reml_fit(spec)
    assert fit.t == math.inf and not fit.converged and not math.isnan(fit.loglik)


def test_large_t_does_not_underflow():
    # Eigenvalues spread over 12 decades: weights e^{-t lambda} underflow without log space.
    lam = np.geomspace(1e-8, 1e4, 200)
    z = np.ones(200)
    fit = reml_fit(KernelSpectrum.from_eigen(lam, z))
    assert fit.converged and math.isfinite(fit.t) and math.isfinite(fit.loglik)
    g = weighted_mean_eigenvalue(fit.spectrum, fit.t)
    assert abs(g - fit.mean_eigenvalue) <= 1e-10 * fit.mean_eigenvalue


def test_gcv_minimises_its_criterion():
    H, u0 = _signal_case(7)
    spec = KernelSpectrum.from_kernel(H, u0)
    g = gcv_fit(spec)
    lam, z = spec.eigenvalues, spec.z

    def gcv(t):
        rss = np.sum(z**2 * np.exp(-2 * t * lam))
        return len(z) * rss / (len(z) - effective_df(spec, t)) ** 2

    grid = np.geomspace(g.t * 1e-2, g.t * 1e2, 2001)
    assert g.criterion == pytest.approx(gcv(g.t), rel=1e-10)
    assert all(g.criterion <= gcv(t) * (1 + 1e-9) for t in grid)
    assert g.df == pytest.approx(effective_df(spec, g.t))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=3, max_value=40).flatmap(
        lambda m: st.tuples(
            st.lists(st.floats(0.0, 1e3, allow_nan=False), min_size=m, max_size=m),
            st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=m, max_size=m),
        )
    ),
    st.floats(-8, 8),
)
def test_property_reml_on_random_spectra(spec_lists, log_scale):
    lam = np.asarray(spec_lists[0]) * 10.0**log_scale
    z = np.asarray(spec_lists[1])
    if not (1e-140 < lam.max() < 1e140 and 1e-140 < np.abs(z).max() < 1e140):
        with pytest.raises(ValueError, match="zero|beyond 1e"):
            KernelSpectrum.from_eigen(lam, z)  # zero, or beyond float64's reach: refused
        return
    spec = KernelSpectrum.from_eigen(lam, z)
    fit = reml_fit(spec)
    assert fit.t >= 0 and not math.isnan(fit.t)
    assert not math.isnan(fit.loglik) and not math.isnan(fit.sigma2)
    if math.isfinite(fit.t) and fit.t > 0:
        ts = fit.t * np.array([0.25, 0.5, 1.0, 2.0, 4.0])
        g = [weighted_mean_eigenvalue(spec, t) for t in ts]
        assert all(a >= b - 1e-12 * abs(a) for a, b in zip(g, g[1:]))
        assert fit.interval[0] <= fit.t <= fit.interval[1]


def test_gcv_at_large_t_has_a_finite_variance():
    """A spectrum whose GCV minimiser lies where m - df(t) rounds to 0 in float64 (t lambda_min
    ~ 30): sigma2 = ||r_t||^2 / (m - df) must come from log space, not divide by zero."""
    rng = np.random.default_rng(0)
    for _ in range(5):  # the fifth draw of this generator is such a spectrum
        lam = np.sort(np.exp(rng.normal(0, 2, 30)))
        z = rng.normal(0, 1, 30) * np.exp(rng.normal(0, 3, 30))
    spec = KernelSpectrum.from_eigen(lam, z)
    g = gcv_fit(spec)
    assert spec.dim - effective_df(spec, g.t) == 0.0  # the rounding the fix is about
    assert math.isfinite(g.sigma2) and g.sigma2 > 0 and math.isfinite(g.criterion)
    rss = np.sum(z**2 * np.exp(-2 * g.t * lam))
    assert g.sigma2 == pytest.approx(rss / np.sum(np.exp(-g.t * lam)), rel=1e-9)
