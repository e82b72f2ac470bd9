"""The variance-component test: is training warranted at all? (METHOD M5)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .qform import TailProbability, qform_tail, satterthwaite
from .spectrum import KernelSpectrum

__all__ = ["VarianceComponentTest", "variance_component_test"]

# Eigenvalues within this relative spread of one another are one eigenvalue: a kernel that is a
# multiple of the identity, up to the rounding of its decomposition.
_EQUAL = 1e-10


@dataclass(frozen=True)
class VarianceComponentTest:
    """Score test of H0: t = 0 against t > 0 (METHOD M5), in the manner of scipy.stats results.

    Attributes:
        statistic: R = u^T M u / u^T u (u projected off the covariates).
        null_mean: E[R] under H0 = tr(M) / m (= lambda-bar with no covariates).
        pvalue: exact P(R >= statistic) under H0.
        method: how the p-value was computed ('davies', 'imhof', 'saddlepoint' or 'exact').
        pvalue_satterthwaite: two-moment approximation, for comparison only.
        alpha: the level of the decision.
        train: True when pvalue < alpha: the residual carries signal the kernel can fit.
        dim: m = N - q; n_fixed: q.
        note: why a fallback was used, if one was.
    """

    statistic: float
    null_mean: float
    pvalue: float
    method: str
    pvalue_satterthwaite: float
    alpha: float
    train: bool
    dim: int
    n_fixed: int
    note: str = ""

    def summary(self) -> str:
        verdict = "training warranted" if self.train else "training NOT warranted"
        extra = f"; {self.note}" if self.note else ""
        fixed = f", {self.n_fixed} fixed effect(s) projected off" if self.n_fixed else ""
        return (
            f"Variance-component test{fixed}: R = {self.statistic:.4g} (null mean "
            f"{self.null_mean:.4g}), "
            f"p = {self.pvalue:.3g} [{self.method}{extra}], Satterthwaite p = "
            f"{self.pvalue_satterthwaite:.3g}; {verdict} at alpha = {self.alpha:g}"
        )


def variance_component_test(
    spectrum_or_kernel: KernelSpectrum | np.ndarray | torch.Tensor,
    residual: np.ndarray | torch.Tensor | None = None,
    covariates: np.ndarray | torch.Tensor | None = None,
    *,
    alpha: float = 0.05,
) -> VarianceComponentTest:
    """Test whether the initial residual u0 carries signal along the kernel (METHOD M5).

    Pass a :class:`KernelSpectrum`, or a dense kernel H (N, N) with the residual u0 (N entries,
    row-major) and optional covariates Z ((N, q) or (n, q)) to project off as fixed effects.
    The exact null tail P(R >= r) = P(sum_j (mu_j - r) chi2_1 >= 0) is computed by Davies'
    algorithm, with a saddlepoint fallback where Davies cannot answer.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}.")
    if isinstance(spectrum_or_kernel, KernelSpectrum):
        if residual is not None or covariates is not None:
            raise ValueError(
                "a KernelSpectrum already holds the residual and covariates; pass them to "
                "KernelSpectrum.from_kernel instead."
            )
        spectrum = spectrum_or_kernel
        if spectrum.fixed_effects is not None:
            raise ValueError(
                "this spectrum carries fixed effects for REML (fixed_effects=); the test reads "
                "the kernel compressed to the covariates' complement (M5): build its spectrum "
                "with KernelSpectrum.from_kernel(H, u0, covariates=Z)."
            )
    else:
        if residual is None:
            raise ValueError("pass the residual u0 = y - f0 along with a dense kernel.")
        spectrum = KernelSpectrum.from_kernel(spectrum_or_kernel, residual, covariates)
    mu = spectrum.eigenvalues
    z2 = spectrum.z**2
    statistic = float(np.dot(mu, z2) / z2.sum())
    if float(mu.max() - mu.min()) <= _EQUAL * float(np.abs(mu).max()):
        # A multiple of the identity: R is its null mean whatever the residual, P(R >= r) = 1.
        tail = TailProbability(
            1.0,
            "exact",
            "the kernel is a multiple of the identity here, so the test has no power: R equals "
            "its null mean whatever the residual",
        )
    else:
        tail = qform_tail(mu - statistic, 0.0, dof=spectrum.multiplicity)
    m = spectrum.dim
    p_satt = satterthwaite(
        float(spectrum.count_sum(mu)), float(spectrum.count_sum(mu * mu)), 0.5 * m * statistic
    )
    return VarianceComponentTest(
        statistic=statistic,
        null_mean=spectrum.mean_eigenvalue,
        pvalue=tail.pvalue,
        method=tail.method,
        pvalue_satterthwaite=p_satt,
        alpha=alpha,
        train=tail.pvalue < alpha,
        dim=m,
        n_fixed=spectrum.n_fixed,
        note=tail.note,
    )
