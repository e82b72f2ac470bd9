"""Prior families, genuine REML with fixed effects, Bayes-risk stop time, GCV (METHOD M9)."""

import math

import numpy as np
import pytest
from scipy import linalg, optimize

from remlstop.flow import logsumexp
from remlstop.gcv import gcv_fit, log_gcv
from remlstop.priors import (
    bayes_risk,
    bayes_risk_stop_time,
    fit_prior,
    log1p_prior_variances,
    prior_loglik,
)
from remlstop.reml import reml_fit
from remlstop.spectrum import KernelSpectrum
from tests.conftest import random_psd

# exp's t is in units of 1/lambda_max (set per spectrum): e^{t lambda} must stay well
# conditioned for the dense reference.
PARAMS = [("exp", {"t": 2.0}), ("linear", {"a": 3.0}), ("power", {"a": 2.0, "b": 1.7})]


def _scaled(spec, prior, params):
    return {"t": params["t"] / spec.eigenvalues[-1]} if prior == "exp" else params


def _case(seed=0, n=60, rank=200):
    rng = np.random.default_rng(seed)
    H = random_psd(n, rank, rng)
    u0 = rng.standard_normal(n) + H @ rng.standard_normal(n) * 2
    return H, u0, rng


def _dense_reml(H, u0, k, Z=None):
    """Brute force: sigma2-profiled Gaussian log-likelihood of Q^T u0 ~ N(0, s2 Q^T (I+K) Q)."""
    lam, V = np.linalg.eigh(H)
    S = np.eye(H.shape[0]) + V @ np.diag(k) @ V.T
    u = u0
    if Z is not None:
        full = np.linalg.qr(Z, mode="complete")[0]
        Q = full[:, Z.shape[1] :]
        S, u = Q.T @ S @ Q, Q.T @ u0
    m = u.size
    s2 = u @ np.linalg.solve(S, u) / m
    return (
        -0.5 * m * math.log(s2)
        - 0.5 * np.linalg.slogdet(S)[1]
        - 0.5 * m * (1 + math.log(2 * math.pi))
    )


@pytest.mark.parametrize("prior, params", PARAMS)
def test_loglik_equals_the_dense_gaussian_likelihood(prior, params):
    H, u0, _ = _case()
    spec = KernelSpectrum.from_kernel(H, u0)
    log1pk = log1p_prior_variances(spec, prior, _scaled(spec, prior, params))
    assert prior_loglik(spec, log1pk)[0] == pytest.approx(
        _dense_reml(H, u0, np.expm1(log1pk)), rel=1e-10
    )


@pytest.mark.parametrize("prior, params", PARAMS)
def test_reml_with_fixed_effects_equals_the_dense_restricted_likelihood(prior, params):
    H, u0, rng = _case(seed=1)
    Z = np.column_stack([np.ones(H.shape[0]), rng.standard_normal(H.shape[0])])
    spec = KernelSpectrum.from_kernel(H, u0, fixed_effects=Z)
    assert spec.n_reml_fixed == 2 and spec.eigenvalues.size == H.shape[0]
    log1pk = log1p_prior_variances(spec, prior, _scaled(spec, prior, params))
    assert prior_loglik(spec, log1pk)[0] == pytest.approx(
        _dense_reml(H, u0, np.expm1(log1pk), Z), rel=1e-10
    )


def test_exp_risk_minimiser_is_the_m4_root():
    H, u0, _ = _case(seed=2)
    spec = KernelSpectrum.from_kernel(H, u0)
    t_hat = reml_fit(spec).t
    assert 0 < t_hat < math.inf
    assert bayes_risk_stop_time(spec, t_hat * spec.eigenvalues) == pytest.approx(t_hat, rel=1e-8)
    # fit_prior's generic search on l(t) finds the same t-hat as M4's root finder.
    assert fit_prior(spec, "exp").t == pytest.approx(t_hat, rel=1e-7)


def test_bayes_risk_equals_its_dense_definition_and_its_minimum_is_interior():
    H, u0, _ = _case(seed=3)
    spec = KernelSpectrum.from_kernel(H, u0)
    lam, V = np.linalg.eigh(H)
    a = 4.0
    log1pk = log1p_prior_variances(spec, "linear", {"a": a})
    K = a * H
    for t in (0.0, 0.3, 2.0):
        E = linalg.expm(-t * H)
        dense = np.trace(K @ E @ E) + np.trace((np.eye(H.shape[0]) - E) @ (np.eye(H.shape[0]) - E))
        assert bayes_risk(spec, log1pk, t) == pytest.approx(dense, rel=1e-9)
    t_star = bayes_risk_stop_time(spec, log1pk)
    grid = np.geomspace(1e-3, 1e3, 4001)
    assert bayes_risk(spec, log1pk, t_star) <= np.min(bayes_risk(spec, log1pk, grid)) + 1e-9


def test_linear_fit_equals_an_independent_one_dimensional_optimiser():
    H, u0, _ = _case(seed=4, rank=20)
    spec = KernelSpectrum.from_kernel(H, u0)
    fit = fit_prior(spec, "linear")
    assert 0 < fit.params["a"] < math.inf

    def neg(log_a):
        k = math.exp(log_a) * np.linalg.eigvalsh(H).clip(0)
        return -_dense_reml(H, u0, k)

    grid = np.linspace(-10, 15, 501)
    best = grid[np.argmin([neg(g) for g in grid])]
    res = optimize.minimize_scalar(
        neg, bounds=(best - 0.1, best + 0.1), method="bounded", options={"xatol": 1e-10}
    )
    assert math.log(fit.params["a"]) == pytest.approx(res.x, abs=1e-5)
    assert fit.loglik == pytest.approx(-res.fun, rel=1e-9)
    lo, hi = fit.interval
    assert lo < fit.t < hi


def test_power_contains_linear_and_fits_at_least_as_well():
    H, u0, _ = _case(seed=5, rank=30)
    spec = KernelSpectrum.from_kernel(H, u0)
    lin, power = fit_prior(spec, "linear"), fit_prior(spec, "power")
    assert power.loglik >= lin.loglik - 1e-6
    assert 0.25 <= power.params["b"] <= 4.0


def test_gcv_equals_its_dense_definition():
    H, u0, _ = _case(seed=6)
    spec = KernelSpectrum.from_kernel(H, u0)
    n = H.shape[0]
    for t in (0.1, 1.0, 5.0):
        E = linalg.expm(-t * H)
        dense = n * np.sum((E @ u0) ** 2) / np.trace(E) ** 2
        assert math.exp(log_gcv(spec, t)) == pytest.approx(dense, rel=1e-9)
    fit = gcv_fit(spec)
    grid = np.geomspace(1e-3, 1e3, 3001)
    assert log_gcv(spec, fit.t) <= np.min(log_gcv(spec, grid)) + 1e-9


def test_compressed_spectrum_is_refused_by_exp_and_power_and_exact_for_linear():
    H, u0, rng = _case(seed=7)
    Z = rng.standard_normal((H.shape[0], 1))
    compressed = KernelSpectrum.from_kernel(H, u0, covariates=Z)
    for prior in ("exp", "power"):
        with pytest.raises(ValueError, match="fixed_effects="):
            reml_fit(compressed, prior=prior)
    genuine = KernelSpectrum.from_kernel(H, u0, fixed_effects=Z)
    # Q^T (I + aH) Q = I + a Q^T H Q: the two routes agree for the linear family.
    a = {"a": 2.5}
    assert prior_loglik(compressed, log1p_prior_variances(compressed, "linear", a))[0] == (
        pytest.approx(
            prior_loglik(genuine, log1p_prior_variances(genuine, "linear", a))[0], rel=1e-9
        )
    )
    # exp with fixed effects is genuine REML: it maximises the dense restricted likelihood.
    fit = reml_fit(genuine)
    dense = [
        _dense_reml(H, u0, np.expm1(t * np.linalg.eigvalsh(H).clip(0)), Z)
        for t in fit.t * np.array([0.98, 1.0, 1.02])
    ]
    assert dense[1] >= max(dense[0], dense[2])


def test_fixed_effects_spectrum_is_refused_by_the_test_and_gcv():
    from remlstop.vctest import variance_component_test

    H, u0, rng = _case(seed=8)
    spec = KernelSpectrum.from_kernel(H, u0, fixed_effects=np.ones(H.shape[0]))
    with pytest.raises(ValueError, match="covariates=Z"):
        variance_component_test(spec)
    with pytest.raises(ValueError, match="covariates=Z"):
        gcv_fit(spec)
    with pytest.raises(ValueError, match="not both"):
        KernelSpectrum.from_kernel(H, u0, np.ones(H.shape[0]), fixed_effects=np.ones(H.shape[0]))


def test_linear_prior_with_unbounded_scale_says_train_to_the_budget():
    # u0 exactly along the kernel's spectrum shape with no noise: a -> inf.
    lam = np.linspace(0.01, 1.0, 80)
    z = np.sqrt(lam) * np.random.default_rng(0).choice([-1.0, 1.0], size=lam.size) * 10
    spec = KernelSpectrum.from_eigen(lam, z)
    fit = fit_prior(spec, "linear")
    assert fit.unbounded and math.isinf(fit.params["a"])
    assert "train to the budget" in fit.summary()


def test_flow_logsumexp_matches_scipy():
    from scipy.special import logsumexp as scipy_lse

    a = np.random.default_rng(0).standard_normal((4, 7)) * 300
    assert logsumexp(a) == pytest.approx(scipy_lse(a), rel=1e-14)
    np.testing.assert_allclose(logsumexp(a, axis=1), scipy_lse(a, axis=1), rtol=1e-14)
    assert logsumexp(np.array([-np.inf, -np.inf])) == -np.inf


def test_approximate_loo_equals_its_dense_definition():
    from remlstop.gcv import _loo_curve, loo_fit

    H, u0, _ = _case(seed=9)
    n = H.shape[0]
    lam, V = np.linalg.eigh(H)
    lam = lam.clip(0)
    for t in (0.05, 0.5, 3.0):
        E = linalg.expm(-t * H)
        dense = np.mean(((E @ u0) / np.diag(E)) ** 2)
        assert _loo_curve(lam, V, V.T @ u0, np.array([t]))[0] == pytest.approx(dense, rel=1e-8)
    fit = loo_fit(H, u0)
    grid = np.geomspace(1e-3, 1e3, 2001)
    assert fit.criterion <= np.min(_loo_curve(lam, V, V.T @ u0, grid)) + 1e-9
    assert 0 < fit.df < n
    with pytest.raises(ValueError, match="entries"):
        loo_fit(H, u0[:-1])
