import numpy as np
import torch
from threadpoolctl import threadpool_info

from remlstop.linalg import available_cpus, blas_threads, symmetric_eigh


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
