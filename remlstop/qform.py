"""Upper tail probabilities of quadratic forms in standard normals (METHOD M5).

Q = sum_j c_j X_j with X_j independent chi-square(n_j), n_j = 1 unless ``dof`` says otherwise (a
repeated coefficient is one term with its count as degrees of freedom). The exact tail P(Q > q) is
computed with Davies' algorithm (``fastlmmclib.quadform.qf``); where Davies faults or returns a
probability below its own accuracy, a Lugannani-Rice saddlepoint approximation (implemented here) is
used. The two-moment Satterthwaite approximation is provided for comparison only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from fastlmmclib.quadform import qf as _davies_qf
from scipy import optimize, stats

__all__ = ["TailProbability", "davies", "saddlepoint", "satterthwaite", "qform_tail"]

# Davies' absolute error bound; below _DAVIES_FLOOR its answer has no relative accuracy left.
_DAVIES_ACC = 1e-10
_DAVIES_FLOOR = 1e-7

_DAVIES_FAULTS = {
    1: "required accuracy not obtained",
    2: "round-off error possibly significant",
    3: "invalid parameters",
    4: "unable to locate integration parameters",
    5: "out of memory",
}


@dataclass(frozen=True)
class TailProbability:
    """P(Q > q) and how it was obtained ('davies', 'saddlepoint' or 'exact')."""

    pvalue: float
    method: str
    note: str = ""


def _coefficients(coeffs: np.ndarray | list[float]) -> np.ndarray:
    c = np.asarray(coeffs, dtype=np.float64).reshape(-1)
    if c.size == 0 or not np.all(np.isfinite(c)):
        raise ValueError("quadratic-form coefficients must be a non-empty finite vector.")
    return c


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


def saddlepoint(coeffs: np.ndarray, q: float = 0.0, dof: np.ndarray | None = None) -> float:
    """Lugannani-Rice saddlepoint approximation of P(sum_j c_j chi2_{n_j} > q)."""
    c = _coefficients(coeffs)
    n = _dof(dof, c)
    keep = c != 0
    c, n = c[keep], n[keep]
    if c.size == 0:
        return 0.0 if q >= 0 else 1.0
    mean = float(np.dot(n, c))
    sd = math.sqrt(2.0 * float(np.dot(n, c**2)))
    if abs(q - mean) < 1e-6 * sd:
        # At the mean the formula is 0/0; the normal limit holds to first order there.
        return float(stats.norm.sf((q - mean) / sd))
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
    if np.all(c <= 0) and q >= 0:
        return TailProbability(0.0, "exact", "all weights <= 0")
    if np.all(c >= 0) and q < 0:
        return TailProbability(1.0, "exact", "all weights >= 0")
    p, fault = davies(c, q, n)
    if fault != 0:
        reason = _DAVIES_FAULTS.get(fault, f"fault {fault}")
        return TailProbability(saddlepoint(c, q, n), "saddlepoint", f"Davies: {reason}")
    if p < _DAVIES_FLOOR:
        return TailProbability(
            saddlepoint(c, q, n), "saddlepoint", f"Davies p = {p:.2g} below its accuracy"
        )
    return TailProbability(min(max(p, 0.0), 1.0), "davies")
