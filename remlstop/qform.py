"""Upper tail probabilities of quadratic forms in standard normals (METHOD M5).

Q = sum_j c_j X_j with X_j independent chi-square(n_j), n_j = 1 unless ``dof`` says otherwise (a
repeated coefficient is one term with its count as degrees of freedom). The exact tail P(Q > q) is
computed with Davies' algorithm (``fastlmmclib.quadform.qf``); where Davies faults (forms of a
few terms), Imhof's integral by quadrature; where that is not accurate either, or Davies returns a
probability below its own accuracy, a Lugannani-Rice saddlepoint approximation (implemented
here). The two-moment Satterthwaite approximation is provided for comparison only.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from fastlmmclib.quadform import qf as _davies_qf
from scipy import integrate, optimize, stats

__all__ = ["TailProbability", "davies", "imhof", "saddlepoint", "satterthwaite", "qform_tail"]

# Davies' absolute error bound; below _DAVIES_FLOOR its answer has no relative accuracy left.
_DAVIES_ACC = 1e-10
_DAVIES_FLOOR = 1e-7
# Imhof's answer is taken where its quadrature error is below this. A threshold more than _FAR
# standard deviations from the mean has a tail beyond float64 (where Davies returned 1/2).
_IMHOF_ERROR = 1e-7
_FAR = 1e4

_DAVIES_FAULTS = {
    1: "required accuracy not obtained",
    2: "round-off error possibly significant",
    3: "invalid parameters",
    4: "unable to locate integration parameters",
    5: "out of memory",
}


@dataclass(frozen=True)
class TailProbability:
    """P(Q > q) and how it was obtained ('davies', 'imhof', 'saddlepoint' or 'exact')."""

    pvalue: float
    method: str
    note: str = ""


def _coefficients(coeffs: np.ndarray | list[float]) -> np.ndarray:
    c = np.asarray(coeffs, dtype=np.float64).reshape(-1)
    if c.size == 0 or not np.all(np.isfinite(c)):
        raise ValueError("quadratic-form coefficients must be a non-empty finite vector.")
    return c


def _threshold(q: float) -> float:
    if isinstance(q, bool) or not isinstance(q, (int, float, np.integer, np.floating)):
        raise TypeError(f"q must be a real number, the threshold of P(Q > q); got {q!r}.")
    if math.isnan(q):
        raise ValueError("q is NaN: P(Q > q) needs a threshold.")
    return float(q)


def _sure(c: np.ndarray, q: float) -> TailProbability | None:
    """P(Q > q) where it needs no computation: every weight on one side of q, or q infinite."""
    if q == math.inf:
        return TailProbability(0.0, "exact", "q = inf")
    if q == -math.inf:
        return TailProbability(1.0, "exact", "q = -inf")
    if np.all(c <= 0) and q >= 0:
        return TailProbability(0.0, "exact", "all weights <= 0")
    if np.all(c >= 0) and q < 0:
        return TailProbability(1.0, "exact", "all weights >= 0")
    return None


def _dof(dof: np.ndarray | None, c: np.ndarray) -> np.ndarray:
    """Degrees of freedom n_j >= 1 per coefficient, as float64 (ones when None)."""
    if dof is None:
        return np.ones(c.size)
    n = np.asarray(dof, dtype=np.float64).reshape(-1)
    if n.shape != c.shape or not np.all((n >= 1) & (n < 2**31) & (n == np.round(n))):
        raise ValueError(
            f"dof must hold {c.size} integer degrees of freedom in [1, 2^31), one per "
            f"coefficient; got shape {n.shape}."
        )
    return n


def davies(coeffs: np.ndarray, q: float = 0.0, dof: np.ndarray | None = None) -> tuple[float, int]:
    """Davies' P(sum_j c_j chi2_{n_j} > q) and its fault code (0 = fine)."""
    c = _coefficients(coeffs)
    n = _dof(dof, c).astype(np.int32)  # the C routine's type
    p, fault, _ = _davies_qf(float(q), c, dof=n, acc=_DAVIES_ACC, lim=1_000_000)
    return float(p), int(fault)


def _saddle_parts(c: np.ndarray, q: float, n: np.ndarray) -> tuple[float, float, float]:
    """Saddlepoint s-hat solving K'(s) = q, with K(s-hat) and K''(s-hat)."""
    lo = 0.5 / c.min() if c.min() < 0 else -np.inf
    hi = 0.5 / c.max() if c.max() > 0 else np.inf

    def k1(s: float) -> float:
        return float(np.sum(n * c / (1.0 - 2.0 * s * c))) - q

    # K' runs from -inf to +inf across (lo, hi); shrink towards the poles until signs differ.
    a = lo * (1 - 1e-12) if np.isfinite(lo) else -1.0
    b = hi * (1 - 1e-12) if np.isfinite(hi) else 1.0
    while not np.isfinite(lo) and k1(a) > 0:
        a *= 2.0
    while not np.isfinite(hi) and k1(b) < 0:
        b *= 2.0
    s = optimize.brentq(k1, a, b, xtol=1e-300, rtol=8.9e-16, maxiter=1000)
    one = 1.0 - 2.0 * s * c
    K = float(-0.5 * np.sum(n * np.log(one)))
    K2 = float(np.sum(2.0 * n * c**2 / one**2))
    return s, K, K2


def imhof(coeffs: np.ndarray, q: float = 0.0, dof: np.ndarray | None = None) -> tuple[float, float]:
    """Imhof's P(Q > q) = 1/2 + (1/π) ∫_0^∞ sin(A(u) − q u / 2) / (u ρ(u)) du, with A(u) =
    ½ Σ n_j atan(c_j u) and ρ(u) = Π (1 + c_j² u²)^(n_j/4), by adaptive quadrature (QUADPACK's
    Fourier rule beyond u = 1, where the integrand oscillates as q u / 2); returns the
    probability and the quadrature's error estimate. Sure where Davies' series fails, on
    forms of few terms."""
    c = _coefficients(coeffs)
    n = _dof(dof, c)
    q = _threshold(q)
    scale = float(np.abs(c).max())
    c, q = c / scale, q / scale  # the integral is scale-free

    def phase(u: float) -> float:
        return 0.5 * float(np.dot(n, np.arctan(c * u)))

    def damping(u: float) -> float:  # u ρ(u)
        return u * math.exp(0.25 * float(np.dot(n, np.log1p((c * u) ** 2))))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        head, e1 = integrate.quad(
            lambda u: math.sin(phase(u) - 0.5 * q * u) / damping(u), 0.0, 1.0, limit=200
        )
        if q == 0.0:
            tail, e2 = integrate.quad(
                lambda u: math.sin(phase(u)) / damping(u), 1.0, math.inf, limit=500
            )
        else:  # sin(A − w u) = sin A cos(w u) − cos A sin(w u), w = q / 2
            w = 0.5 * abs(q)
            a, ea = integrate.quad(
                lambda u: math.sin(phase(u)) / damping(u), 1.0, math.inf, weight="cos", wvar=w
            )
            b, eb = integrate.quad(
                lambda u: math.cos(phase(u)) / damping(u), 1.0, math.inf, weight="sin", wvar=w
            )
            tail, e2 = a - math.copysign(b, q), ea + eb
    p = 0.5 + (head + tail) / math.pi
    return float(min(max(p, 0.0), 1.0)), float((e1 + e2) / math.pi)


def saddlepoint(coeffs: np.ndarray, q: float = 0.0, dof: np.ndarray | None = None) -> float:
    """Lugannani-Rice saddlepoint approximation of P(sum_j c_j chi2_{n_j} > q)."""
    c = _coefficients(coeffs)
    n = _dof(dof, c)
    q = _threshold(q)
    keep = c != 0
    c, n = c[keep], n[keep]
    if c.size == 0:
        return 0.0 if q >= 0 else 1.0
    sure = _sure(c, q)
    if sure is not None:
        return sure.pvalue
    mean = float(np.dot(n, c))
    var = 2.0 * float(np.dot(n, c**2))
    sd = math.sqrt(var)
    if abs(q - mean) < 1e-6 * sd:
        # At the mean the formula is 0/0; its limit is 1/2 - κ3 / (6 √(2π) κ2^(3/2)).
        kappa3 = 8.0 * float(np.dot(n, c**3))
        return float(0.5 - kappa3 / (6.0 * math.sqrt(2.0 * math.pi) * var**1.5))
    s, K, K2 = _saddle_parts(c, q, n)
    w = math.copysign(math.sqrt(max(2.0 * (s * q - K), 0.0)), s)
    v = s * math.sqrt(K2)
    if w == 0.0 or v == 0.0:
        return float(stats.norm.sf((q - mean) / sd))
    p = stats.norm.sf(w) + stats.norm.pdf(w) * (1.0 / v - 1.0 / w)
    return float(min(max(p, 0.0), 1.0))


def satterthwaite(trace_m: float, trace_m2: float, statistic: float) -> float:
    """P(kappa chi2_nu > statistic), kappa = tr M^2 / (2 tr M), nu = (tr M)^2 / tr M^2 (M5).

    Two-moment match of the score U = u^T M u / (2 sigma2); anti-conservative in the tail and
    reported for comparison only.
    """
    kappa = trace_m2 / (2.0 * trace_m)
    nu = trace_m**2 / trace_m2
    return float(stats.chi2.sf(statistic / kappa, nu))


def qform_tail(
    coeffs: np.ndarray, q: float = 0.0, dof: np.ndarray | None = None
) -> TailProbability:
    """Exact P(sum_j c_j chi2_{n_j} > q) (``dof``: the n_j, default 1): Davies, with the
    saddlepoint where Davies cannot answer."""
    c = _coefficients(coeffs)
    n = _dof(dof, c)
    q = _threshold(q)
    sure = _sure(c, q)
    if sure is not None:
        return sure
    keep = c != 0  # zero weights add nothing, and fail Davies' accuracy on small forms
    c, n = c[keep], n[keep]
    mean, sd = float(np.dot(n, c)), math.sqrt(2.0 * float(np.dot(n, c**2)))
    if abs(q - mean) > _FAR * sd:
        # The far tail is below exp(-(|q - mean| / sd) / √2) < 1e-300: 0 or 1 in float64.
        return TailProbability(float(q < mean), "exact", "q beyond 10^4 standard deviations")
    p, fault = davies(c, q, n)
    if fault != 0:
        reason = _DAVIES_FAULTS.get(fault, f"fault {fault}")
        p, error = imhof(c, q, n)
        if error < _IMHOF_ERROR and p > _DAVIES_FLOOR:
            return TailProbability(p, "imhof", f"Davies: {reason}")
        return TailProbability(saddlepoint(c, q, n), "saddlepoint", f"Davies: {reason}")
    if p < _DAVIES_FLOOR:
        return TailProbability(
            saddlepoint(c, q, n), "saddlepoint", f"Davies p = {p:.2g} below its accuracy"
        )
    return TailProbability(min(max(p, 0.0), 1.0), "davies")
