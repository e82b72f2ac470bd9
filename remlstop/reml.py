"""REML for the training time under the paper's prior (METHOD M4), and the family dispatch (M9).

Everything here is a pure function of a :class:`~remlstop.spectrum.KernelSpectrum`. The weights
w_j(t) come from :mod:`remlstop.flow` in log space, and roots are sought in log t inside brackets
that are widened until they hold, so kernels on any scale (1e-6 ... 1e6) work. Other prior
families (``linear``, ``power``) and fixed effects are fitted in :mod:`remlstop.priors`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from scipy import optimize, stats

from .flow import (
    StopTime,
    effective_df,
    log_z2,
    logsumexp,
    weight_moments,
    weighted_mean_eigenvalue,
)
from .priors import PRIORS, PriorFit, bayes_risk, fit_prior
from .spectrum import KernelSpectrum, require_spectrum

__all__ = ["REMLFit", "reml_fit", "profile_loglik"]

# Bracket growth in log t and the furthest it may go, in units of 1/lambda-bar: e^690 keeps
# t * lambda finite in float64.
_STEP = 2.0
_REACH = 690.0


def profile_loglik(spectrum: KernelSpectrum, t: float | np.ndarray) -> float | np.ndarray:
    """Profile log-likelihood l(t) = -(m/2) log sigma2(t) - (t/2) sum_j c_j lambda_j
    - (m/2)(1 + log 2 pi).

    METHOD M4, with sigma2(t) = (1/m) sum_j w_j(t); vectorised over t (gradient-flow time).
    """
    t_arr = np.asarray(t, dtype=np.float64)
    m = spectrum.dim
    logz2 = log_z2(spectrum)
    a = logz2[None, :] - np.multiply.outer(t_arr.reshape(-1), spectrum.eigenvalues)
    log_sigma2 = logsumexp(a, axis=1) - math.log(m)
    value = (
        -0.5 * m * log_sigma2
        - 0.5 * t_arr.reshape(-1) * spectrum.count_sum(spectrum.eigenvalues)
        - 0.5 * m * (1.0 + math.log(2.0 * math.pi))
    )
    return float(value[0]) if t_arr.ndim == 0 else value.reshape(t_arr.shape)


@dataclass(frozen=True)
class REMLFit(StopTime):
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
    prior: ClassVar[str] = "exp"
    n_params: ClassVar[int] = 1

    @property
    def params(self) -> dict[str, float]:
        """The exp family's one parameter, t (METHOD M9)."""
        return {"t": self.t}

    def risk_at(self, t: float | np.ndarray) -> float | np.ndarray:
        """R(t) under the fitted exp prior, sigma2 units (M9); minimised at t-hat."""
        lam = self.spectrum.eigenvalues
        log1pk = np.where(lam > 0, math.inf, 0.0) if self.unbounded else self.t * lam
        return bayes_risk(self.spectrum, log1pk, t)

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


def reml_fit(
    spectrum: KernelSpectrum, *, prior: str = "exp", level: float = 0.95
) -> REMLFit | PriorFit:
    """REML fit of the signal prior and its stop time on a kernel spectrum (METHOD M4, M9).

    ``prior='exp'`` (the paper's model, the default): t-hat = 0 when g-bar(0) <= lambda-bar;
    otherwise the unique root of g-bar(t) = lambda-bar, found in log t (a bracket widened until
    it holds) and polished by Newton steps on the score; returns an :class:`REMLFit`. With
    ``'linear'`` or ``'power'``, or a spectrum carrying ``fixed_effects`` (genuine REML), the
    family is fitted by :func:`remlstop.priors.fit_prior` and its Bayes-risk stop time returned
    as a :class:`~remlstop.priors.PriorFit`. Both are in gradient-flow time units;
    ``fit.steps(dt)`` converts.

    A spectrum built with ``covariates=`` (the kernel compressed to their complement, which
    the test reads) is exact for ``linear`` only: Q^T(I + aH)Q = I + a Q^T H Q, but
    Q^T e^{tH} Q != e^{t Q^T H Q}. ``exp`` and ``power`` refuse it.
    """
    require_spectrum(spectrum, "reml_fit")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}.")
    if spectrum.n_fixed > 0 and prior != "linear":
        raise ValueError(
            f"this spectrum is compressed to the complement of {spectrum.n_fixed} covariate(s) "
            f"(covariates=), on which REML with the {prior!r} prior would fit the wrong model "
            "(METHOD M9). Build it with KernelSpectrum.from_kernel(H, u0, fixed_effects=Z) for "
            "genuine REML with fixed effects."
        )
    if prior != "exp" or spectrum.fixed_effects is not None:
        return fit_prior(spectrum, prior, level=level)
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
            root = hi if score(hi) == 0.0 else _root_in_log_t(score, lo, hi)
            t_hat = math.exp(root)
            t_hat = _newton_polish(spectrum, t_hat, lam_bar)

    if not math.isfinite(t_hat):
        return REMLFit(
            t=math.inf,
            boundary=False,
            converged=False,
            sigma2=0.0,
            df=float(m),
            loglik=math.inf,
            information=0.0,
            interval=(0.0, math.inf),
            decorrelation=0.0,
            statistic=g0,
            mean_eigenvalue=lam_bar,
            level=level,
            spectrum=spectrum,
        )
    log_total, g_hat, var_hat = weight_moments(spectrum, t_hat)
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
        _, g, var = weight_moments(spectrum, best_t)
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
