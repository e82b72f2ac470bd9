"""The spectral quantities of the linearised gradient flow: the one home (METHOD M2, M4, M9).

Every function reads a :class:`~remlstop.spectrum.KernelSpectrum` (eigenvalues lambda_j and
z = V^T u0) and a gradient-flow time ``t``. Weights w_j(t) = z_j^2 exp(-t lambda_j) are handled
in log space with the largest term factored out, so nothing underflows at large t. The stopper,
the criteria, the plots and the benchmark read these; none recomputes them.
"""

from __future__ import annotations

import math

import numpy as np

from .spectrum import KernelSpectrum

__all__ = [
    "logsumexp",
    "log_z2",
    "log_weights",
    "weight_moments",
    "weighted_mean_eigenvalue",
    "effective_df",
    "log_residual_norm2",
    "log_residual_dof",
    "check_dt",
    "time_to_steps",
    "StopTime",
]


def logsumexp(a: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """log sum exp(a) along ``axis`` with the largest term factored out; -inf for all -inf.

    The statistics call it thousands of times per decision on vectors of N entries, where
    scipy's general version costs ten times more than the arithmetic.
    """
    a = np.asarray(a, dtype=np.float64)
    top = np.max(a, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(a - top), axis=axis, keepdims=True)) + top
    out = np.squeeze(out, axis=axis) if axis is not None else out.reshape(())
    return float(out) if out.ndim == 0 else out


def log_z2(spectrum: KernelSpectrum) -> np.ndarray:
    """log z_j^2, shape (m,); -inf where z_j = 0."""
    with np.errstate(divide="ignore"):
        return 2.0 * np.log(np.abs(spectrum.z))


def log_weights(spectrum: KernelSpectrum, t: float) -> np.ndarray:
    """log w_j(t) = 2 log|z_j| - t lambda_j (METHOD M4), shape (m,), t in flow time."""
    return log_z2(spectrum) - t * spectrum.eigenvalues


def weight_moments(spectrum: KernelSpectrum, t: float) -> tuple[float, float, float]:
    """(log sum_j w_j, weighted mean of lambda, weighted variance of lambda) at time t (M4)."""
    a = log_weights(spectrum, t)
    top = float(np.max(a))
    w = np.exp(a - top)
    total = float(w.sum())
    lam = spectrum.eigenvalues
    mean = float(np.dot(w, lam) / total)
    var = float(np.dot(w, (lam - mean) ** 2) / total)
    return top + math.log(total), mean, var


def weighted_mean_eigenvalue(spectrum: KernelSpectrum, t: float) -> float:
    """g-bar(t) = sum_j lambda_j w_j(t) / sum_j w_j(t) (METHOD M4); decreasing in t."""
    return weight_moments(spectrum, t)[1]


def effective_df(spectrum: KernelSpectrum, t: float | np.ndarray) -> float | np.ndarray:
    """df(t) = sum_j (1 - exp(-t lambda_j)) (METHOD M4), t in gradient-flow time units."""
    t_arr = np.asarray(t, dtype=np.float64)
    out = np.sum(-np.expm1(-np.multiply.outer(t_arr, spectrum.eigenvalues)), axis=-1)
    return float(out) if out.ndim == 0 else out


def log_residual_norm2(spectrum: KernelSpectrum, t: float | np.ndarray) -> float | np.ndarray:
    """log ||r_t||^2 = log sum_j z_j^2 exp(-2 t lambda_j): the flow's training residual (M2).

    Vectorised over t (flow time)."""
    tl = np.multiply.outer(np.asarray(t, dtype=np.float64), spectrum.eigenvalues)
    return logsumexp(log_z2(spectrum) - 2.0 * tl, axis=-1)


def log_residual_dof(spectrum: KernelSpectrum, t: float | np.ndarray) -> float | np.ndarray:
    """log (m - df(t)) = log sum_j exp(-t lambda_j), so nothing cancels at large t (M9).

    Vectorised over t (flow time)."""
    tl = np.multiply.outer(np.asarray(t, dtype=np.float64), spectrum.eigenvalues)
    return logsumexp(-tl, axis=-1)


def check_dt(dt_per_step: float) -> float:
    """A positive finite gradient-flow time per step, or ValueError naming the value."""
    dt = float(dt_per_step)
    if not math.isfinite(dt) or dt <= 0:
        raise ValueError(
            f"dt_per_step must be a positive finite gradient-flow time per step, got {dt_per_step}."
        )
    return dt


def time_to_steps(t: float, dt_per_step: float) -> float:
    """Optimizer steps to reach flow time ``t`` at ``dt_per_step`` per step (M2); inf stays inf."""
    return t / check_dt(dt_per_step)


class StopTime:
    """What every criterion's fit shares: a stop time ``t`` in gradient-flow units."""

    t: float

    @property
    def unbounded(self) -> bool:
        """True when there is no finite stop time: train to the budget."""
        return math.isinf(self.t)

    def steps(self, dt_per_step: float) -> float:
        """Optimizer steps to reach t at ``dt_per_step`` time units per step (METHOD M2)."""
        return time_to_steps(self.t, dt_per_step)
