"""Generalised cross-validation: a likelihood-free stop time on the same spectrum (METHOD M9).

No sigma2 is needed: GCV(t) = m ||r_t||^2 / (m - df(t))^2 with r_t the flow's residual (M2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize

from .flow import StopTime, effective_df, log_residual_dof, log_residual_norm2
from .linalg import symmetric_eigh
from .spectrum import KernelSpectrum, _check_kernel, as_float64_vector, require_spectrum

__all__ = ["GCVFit", "LOOFit", "gcv_fit", "log_gcv", "loo_fit"]


@dataclass(frozen=True)
class GCVFit(StopTime):
    """Generalised cross-validation stop time (METHOD M9), same shape as :class:`REMLFit`.

    Attributes:
        t: the minimiser of GCV(t) = m ||r_t||^2 / (m - df(t))^2, gradient-flow time.
        boundary: True when the minimum is at t = 0.
        converged: the bounded minimisation converged.
        sigma2: ||r_t||^2 / (m - df(t)) at the minimiser.
        df: df(t).
        criterion: GCV(t) at the minimiser.
    """

    t: float
    boundary: bool
    converged: bool
    sigma2: float
    df: float
    criterion: float

    def summary(self) -> str:
        return (
            f"GCV: t = {self.t:.4g}, df = {self.df:.1f}, sigma2 = {self.sigma2:.4g}, "
            f"GCV = {self.criterion:.4g}"
        )


def log_gcv(spectrum: KernelSpectrum, t: float | np.ndarray) -> float | np.ndarray:
    """log GCV(t) = log(m ||r_t||^2 / (m - df(t))^2) (METHOD M9), vectorised over t;
    m - df(t) = sum_j e^{-t lambda_j} in log space, so nothing cancels."""
    return (
        math.log(spectrum.dim)
        + log_residual_norm2(spectrum, t)
        - 2.0 * log_residual_dof(spectrum, t)
    )


def gcv_fit(spectrum: KernelSpectrum, *, grid_size: int = 400) -> GCVFit:
    """Minimise GCV(t) = m ||r_t||^2 / (m - df(t))^2 over t >= 0 (METHOD M9).

    GCV is not unimodal in general, so a log-spaced grid over the whole range where the flow
    moves (t lambda_max from 1e-3 to t lambda_min+ = 50) is scanned first and the best cell then
    refined by a bounded scalar minimisation in log t.
    """
    require_spectrum(spectrum, "gcv_fit")
    if spectrum.fixed_effects is not None:
        raise ValueError(
            "GCV reads the flow on the spectrum itself; a spectrum with fixed_effects= is for "
            "REML. Build one with covariates=Z (the kernel compressed to their complement)."
        )
    lam = spectrum.eigenvalues
    positive = lam[lam > 1e-12 * lam[-1]]
    s_lo = math.log(1e-3 / lam[-1])
    s_hi = math.log(50.0 / positive[0])
    grid = np.linspace(s_lo, s_hi, grid_size)
    values = log_gcv(spectrum, np.exp(grid))
    k = int(np.argmin(values))
    a, b = grid[max(k - 1, 0)], grid[min(k + 1, grid_size - 1)]
    res = optimize.minimize_scalar(
        lambda s: log_gcv(spectrum, math.exp(s)),
        bounds=(a, b),
        method="bounded",
        options={"xatol": 1e-10},
    )
    refined = res.fun <= values[k]
    s_best, v_best = (float(res.x), float(res.fun)) if refined else (grid[k], values[k])
    t_best = math.exp(s_best)
    if log_gcv(spectrum, 0.0) <= v_best:
        t_best, v_best = 0.0, log_gcv(spectrum, 0.0)
    df = effective_df(spectrum, t_best)
    # m - df(t) in log space: at large t, m - df rounds to 0.
    log_sigma2 = log_residual_norm2(spectrum, t_best) - log_residual_dof(spectrum, t_best)
    return GCVFit(
        t=t_best,
        boundary=t_best == 0.0,
        converged=bool(res.success),
        sigma2=math.exp(log_sigma2),
        df=df,
        criterion=math.exp(v_best),
    )


@dataclass(frozen=True)
class LOOFit(StopTime):
    """Approximate leave-one-out stop time for the gradient-descent smoother (METHOD M9).

    Attributes:
        t: the minimiser of LOO(t) = (1/N) sum_i (r_i(t) / [e^{-tH}]_ii)^2, gradient-flow time.
        boundary: True when the minimum is at t = 0.
        criterion: LOO(t) at the minimiser.
        df: df(t).
    """

    t: float
    boundary: bool
    criterion: float
    df: float

    def summary(self) -> str:
        return f"approximate LOO: t = {self.t:.4g}, df = {self.df:.1f}, LOO = {self.criterion:.4g}"


def _loo_curve(lam: np.ndarray, V: np.ndarray, z: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """LOO(t) for each t: residuals V (e^{-t lam} z) over the diagonal (V∘V) e^{-t lam}."""
    decay = np.exp(-np.multiply.outer(lam, ts))  # (N, g)
    resid = V @ (decay * z[:, None])
    diag = (V * V) @ decay
    return np.mean((resid / diag) ** 2, axis=0)


def loo_fit(kernel: np.ndarray, residual: np.ndarray, *, grid_size: int = 200) -> LOOFit:
    """Minimise the approximate leave-one-out error of the flow's smoother over t >= 0 (M9).

    ``kernel``: H (N, N); ``residual``: u0 (N entries). The smoother S_t = I - e^{-tH} gives the
    leave-one-out residual r_i(t) / [e^{-tH}]_ii, which needs the eigenvectors: a full
    eigendecomposition (about 1.7x the spectrum's cost) and N x N memory, so N up to a few
    thousand. The grid spans t lambda_max = 1e-3 to t lambda_min+ = 50, as GCV's.
    """
    H = _check_kernel(kernel)
    u0 = as_float64_vector(residual, "residual")
    if u0.size != H.shape[0]:
        raise ValueError(
            f"residual has {u0.size} entries but the kernel is {H.shape[0]} x {H.shape[0]}."
        )
    lam, V = symmetric_eigh(H)
    lam = np.clip(lam, 0.0, None)
    z = V.T @ u0
    positive = lam[lam > 1e-12 * lam[-1]]
    grid = np.linspace(math.log(1e-3 / lam[-1]), math.log(50.0 / positive[0]), grid_size)
    values = _loo_curve(lam, V, z, np.exp(grid))
    k = int(np.argmin(values))
    res = optimize.minimize_scalar(
        lambda s: float(_loo_curve(lam, V, z, np.array([math.exp(s)]))[0]),
        bounds=(grid[max(k - 1, 0)], grid[min(k + 1, grid_size - 1)]),
        method="bounded",
        options={"xatol": 1e-10},
    )
    s_best, v_best = (
        (float(res.x), float(res.fun)) if res.fun <= values[k] else (grid[k], values[k])
    )
    t_best = math.exp(s_best)
    at_zero = float(np.mean(u0**2))  # e^{0} = I: the residual itself
    if at_zero <= v_best:
        t_best, v_best = 0.0, at_zero
    return LOOFit(
        t=t_best,
        boundary=t_best == 0.0,
        criterion=v_best,
        df=float(np.sum(-np.expm1(-t_best * lam))),
    )
