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
import ctypes
import math
import os
from collections.abc import Callable, Iterator

import numpy as np
import scipy.linalg.lapack as lapack
import torch
from scipy.linalg import cython_lapack
from threadpoolctl import threadpool_limits

__all__ = [
    "available_cpus",
    "blas_threads",
    "eigh_threads",
    "mirror_upper",
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
    the Householder reflectors (Q^T vector, O(N^2 c)), and T is decomposed by divide and
    conquer, or from N = 2,048 by MRRR in column blocks (:func:`_tridiagonal_projection`).
    Skipping the back-transformation V = Q W, about half the flops of a full ``eigh``, made it
    1.3-1.4x faster at N = 1,000-2,000 with the same eigenvalues; at N = 3,000 MRRR's cost makes
    it about as fast as a full ``eigh`` (benchmarks/eigh_threads.py). Only the lower triangle is
    read.

    Memory: an exactly symmetric, writeable, contiguous ``matrix`` (what
    :func:`remlstop.empirical_ntk` returns) is its own workspace: LAPACK overwrites one triangle
    and the diagonal, and both are restored bit for bit from the other triangle before this
    returns (also on error), so no N x N copy is made; another thread must not read it
    meanwhile. Any other matrix is copied once (not at all with ``overwrite=True``, which
    destroys it). From N = 2,048, T's eigenvectors are then formed about a quarter at a time.
    """
    A = np.asarray(matrix, dtype=np.float64)
    u = np.asarray(vector, dtype=np.float64)
    shape = u.shape
    u = u.reshape(shape[0], -1)
    n = A.shape[0]
    # LAPACK works on column-major arrays; a symmetric row-major one is its own transpose.
    work = A.T if A.flags.c_contiguous and not A.flags.f_contiguous else A
    in_place = not overwrite and _restorable(work)
    diagonal = np.diag(work).copy() if in_place else None
    with blas_threads(eigh_threads(n)):
        try:
            lwork = int(lapack.dsytrd_lwork(n, lower=1)[0])
            packed, diag, offdiag, tau, info = lapack.dsytrd(
                work, lower=1, lwork=max(lwork, n), overwrite_a=int(overwrite or in_place)
            )
            if info != 0:
                raise np.linalg.LinAlgError(f"LAPACK dsytrd failed (info = {info}).")
            w = u.copy()
            # Q = H(0) ... H(n-2), H(i) = I - tau_i v v^T with v[i+1] = 1 and v[i+2:] stored
            # below the subdiagonal of column i; Q^T u applies H(0) first.
            for i in range(n - 1):
                if tau[i] != 0.0:
                    v = packed[i + 1 :, i].copy()
                    v[0] = 1.0
                    w[i + 1 :] -= np.outer(v, tau[i] * (v @ w[i + 1 :]))
            del packed
        finally:
            if diagonal is not None:
                _restore_lower(work, diagonal)
        del A, work
        return _tridiagonal_projection(diag, offdiag, w, shape)


def _restorable(F: np.ndarray, rows: int = 256) -> bool:
    """Whether ``F`` may serve as dsytrd's workspace and be restored from its upper triangle:
    Fortran-contiguous (so LAPACK writes into it, not into a copy), writeable, and exactly
    symmetric (checked in column blocks, so no N x N temporary is made)."""
    if not (F.flags.f_contiguous and F.flags.writeable and F.dtype == np.float64):
        return False
    return all(
        np.array_equal(F[:, j : j + rows].T, F[j : j + rows]) for j in range(0, F.shape[0], rows)
    )


def _restore_lower(F: np.ndarray, diagonal: np.ndarray) -> None:
    """Copy the strictly upper triangle of ``F`` onto its lower one and put back the diagonal."""
    mirror_upper(F)
    np.fill_diagonal(F, diagonal)


def mirror_upper(F: np.ndarray, cols: int = 256) -> None:
    """Copy the strictly upper triangle of the square ``F`` onto its lower one, in place, in
    column blocks of ``cols`` (whole-matrix transposes miss the cache); no second N x N array
    is made. ``mirror_upper(F.T)`` mirrors the lower triangle onto the upper."""
    n = F.shape[0]
    for j in range(0, n, cols):
        k = min(n, j + cols)
        F[k:, j:k] = F[j:k, k:].T
        block = F[j:k, j:k]
        lower = np.tril_indices(k - j, -1)
        block[lower] = block.T[lower]


def _lapack_function(name: str, *args: type) -> Callable[..., None]:
    """A LAPACK routine of SciPy's own library, from the function pointer that
    ``scipy.linalg.cython_lapack`` exports; every argument is passed by reference (Fortran)."""
    capsule = cython_lapack.__pyx_capi__[name]
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    pointer = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
    return ctypes.CFUNCTYPE(None, *args)(pointer)


_D, _I, _C = ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_int), ctypes.c_char_p
# SciPy's f2py wrapper of dstemr allocates all N x N eigenvectors whatever the index range,
# so the routine is called directly, with an N x (hi - lo) output.
_DSTEMR = _lapack_function(
    "dstemr", _C, _C, _I, _D, _D, _D, _D, _I, _I, _I, _D, _D, _I, _I, _I, _I, _D, _I, _I, _I, _I
)


def _dstemr(
    diag: np.ndarray, offdiag: np.ndarray, lo: int, hi: int
) -> tuple[int, np.ndarray, np.ndarray]:
    """LAPACK dstemr (MRRR) for eigenpairs lo..hi-1 (0-based, ascending) of the symmetric
    tridiagonal T: ``(info, eigenvalues (k,), eigenvectors as rows (k, n))``, k = hi - lo."""
    n, k = diag.size, hi - lo
    d = np.array(diag, dtype=np.float64)
    e = np.zeros(n)
    e[: n - 1] = offdiag
    evals = np.empty(n)
    rows = np.empty((k, n))  # column-major n x k: eigenvector j is row j
    support = np.empty(2 * k, dtype=np.intc)
    work, iwork = np.empty(18 * n), np.empty(10 * n, dtype=np.intc)
    found, info, tryrac = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(1)
    bound = ctypes.c_double(0.0)

    def ref(v: int) -> object:
        return ctypes.byref(ctypes.c_int(v))

    def ptr(a: np.ndarray) -> object:
        return a.ctypes.data_as(_I if a.dtype == np.intc else _D)

    _DSTEMR(
        b"V",
        b"I",
        ref(n),
        ptr(d),
        ptr(e),
        ctypes.byref(bound),
        ctypes.byref(bound),
        ref(lo + 1),
        ref(hi),
        ctypes.byref(found),
        ptr(evals),
        ptr(rows),
        ref(n),
        ref(k),
        ptr(support),
        ctypes.byref(tryrac),
        ptr(work),
        ref(work.size),
        ptr(iwork),
        ref(iwork.size),
        ctypes.byref(info),
    )
    if info.value == 0 and found.value != k:
        return -1, evals[:0], rows[:0]
    return info.value, evals[:k], rows


def _block_ends(evals: np.ndarray, size: int) -> list[int]:
    """Ends of index blocks of about ``size`` ascending eigenvalues of T, each end at a gap
    that MRRR resolves on its own: a relative gap of at least ``_BLOCK_GAP`` (dstemr's own
    threshold for a singleton) that is also far above round-off (1e3 N eps ||T||). Eigenvectors
    from separate calls are orthogonal across such gaps (2e-12 measured on a paper-MLP kernel
    at N = 3,000); a cluster (a kernel's null space, repeated eigenvalues) is never split and
    makes its block as long as it needs."""
    n = evals.size
    gap = np.diff(evals)
    mags = np.maximum(np.abs(evals[1:]), np.abs(evals[:-1]))
    noise = 1e3 * n * np.finfo(np.float64).eps * max(float(np.abs(evals).max()), 1e-300)
    split = (gap > _BLOCK_GAP * mags) & (gap > noise)
    ends: list[int] = []
    lo = 0
    while lo < n:
        at = np.flatnonzero(split[lo + size - 1 :]) if lo + size < n else np.empty(0, int)
        hi = n if at.size == 0 else lo + size + int(at[0])
        ends.append(hi)
        lo = hi
    return ends


def _tridiagonal_projection(
    diag: np.ndarray, offdiag: np.ndarray, w: np.ndarray, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues of the tridiagonal T and S^T w (T = S diag(lambda) S^T), S in column blocks.

    MRRR (``dstemr``) computes the eigenvectors of any index range of T; blocks end at gaps in
    the spectrum (:func:`_block_ends`), so the blocks are orthogonal to one another. Only one
    block of S is held at a time, about N x N/4, where divide and conquer would hold all of S
    and an N x N workspace besides (benchmarks/peak_memory.py measures the peak). If MRRR fails,
    or the blocks do not keep w's norm (so were not orthogonal), divide and conquer runs instead;
    below ``_MRRR_FROM`` rows it runs from the start, being several times faster there
    (benchmarks/eigh_threads.py) for at most 2 x 32 MB of eigenvectors and workspace.
    """
    n = diag.size
    if n == 1:  # T = [d]; LAPACK's wrappers refuse the empty off-diagonal of a 1 x 1 matrix
        return diag.copy(), w.reshape(shape)
    # Below _MRRR_FROM divide and conquer runs directly: no eigenvalue-only pass first.
    evals, info = lapack.dstevd(diag, offdiag, compute_v=0)[::2] if n >= _MRRR_FROM else (None, 1)
    if info == 0:
        z = np.empty((n, w.shape[1]))
        lo = 0
        for hi in _block_ends(evals, -(-n // _EIGENVECTOR_BLOCKS)):
            info, lam, S_T = _dstemr(diag, offdiag, lo, hi)
            if info != 0:
                break
            evals[lo:hi], z[lo:hi] = lam, S_T @ w
            del S_T
            lo = hi
        else:
            # Blocks that were not orthogonal would not keep the columns' norms (Parseval).
            norms = np.einsum("ij,ij->j", w, w)
            if np.allclose(np.einsum("ij,ij->j", z, z), norms, rtol=1e-10, atol=0.0):
                return evals, z.reshape(shape)
    evals, W, info = lapack.dstevd(diag, offdiag, compute_v=1)
    if info != 0:
        evals, W, info = lapack.dstev(diag, offdiag, compute_v=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"LAPACK could not diagonalise T (info = {info}).")
    return evals, (W.T @ w).reshape(shape)


# Eigenvectors of T come in about this many column blocks, split only across relative gaps of
# at least _BLOCK_GAP (LAPACK dlarrv's MINRGP, below which MRRR treats eigenvalues as a cluster).
_EIGENVECTOR_BLOCKS = 4
_MRRR_FROM = 2048
_BLOCK_GAP = 1e-3
