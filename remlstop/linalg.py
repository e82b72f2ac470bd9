"""Dense float64 linear algebra for the statistics, with BLAS threads sized to the machine.

Why this module exists: the BLAS/LAPACK pools that numpy, scipy and torch load size themselves
from the host's CPU count. Where a container or a CI runner is given fewer cores than the host
has (a cgroup CPU quota, a CPU affinity mask), or where several pools spin at once, a dense
``eigh`` oversubscribes the cores it really has and can run two orders of magnitude slower.
Every dense factorisation of the library runs under :func:`blas_threads`, which caps the pools
for the duration of the call only (the user's global settings are restored on exit): at the cores
this process may really use, and at one thread for eigen-decompositions of moderate size, where
threads buy little and contention costs a lot (measured in benchmarks/eigh_threads.py).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import numpy as np
import scipy.linalg.lapack as lapack
import torch
from threadpoolctl import threadpool_limits

__all__ = [
    "available_cpus",
    "blas_threads",
    "eigh_threads",
    "spectral_projection",
    "symmetric_eigh",
]


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by a cgroup v2 (``cpu.max``) or v1 (``cfs_quota_us``) quota, if any."""
    candidates = [
        ("/sys/fs/cgroup/cpu.max", None),
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    ]
    for quota_path, period_path in candidates:
        try:
            with open(quota_path) as fh:
                fields = fh.read().split()
            if period_path is None:
                quota, period = fields[0], fields[1]
            else:
                with open(period_path) as fh:
                    quota, period = fields[0], fh.read().split()[0]
        except (OSError, IndexError):
            continue
        if quota in ("max", "-1"):
            return None
        return max(1.0, float(quota) / float(period))
    return None


def available_cpus() -> int:
    """Cores this process may use: the affinity mask, capped by any cgroup CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, math.floor(quota))
    return max(1, count)


@contextlib.contextmanager
def blas_threads(limit: int | None = None) -> Iterator[int]:
    """Cap numpy/scipy BLAS pools and torch's intra-op threads at ``limit`` for a block.

    ``limit`` defaults to :func:`available_cpus`. Settings are restored on exit, so the
    user's own thread configuration is untouched outside the library's calls.
    """
    limit = available_cpus() if limit is None else max(1, int(limit))
    previous = torch.get_num_threads()
    with threadpool_limits(limits=limit):
        if previous > limit:
            torch.set_num_threads(limit)
        try:
            yield limit
        finally:
            if previous > limit:
                torch.set_num_threads(previous)


def eigh_threads(n: int) -> int:
    """BLAS threads for a dense float64 ``eigh`` of an (n, n) matrix.

    One thread below ``_SERIAL_EIGH_BELOW`` rows: the divide-and-conquer tridiagonal solver
    gains little from threads at that size, and every extra thread is one more to collide with
    torch's spinning OpenMP pool or another process (benchmarks/eigh_threads.py measures it).
    """
    return 1 if n < _SERIAL_EIGH_BELOW else available_cpus()


_SERIAL_EIGH_BELOW = 4096


def symmetric_eigh(matrix: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a symmetric matrix in float64: ``(eigenvalues, eigenvectors)``.

    Shapes: (N, N) in, (N,) ascending eigenvalues and (N, N) column eigenvectors out, both
    float64 numpy arrays on the CPU. A torch tensor on an accelerator is decomposed there
    and only the results are copied back; on the CPU, LAPACK runs under :func:`blas_threads`
    with :func:`eigh_threads` threads.
    """
    if isinstance(matrix, torch.Tensor):
        if matrix.device.type != "cpu":
            evals, evecs = torch.linalg.eigh(matrix.detach().to(torch.float64))
            return evals.cpu().numpy(), evecs.cpu().numpy()
        matrix = matrix.detach().numpy()
    A = np.asarray(matrix, dtype=np.float64)
    with blas_threads(eigh_threads(A.shape[0])):
        evals, evecs = np.linalg.eigh(A)
    return evals, evecs


def spectral_projection(
    matrix: np.ndarray, vector: np.ndarray, *, overwrite: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues of a symmetric matrix and a vector's (or columns') coordinates in its eigenbasis.

    Shapes: matrix (N, N) and vector (N,) or (N, c) float64 in; (N,) ascending eigenvalues
    lambda and z = V^T vector out, of the vector's shape (METHOD M4; columns carry fixed effects
    along, M9), without forming the N x N eigenvector matrix V of the matrix. The matrix is
    reduced to tridiagonal form T = Q^T A Q (LAPACK ``dsytrd``), the vector is carried along by
    the Householder reflectors (Q^T vector, O(N^2 c)), and T is decomposed by divide and conquer
    (``dstevd``). Skipping the back-transformation V = Q W, about half the flops of a full
    ``eigh``, made it 1.6-1.7x faster at N = 1,000-2,000 with the same eigenvalues
    (benchmarks/eigh_threads.py). Only the lower triangle is read. Memory: one N x N copy for
    the reduction (none with ``overwrite=True``, which destroys ``matrix``), freed before the
    N x N eigenvectors of T are formed. Divide and conquer falls back to the QR algorithm
    (``dstev``) if it does not converge.
    """
    A = np.asarray(matrix, dtype=np.float64)
    u = np.asarray(vector, dtype=np.float64)
    shape = u.shape
    u = u.reshape(shape[0], -1)
    n = A.shape[0]
    with blas_threads(eigh_threads(n)):
        lwork = int(lapack.dsytrd_lwork(n, lower=1)[0])
        packed, diag, offdiag, tau, info = lapack.dsytrd(
            A, lower=1, lwork=max(lwork, n), overwrite_a=int(overwrite)
        )
        if info != 0:
            raise np.linalg.LinAlgError(f"LAPACK dsytrd failed (info = {info}).")
        del A
        w = u.copy()
        # Q = H(0) ... H(n-2), H(i) = I - tau_i v v^T with v[i+1] = 1 and v[i+2:] stored
        # below the subdiagonal of column i; Q^T u applies H(0) first.
        for i in range(n - 1):
            if tau[i] != 0.0:
                v = packed[i + 1 :, i].copy()
                v[0] = 1.0
                w[i + 1 :] -= np.outer(v, tau[i] * (v @ w[i + 1 :]))
        del packed
        evals, W, info = lapack.dstevd(diag, offdiag, compute_v=1)
        if info != 0:
            evals, W, info = lapack.dstev(diag, offdiag, compute_v=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"LAPACK could not diagonalise T (info = {info}).")
        return evals, (W.T @ w).reshape(shape)
