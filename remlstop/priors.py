"""Prior families for the signal, their REML fits, and the Bayes-risk stop time (METHOD M9).

Signal g ~ N(0, sigma2 K), K = V diag(k_j) V^T, noise N(0, sigma2 I), so Var(u0) = sigma2 (I + K):
``exp`` k_j = e^{t lambda_j} - 1 (the paper, M3), ``linear`` k_j = a lambda_j (the kernel mixed
model) and ``power`` k_j = a (lambda_j / lambda_max)^b. Every family is held through
log(1 + k_j), so nothing overflows. The stop time under a fitted prior is the gradient-flow time
with the least Bayes in-sample risk R(t); for ``exp`` with parameter s it is s exactly, so the
paper's rule is the special case. All functions are pure functions of a ``KernelSpectrum``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, stats

from .flow import StopTime, effective_df, log_z2, logsumexp
from .spectrum import KernelSpectrum

__all__ = [
    "PRIORS",
    "PriorFit",
    "log1p_prior_variances",
    "prior_loglik",
    "bayes_risk",
    "bayes_risk_stop_time",
    "minimise_in_log_t",
    "risk_bracket",
    "fit_prior",
]

PRIORS = ("exp", "linear", "power")
_N_PARAMS = {"exp": 1, "linear": 1, "power": 2}
# The power family's exponent b: a bounded range keeps it identifiable (M9).
_B_RANGE = (0.25, 4.0)
# Grids in log(scale * lambda_max): wide enough that both ends are limits in practice.
_LOG_SCALE_RANGE = (-14.0, 28.0)
_GRID = 85
# A maximum this close to the likelihood at the grid's top cannot be told from an infinite
# scale by the data: it is reported as unbounded (train to the budget).
_PLATEAU_NATS = 1e-6
_B_GRID = 13


def log1p_prior_variances(
    spectrum: KernelSpectrum, prior: str, params: dict[str, float]
) -> np.ndarray:
    """log(1 + k_j), shape (m,), for a family and its parameters (METHOD M9).

    ``exp``: {'t': flow time}; ``linear``: {'a': scale >= 0}; ``power``: {'a', 'b'}.
    A scale of inf gives inf wherever lambda_j > 0.
    """
    lam = spectrum.eigenvalues
    if prior == "exp":
        t = params["t"]
        return np.where(lam > 0, math.inf, 0.0) if math.isinf(t) else t * lam
    if prior == "linear":
        scaled = lam
    elif prior == "power":
        scaled = (lam / lam[-1]) ** params["b"]
    else:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}.")
    a = params["a"]
    if math.isinf(a):
        return np.where(scaled > 0, math.inf, 0.0)
    return np.log1p(a * scaled)


def prior_loglik(spectrum: KernelSpectrum, log1pk: np.ndarray) -> tuple[float, float]:
    """(restricted log-likelihood, sigma2-hat) of u0 ~ N(0, sigma2 (I + K)) (METHOD M9).

    sigma2 profiled out. Without fixed effects REML = ML:
    l = -(m/2) log(sum_j z_j^2/(1 + k_j) / m) - 1/2 sum_j c_j log(1 + k_j) - (m/2)(1 + log 2 pi).
    With fixed effects W = V^T Q (``spectrum.fixed_effects``), d_j = 1/(1 + k_j), m = N - q:
    u0^T P u0 = sum d z^2 - b^T A^{-1} b, A = W^T diag(d) W, b = W^T (d z), and
    l_R = -(m/2) log(u0^T P u0 / m) - 1/2 sum log(1 + k) - 1/2 log|A| - (m/2)(1 + log 2 pi).
    An infinite prior variance (an improper limit) gives -inf.
    """
    values, sigma2 = _loglik_rows(spectrum, np.asarray(log1pk, dtype=np.float64)[None, :])
    return float(values[0]), float(sigma2[0])


def _loglik_rows(spectrum: KernelSpectrum, log1pk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`prior_loglik` for each row of ``log1pk`` (g, m): a grid in one pass."""
    W = spectrum.fixed_effects
    lz2 = log_z2(spectrum)
    log_det = np.zeros(log1pk.shape[0])
    if W is None:
        m = spectrum.dim
        log_quad = logsumexp(lz2[None, :] - log1pk, axis=1)
    else:
        m = spectrum.eigenvalues.size - W.shape[1]
        log_quad = np.full(log1pk.shape[0], -np.inf)
        for i, row in enumerate(log1pk):
            d = np.exp(-row)
            dz = d * spectrum.z
            A = W.T @ (d[:, None] * W)
            b = W.T @ dz
            sign, det = np.linalg.slogdet(A)
            quad = float(np.dot(dz, spectrum.z) - b @ np.linalg.solve(A, b)) if sign > 0 else 0.0
            if quad > 0:
                log_quad[i], log_det[i] = math.log(quad), det
    log_sigma2 = log_quad - math.log(m)
    with np.errstate(invalid="ignore"):
        values = (
            -0.5 * m * log_sigma2
            - 0.5 * spectrum.count_sum(log1pk)
            - 0.5 * log_det
            - 0.5 * m * (1.0 + math.log(2.0 * math.pi))
        )
    bad = ~np.all(np.isfinite(log1pk), axis=1) | ~np.isfinite(log_quad)
    return np.where(bad, -np.inf, values), np.where(bad, np.nan, np.exp(log_sigma2))


def bayes_risk(
    spectrum: KernelSpectrum, log1pk: np.ndarray, t: float | np.ndarray
) -> float | np.ndarray:
    """R(t) = sum_j c_j [k_j e^{-2 t lambda_j} + (1 - e^{-t lambda_j})^2] (M9), sigma2 units.

    The Bayes in-sample risk of the gradient-descent smoother at flow time t under the prior
    log(1 + k_j) = ``log1pk``; vectorised over t.
    """
    lam = spectrum.eigenvalues
    t_arr = np.asarray(t, dtype=np.float64)
    tl = np.multiply.outer(t_arr, lam)
    with np.errstate(over="ignore", invalid="ignore"):
        signal = np.exp(log1pk - 2.0 * tl) - np.exp(-2.0 * tl)
        signal = np.where(log1pk == 0.0, 0.0, signal)
    out = spectrum.count_sum(signal + np.expm1(-tl) ** 2)
    return float(out) if np.ndim(out) == 0 else out


def bayes_risk_stop_time(spectrum: KernelSpectrum, log1pk: np.ndarray) -> float:
    """The flow time t >= 0 minimising the Bayes risk R(t) (METHOD M9).

    R'(t) = 2 sum_j lambda_j e^{-t lambda_j} [1 - (1 + k_j) e^{-t lambda_j}]: term j changes sign
    at tau_j = log(1 + k_j)/lambda_j, so the minimiser lies in [min tau_j, max tau_j] over the
    directions with lambda_j, k_j > 0. For ``exp`` every tau_j is its t, and the rule returns
    M4's t-hat exactly. 0 when the prior has no signal; inf when a direction's prior variance is
    infinite (train to the budget).
    """
    lo, hi = risk_bracket(spectrum, log1pk)
    if hi == 0.0 or math.isinf(hi):
        return hi
    return minimise_in_log_t(lambda t: bayes_risk(spectrum, log1pk, t), lo, hi)


def risk_bracket(spectrum: KernelSpectrum, log1pk: np.ndarray) -> tuple[float, float]:
    """[min_j tau_j, max_j tau_j], tau_j = log(1 + k_j)/lambda_j over lambda_j, k_j > 0: R'(t) < 0
    below it and > 0 above it (M9); (0, 0) when the prior has no signal."""
    lam = spectrum.eigenvalues
    active = (lam > 0) & (log1pk > 0)
    if not np.any(active):
        return 0.0, 0.0
    tau = log1pk[active] / lam[active]
    return float(tau.min()), float(tau.max())


def minimise_in_log_t(fn: Callable[[np.ndarray], np.ndarray], lo: float, hi: float) -> float:
    """argmin of fn over flow time t in [lo, hi] (0 < lo <= hi): a 200-point grid in log t,
    then a bounded refinement around the best cell (no unimodality assumed). ``fn`` is
    vectorised over t."""
    if hi <= lo * (1.0 + 1e-12):
        return 0.5 * (lo + hi)
    s = np.linspace(math.log(lo), math.log(hi), 200)
    values = np.asarray(fn(np.exp(s)), dtype=np.float64)
    k = int(np.argmin(values))
    a, b = s[max(k - 1, 0)], s[min(k + 1, s.size - 1)]
    res = optimize.minimize_scalar(
        lambda v: float(fn(np.array([math.exp(v)]))[0]),
        bounds=(a, b),
        method="bounded",
        options={"xatol": 1e-12},
    )
    return math.exp(float(res.x)) if res.fun <= values[k] else math.exp(float(s[k]))


@dataclass(frozen=True)
class PriorFit(StopTime):
    """A prior family fitted by REML and its Bayes-risk stop time (METHOD M9).

    Attributes:
        prior: 'exp', 'linear' or 'power'.
        params: the fitted parameters ({'t'} for exp, {'a'} for linear, {'a', 'b'} for power;
            'a' in units of 1/lambda_max for power, of the kernel's scale for linear).
        t: the stop time minimising R(t), gradient-flow time (0: do not train; inf: train to
            the budget -- the likelihood rises without bound in the prior's scale).
        loglik: the restricted log-likelihood at the fit (nats).
        sigma2: sigma2-hat, the noise variance estimate.
        df: effective degrees of freedom df(t) at the stop time.
        n_params: the family's parameter count (AIC penalty).
        interval: ``level`` interval for t from the profile likelihood of the scale parameter
            (exp: of t itself); (nan, nan) where not computed (power).
    """

    prior: str
    params: dict[str, float]
    t: float
    loglik: float
    sigma2: float
    df: float
    n_params: int
    interval: tuple[float, float]
    level: float
    spectrum: KernelSpectrum = field(repr=False, compare=False)

    @property
    def boundary(self) -> bool:
        """True when the fit puts no signal in the prior: stop at once (t = 0)."""
        return self.t == 0.0

    def log1pk(self) -> np.ndarray:
        """log(1 + k_j) of the fitted prior, shape (m,)."""
        return log1p_prior_variances(self.spectrum, self.prior, self.params)

    def risk_at(self, t: float | np.ndarray) -> float | np.ndarray:
        """R(t) under the fitted prior, in units of sigma2-hat (M9), for plots."""
        return bayes_risk(self.spectrum, self.log1pk(), t)

    def summary(self) -> str:
        shown = ", ".join(f"{k} = {v:.4g}" for k, v in self.params.items())
        stop = "train to the budget" if self.unbounded else f"t = {self.t:.4g}"
        lo, hi = self.interval
        band = (
            f" ({self.level:.0%} interval [{lo:.4g}, {hi:.4g}])"
            if math.isfinite(lo) and not math.isnan(hi)
            else ""
        )
        return (
            f"REML ({self.prior} prior, {shown}): {stop}{band}, df = {self.df:.1f}, "
            f"sigma2 = {self.sigma2:.4g}, loglik = {self.loglik:.6g}"
        )


def _scaled(spectrum: KernelSpectrum, prior: str, b: float) -> np.ndarray:
    """The eigenvalue profile the scale multiplies: lambda/lambda_max (linear), its b-th power
    (power), lambda itself (exp, whose scale is t)."""
    lam = spectrum.eigenvalues
    return lam if prior == "exp" else (lam / lam[-1]) ** b


def _scale_logliks(spectrum: KernelSpectrum, prior: str, b: float, xs: np.ndarray) -> np.ndarray:
    """l at scale e^x for each x in ``xs``: log(1 + k_j) = t lambda_j (exp) or log1p(e^x s_j)."""
    s = _scaled(spectrum, prior, b)
    scale = np.exp(np.asarray(xs, dtype=np.float64))[:, None]
    log1pk = scale * s[None, :] if prior == "exp" else np.log1p(scale * s[None, :])
    return _loglik_rows(spectrum, log1pk)[0]


def _scale_grid(spectrum: KernelSpectrum, prior: str, b: float) -> tuple[np.ndarray, np.ndarray]:
    """(x grid, l on it): x = log(scale), in units of 1/lambda_max for exp's t."""
    xs = np.linspace(*_LOG_SCALE_RANGE, _GRID)
    if prior == "exp":
        xs = xs - math.log(spectrum.eigenvalues[-1])
    return xs, _scale_logliks(spectrum, prior, b, xs)


def _fit_scale(spectrum: KernelSpectrum, prior: str, b: float) -> tuple[float, float]:
    """(x-hat, l-hat) over x = log(scale) in [-inf, inf]: a grid, then bounded refinement.

    The likelihood need not be concave in the scale (M9). x = -inf (no signal) and x = inf are
    the limits; each is returned when the grid's best point sits at that end and beats its
    neighbour. The grid is in units of lambda_max, so kernels on any scale are covered.
    """
    xs, values = _scale_grid(spectrum, prior, b)
    k = int(np.argmax(values))
    if k == 0:
        zero = prior_loglik(spectrum, np.zeros_like(spectrum.eigenvalues))[0]
        if zero >= values[0]:
            return -math.inf, zero
    if k == xs.size - 1 or values[k] - values[-1] < _PLATEAU_NATS:
        return math.inf, float(values[-1])

    def neg(x: float) -> float:
        return -float(_scale_logliks(spectrum, prior, b, np.array([x]))[0])

    lo = xs[k - 1] if k > 0 else xs[0] - 2.0
    res = optimize.minimize_scalar(
        neg, bounds=(lo, xs[k + 1]), method="bounded", options={"xatol": 1e-10}
    )
    if -res.fun >= values[k]:
        return float(res.x), float(-res.fun)
    return float(xs[k]), float(values[k])


def _scale_interval(
    spectrum: KernelSpectrum, prior: str, b: float, x_hat: float, l_hat: float, level: float
) -> tuple[float, float]:
    """Profile-likelihood interval for x = log(scale): {x : 2 (l-hat - l(x)) <= chi2_1}."""
    cut = l_hat - 0.5 * float(stats.chi2.ppf(level, df=1))
    lo_lim, hi_lim = _LOG_SCALE_RANGE

    def excess(x: float) -> float:
        return float(_scale_logliks(spectrum, prior, b, np.array([x]))[0]) - cut

    ends = []
    for direction, limit in ((-1.0, lo_lim), (1.0, hi_lim)):
        if math.isinf(x_hat) and direction * x_hat > 0:
            ends.append(x_hat)
            continue
        x = min(max(x_hat, lo_lim), hi_lim)
        while direction * (x - limit) < 0 and excess(x + direction) > 0:
            x += direction
        if direction * (x - limit) >= 0:
            ends.append(direction * math.inf)
        else:
            ends.append(optimize.brentq(excess, *sorted((x, x + direction)), xtol=1e-10))
    return ends[0], ends[1]


def _params(prior: str, x: float, b: float, spectrum: KernelSpectrum) -> dict[str, float]:
    """The family's parameters from x = log(scale): t (exp), a (linear, power), b (power)."""
    value = 0.0 if x == -math.inf else math.exp(x) if math.isfinite(x) else math.inf
    if prior == "exp":
        return {"t": value}
    if prior == "linear":
        return {"a": value / spectrum.eigenvalues[-1]}
    return {"a": value, "b": b}


def fit_prior(spectrum: KernelSpectrum, prior: str, *, level: float = 0.95) -> PriorFit:
    """REML fit of one prior family and its Bayes-risk stop time (METHOD M9).

    Every family is one scale parameter (t for exp, a otherwise) searched over a grid in log
    scale and refined; ``power`` profiles a for each b on a grid over [0.25, 4], then refines b.
    Fixed effects in the spectrum (``fixed_effects``) are handled by genuine REML. The paper's
    M4 root finder :func:`remlstop.reml.reml_fit` gives exp's t-hat without fixed effects.
    The interval maps the scale's profile-likelihood interval through the stop time (exp,
    linear); for power it is not computed.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}.")
    bs = list(np.geomspace(*_B_RANGE, _B_GRID)) if prior == "power" else [1.0]
    # The grid's best b (the scale profiled on its grid), then the exact fit there.
    b_hat = max(bs, key=lambda b: float(np.max(_scale_grid(spectrum, prior, b)[1])))
    x_hat, l_hat = _fit_scale(spectrum, prior, b_hat)
    if prior == "power" and math.isfinite(x_hat):
        lb_lo, lb_hi = (math.log(v) for v in _B_RANGE)

        def neg(p: np.ndarray) -> float:
            if not lb_lo <= p[0] <= lb_hi:
                return math.inf
            return -float(_scale_logliks(spectrum, prior, math.exp(p[0]), p[1:])[0])

        res = optimize.minimize(
            neg,
            np.array([math.log(b_hat), x_hat]),
            method="Nelder-Mead",
            options={"xatol": 1e-7, "fatol": 1e-10},
        )
        if -res.fun > l_hat:
            b_hat, x_hat, l_hat = math.exp(float(res.x[0])), float(res.x[1]), float(-res.fun)
    params = _params(prior, x_hat, b_hat, spectrum)

    def stop_time(p: dict[str, float]) -> float:
        return bayes_risk_stop_time(spectrum, log1p_prior_variances(spectrum, prior, p))

    interval = (math.nan, math.nan)
    if prior != "power":
        ends = _scale_interval(spectrum, prior, b_hat, x_hat, l_hat, level)
        interval = (
            stop_time(_params(prior, ends[0], b_hat, spectrum)),
            stop_time(_params(prior, ends[1], b_hat, spectrum)),
        )
    # sigma2 at an infinite scale is its limit, read at the grid's top.
    x_sigma = min(
        x_hat, _LOG_SCALE_RANGE[1] - (math.log(spectrum.eigenvalues[-1]) if prior == "exp" else 0.0)
    )
    sigma2 = prior_loglik(
        spectrum, log1p_prior_variances(spectrum, prior, _params(prior, x_sigma, b_hat, spectrum))
    )[1]
    t_stop = stop_time(params)
    return PriorFit(
        prior=prior,
        params=params,
        t=t_stop,
        loglik=l_hat,
        sigma2=sigma2,
        df=float(effective_df(spectrum, t_stop)) if math.isfinite(t_stop) else float(spectrum.dim),
        n_params=_N_PARAMS[prior],
        interval=interval,
        level=level,
        spectrum=spectrum,
    )
