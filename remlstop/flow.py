"""The spectral quantities of the linearised gradient flow: the one home (METHOD M2, M4, M9).

Every function reads a :class:`~remlstop.spectrum.KernelSpectrum` (eigenvalues lambda_j, z = V^T u0
and the counts c_j of directions per entry) and a gradient-flow time ``t``. Weights w_j(t) = z_j^2
exp(-t lambda_j) are handled in log space with the largest term factored out, so nothing underflows
at large t. The stopper, the criteria, the plots and the benchmark read these; none recomputes them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import brentq

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
    "loss_matched_time",
    "StopTime",
]


def logsumexp(a: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """log sum exp(a) along ``axis`` with the largest term factored out; -inf for all -inf.

    The statistics call it thousands of times per decision on vectors of N entries, where
    scipy's general version costs ten times more than the arithmetic.
    """
    a = np.asarray(a, dtype=np.float64)
    if a.size == 0 and axis is None:
        return -math.inf
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
    """df(t) = sum_j c_j (1 - exp(-t lambda_j)) (METHOD M4), t in gradient-flow time units."""
    t_arr = np.asarray(t, dtype=np.float64)
    out = spectrum.count_sum(-np.expm1(-np.multiply.outer(t_arr, spectrum.eigenvalues)))
    return float(out) if np.ndim(out) == 0 else out


def log_residual_norm2(spectrum: KernelSpectrum, t: float | np.ndarray) -> float | np.ndarray:
    """log ||r_t||^2 = log sum_j z_j^2 exp(-2 t lambda_j): the flow's training residual (M2).

    Vectorised over t (flow time)."""
    tl = np.multiply.outer(np.asarray(t, dtype=np.float64), spectrum.eigenvalues)
    return logsumexp(log_z2(spectrum) - 2.0 * tl, axis=-1)


def log_residual_dof(spectrum: KernelSpectrum, t: float | np.ndarray) -> float | np.ndarray:
    """log (m - df(t)) = log sum_j c_j exp(-t lambda_j), so nothing cancels at large t (M9).

    Vectorised over t (flow time)."""
    tl = np.multiply.outer(np.asarray(t, dtype=np.float64), spectrum.eigenvalues)
    if spectrum.multiplicity is None:
        return logsumexp(-tl, axis=-1)
    return logsumexp(np.log(spectrum.counts) - tl, axis=-1)


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


_EDGE_LOG_TOL = 1e-13  # relative tolerance on ‖r‖² at t = 0 and t = ∞


def _as_float64_vector(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf.")
    return arr


def loss_matched_time(eigenvalues: Any, z: Any, residual_norm2: float) -> float:
    """Loss-matched clock (M2 *choice*): t ≥ 0 with ``Σ_j z_j² e^{-2tλ_j} = ‖r‖²``.

    ``eigenvalues`` (N,) of H, ≥ 0; ``z`` (N,) = Vᵀ u0; ``residual_norm2`` = ‖r_observed‖².
    Returns 0.0 when ‖r‖² ≥ Σz², ``math.inf`` when ‖r‖² ≤ Σ_{λ_j=0} z_j² (the t → ∞ limit),
    each up to a relative round-off tolerance of 1e-13.
    Solved in log t with a bracket widened until it holds; sums in log space. Never NaN.
    """
    lam = _as_float64_vector(eigenvalues, "eigenvalues")
    zz = _as_float64_vector(z, "z")
    if lam.shape != zz.shape:
        raise ValueError(
            f"eigenvalues and z must have the same length; got {lam.size} and {zz.size}."
        )
    if np.any(lam < 0.0):
        raise ValueError(
            f"eigenvalues must be >= 0 (H is PSD); min is {lam.min():.3g}. Clip round-off to 0."
        )
    r2 = float(residual_norm2)
    if not (math.isfinite(r2) and r2 >= 0.0):
        raise ValueError(f"residual_norm2 must be finite and >= 0; got {residual_norm2!r}.")

    keep = zz != 0.0  # zero projections contribute nothing; log 0 would be -inf
    if r2 == 0.0:  # decided without logs: log 0 - log 0 would be NaN
        return math.inf if np.any(keep) else 0.0
    log_z2, lam = 2.0 * np.log(np.abs(zz[keep])), lam[keep]
    log_r2 = math.log(r2)
    positive = lam > 0.0
    log_limit = logsumexp(log_z2[~positive])  # t-independent part (λ = 0)
    log_z2_pos, lam_pos = log_z2[positive], lam[positive]

    def excess(t: float) -> float:  # log Σ z² e^{-2tλ} - log ‖r‖², decreasing in t
        # (tλ)·2, not (2t)·λ: 2t overflows for t near the largest double while tλ does not.
        with np.errstate(over="ignore"):  # tλ overflowing to inf is right: e^{-inf} = 0
            log_w = log_z2_pos - (t * lam_pos) * 2.0
        return logsumexp(np.append(log_w, log_limit)) - log_r2

    # Within round-off of an edge counts as the edge: e^{2 log|z|} is not z² to the last ulp.
    if excess(0.0) <= _EDGE_LOG_TOL:
        return 0.0
    if log_limit - log_r2 >= -_EDGE_LOG_TOL:
        return math.inf

    # 1/λ_max sets the scale; capped because 1/λ overflows for subnormal λ.
    lo = hi = min(1.0 / float(np.max(lam_pos)), 1e300)
    while excess(lo) <= 0.0:
        lo /= 16.0
        if lo == 0.0:  # root below the smallest double: the flow has not moved
            return 0.0
    while excess(hi) >= 0.0:
        hi *= 16.0
        if math.isinf(hi):  # root beyond the largest double
            return math.inf

    log_t = brentq(
        lambda s: excess(math.exp(s)), math.log(lo), math.log(hi), xtol=1e-15, maxiter=500
    )
    return math.exp(log_t)
