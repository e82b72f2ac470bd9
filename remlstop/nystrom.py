"""The large-N spectrum: eigenvalues and residual projections from landmark rows of the kernel.

The dense path needs the N x N kernel (METHOD M1, M4). Here (M10) only m landmark rows of it
are computed, C = H[S, :] (mK x N, exact entries from the same kernel backends), and H is
approximated by its Nystrom projection H_S = C^T W^+ C (W = H[S, S]): the standard low-rank
approximation of a kernel matrix, never above H (H - H_S is positive semi-definite), exact on
the span of the landmarks' kernel columns. Everything is formed from C and m x m matrices: the
r nonzero eigenvalues of H_S are those of M^T (C C^T) M with M M^T = W^{-1} on the landmarks a
pivoted Cholesky factorisation of W keeps (M = P L^{-T}), and z = V^T (B^T u0) / s with
B = C^T M, so no N x r matrix is made (cost: C, then C C^T in O(N m^2), then O(m^3)). C itself
is not kept either: it is computed in blocks of columns, each folded into C C^T, C u0, C Q
(covariates) and W = H[S, S] and dropped, so the memory is a few m K x m K matrices, not
m K x N, and the landmarks are limited by time, not by N.

The unresolved part H - H_S has trace tr H - sum(lambda), with tr H exact from per-row gradient
norms. It enters the spectrum as one cluster: its dim - r directions share that trace equally,
and the part of u0 outside the resolved span, ||u0||^2 - sum(z^2), is spread evenly over them
(the residual there is treated as noise of the average unresolved eigenvalue). Every criterion
and the test then read an ordinary :class:`~remlstop.spectrum.KernelSpectrum` of all N
eigenvalues. ``SpectrumApproximation`` records what was resolved, so a user can see how much of
the kernel and of the residual the tail holds, and raise ``landmarks`` when it is large.

Its error is measurable, not its sign: the approximation misses the middle of the spectrum, and
on the paper's MLP at n = 20,000 to 10^5 the criteria that read it stop later the fewer the
landmarks (benchmarks/large_n.py), but with tens of landmarks on other networks the stop has
moved either way. Half of the
landmarks already computed give a second, nested approximation (:meth:`NystromKernel.nested`)
from the m K x m K blocks alone, no N-sized copy; the stopper compares the stop times of both
(``SpectrumApproximation.check_times``) for one more fit of the criteria. Where the landmarks
resolve the top of the spectrum the shift is of the size of the error against the dense stop;
with very few the unresolved cluster sets both stops and the check cannot see their common
error (benchmarks/results/large_n_accuracy.md).

A sketch of the per-sample gradients (a Johnson-Lindenstrauss map) was measured as the other
candidate and lost clearly: benchmarks/sketch_vs_nystrom.py compares them at a size where the
dense spectrum is still available.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.linalg import blas, lapack
from torch import nn

from ._model import device_dtype, differentiable_evaluation
from .linalg import blas_threads, eigh_threads, mirror_upper, spectral_projection
from .spectrum import KernelSpectrum, _orthonormal_basis, as_float64_vector, expand_covariates

__all__ = [
    "NystromKernel",
    "SpectrumApproximation",
    "choose_landmarks",
    "nystrom_from_rows",
    "nystrom_kernel",
    "relative_shift",
]

# Landmarks whose pivot (the part of their kernel row the landmarks before them do not explain)
# is below this fraction of W's largest diagonal entry are dropped, and so are H_S's eigenvalues
# below this fraction of its largest: directions not determined to float64 accuracy (W^{-1}
# would amplify their round-off).
_RANK_TOL = 1e-10
# One block of the streamed landmark rows C (m K x b K float64) takes at most this, unless a
# block of m rows (the smallest :func:`nystrom_kernel` makes) is larger.
_BLOCK_BYTES = 2**29
# Columns of C C^T per matrix product while it is accumulated (:func:`_add_gram`).
_PANEL = 2048


@dataclass(frozen=True)
class SpectrumApproximation:
    """How a large-N spectrum was obtained (METHOD M10), and how much of it is resolved.

    Attributes:
        method: 'nystrom'.
        landmarks: m, the landmark rows (each brings K kernel rows).
        rank: r, the resolved eigenvalues.
        resolved_trace: sum of the resolved eigenvalues over tr H (of the compressed kernel
            when covariates are projected off), in [0, 1].
        tail_count: dim - r, the directions of the unresolved cluster.
        tail_eigenvalue: their common eigenvalue, (tr H - sum resolved) / tail_count.
        tail_energy: the share of ||u0||^2 outside the resolved span, in [0, 1].
        seed: seeds the landmark draw.
        seconds: wall-clock seconds for the landmark rows and the eigen-decomposition.
        check_landmarks: m', the landmarks of the nested check (half of m, drawn from them
            with the same seed); 0 when no check ran.
        check_times: each criterion's stop time (gradient-flow units, inf: no finite stop) on
            the spectrum from those m' landmarks; empty when no check ran.
        check_pvalue: the variance-component test's p-value on that spectrum (nan: no check).
    """

    method: str
    landmarks: int
    rank: int
    resolved_trace: float
    tail_count: int
    tail_eigenvalue: float
    tail_energy: float
    seed: int
    # A timing, not part of what was computed: equal approximations may differ in it.
    seconds: float = field(default=0.0, compare=False)
    check_landmarks: int = 0
    check_times: dict[str, float] = field(default_factory=dict)
    check_pvalue: float = math.nan

    def summary(self) -> str:
        return (
            f"Nystrom spectrum (M10) from {self.landmarks} landmark rows (seed {self.seed}): "
            f"{self.rank} eigenvalues resolved, holding {self.resolved_trace:.1%} of tr H; the "
            f"other {self.tail_count} directions as one cluster at lambda = "
            f"{self.tail_eigenvalue:.3g} holding {self.tail_energy:.1%} of ||u0||^2"
        )

    def check_shift(self, criterion: str, t: float) -> float:
        """The criterion's stop time with half the landmarks relative to ``t``, its stop time
        with all of them: t' / t - 1 (0 when both are infinite, inf when only t' is, nan when
        no check ran)."""
        if criterion not in self.check_times:
            return math.nan
        return relative_shift(self.check_times[criterion], t)


def relative_shift(t_check: float, t: float) -> float:
    """t_check / t - 1 for stop times in [0, inf]: 0 when equal (both inf included), inf when
    only t_check is infinite or t is 0, -1 when only t is infinite."""
    if t_check == t:
        return 0.0
    if math.isinf(t):
        return -1.0
    if math.isinf(t_check) or t == 0:
        return math.inf
    return t_check / t - 1.0


def _kernel_rows(train_rows: np.ndarray, K: int) -> np.ndarray:
    """The kernel rows (i K + k, k < K) of training rows i, in M1's row-major order."""
    return (np.asarray(train_rows)[:, None] * K + np.arange(K)[None, :]).reshape(-1)


def choose_landmarks(n: int, seed: int, landmarks: int) -> np.ndarray:
    """``landmarks`` distinct row indices of ``range(n)``, uniformly at random, ascending.

    Drawn from a generator of their own (the user's global RNG is not touched)."""
    if landmarks < 3 or landmarks > n:
        raise ValueError(
            f"landmarks must be between 3 and the number of rows n = {n}, got {landmarks}."
        )
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=landmarks, replace=False))


def _mixing(W: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pivots p (r,), L^{-1} (r, r) lower triangular and M (mK, r) with M M^T = W[p, p]^{-1}
    on the rows p, from the pivoted Cholesky factorisation P^T W P = L L^T (LAPACK dpstrf),
    stopped where the largest remaining pivot is below ``_RANK_TOL`` of W's largest diagonal.

    The landmarks left out have kernel rows in the span of the others to that accuracy: with
    W of rank r, the Nystrom projection C^T W^+ C equals C_p^T W[p, p]^{-1} C_p. A Cholesky
    factor and its inverse cost about m^3 / 3 flops each, a fifth of an eigendecomposition.
    """
    tol = _RANK_TOL * float(np.max(np.diag(W)))
    with blas_threads(eigh_threads(W.shape[0])):
        factor, piv, rank, info = lapack.dpstrf(W, tol=tol, lower=1, overwrite_a=1)
        if info < 0:
            raise np.linalg.LinAlgError(f"LAPACK dpstrf failed (info = {info}).")
        p = piv[:rank] - 1
        inverse, info = lapack.dtrtri(np.tril(factor[:rank, :rank]), lower=1, overwrite_c=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"LAPACK dtrtri failed (info = {info}).")
    inverse = np.tril(inverse)
    M = np.zeros((W.shape[0], rank))
    M[p] = inverse.T
    return p, inverse, M


def _factor(W: np.ndarray, G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """M (mK, r0) and the Gram M^T G M (r0, r0) from the symmetric W = H[S, S] (consumed: the
    factorisation overwrites it) and G = C C^T, both mK x mK."""
    # Symmetric, so the transposes are the column-major arrays LAPACK and BLAS work on in place.
    p, inverse, M = _mixing(W.T)
    Gp = G[np.ix_(p, p)].T
    with blas_threads():
        # M^T (C C^T) M = L^{-1} G[p, p] L^{-T}, by two triangular products.
        gram = blas.dtrmm(1.0, inverse, Gp, lower=1, overwrite_b=1)
        gram = blas.dtrmm(1.0, inverse, gram, side=1, lower=1, trans_a=1, overwrite_b=1)
    return M, gram


@dataclass(frozen=True)
class NystromKernel:
    """H approximated from its landmark rows C = H[S, :] (METHOD M10), H_S = B B^T with
    B = C^T M, for one residual u0 (and covariates Q): held as m K x m K blocks and C's
    products with u0 and Q, so no N-sized matrix is kept (C itself is streamed, block by block).

    Attributes:
        landmark_rows: S as row indices of the kernel (mK,), ascending, row-major (i*K + k).
        block: W = H[S, S], (mK, mK), symmetrised.
        row_gram: C C^T, (mK, mK).
        mixing: M = P L^{-T} (mK, r0) from the pivoted Cholesky factorisation
            P^T W P = L L^T (zero on the rows of landmarks it drops).
        gram: M^T C C^T M, (r0, r0): B^T B.
        residual: u0, (N,) float64; residual_rows: C u0, (mK,).
        covariate_basis: Q, an orthonormal basis (N, q) of the covariates (M5), or None;
            covariate_rows: C Q, (mK, q), or None.
        trace: tr H, exact.
        landmarks: m, the landmark *training rows*; seed: their draw; seconds: time spent.
        kernel_path: the NTK backend that computed the rows ('layerwise' or 'generic').
    """

    landmark_rows: np.ndarray
    block: np.ndarray
    row_gram: np.ndarray
    mixing: np.ndarray
    gram: np.ndarray
    residual: np.ndarray
    residual_rows: np.ndarray
    covariate_basis: np.ndarray | None
    covariate_rows: np.ndarray | None
    trace: float
    landmarks: int
    seed: int
    seconds: float = 0.0
    kernel_path: str = ""

    @property
    def n_obs(self) -> int:
        """N = n K, the residuals."""
        return int(self.residual.size)

    def nested(self, keep: np.ndarray) -> NystromKernel:
        """The Nystrom approximation from the landmarks ``keep`` alone (positions among this
        one's m landmark training rows), from its own blocks: W, C C^T, C u0 and C Q restricted
        to them, no N-sized copy, O((m' K)^3) flops (module docstring)."""
        tic = time.perf_counter()
        keep = np.asarray(keep)
        if keep.ndim != 1 or keep.size < 3 or np.unique(keep).size != keep.size:
            raise ValueError(f"keep must be at least 3 distinct landmark positions, got {keep}.")
        if keep.min() < 0 or keep.max() >= self.landmarks:
            raise ValueError(
                f"keep must index this approximation's {self.landmarks} landmarks, got "
                f"positions {keep.min()} ... {keep.max()}."
            )
        K = self.landmark_rows.size // self.landmarks
        pos = _kernel_rows(np.sort(keep), K)
        W = self.block[np.ix_(pos, pos)]
        G = self.row_gram[np.ix_(pos, pos)]
        M, gram = _factor(W.copy(), G)
        return dataclasses.replace(
            self,
            landmark_rows=self.landmark_rows[pos],
            block=W,
            row_gram=G,
            mixing=M,
            gram=gram,
            residual_rows=self.residual_rows[pos],
            covariate_rows=None if self.covariate_rows is None else self.covariate_rows[pos],
            landmarks=int(keep.size),
            seconds=time.perf_counter() - tic,
        )

    def spectrum(self, kernel_times: np.ndarray | None = None) -> KernelSpectrum:
        """The spectrum of H_S plus the one-cluster tail (module docstring) for the residual
        u0 this factorisation holds.

        With ``kernel_times`` = H Q (N, q), Q = ``covariate_basis``, computed exactly by the
        caller (``remlstop.ntk.ntk_vector_product``), the kernel is compressed to the
        covariates' complement (M5), as ``KernelSpectrum.from_kernel(H, u0, covariates=Z)``
        does: B becomes P B, u0 becomes P u0, and tr(P H P) = tr H - tr(Q^T H Q).
        """
        tic = time.perf_counter()
        u, Cu = self.residual, self.residual_rows
        N = self.n_obs
        M, S = self.mixing, self.gram
        trace, q = self.trace, 0
        if kernel_times is not None:
            Q, CQ = self.covariate_basis, self.covariate_rows
            if Q is None or CQ is None:
                raise ValueError(
                    "kernel_times compresses the kernel to the covariates' complement, but this "
                    "factorisation was built without covariates; pass covariates= when building it."
                )
            if np.shape(kernel_times) != Q.shape:
                raise ValueError(
                    f"kernel_times must be H Q of shape {Q.shape} (Q = covariate_basis), got "
                    f"{np.shape(kernel_times)}."
                )
            q = Q.shape[1]
            QB = CQ.T @ M  # Q^T B, (q, r0)
            S = S - QB.T @ QB
            coef = Q.T @ u
            u = u - Q @ coef
            Cu = Cu - CQ @ coef
            trace -= float(np.einsum("ij,ij->", Q, np.asarray(kernel_times, dtype=np.float64)))
        sym = S + S.T
        sym *= 0.5
        s2, w = spectral_projection(sym, M.T @ Cu, overwrite=True)
        del sym
        keep = s2 > _RANK_TOL * max(float(s2[-1]), 1e-300)
        s2 = s2[keep]
        z = w[keep] / np.sqrt(s2)
        dim = N - q
        tail_count = dim - s2.size
        resolved = float(s2.sum())
        if tail_count < 1:
            raise ValueError(
                f"the landmarks resolve all {dim} directions: use the dense path (fewer "
                "landmarks would leave an unresolved part)."
            )
        tail_trace = max(trace - resolved, 0.0)
        energy = float(u @ u)
        tail_energy = max(energy - float(z @ z), 0.0)
        tail_lambda = tail_trace / tail_count
        # The cluster is one entry of multiplicity dim - r: the statistics then cost O(r), not
        # O(N) (at N = 10^6 they took 92 s and 12.8 GB as N entries).
        spectrum = KernelSpectrum.from_eigen(
            np.concatenate([[tail_lambda], s2]),
            np.concatenate([[math.sqrt(tail_energy)], z]),
            n_fixed=q,
            multiplicity=np.concatenate([[tail_count], np.ones(s2.size, dtype=np.int64)]),
        )
        info = SpectrumApproximation(
            method="nystrom",
            landmarks=self.landmarks,
            rank=int(s2.size),
            resolved_trace=resolved / max(resolved + tail_trace, 1e-300),
            tail_count=tail_count,
            tail_eigenvalue=tail_lambda,
            tail_energy=tail_energy / energy if energy > 0 else 0.0,
            seed=self.seed,
            seconds=self.seconds + time.perf_counter() - tic,
        )
        return spectrum.with_approximation(info)


def _add_gram(G: np.ndarray, Cb: np.ndarray) -> None:
    """G's lower triangle += C_b C_b^T, for C_b (mK, columns), in column panels of
    ``_PANEL``: the panel's diagonal block by BLAS syrk, the rest below it by a matrix product.

    Not one syrk for all of G: SciPy's threaded dsyrk wrote out of bounds (a segfault) for a
    16,384 x 16,384 output with 4,096 or more columns on two threads, measured; the panels keep
    every output small, for the same flops."""
    mK = G.shape[0]
    with blas_threads():
        for j in range(0, mK, _PANEL):
            k = min(mK, j + _PANEL)
            G[j:k, j:k] += blas.dsyrk(1.0, Cb[j:k].T, trans=1, lower=1)
            G[k:, j:k] += Cb[k:] @ Cb[j:k].T


def _from_blocks(
    blocks: Iterable[np.ndarray],
    landmark_rows: np.ndarray,
    residual: np.ndarray,
    basis: np.ndarray | None,
    trace: float,
    landmarks: int,
    seed: int,
) -> NystromKernel:
    """Accumulate the m K x m K blocks and C's products from C's column blocks, in order
    ((mK, columns) float64 each, covering the N columns), and factor them (module docstring)."""
    S = landmark_rows
    mK, N = S.size, residual.size
    G = np.zeros((mK, mK))
    W = np.zeros((mK, mK))
    Cu = np.zeros(mK)
    CQ = None if basis is None else np.zeros((mK, basis.shape[1]))
    start = 0
    for Cb in blocks:
        stop = start + Cb.shape[1]
        if Cb.shape[0] != mK or stop > N:
            raise ValueError(
                f"the landmark rows must be (mK, N) = ({mK}, {N}); got a block of shape "
                f"{Cb.shape} at column {start}."
            )
        if not np.isfinite(Cb).all():
            raise ValueError(
                "the landmark rows of the kernel contain NaN or inf; check the model's outputs."
            )
        _add_gram(G, Cb)
        Cu += Cb @ residual[start:stop]
        if CQ is not None:
            CQ += Cb @ basis[start:stop]
        lo, hi = np.searchsorted(S, [start, stop])  # S is ascending
        W[:, lo:hi] = Cb[:, S[lo:hi] - start]
        start = stop
    if start != N:
        raise ValueError(
            f"the landmark rows must have N = {N} columns (one per residual), got {start}."
        )
    mirror_upper(G.T)
    W += W.T
    W *= 0.5
    if not np.max(np.diag(W)) > 0:
        raise ValueError(
            "the kernel is zero on the landmark rows: the model's outputs do not depend on its "
            "trainable parameters there."
        )
    M, gram = _factor(W.copy(), G)
    return NystromKernel(
        landmark_rows=S,
        block=W,
        row_gram=G,
        mixing=M,
        gram=gram,
        residual=residual,
        residual_rows=Cu,
        covariate_basis=basis,
        covariate_rows=CQ,
        trace=float(trace),
        landmarks=int(landmarks),
        seed=int(seed),
    )


def _residual_and_basis(
    residual: np.ndarray | torch.Tensor, covariates: np.ndarray | torch.Tensor | None, N: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """u0 as (N,) float64 and Q, the orthonormal basis (N, q) of the covariates Z ((N, q) or
    (n, q)) as the dense path builds it (M5), or None."""
    u = as_float64_vector(residual, "residual")
    if u.size != N:
        raise ValueError(
            f"residual has {u.size} entries but the kernel has N = {N} rows; they must "
            "match (N = rows x outputs, flattened row-major)."
        )
    if covariates is None:
        return u, None
    return u, _orthonormal_basis(expand_covariates(covariates, N))


def nystrom_from_rows(
    rows: np.ndarray | torch.Tensor,
    landmark_rows: np.ndarray,
    trace: float,
    residual: np.ndarray | torch.Tensor,
    *,
    covariates: np.ndarray | torch.Tensor | None = None,
    landmarks: int | None = None,
    seed: int = 0,
) -> NystromKernel:
    """Factor the landmark rows C = H[S, :] ((mK, N), S = ``landmark_rows``) of a kernel with
    exact trace ``trace`` into a :class:`NystromKernel` for the residual u0 (N,) and the
    covariates Z ((N, q) or (n, q), optional) (METHOD M10).

    Pure linear algebra on the rows: W = C[:, S], M = P L^{-T} from its pivoted Cholesky
    factorisation stopped at pivots below ``_RANK_TOL`` of W's largest diagonal entry
    (:func:`_mixing`), C C^T, C u0, C Q and the r0 x r0 Gram M^T C C^T M.
    """
    tic = time.perf_counter()
    C = np.ascontiguousarray(
        rows.detach().cpu().double().numpy() if isinstance(rows, torch.Tensor) else rows,
        dtype=np.float64,
    )
    S = np.asarray(landmark_rows)
    if C.ndim != 2 or C.shape[0] != S.size or C.shape[0] >= C.shape[1]:
        raise ValueError(
            f"rows must be (mK, N) with mK = {S.size} < N landmark rows of the kernel, got "
            f"shape {tuple(C.shape)}."
        )
    u, Q = _residual_and_basis(residual, covariates, C.shape[1])
    m = landmarks if landmarks is not None else S.size
    factor = _from_blocks([C], S, u, Q, trace, m, seed)
    return dataclasses.replace(factor, seconds=time.perf_counter() - tic)


def nystrom_kernel(
    model: nn.Module,
    x: torch.Tensor,
    residual: np.ndarray | torch.Tensor,
    *,
    landmarks: int,
    covariates: np.ndarray | torch.Tensor | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    memory_limit_bytes: int | None = None,
    block_rows: int | None = None,
) -> NystromKernel:
    """The Nystrom factorisation of the model's empirical NTK at ``x`` (METHOD M1, M10), for
    the residual u0 and the covariates Z.

    Args:
        model: the network; derivatives over its trainable parameters (eval mode, left as found).
        x: training inputs (n, ...); the kernel has N = n K rows.
        residual: u0, N entries in M1's row-major order.
        landmarks: m, training rows drawn uniformly at random (seeded by ``seed``) whose K
            kernel rows each are computed exactly.
        covariates: Z, (N, q) or (n, q), for :meth:`NystromKernel.spectrum`'s compressed
            kernel (M5); None: none.
        chunk_size, memory_limit_bytes: passed to :func:`remlstop.ntk.empirical_ntk`.
        block_rows: training rows per block of the landmark rows C, which is streamed: only
            one block, m K x (block_rows K) float64, is alive at once (default: as many rows
            as fit ``_BLOCK_BYTES``, at least m, so the landmarks' own Jacobian factors, made
            anew for each block, cost at most what the rows' cost).

    Returns:
        :class:`NystromKernel`; ``.spectrum()`` gives the spectrum every criterion reads.
    """
    from .ntk import _check_inputs, _probe_outputs, empirical_ntk, ntk_trace

    tic = time.perf_counter()
    n = x.shape[0]
    if block_rows is not None and block_rows < 1:
        raise ValueError(f"block_rows must be a positive number of rows, got {block_rows}.")
    chosen = choose_landmarks(n, seed, landmarks)
    landmark_x = x[torch.as_tensor(chosen, device=x.device)]
    paths: list[str] = []
    with differentiable_evaluation(model):
        K = _probe_outputs(model, _check_inputs(x[:4], "x", *device_dtype(model)))
        N = n * K
        u, Q = _residual_and_basis(residual, covariates, N)
        b = block_rows or max(landmarks, _BLOCK_BYTES // (8 * landmarks * K * K))

        def blocks() -> Iterator[np.ndarray]:
            for start in range(0, n, b):
                part = x[start : start + b]
                Cb, info = empirical_ntk(
                    model,
                    part,
                    landmark_x,
                    chunk_size=chunk_size,
                    memory_limit_bytes=memory_limit_bytes,
                    return_info=True,
                )
                paths.append(info.path)
                # The cross kernel J(x_S) J(x_b)^T comes divided by the block's N_b = n_b K;
                # C = H[S, :] is divided by N (M1).
                C = Cb.cpu().numpy()
                C *= part.shape[0] * K / N
                yield C

        trace = ntk_trace(model, x, chunk_size=chunk_size)
        factor = _from_blocks(blocks(), _kernel_rows(chosen, K), u, Q, trace, landmarks, seed)
    return dataclasses.replace(
        factor, seconds=time.perf_counter() - tic, kernel_path=paths[0] if paths else ""
    )
