"""KernelSpectrum: the eigenvalues of the kernel and the residual in its eigenbasis.

This is the one object the statistics read (METHOD M4, M5). It is built once from a dense
kernel H (N x N) and the initial residual u0 = y - f0 (length N, row-major over outputs), and,
when covariates Z are given, from the kernel compressed to the complement of Z (M5).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.linalg import blas

from .linalg import blas_threads, spectral_projection

if TYPE_CHECKING:
    from .nystrom import SpectrumApproximation

__all__ = ["KernelSpectrum", "as_float64_vector", "expand_covariates"]

ArrayLike = np.ndarray | torch.Tensor


# The statistics square eigenvalues and projections and take exponentials of t λ: scales
# beyond these overflow or underflow float64 (a kernel is a few units for a network whose
# outputs and targets are of order one).
_SCALE = 1e140


def _check_scale(value: float, what: str) -> None:
    """ValueError when ``value`` (> 0) lies beyond 1e±140, naming ``what`` and the way out."""
    if not 1.0 / _SCALE < value < _SCALE:
        raise ValueError(
            f"the {what} ({value:.3g}) is beyond 1e±140, where the statistics overflow float64: "
            "rescale the targets and the network's outputs to order one."
        )


def _check_scales(eigenvalues: np.ndarray, z: np.ndarray) -> None:
    _check_scale(float(np.max(eigenvalues)), "kernel's largest eigenvalue")
    _check_scale(float(np.max(np.abs(z))), "residual's largest projection")


# A residual whose energy after the covariates' projection is below this share of its energy
# before is rounding: the residual lay in the covariates' span.
_ROUNDING_RESIDUAL = 1e-24


def _dtype_eps(x: ArrayLike) -> float:
    if isinstance(x, torch.Tensor):
        return float(torch.finfo(x.dtype).eps) if x.is_floating_point() else 2.2e-16
    x = np.asarray(x)
    return float(np.finfo(x.dtype).eps) if np.issubdtype(x.dtype, np.floating) else 2.2e-16


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        # NumPy has no bfloat16; statistics run in float64 anyway.
        return (x.double() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def as_float64_vector(values: ArrayLike, name: str) -> np.ndarray:
    """Flatten ``values`` row-major to a float64 vector, refusing integers and non-finite entries.

    Integer or boolean input is refused because it almost always means class labels, which the
    theory (squared error, M1) does not cover.
    """
    arr = _to_numpy(values)
    if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer):
        raise TypeError(
            f"{name} has integer dtype {arr.dtype}; this looks like class labels. remlstop covers "
            "squared-error training only: one-hot encode the labels as floats and use loss='mse'."
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array or tensor, got dtype {arr.dtype}.")
    vec = np.ascontiguousarray(arr, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(vec)):
        bad = int(np.sum(~np.isfinite(vec)))
        raise ValueError(
            f"{name} contains {bad} NaN or infinite value(s); remove or impute them before fitting."
        )
    return vec


def _max_asymmetry(H: np.ndarray, rows: int = 256) -> float:
    """max |H - H^T| in row blocks, so no N x N temporary is made."""
    return max(
        float(np.max(np.abs(H[i : i + rows] - H[:, i : i + rows].T)))
        for i in range(0, H.shape[0], rows)
    )


def _check_kernel(kernel: ArrayLike) -> np.ndarray:
    """Validate a dense kernel and return it as a float64 array (the caller's memory when it
    already is one: nothing N x N is copied). It is symmetric up to round-off; the
    eigensolver reads its lower triangle."""
    if isinstance(kernel, torch.Tensor) and not kernel.is_floating_point():
        raise TypeError(f"kernel must be floating point, got dtype {kernel.dtype}.")
    raw = _to_numpy(kernel)
    if not np.issubdtype(np.asarray(raw).dtype, np.floating):
        raise TypeError(f"kernel must be floating point, got dtype {np.asarray(raw).dtype}.")
    H = np.asarray(raw, dtype=np.float64)
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"kernel must be a square (N, N) matrix, got shape {tuple(H.shape)}.")
    if H.shape[0] < 3:
        raise ValueError(
            f"kernel is {H.shape[0]}x{H.shape[0]}; at least N = 3 residuals are needed to estimate "
            "a variance component. Use more training rows."
        )
    if not np.isfinite(H).all():
        raise ValueError(
            "kernel contains NaN or infinite entries; check the model outputs and parameters "
            "(a diverged or NaN-initialised network gives a NaN kernel)."
        )
    scale = max(float(H.max()), -float(H.min()))
    if scale == 0.0:
        raise ValueError(
            "kernel is identically zero: the model's outputs do not depend on its trainable "
            "parameters at these inputs (frozen or dead network). Nothing can be learned."
        )
    asym = _max_asymmetry(H)
    sym_tol = max(1e-10, 100.0 * _dtype_eps(kernel)) * scale
    if asym > sym_tol:
        raise ValueError(
            f"kernel is not symmetric (max |H - H^T| = {asym:.3g} vs max |H| = {scale:.3g}); an "
            "NTK train-train kernel is J J^T / N. Did you pass the cross kernel?"
        )
    return H


def expand_covariates(covariates: ArrayLike, n_total: int) -> np.ndarray:
    """Fixed-effect covariates Z (M5) as an (N, q) float64 matrix, rows in the row-major order
    of the residual; an (n, q) matrix with N = n*K is expanded to one column per covariate and
    output (Z kron I_K)."""
    Z = np.asarray(_to_numpy(covariates), dtype=np.float64)
    if Z.ndim == 1:
        Z = Z[:, None]
    if Z.ndim != 2 or Z.shape[1] == 0:
        raise ValueError(
            f"covariates must be (N, q) or (n, q) with q >= 1 columns, got shape "
            f"{tuple(Z.shape)} (pass None for no covariates)."
        )
    if not np.all(np.isfinite(Z)):
        raise ValueError("covariates contain NaN or infinite values.")
    rows = Z.shape[0]
    if rows != n_total:
        if rows > 0 and n_total % rows == 0:
            # One copy of each covariate per output: the fixed effect acts on every output.
            Z = np.kron(Z, np.eye(n_total // rows))
        else:
            raise ValueError(
                f"covariates have {rows} rows but the residual has N = {n_total} entries; pass "
                "one row per residual (N rows) or one per training row (n rows, N = n*K)."
            )
    return Z


def _compressed(H: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """P H P - s Q Q^T, P = I - Q Q^T, in the lower triangle of one new N x N array (M5).

    The covariate directions get eigenvalue -s (s = tr H + 1), well apart from the compressed
    kernel's (all >= 0), so they are split off exactly even where the compressed kernel itself
    has a null space. As one symmetric rank-2q update, H - (B Q^T + Q B^T) with
    B = H Q - Q (Q^T H Q)/2 + s Q/2 (BLAS syr2k), so no other N x N temporary is made.
    """
    shift = float(np.trace(H)) + 1.0
    with blas_threads():
        HQ = H @ Q
        B = HQ - 0.5 * Q @ (Q.T @ HQ) + 0.5 * shift * Q
        out = np.array(H, order="F", copy=True)
        return blas.dsyr2k(-1.0, B, Q, beta=1.0, c=out, lower=1, overwrite_c=1)


def _orthonormal_basis(Z: np.ndarray) -> np.ndarray:
    """Q of a reduced QR of Z (N, q), refusing rank-deficient or too-large Z."""
    n_total, q = Z.shape
    if q >= n_total - 2:
        raise ValueError(
            f"{q} covariates leave {n_total - q} residual degrees of freedom; at least 3 are "
            "needed. Use fewer covariates or more data."
        )
    Q, R = np.linalg.qr(Z, mode="reduced")
    diag = np.abs(np.diag(R))
    if diag.min() <= 1e-10 * max(diag.max(), 1e-300):
        raise ValueError(
            f"covariates have rank < q = {q} (collinear columns); drop the redundant columns "
            "(an intercept and a column of ones together, say)."
        )
    return Q


@dataclass(frozen=True)
class KernelSpectrum:
    """Eigenvalues of the (compressed) kernel and projections of the residual on its eigenvectors.

    Attributes:
        eigenvalues: (m,) float64, ascending, >= 0, m = N - q (METHOD M4: lambda_j).
        z: (m,) float64, z = V^T u0 (projected off the covariates when q > 0).
        n_obs: N, the number of residuals (n rows x K outputs).
        n_fixed: q, the number of fixed-effect covariates projected out (M5).
        trace: trace of the (compressed) kernel before clipping.
        clipped_mass: total magnitude of the tiny negative eigenvalues clipped to 0.
        fixed_effects: None, or W = V^T Q (m, q_R): an orthonormal basis Q of fixed-effect
            covariates carried into the eigenbasis of the *uncompressed* kernel, for genuine
            REML with fixed effects (METHOD M9). Such a spectrum keeps all N eigenvalues; the
            variance-component test needs the compressed one (``covariates=``) instead.
        approximation: None for a spectrum of the dense kernel; how a large-N spectrum was
            obtained otherwise (:class:`remlstop.nystrom.SpectrumApproximation`, METHOD M10).
        multiplicity: None (every eigenvalue once), or (m',) int64 counts c_j >= 1 with
            sum c_j = m: entry j stands for c_j directions of eigenvalue lambda_j, and z_j^2 is
            the residual's energy summed over them. Every statistic is a sum of f(lambda_j)
            z_j^2 or of c_j g(lambda_j), so a cluster of equal eigenvalues (the Nystrom tail,
            M10) costs one entry, not N. Not with ``fixed_effects``.
    """

    eigenvalues: np.ndarray = field(repr=False)
    z: np.ndarray = field(repr=False)
    n_obs: int
    n_fixed: int
    trace: float
    clipped_mass: float
    fixed_effects: np.ndarray | None = field(default=None, repr=False)
    approximation: SpectrumApproximation | None = None
    multiplicity: np.ndarray | None = field(default=None, repr=False)

    @functools.cached_property
    def counts(self) -> np.ndarray:
        """c_j as float64, shape (m',): ones without ``multiplicity``."""
        if self.multiplicity is None:
            return np.ones(self.eigenvalues.size)
        return self.multiplicity.astype(np.float64)

    def count_sum(self, values: np.ndarray) -> np.ndarray | float:
        """sum_j c_j values[..., j]: a sum over the directions, not over the entries."""
        if self.multiplicity is None:
            return values.sum(axis=-1)
        return values @ self.counts

    def expanded(self) -> KernelSpectrum:
        """The same spectrum with one entry per direction: entry j repeated c_j times, its
        energy z_j^2 spread evenly over them. Every statistic is unchanged."""
        if self.multiplicity is None:
            return self
        c = self.multiplicity
        return dataclasses.replace(
            self,
            eigenvalues=np.repeat(self.eigenvalues, c),
            z=np.repeat(self.z / np.sqrt(c), c),
            multiplicity=None,
        )

    def with_approximation(self, approximation: SpectrumApproximation) -> KernelSpectrum:
        """This spectrum, marked as computed by a large-N approximation (METHOD M10)."""
        return dataclasses.replace(self, approximation=approximation)

    @property
    def n_reml_fixed(self) -> int:
        """q_R: the number of fixed effects REML accounts for through ``fixed_effects`` (M9)."""
        return 0 if self.fixed_effects is None else int(self.fixed_effects.shape[1])

    @property
    def dim(self) -> int:
        """m = N - q: the dimension the statistics live in."""
        return self.n_obs - self.n_fixed

    @property
    def mean_eigenvalue(self) -> float:
        """lambda-bar = tr(M) / m (METHOD M4), from the clipped eigenvalues."""
        return float(self.count_sum(self.eigenvalues) / self.dim)

    @property
    def residual_norm2(self) -> float:
        """||u0||^2 in the complement of the covariates."""
        return float(np.dot(self.z, self.z))

    @classmethod
    def from_eigen(
        cls,
        eigenvalues: ArrayLike,
        z: ArrayLike,
        *,
        n_fixed: int = 0,
        clipped_mass: float = 0.0,
        fixed_effects: ArrayLike | None = None,
        multiplicity: ArrayLike | None = None,
    ) -> KernelSpectrum:
        """Build from eigenvalues (m',) and projections z (m',) computed elsewhere (e.g. Lanczos).

        ``fixed_effects``: W = V^T Q, (m, q) with orthonormal columns, for REML (M9).
        ``multiplicity``: (m',) integer counts c_j >= 1, entry j standing for c_j directions of
        eigenvalue lambda_j with energy z_j^2 among them (see the class); not with
        ``fixed_effects``."""
        lam = as_float64_vector(eigenvalues, "eigenvalues")
        zz = as_float64_vector(z, "z")
        if lam.shape != zz.shape:
            raise ValueError(
                f"eigenvalues have {lam.size} entries but z has {zz.size}; they must match."
            )
        counts = None
        if multiplicity is not None:
            counts = np.asarray(_to_numpy(multiplicity)).reshape(-1)
            integral = np.issubdtype(counts.dtype, np.integer) or (
                np.issubdtype(counts.dtype, np.floating) and np.all(np.mod(counts, 1) == 0)
            )
            if counts.shape != lam.shape or counts.size == 0 or not integral or counts.min() < 1:
                raise ValueError(
                    f"multiplicity must hold {lam.size} integer counts >= 1, one per eigenvalue; "
                    f"got shape {counts.shape}, dtype {counts.dtype}."
                )
            if fixed_effects is not None:
                raise ValueError(
                    "multiplicity and fixed_effects cannot be combined: W = V^T Q needs one row "
                    "per direction. Pass the expanded spectrum."
                )
            if counts.max() >= 2**31:  # Davies' degrees of freedom are int32
                raise ValueError(f"multiplicity counts must be below 2^31, got {counts.max():.4g}.")
            counts = counts.astype(np.int64)
        if isinstance(n_fixed, bool) or int(n_fixed) != n_fixed or n_fixed < 0:
            raise ValueError(f"n_fixed must be a non-negative integer, got {n_fixed!r}.")
        if not (math.isfinite(clipped_mass) and clipped_mass >= 0):
            raise ValueError(f"clipped_mass must be finite and >= 0, got {clipped_mass!r}.")
        total = lam.size if counts is None else int(counts.sum())
        if total < 3:
            raise ValueError(f"{total} eigenvalues given; at least 3 are needed.")
        if lam.min() < 0:
            raise ValueError(
                f"eigenvalues must be >= 0 (a kernel is PSD), smallest is {lam.min():.3g}."
            )
        if lam.max() == 0:
            raise ValueError(
                "all eigenvalues are zero: the kernel is zero, nothing can be learned."
            )
        if not np.any(zz != 0):
            raise ValueError("the residual is exactly zero: the network already fits the targets.")
        _check_scales(lam, zz)
        order = np.argsort(lam, kind="stable")
        W = None
        if fixed_effects is not None:
            W = np.asarray(_to_numpy(fixed_effects), dtype=np.float64)
            W = W[:, None] if W.ndim == 1 else W
            if W.ndim != 2 or W.shape[0] != lam.size or W.shape[1] >= lam.size - 2:
                raise ValueError(
                    f"fixed_effects must be (m, q) with m = {lam.size} rows and q <= m - 3 "
                    f"columns; got shape {tuple(W.shape)}."
                )
            if not np.isfinite(W).all() or not np.allclose(W.T @ W, np.eye(W.shape[1]), atol=1e-8):
                raise ValueError(
                    "fixed_effects must be W = V^T Q with orthonormal columns (Q an orthonormal "
                    "basis of the covariates, V the kernel's eigenvectors); pass the covariates "
                    "to KernelSpectrum.from_kernel(H, u0, fixed_effects=Z) to have it built."
                )
            W = W[order]
        return cls(
            eigenvalues=lam[order],
            z=zz[order],
            n_obs=total + int(n_fixed),
            n_fixed=int(n_fixed),
            trace=float(lam.sum() if counts is None else lam @ counts),
            clipped_mass=float(clipped_mass),
            fixed_effects=W,
            multiplicity=None if counts is None else counts[order],
        )

    @classmethod
    def from_kernel(
        cls,
        kernel: ArrayLike,
        residual: ArrayLike,
        covariates: ArrayLike | None = None,
        *,
        fixed_effects: ArrayLike | None = None,
    ) -> KernelSpectrum:
        """Eigendecompose a dense kernel H (N, N) against the residual u0 (any shape, N entries).

        Two ways to hold covariates Z ((N, q) or (n, q)), for two different statistics:
        ``covariates=Z`` compresses the kernel to Z's complement, which the variance-component
        test reads (M5); ``fixed_effects=Z`` keeps H's own eigenbasis and carries an orthonormal
        basis of Z along (W = V^T Q), which genuine REML with fixed effects reads (M9). Pass
        one or the other.

        The residual is flattened row-major (METHOD M1). With covariates Z ((N, q) or (n, q)),
        H is compressed to the orthogonal complement of Z through a reduced QR of Z (M5): the
        compressed kernel's eigenvalues are those of P H P (P = I - Q Q^T applied as rank-q
        updates, never an N x N projector) once the q covariate directions are split off.
        Eigenvalues below zero by more than round-off raise; round-off negatives are clipped to
        0 and their mass recorded.
        """
        H = _check_kernel(kernel)
        n_total = H.shape[0]
        u0 = as_float64_vector(residual, "residual")
        if np.any(u0 != 0):  # a zero residual is refused below, by name
            _check_scale(float(np.abs(u0).max()), "residual's largest entry")
        energy = float(u0 @ u0)
        if u0.size != n_total:
            raise ValueError(
                f"residual has {u0.size} entries but the kernel is {n_total}x{n_total}; they must "
                "match (N = rows x outputs, flattened row-major)."
            )
        if covariates is not None and fixed_effects is not None:
            raise ValueError(
                "pass covariates= (the compressed kernel, for the variance-component test) or "
                "fixed_effects= (REML with fixed effects), not both; build two spectra."
            )
        q = 0
        W = None
        if fixed_effects is not None:
            Qf = _orthonormal_basis(expand_covariates(fixed_effects, n_total))
            off = u0 - Qf @ (Qf.T @ u0)
            if float(off @ off) <= _ROUNDING_RESIDUAL * energy:
                raise ValueError(
                    "the residual lies in the span of the fixed effects: they fit the targets "
                    "exactly, and nothing is left for the kernel."
                )
            evals, zW = spectral_projection(H, np.column_stack([u0, Qf]))
            z, W = zW[:, 0], zW[:, 1:]
        elif covariates is not None:
            Q = _orthonormal_basis(expand_covariates(covariates, n_total))
            q = Q.shape[1]
            # P H P - s Q Q^T: the covariate directions get eigenvalue -s, well apart from the
            # compressed kernel's (all >= 0), so they are split off exactly even where the
            # compressed kernel itself has a null space.
            u0 = u0 - Q @ (Q.T @ u0)
        if W is None:
            compressed = None if covariates is None else _compressed(H, Q)
            # The compressed kernel is ours: the eigensolver may overwrite it (one N x N copy
            # fewer at the peak).
            evals, z = spectral_projection(
                H if compressed is None else compressed, u0, overwrite=compressed is not None
            )
            del compressed
            # The q eigenvectors spanning the covariates carry eigenvalue -shift and no residual.
            evals, z = evals[q:], z[q:]
        lam_max = float(evals[-1])
        if lam_max <= 0:
            beyond = "beyond the fixed effects" if covariates is not None else "(check the kernel)"
            where = "" if covariates is None else " in the complement of the covariates"
            raise ValueError(
                f"the kernel has no positive eigenvalue{where}: a kernel J J^T / N is positive "
                f"semi-definite and not zero there, so nothing can be learned {beyond}."
            )
        tol = max(1e-8, 10.0 * _dtype_eps(kernel) * np.sqrt(n_total)) * lam_max
        if evals[0] < -tol:
            raise ValueError(
                f"kernel has a materially negative eigenvalue ({evals[0]:.3g}, largest "
                f"{lam_max:.3g}); a kernel J J^T / N is positive semi-definite. Check how it was "
                "built."
            )
        trace = float(evals.sum())
        negative = evals < 0
        clipped = float(-evals[negative].sum())
        evals = np.where(negative, 0.0, evals)
        # Relative to u0 before the projection: a residual in the covariates' span leaves
        # only rounding behind, which the test and REML would read as data.
        if float(np.dot(z, z)) <= _ROUNDING_RESIDUAL * energy:
            raise ValueError(
                "the residual is zero (after projecting off the covariates): the network already "
                "fits the targets, or the targets equal the initial outputs (or an affine "
                "function of the covariates)."
            )
        _check_scales(evals, z)
        return cls(
            eigenvalues=evals,
            z=z,
            n_obs=n_total,
            n_fixed=q,
            trace=trace,
            clipped_mass=clipped,
            fixed_effects=W,
        )


def require_spectrum(spectrum: object, who: str) -> None:
    """TypeError unless ``spectrum`` is a :class:`KernelSpectrum` (the fits read one only)."""
    if not isinstance(spectrum, KernelSpectrum):
        raise TypeError(
            f"{who} takes a KernelSpectrum, got {type(spectrum).__name__}: build one with "
            "KernelSpectrum.from_kernel(H, u0) or KernelSpectrum.from_eigen(eigenvalues, z)."
        )
