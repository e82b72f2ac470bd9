import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

import remlstop.linalg as linalg
from remlstop.linalg import available_cpus, blas_threads, spectral_projection, symmetric_eigh


def test_available_cpus_is_within_affinity():
    import os

    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))


def test_blas_threads_restores_user_settings():
    before_torch = torch.get_num_threads()
    before = [p["num_threads"] for p in threadpool_info()]
    with blas_threads(1) as limit:
        assert limit == 1
        assert torch.get_num_threads() == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info())
    assert torch.get_num_threads() == before_torch
    assert [p["num_threads"] for p in threadpool_info()] == before


def test_symmetric_eigh_matches_numpy_for_numpy_and_torch_input():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((50, 50))
    S = A + A.T
    ref = np.linalg.eigvalsh(S)
    for arg in (S, torch.from_numpy(S).float()):
        evals, evecs = symmetric_eigh(arg)
        assert evals.dtype == np.float64 and evecs.shape == (50, 50)
        np.testing.assert_allclose(evals, ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(evecs @ np.diag(evals) @ evecs.T, S, atol=1e-4)


def test_eigh_runs_serially_below_the_threshold_and_restores_threads():
    from remlstop.linalg import eigh_threads

    assert eigh_threads(1000) == 1
    assert eigh_threads(10_000) == available_cpus()
    before = [p["num_threads"] for p in threadpool_info()]
    symmetric_eigh(np.eye(20))
    assert [p["num_threads"] for p in threadpool_info()] == before


def _functionals(evals, z, scales):
    # What REML and the test read from a spectrum: sums of z^2 weighted by functions of lambda.
    return np.array(
        [[np.sum(z**2 / (1 + s * evals)), np.sum(z**2 * evals / (1 + s * evals))] for s in scales]
    )


def test_spectral_projection_matches_a_full_eigendecomposition():
    rng = np.random.default_rng(4)
    # A low-rank kernel plus a small ridge: a 60-fold cluster of equal eigenvalues, whose
    # individual eigenvectors are arbitrary, beside distinct ones.
    A = rng.standard_normal((100, 40))
    H = A @ A.T / 40 + 1e-3 * np.eye(100)
    u = rng.standard_normal(100)
    evals, z = spectral_projection(H, u)
    ref_evals, V = np.linalg.eigh(H)
    ref_z = V.T @ u
    np.testing.assert_allclose(evals, ref_evals, rtol=1e-12, atol=1e-12 * ref_evals[-1])
    np.testing.assert_allclose(np.abs(z[-40:]), np.abs(ref_z[-40:]), rtol=1e-8)
    np.testing.assert_allclose(z @ z, u @ u, rtol=1e-12)
    scales = np.logspace(-3, 6, 20)
    np.testing.assert_allclose(
        _functionals(evals, z, scales), _functionals(ref_evals, ref_z, scales), rtol=1e-10
    )


def test_spectral_projection_falls_back_to_full_eigh_when_lapack_fails(monkeypatch):
    rng = np.random.default_rng(5)
    A = rng.standard_normal((30, 30))
    H = A @ A.T
    u = rng.standard_normal(30)
    good = linalg.spectral_projection(H, u)
    monkeypatch.setattr(linalg.lapack, "dstevd", lambda d, e, compute_v: (d, None, 7))
    evals, z = linalg.spectral_projection(H, u)
    np.testing.assert_allclose(evals, good[0], rtol=1e-10)
    np.testing.assert_allclose(np.abs(z), np.abs(good[1]), rtol=1e-8)


def _kernel_with_clusters(rng: np.random.Generator, n: int = 400) -> np.ndarray:
    """Exactly symmetric PSD matrix with a 150-fold null space and a 40-fold repeated
    eigenvalue, each longer than one eigenvector block (n/4 = 100)."""
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.concatenate([np.zeros(150), np.full(40, 0.5), np.logspace(-4, 2, n - 190)])
    H = (Q * lam) @ Q.T
    return (H + H.T) / 2


@pytest.fixture
def mrrr_at_any_size(monkeypatch):
    """Blocked MRRR runs from 2,048 rows; the tests take it at small sizes too."""
    monkeypatch.setattr(linalg, "_MRRR_FROM", 0)


@pytest.mark.usefixtures("mrrr_at_any_size")
def test_blocked_eigenvectors_keep_clusters_whole_and_match_a_full_eigendecomposition():
    rng = np.random.default_rng(11)
    H = _kernel_with_clusters(rng)
    u = rng.standard_normal((400, 2))
    evals, z = spectral_projection(H, u)
    ref_evals, V = np.linalg.eigh(H)
    ref_z = V.T @ u
    np.testing.assert_allclose(evals, ref_evals, atol=1e-10 * ref_evals[-1])
    np.testing.assert_allclose((z * z).sum(0), (u * u).sum(0), rtol=1e-12)
    scales = np.logspace(-3, 6, 20)
    for c in range(2):
        np.testing.assert_allclose(
            _functionals(evals, z[:, c], scales),
            _functionals(ref_evals, ref_z[:, c], scales),
            # Two float64 algorithms: 1.8e-9 was measured with numpy 2.4.6 / scipy 1.17.1.
            rtol=1e-8,
        )
    ends = linalg._block_ends(ref_evals, 100)
    assert ends[-1] == 400 and len(ends) > 1
    # No block boundary falls inside the null space or the repeated eigenvalue.
    assert not any(0 < e < 150 or 150 < e < 190 for e in ends)


@pytest.mark.usefixtures("mrrr_at_any_size")
def test_blocked_eigenvectors_fall_back_to_divide_and_conquer_when_mrrr_fails(monkeypatch):
    rng = np.random.default_rng(12)
    H = _kernel_with_clusters(rng, 200)
    u = rng.standard_normal(200)
    good = spectral_projection(H, u)
    calls = []

    def failing(diag, offdiag, lo, hi):
        calls.append((lo, hi))
        return 3, np.empty(0), np.empty((0, diag.size))

    monkeypatch.setattr(linalg, "_dstemr", failing)
    evals, z = spectral_projection(H, u)
    assert calls
    np.testing.assert_allclose(evals, good[0], atol=1e-12 * good[0][-1])
    np.testing.assert_allclose(z @ z, u @ u, rtol=1e-12)


@pytest.mark.usefixtures("mrrr_at_any_size")
def test_a_symmetric_matrix_is_its_own_workspace_and_is_restored_bit_for_bit():
    rng = np.random.default_rng(13)
    A = rng.standard_normal((300, 50))
    H = A @ A.T
    H = (H + H.T) / 2
    u = rng.standard_normal(300)
    reference = spectral_projection(H.copy(), u)
    for matrix in (H.copy(), np.asfortranarray(H), torch.from_numpy(H.copy()).numpy()):
        before = matrix.copy()
        evals, z = spectral_projection(matrix, u)
        assert np.array_equal(matrix, before)
        np.testing.assert_array_equal(evals, reference[0])
        np.testing.assert_array_equal(z, reference[1])


def test_the_matrix_is_restored_when_the_reduction_fails(monkeypatch):
    rng = np.random.default_rng(14)
    A = rng.standard_normal((80, 80))
    H = A @ A.T
    H = (H + H.T) / 2
    before = H.copy()
    real = linalg.lapack.dsytrd

    def corrupt_then_fail(a, **kwargs):
        real(a, **kwargs)
        raise MemoryError("simulated")

    monkeypatch.setattr(linalg.lapack, "dsytrd", corrupt_then_fail)
    try:
        spectral_projection(H, rng.standard_normal(80))
    except MemoryError:
        pass
    else:
        raise AssertionError("the simulated failure did not propagate")
    assert np.array_equal(H, before)


def test_a_nearly_symmetric_or_read_only_matrix_is_copied_not_touched():
    rng = np.random.default_rng(15)
    A = rng.standard_normal((60, 60))
    H = A @ A.T
    H[0, 1] += 1e-13  # within the kernel check's tolerance, but not exactly symmetric
    before = H.copy()
    spectral_projection(H, rng.standard_normal(60))
    assert np.array_equal(H, before)
    S = (before + before.T) / 2
    S.flags.writeable = False
    spectral_projection(S, rng.standard_normal(60))


def test_spectral_projection_of_a_1_by_1_matrix():
    lam, z = spectral_projection(np.array([[2.0]]), np.array([3.0]))
    assert lam.tolist() == [2.0] and z.tolist() == [3.0]
    lam, z = spectral_projection(np.array([[2.0]]), np.array([[3.0, -1.0]]))
    assert z.tolist() == [[3.0, -1.0]]
