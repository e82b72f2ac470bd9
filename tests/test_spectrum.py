import numpy as np
import pytest
import torch

from remlstop.spectrum import KernelSpectrum
from tests.conftest import random_psd


def test_from_kernel_matches_direct_eigendecomposition():
    rng = np.random.default_rng(0)
    H = random_psd(40, 40, rng)
    u0 = rng.standard_normal(40)
    spec = KernelSpectrum.from_kernel(H, u0)
    lam, V = np.linalg.eigh(H)
    np.testing.assert_allclose(spec.eigenvalues, np.clip(lam, 0, None), atol=1e-12)
    np.testing.assert_allclose(spec.z**2, (V.T @ u0) ** 2, rtol=1e-8, atol=1e-10)
    assert spec.n_obs == spec.dim == 40 and spec.n_fixed == 0
    assert spec.trace == pytest.approx(np.trace(H))
    assert spec.residual_norm2 == pytest.approx(u0 @ u0)
    assert np.all(spec.eigenvalues >= 0) and spec.clipped_mass >= 0


def test_round_off_negative_eigenvalues_are_clipped_and_recorded():
    rng = np.random.default_rng(1)
    H = random_psd(30, 5, rng)  # rank 5: 25 eigenvalues are zero up to round-off
    spec = KernelSpectrum.from_kernel(H, rng.standard_normal(30))
    assert spec.eigenvalues.min() == 0.0
    assert 0 < spec.clipped_mass < 1e-10 * spec.eigenvalues.max() * 30


def test_residual_is_flattened_row_major_and_torch_accepted():
    rng = np.random.default_rng(2)
    H = random_psd(12, 12, rng)
    Y = torch.randn(6, 2)
    a = KernelSpectrum.from_kernel(torch.from_numpy(H), Y)
    b = KernelSpectrum.from_kernel(H, Y.numpy().reshape(-1))
    np.testing.assert_allclose(a.z, b.z)


def test_half_precision_tensors_are_accepted_as_float64():
    # A network run in bfloat16 hands over bf16 outputs; NumPy has no bfloat16.
    rng = np.random.default_rng(3)
    H = random_psd(10, 10, rng)
    u = torch.randn(10).to(torch.bfloat16)
    f0 = torch.randn(10, 1).to(torch.bfloat16)
    a = KernelSpectrum.from_kernel(torch.from_numpy(H), u, f0)
    b = KernelSpectrum.from_kernel(H, u.double(), f0.double())
    np.testing.assert_allclose(a.z, b.z)
    np.testing.assert_allclose(a.eigenvalues, b.eigenvalues)


def test_covariates_compress_the_kernel_to_the_complement():
    rng = np.random.default_rng(3)
    n = 50
    H = random_psd(n, 20, rng)
    Z = np.column_stack([np.ones(n), rng.standard_normal(n)])
    u0 = rng.standard_normal(n)
    spec = KernelSpectrum.from_kernel(H, u0, covariates=Z)
    # Reference: an explicit orthonormal basis of the complement (fine at test size).
    Qfull, _ = np.linalg.qr(Z, mode="complete")
    C = Qfull[:, 2:]
    M = C.T @ H @ C
    np.testing.assert_allclose(
        spec.eigenvalues, np.clip(np.linalg.eigvalsh(M), 0, None), atol=1e-10
    )
    assert spec.dim == n - 2 and spec.n_fixed == 2
    assert spec.residual_norm2 == pytest.approx(np.sum((C.T @ u0) ** 2))


def test_covariates_with_one_row_per_training_row_expand_per_output():
    rng = np.random.default_rng(4)
    n, K = 10, 3
    H = random_psd(n * K, n * K, rng)
    spec = KernelSpectrum.from_kernel(H, rng.standard_normal(n * K), covariates=np.ones((n, 1)))
    assert spec.n_fixed == K


@pytest.mark.parametrize(
    "kernel, residual, covariates, error, match",
    [
        (np.eye(5), np.r_[1.0, np.nan, 0, 0, 0], None, ValueError, "NaN"),
        (np.where(np.eye(5) > 0, np.inf, 0.0), np.ones(5), None, ValueError, "NaN or infinite"),
        (np.eye(5), np.ones(4), None, ValueError, "must match"),
        (np.eye(2), np.ones(2), None, ValueError, "at least N = 3"),
        (np.triu(np.ones((5, 5))), np.ones(5), None, ValueError, "not symmetric"),
        (np.diag([1.0, 1, 1, 1, -1]), np.ones(5), None, ValueError, "materially negative"),
        (np.zeros((5, 5)), np.ones(5), None, ValueError, "identically zero"),
        (np.eye(5), np.arange(5), None, TypeError, "class labels"),
        (np.eye(5), np.ones(5), np.ones((5, 2)), ValueError, "rank < q"),
        (
            np.eye(5),
            np.ones(5),
            np.random.default_rng(0).standard_normal((5, 3)),
            ValueError,
            "degrees of freedom",
        ),
        (np.eye(5), np.ones(5), np.ones((4, 1)), ValueError, "covariates have 4 rows"),
        (np.ones((5, 4)), np.ones(5), None, ValueError, "square"),
        (np.eye(5), np.zeros(5), None, ValueError, "residual is zero"),
    ],
)
def test_bad_input_raises_a_specific_error(kernel, residual, covariates, error, match):
    with pytest.raises(error, match=match):
        KernelSpectrum.from_kernel(kernel, residual, covariates)


def test_integer_kernel_tensor_is_refused():
    with pytest.raises(TypeError, match="floating point"):
        KernelSpectrum.from_kernel(torch.eye(4, dtype=torch.int64), torch.ones(4))


def test_from_eigen_validates_and_sorts():
    spec = KernelSpectrum.from_eigen([3.0, 1.0, 2.0], [0.1, 0.2, 0.3])
    np.testing.assert_array_equal(spec.eigenvalues, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(spec.z, [0.2, 0.3, 0.1])
    with pytest.raises(ValueError, match=">= 0"):
        KernelSpectrum.from_eigen([-1.0, 1.0, 2.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="must match"):
        KernelSpectrum.from_eigen([1.0, 1.0, 2.0], [1.0, 1.0])


def _clustered(seed: int, cluster: int = 400, resolved: int = 30, fixed: int = 0):
    """A spectrum like the Nystrom path's: resolved eigenvalues plus one cluster of equal ones,
    as entries with multiplicity and expanded to one entry per direction."""
    rng = np.random.default_rng(seed)
    lam = np.sort(rng.gamma(0.7, 3.0, resolved)) + 0.05
    z = rng.standard_normal(resolved) * np.sqrt(1.0 + lam)
    tail_lam, tail_energy = 0.02, 0.8 * cluster
    compressed = KernelSpectrum.from_eigen(
        np.append(lam, tail_lam),
        np.append(z, np.sqrt(tail_energy)),
        n_fixed=fixed,
        multiplicity=np.append(np.ones(resolved, dtype=int), cluster),
    )
    expanded = KernelSpectrum.from_eigen(
        np.append(lam, np.full(cluster, tail_lam)),
        np.append(z, np.full(cluster, np.sqrt(tail_energy / cluster))),
        n_fixed=fixed,
    )
    return compressed, expanded


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_cluster_as_one_entry_gives_every_statistic_of_its_expanded_spectrum(seed):
    from remlstop import flow, gcv, priors, reml
    from remlstop.criteria import evaluate_criteria
    from remlstop.vctest import variance_component_test

    compressed, expanded = _clustered(seed)
    assert compressed.eigenvalues.size == 31 and expanded.eigenvalues.size == 430
    for attr in ("dim", "n_obs", "mean_eigenvalue", "residual_norm2", "trace"):
        assert getattr(compressed, attr) == pytest.approx(getattr(expanded, attr), rel=1e-12)
    ts = np.array([0.0, 0.03, 0.4, 5.0, 80.0])
    for fn in (
        flow.effective_df,
        flow.log_residual_norm2,
        flow.log_residual_dof,
        gcv.log_gcv,
        reml.profile_loglik,
    ):
        np.testing.assert_allclose(fn(compressed, ts), fn(expanded, ts), rtol=1e-11, atol=1e-13)
    log1pk = [priors.log1p_prior_variances(s, "linear", {"a": 2.0}) for s in (compressed, expanded)]
    assert priors.prior_loglik(compressed, log1pk[0]) == pytest.approx(
        priors.prior_loglik(expanded, log1pk[1]), rel=1e-12
    )
    np.testing.assert_allclose(
        priors.bayes_risk(compressed, log1pk[0], ts),
        priors.bayes_risk(expanded, log1pk[1], ts),
        rtol=1e-12,
    )
    a, b = evaluate_criteria(compressed), evaluate_criteria(expanded)
    assert a.auto_choice == b.auto_choice and a.misfit == pytest.approx(b.misfit, rel=1e-9)
    # Equal up to the optimisers' tolerances (the sums differ in their last bits; the power
    # family's flat likelihood in b moves its stop by up to 2e-6).
    for name, fit in b.fits.items():
        assert a.fits[name].t == pytest.approx(fit.t, rel=1e-5), name
        for end, want in zip(getattr(a.fits[name], "interval", ()), getattr(fit, "interval", ())):
            assert end == pytest.approx(want, rel=1e-5, nan_ok=True), name
    ta, tb = variance_component_test(compressed), variance_component_test(expanded)
    assert ta.statistic == pytest.approx(tb.statistic, rel=1e-12)
    assert ta.pvalue == pytest.approx(tb.pvalue, rel=1e-6, abs=1e-12)
    assert ta.pvalue_satterthwaite == pytest.approx(tb.pvalue_satterthwaite, rel=1e-9)


def test_a_compressed_covariate_spectrum_with_a_cluster_matches_its_expansion():
    from remlstop.criteria import evaluate_criteria
    from remlstop.priors import fit_prior
    from remlstop.vctest import variance_component_test

    compressed, expanded = _clustered(3, fixed=2)
    assert compressed.dim == expanded.dim == 430 and compressed.n_obs == 432
    fa, fb = fit_prior(compressed, "linear"), fit_prior(expanded, "linear")
    assert fa.t == pytest.approx(fb.t, rel=1e-6) and fa.df == pytest.approx(fb.df, rel=1e-6)
    assert variance_component_test(compressed).pvalue == pytest.approx(
        variance_component_test(expanded).pvalue, rel=1e-6, abs=1e-12
    )
    with pytest.raises(ValueError):
        evaluate_criteria(compressed)  # the exp prior refuses a compressed spectrum, as expanded


def test_expanded_spreads_each_entry_over_its_directions():
    compressed, expanded = _clustered(4)
    again = compressed.expanded()
    assert again.multiplicity is None and expanded.expanded() is expanded
    np.testing.assert_allclose(again.eigenvalues, expanded.eigenvalues, rtol=0)
    np.testing.assert_allclose(again.z, expanded.z, rtol=1e-15)


@pytest.mark.parametrize(
    "multiplicity, match",
    [([1, 2], "3 integer counts"), ([1, 0, 2], "3 integer counts"), ([1, 1.5, 2], "integer")],
)
def test_a_bad_multiplicity_is_refused(multiplicity, match):
    with pytest.raises(ValueError, match=match):
        KernelSpectrum.from_eigen([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], multiplicity=multiplicity)
    with pytest.raises(ValueError, match="cannot be combined"):
        KernelSpectrum.from_eigen(
            [1.0, 2.0, 3.0, 4.0], [1.0] * 4, multiplicity=[1] * 4, fixed_effects=np.eye(4, 1)
        )


def test_a_residual_in_the_covariates_span_is_refused_not_read_as_rounding_noise():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((12, 12))
    x = rng.standard_normal(12)
    Z = np.c_[np.ones(12), x]
    with pytest.raises(ValueError, match="the residual is zero"):
        KernelSpectrum.from_kernel(A @ A.T, 3 + 2 * x, covariates=Z)
    with pytest.raises(ValueError, match="lies in the span of the fixed effects"):
        KernelSpectrum.from_kernel(A @ A.T, 3 + 2 * x, fixed_effects=Z)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_fixed": -2}, "n_fixed must be a non-negative integer"),
        ({"n_fixed": 1.7}, "n_fixed must be a non-negative integer"),
        ({"clipped_mass": -1.0}, "clipped_mass must be finite"),
        ({"multiplicity": np.array([2**64 - 1, 1, 1, 1, 1], np.uint64)}, "below 2\\^31"),
        ({"fixed_effects": np.zeros((5, 1))}, "orthonormal columns"),
    ],
)
def test_bad_eigen_inputs_are_refused_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KernelSpectrum.from_eigen([1.0, 2.0, 3.0, 4.0, 5.0], [1.0] * 5, **kwargs)


def test_a_complex_kernel_is_refused():
    with pytest.raises(TypeError, match="kernel must be floating point"):
        KernelSpectrum.from_kernel(np.eye(4) + 1j * np.eye(4), np.ones(4))


def test_scales_beyond_float64s_reach_are_refused_with_the_way_out():
    for scale in (1e300, 1e-300):
        with pytest.raises(ValueError, match="rescale the targets"):
            KernelSpectrum.from_eigen(np.array([1.0, 2.0, 3.0]) * scale, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="rescale the targets"):
        KernelSpectrum.from_kernel(np.eye(4) + 1.0, np.ones(4) * 1e160)


def test_the_fits_take_a_spectrum_and_covariates_need_columns():
    from remlstop.gcv import gcv_fit
    from remlstop.reml import reml_fit

    for fit in (reml_fit, gcv_fit):
        with pytest.raises(TypeError, match="takes a KernelSpectrum"):
            fit(np.ones(5))
    with pytest.raises(ValueError, match="q >= 1 columns"):
        KernelSpectrum.from_kernel(np.eye(4) + 1.0, np.arange(4.0), covariates=np.zeros((4, 0)))
    with pytest.raises(ValueError, match="no positive eigenvalue: "):
        KernelSpectrum.from_kernel(-np.eye(5), np.ones(5))
