"""REML for the training time (METHOD M4) and generalised cross-validation (M7).

Everything here is a pure function of a :class:`~remlstop.spectrum.KernelSpectrum`. Weights
w_j(t) = z_j^2 exp(-t lambda_j) are handled in log space with the largest term factored out, so
no quantity underflows at large t, and roots are sought in log t inside brackets that are widened
until they hold, so kernels on any scale (1e-6 ... 1e6) work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, stats
from scipy.special import logsumexp

from .spectrum import KernelSpectrum

__all__ = [
    "REMLFit",
    "GCVFit",
    "reml_fit",
    "gcv_fit",
    "profile_loglik",
    "weighted_mean_eigenvalue",
    "effective_df",
]

# Bracket growth in log t and the furthest it may go, in units of 1/lambda-bar: e^690 keeps
# t * lambda finite in float64.
_STEP = 2.0
_REACH = 690.0


def _log_z2(spectrum: KernelSpectrum) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return 2.0 * np.log(np.abs(spectrum.z))


def _log_weights(spectrum: KernelSpectrum, t: float) -> np.ndarray:
    """log w_j(t) = 2 log|z_j| - t lambda_j (-inf where z_j = 0)."""
    return _log_z2(spectrum) - t * spectrum.eigenvalues


def _weight_moments(spectrum: KernelSpectrum, t: float) -> tuple[float, float, float]:
    """(log sum_j w_j, weighted mean of lambda, weighted variance of lambda) at time t."""
    a = _log_weights(spectrum, t)
    top = float(np.max(a))
    w = np.exp(a - top)
    total = float(w.sum())
    lam = spectrum.eigenvalues
    mean = float(np.dot(w, lam) / total)
    var = float(np.dot(w, (lam - mean) ** 2) / total)
    return top + math.log(total), mean, var


def weighted_mean_eigenvalue(spectrum: KernelSpectrum, t: float) -> float:
    """g-bar(t) = sum_j lambda_j w_j(t) / sum_j w_j(t) (METHOD M4); decreasing in t."""
    return _weight_moments(spectrum, t)[1]


def effective_df(spectrum: KernelSpectrum, t: float | np.ndarray) -> float | np.ndarray:
    """df(t) = sum_j (1 - exp(-t lambda_j)) (METHOD M4), t in gradient-flow time units."""
    t_arr = np.asarray(t, dtype=np.float64)
    out = np.sum(-np.expm1(-np.multiply.outer(t_arr, spectrum.eigenvalues)), axis=-1)
    return float(out) if out.ndim == 0 else out


def profile_loglik(spectrum: KernelSpectrum, t: float | np.ndarray) -> float | np.ndarray:
    """Profile log-likelihood l(t) = -(m/2) log sigma2(t) - (t/2) sum lambda - (m/2)(1 + log 2 pi).

    METHOD M4, with sigma2(t) = (1/m) sum_j w_j(t); vectorised over t (gradient-flow time).
    """
    t_arr = np.asarray(t, dtype=np.float64)
    m = spectrum.dim
    logz2 = _log_z2(spectrum)
    a = logz2[None, :] - np.multiply.outer(t_arr.reshape(-1), spectrum.eigenvalues)
    log_sigma2 = logsumexp(a, axis=1) - math.log(m)
    value = (
        -0.5 * m * log_sigma2
        - 0.5 * t_arr.reshape(-1) * spectrum.eigenvalues.sum()
        - 0.5 * m * (1.0 + math.log(2.0 * math.pi))
    )
    return float(value[0]) if t_arr.ndim == 0 else value.reshape(t_arr.shape)


def _check_dt(dt_per_step: float) -> float:
    dt = float(dt_per_step)
    if not math.isfinite(dt) or dt <= 0:
        raise ValueError(
            f"dt_per_step must be a positive finite gradient-flow time per step, got {dt_per_step}."
        )
    return dt


class _StopTime:
    t: float

    def steps(self, dt_per_step: float) -> float:
        """Optimizer steps to reach t at ``dt_per_step`` time units per step (METHOD M2)."""
        return self.t / _check_dt(dt_per_step)


@dataclass(frozen=True)
class REMLFit(_StopTime):
    """REML estimate of the training time (METHOD M4).

    Attributes:
        t: t-hat in gradient-flow time (0 at the boundary; inf if the likelihood rises forever).
        boundary: True when g-bar(0) <= lambda-bar: nothing to learn beyond initialisation.
        converged: the root was bracketed and solved (False only for t = inf).
        sigma2: sigma2-hat(t-hat), the noise variance estimate.
        df: effective degrees of freedom df(t-hat).
        loglik: l(t-hat).
        information: observed information (m/2) Var_w(lambda) at t-hat.
        interval: 95% (or ``level``) profile-likelihood interval for t.
        decorrelation: Cov_j(lambda_j, w_j(t-hat)); zero at an interior t-hat.
        statistic: g-bar(0) = R, the variance-component ratio statistic (M5).
        mean_eigenvalue: lambda-bar.
    """

    t: float
    boundary: bool
    converged: bool
    sigma2: float
    df: float
    loglik: float
    information: float
    interval: tuple[float, float]
    decorrelation: float
    statistic: float
    mean_eigenvalue: float
    level: float
    spectrum: KernelSpectrum = field(repr=False, compare=False)

    def loglik_at(self, t: float | np.ndarray) -> float | np.ndarray:
        """The profile log-likelihood l(t) of this fit's spectrum, for plots."""
        return profile_loglik(self.spectrum, t)

    def summary(self) -> str:
        if self.boundary:
            return (
                f"REML: t-hat = 0 (boundary: g(0) = {self.statistic:.4g} <= lambda-bar = "
                f"{self.mean_eigenvalue:.4g}); nothing to learn beyond initialisation; "
                f"sigma2 = {self.sigma2:.4g}; {self.level:.0%} interval for t: "
                f"[0, {self.interval[1]:.4g}]"
            )
        return (
            f"REML: t-hat = {self.t:.4g} ({self.level:.0%} interval [{self.interval[0]:.4g}, "
            f"{self.interval[1]:.4g}]), df = {self.df:.1f} of {self.spectrum.dim}, "
            f"sigma2 = {self.sigma2:.4g}, loglik = {self.loglik:.6g}"
        )


def _expand_until(fn, start: float, direction: float, want_positive: bool) -> float | None:
    """Walk s = start + k * direction * _STEP until sign(fn(s)) is the wanted one."""
    s = start
    for _ in range(int(_REACH / _STEP) + 1):
        value = fn(s)
        if (value > 0) == want_positive and value != 0:
            return s
        s += direction * _STEP
    return None


def _root_in_log_t(fn, lo: float, hi: float) -> float:
    return optimize.brentq(fn, lo, hi, xtol=1e-15, rtol=8.9e-16, maxiter=500)


def _likelihood_interval(
    spectrum: KernelSpectrum, t_hat: float, loglik: float, level: float, s0: float
) -> tuple[float, float]:
    cut = loglik - 0.5 * float(stats.chi2.ppf(level, df=1))

    def excess(s: float) -> float:
        return profile_loglik(spectrum, math.exp(s)) - cut

    if profile_loglik(spectrum, 0.0) >= cut:
        lower = 0.0
    else:
        s_hat = math.log(t_hat)
        lo = _expand_until(excess, s_hat - _STEP, -1.0, want_positive=False)
        lower = 0.0 if lo is None else math.exp(_root_in_log_t(excess, lo, s_hat))
    s_start = math.log(t_hat) if t_hat > 0 else s0
    hi = _expand_until(excess, s_start + _STEP, 1.0, want_positive=False)
    if hi is None:
        upper = math.inf
    else:
        # excess > 0 somewhere below hi: at t-hat itself, or for a boundary fit near t = 0.
        s_in = s_start if t_hat > 0 else _expand_until(excess, hi, -1.0, want_positive=True)
        upper = math.exp(_root_in_log_t(excess, s_in, hi)) if s_in is not None else 0.0
    return lower, upper


def reml_fit(spectrum: KernelSpectrum, *, level: float = 0.95) -> REMLFit:
    """REML estimate of the training time t on a kernel spectrum (METHOD M4).

    t-hat = 0 when g-bar(0) <= lambda-bar; otherwise the unique root of g-bar(t) = lambda-bar,
    found in log t (a bracket widened until it holds) and polished by Newton steps on the score.
    Returns an :class:`REMLFit` in gradient-flow time units; ``fit.steps(dt)`` converts.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    lam_bar = spectrum.mean_eigenvalue
    m = spectrum.dim
    s0 = -math.log(lam_bar)
    g0 = weighted_mean_eigenvalue(spectrum, 0.0)
    supported = spectrum.eigenvalues[spectrum.z != 0]

    def score(s: float) -> float:
        return weighted_mean_eigenvalue(spectrum, math.exp(s)) - lam_bar

    converged = True
    if g0 <= lam_bar:
        t_hat = 0.0
    elif supported.min() >= lam_bar:
        # u0 lies wholly in directions the flow fits faster than average: l(t) rises forever.
        t_hat, converged = math.inf, False
    else:
        lo = _expand_until(score, s0, -1.0, want_positive=True)
        hi = _expand_until(score, s0, 1.0, want_positive=False)
        if lo is None or hi is None:
            t_hat, converged = math.inf, False
        else:
            if score(hi) == 0.0:
                t_hat = math.exp(hi)
            else:
                t_hat = math.exp(_root_in_log_t(score, lo, hi))
            t_hat = _newton_polish(spectrum, t_hat, lam_bar)

    if not math.isfinite(t_hat):
        return REMLFit(
            t=math.inf, boundary=False, converged=False, sigma2=0.0, df=float(m),
            loglik=math.inf, information=0.0, interval=(0.0, math.inf), decorrelation=0.0,
            statistic=g0, mean_eigenvalue=lam_bar, level=level, spectrum=spectrum,
        )  # fmt: skip
    log_total, g_hat, var_hat = _weight_moments(spectrum, t_hat)
    loglik = profile_loglik(spectrum, t_hat)
    # Cov_j(lambda_j, w_j) = (sum w / m) (g-bar - lambda-bar), kept in its exact factored form.
    decorrelation = math.exp(log_total) / m * (g_hat - lam_bar)
    return REMLFit(
        t=t_hat,
        boundary=t_hat == 0.0,
        converged=converged,
        sigma2=math.exp(log_total) / m,
        df=effective_df(spectrum, t_hat),
        loglik=loglik,
        information=0.5 * m * var_hat,
        interval=_likelihood_interval(spectrum, t_hat, loglik, level, s0),
        decorrelation=decorrelation,
        statistic=g0,
        mean_eigenvalue=lam_bar,
        level=level,
        spectrum=spectrum,
    )


def _newton_polish(spectrum: KernelSpectrum, t: float, lam_bar: float) -> float:
    """A few Newton steps on g-bar(t) = lambda-bar (slope -Var_w(lambda)), kept if they help."""
    best_t = t
    best_err = abs(weighted_mean_eigenvalue(spectrum, t) - lam_bar)
    for _ in range(3):
        _, g, var = _weight_moments(spectrum, best_t)
        if var <= 0:
            break
        cand = best_t + (g - lam_bar) / var
        if not (cand > 0 and math.isfinite(cand)):
            break
        err = abs(weighted_mean_eigenvalue(spectrum, cand) - lam_bar)
        if err >= best_err:
            break
        best_t, best_err = cand, err
    return best_t


@dataclass(frozen=True)
class GCVFit(_StopTime):
    """Generalised cross-validation stop time (METHOD M7), same shape as :class:`REMLFit`.

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


def _log_gcv(spectrum: KernelSpectrum, t: float) -> float:
    """log GCV(t), using m - df(t) = sum_j exp(-t lambda_j) so nothing cancels."""
    lam = spectrum.eigenvalues
    log_rss = logsumexp(_log_z2(spectrum) - 2.0 * t * lam)
    log_dof = logsumexp(-t * lam)
    return math.log(spectrum.dim) + float(log_rss) - 2.0 * float(log_dof)


def gcv_fit(spectrum: KernelSpectrum, *, grid_size: int = 400) -> GCVFit:
    """Minimise GCV(t) = m ||r_t||^2 / (m - df(t))^2 over t >= 0 (METHOD M7).

    GCV is not unimodal in general, so a log-spaced grid over the whole range where the flow
    moves (t lambda_max from 1e-3 to t lambda_min+ = 50) is scanned first and the best cell then
    refined by a bounded scalar minimisation in log t.
    """
    lam = spectrum.eigenvalues
    positive = lam[lam > 1e-12 * lam[-1]]
    s_lo = math.log(1e-3 / lam[-1])
    s_hi = math.log(50.0 / positive[0])
    grid = np.linspace(s_lo, s_hi, grid_size)
    values = np.array([_log_gcv(spectrum, math.exp(s)) for s in grid])
    k = int(np.argmin(values))
    a, b = grid[max(k - 1, 0)], grid[min(k + 1, grid_size - 1)]
    res = optimize.minimize_scalar(
        lambda s: _log_gcv(spectrum, math.exp(s)), bounds=(a, b), method="bounded",
        options={"xatol": 1e-10},
    )  # fmt: skip
    s_best, v_best = (float(res.x), float(res.fun)) if res.fun <= values[k] else (grid[k], values[k])
    t_best = math.exp(s_best)
    if _log_gcv(spectrum, 0.0) <= v_best:
        t_best, v_best = 0.0, _log_gcv(spectrum, 0.0)
    df = effective_df(spectrum, t_best)
    log_rss = float(logsumexp(_log_z2(spectrum) - 2.0 * t_best * lam))
    # m - df(t) = sum_j exp(-t lambda_j) in log space: at large t, m - df rounds to 0.
    log_dof = float(logsumexp(-t_best * lam))
    return GCVFit(
        t=t_best,
        boundary=t_best == 0.0,
        converged=bool(res.success),
        sigma2=math.exp(log_rss - log_dof),
        df=df,
        criterion=math.exp(v_best),
    )
