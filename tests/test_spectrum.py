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
