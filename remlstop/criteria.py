"""Every stopping criterion on one spectrum, side by side, and the choice between them (M9).

A criterion maps a :class:`~remlstop.spectrum.KernelSpectrum` to a stop time in gradient-flow
units: ``reml`` (the paper's REML, M4), ``reml-linear`` and ``reml-power`` (REML of another prior
family, then its Bayes-risk stop time), ``gcv``, ``auto`` (the family with the best AIC) and
``average`` (the stop time minimising the AIC-weighted average of the families' risks). The
misfit diagnostic Delta = l_linear - l_exp (nats) says how strongly the data reject the
paper's prior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .flow import StopTime
from .gcv import GCVFit, gcv_fit
from .priors import PriorFit, fit_prior, minimise_in_log_t, risk_bracket
from .reml import REMLFit, reml_fit
from .spectrum import KernelSpectrum

__all__ = ["CRITERIA", "MISFIT_NATS", "AveragedFit", "Criteria", "evaluate_criteria"]

CRITERIA = ("reml", "reml-linear", "reml-power", "gcv", "auto", "average")
_FAMILY_CRITERIA = {"reml": "exp", "reml-linear": "linear", "reml-power": "power"}
# Delta above 5 nats (2 Delta > 10: "very strong" evidence on the Kass-Raftery scale of
# likelihood ratios between models with the same parameter count) is reported as the data
# rejecting the paper's prior.
MISFIT_NATS = 5.0

Fit = REMLFit | PriorFit | GCVFit


def _log1pk(fit: REMLFit | PriorFit) -> np.ndarray:
    return fit.log1pk() if isinstance(fit, PriorFit) else fit.t * fit.spectrum.eigenvalues


def _absolute_risk(fit: REMLFit | PriorFit, t: np.ndarray) -> np.ndarray:
    """sigma2-hat * R(t): the Bayes risk in the data's units, comparable across families."""
    return fit.sigma2 * np.asarray(fit.risk_at(t))


@dataclass(frozen=True)
class AveragedFit(StopTime):
    """The stop time minimising sum_f w_f sigma2_f R_f(t), w_f ∝ exp(l_f - #params_f) (M9).

    Attributes:
        t: gradient-flow time (inf: train to the budget).
        weights: AIC weight of each family ('exp', 'linear', 'power'), summing to 1.
    """

    t: float
    weights: dict[str, float]

    def summary(self) -> str:
        shown = ", ".join(f"{k} {v:.2f}" for k, v in self.weights.items())
        stop = "train to the budget" if self.unbounded else f"t = {self.t:.4g}"
        return f"risk averaged over the priors (AIC weights {shown}): {stop}"


def _average(fits: dict[str, REMLFit | PriorFit]) -> AveragedFit:
    aic = {name: f.loglik - f.n_params for name, f in fits.items()}
    top = max(aic.values())
    # A likelihood that rises for ever (top = inf) takes all the weight.
    raw = {n: float(v == top) if math.isinf(top) else math.exp(v - top) for n, v in aic.items()}
    total = sum(raw.values())
    weights = {name: v / total for name, v in raw.items()}
    if any(fits[n].unbounded and w > 0.5 for n, w in weights.items()):
        return AveragedFit(t=math.inf, weights=weights)
    # Families without a finite risk (an infinite prior scale) or with a negligible weight are
    # left out of the sum; their weight is reported as it is.
    used = {n: f for n, f in fits.items() if not f.unbounded and weights[n] > 1e-12}

    def risk(t: np.ndarray) -> np.ndarray:
        return sum(weights[n] * _absolute_risk(f, t) for n, f in used.items())

    # Each family's risk falls below its bracket and rises above it, so the weighted sum has
    # its minimum inside the union of the brackets.
    brackets = [risk_bracket(f.spectrum, _log1pk(f)) for f in used.values()]
    brackets = [b for b in brackets if b[1] > 0]
    if not brackets:
        return AveragedFit(t=0.0, weights=weights)
    lo, hi = min(b[0] for b in brackets), max(b[1] for b in brackets)
    return AveragedFit(t=minimise_in_log_t(risk, lo, hi), weights=weights)


@dataclass(frozen=True)
class Criteria:
    """Every criterion's fit on one spectrum (METHOD M4, M9).

    Attributes:
        fits: criterion name -> its fit (``.t`` in gradient-flow time, ``.steps(dt)``,
            ``.summary()``); ``fits['auto']`` is the fit of the family AIC chose.
        misfit: Delta = l_linear - l_exp in nats.
        auto_choice: the criterion 'auto' chose ('reml', 'reml-linear' or 'reml-power').
    """

    fits: dict[str, Any] = field(repr=False)
    misfit: float
    auto_choice: str

    @property
    def prior_rejected(self) -> bool:
        """True when Delta > MISFIT_NATS: the data reject the paper's prior."""
        return self.misfit > MISFIT_NATS

    def misfit_message(self) -> str:
        """Delta in plain words."""
        if self.prior_rejected:
            return (
                f"misfit Delta = {self.misfit:.1f} nats > {MISFIT_NATS:g}: the data reject the "
                "paper's prior e^(tH) in favour of the kernel mixed model sigma2 (I + aH); "
                "the paper's REML ('reml') tends to stop too early here."
            )
        return (
            f"misfit Delta = {self.misfit:.1f} nats (<= {MISFIT_NATS:g}: the paper's prior "
            "fits as well as the kernel mixed model)"
        )

    def lines(self, dt_per_step: float, chosen: str) -> list[str]:
        """One line per criterion: its stop time and steps, the chosen one marked."""
        out = []
        for name in CRITERIA:
            fit = self.fits[name]
            mark = "*" if name == chosen else " "
            if fit.unbounded:
                when = "train to the budget (no finite stop time)"
            elif dt_per_step == 0.0:  # a warm-up from lr = 0: the clock counts the real steps
                when = f"t = {fit.t:.4g} (no steps at the current learning rate, 0)"
            else:
                when = f"t = {fit.t:.4g} = {fit.steps(dt_per_step):.1f} steps"
            note = f" (chose {self.auto_choice})" if name == "auto" else ""
            out.append(f"{mark} {name:<12} {when}{note}")
        return out


def evaluate_criteria(spectrum: KernelSpectrum, *, level: float = 0.95) -> Criteria:
    """Fit every criterion of :data:`CRITERIA` on ``spectrum`` (METHOD M4, M9)."""
    families: dict[str, REMLFit | PriorFit] = {"reml": reml_fit(spectrum, level=level)}
    for name in ("reml-linear", "reml-power"):
        families[name] = fit_prior(spectrum, _FAMILY_CRITERIA[name], level=level)
    auto_choice = max(families, key=lambda n: families[n].loglik - families[n].n_params)
    fits: dict[str, Fit | AveragedFit] = dict(families)
    fits["gcv"] = gcv_fit(spectrum)
    fits["auto"] = families[auto_choice]
    fits["average"] = _average({_FAMILY_CRITERIA[n]: f for n, f in families.items()})
    return Criteria(
        fits=fits,
        misfit=families["reml-linear"].loglik - families["reml"].loglik,
        auto_choice=auto_choice,
    )
