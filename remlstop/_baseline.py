"""The stopper's state at theta0, built once and saved as one unit, and the kernel it reads now.

``Baseline`` holds what the decision was made from (METHOD M4, M5): the initial residual, the
initial spectrum and the test's spectrum, and whether the step size is stable on that kernel.
``KernelView`` holds what the rules read at each check: the spectrum, H u0, lambda-bar and the
stop time, from the initial kernel or the last refresh (M6). Both are frozen: a refresh builds a
new view, a resume rebuilds both from their saved states.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .nystrom import SpectrumApproximation
from .spectrum import KernelSpectrum

__all__ = ["Baseline", "KernelView"]


def _spectrum_state(spectrum: KernelSpectrum) -> dict[str, Any]:
    approximation = spectrum.approximation
    return {
        "eigenvalues": torch.from_numpy(spectrum.eigenvalues.copy()),
        "z": torch.from_numpy(spectrum.z.copy()),
        "n_fixed": spectrum.n_fixed,
        "clipped_mass": spectrum.clipped_mass,
        "approximation": None if approximation is None else dataclasses.asdict(approximation),
        "multiplicity": (
            None if spectrum.multiplicity is None else torch.from_numpy(spectrum.multiplicity)
        ),
    }


def _spectrum_from_state(state: dict[str, Any]) -> KernelSpectrum:
    spectrum = KernelSpectrum.from_eigen(
        state["eigenvalues"].numpy(),
        state["z"].numpy(),
        n_fixed=state["n_fixed"],
        clipped_mass=state["clipped_mass"],
        multiplicity=None if state.get("multiplicity") is None else state["multiplicity"].numpy(),
    )
    saved = state.get("approximation")
    return (
        spectrum if saved is None else spectrum.with_approximation(SpectrumApproximation(**saved))
    )


@dataclass(frozen=True)
class KernelView:
    """The kernel the rules read (M4): its spectrum, h = H u0 (N,), lambda-bar from the
    spectrum (the number REML's root uses, so D = 0 there) and the criterion's stop time t."""

    spectrum: KernelSpectrum
    Hu0: torch.Tensor
    lam_bar: float
    t_target: float

    @classmethod
    def build(
        cls, H: torch.Tensor, u0: torch.Tensor, spectrum: KernelSpectrum, t_target: float
    ) -> KernelView:
        return cls(spectrum, H @ u0.to(H.device), spectrum.mean_eigenvalue, float(t_target))

    def state(self) -> dict[str, Any]:
        return {
            "spectrum": _spectrum_state(self.spectrum),
            "Hu0": self.Hu0.detach().cpu(),
            "lam_bar": self.lam_bar,
            "t_target": self.t_target,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> KernelView:
        return cls(
            _spectrum_from_state(state["spectrum"]),
            state["Hu0"].to(device),
            float(state["lam_bar"]),
            float(state["t_target"]),
        )


@dataclass(frozen=True)
class Baseline:
    """What the decision was made from at theta0 (M4, M5).

    Attributes:
        u0: (N,) float64 initial residual y - f0, row-major (M1).
        spectrum: the initial kernel's spectrum (the criteria's).
        test_spectrum: the test's (the same object unless ``test_covariates`` compress it).
        H0: the initial kernel, kept only to measure drift at refreshes (M6).
        unstable: the step size is beyond gradient descent's stability limit on this kernel.
        rows: (n, 2) int64 keys of the training rows in the order u0 holds them
            (:func:`remlstop.data.row_keys`), so a resumed run finds them again in its data;
            None in checkpoints saved before they were kept.
    """

    u0: torch.Tensor
    spectrum: KernelSpectrum
    test_spectrum: KernelSpectrum
    H0: torch.Tensor | None
    unstable: bool
    rows: torch.Tensor | None = None

    @property
    def mse0(self) -> float:
        """The initial training MSE, ||u0||^2 / N."""
        return float(self.u0 @ self.u0) / self.u0.numel()

    def state(self) -> dict[str, Any]:
        return {
            "u0": self.u0.detach().cpu(),
            "spectrum0": _spectrum_state(self.spectrum),
            "test_spectrum": (
                None if self.test_spectrum is self.spectrum else _spectrum_state(self.test_spectrum)
            ),
            "H0": None if self.H0 is None else self.H0.detach().cpu(),
            "unstable": self.unstable,
            "rows": self.rows,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> Baseline:
        spectrum = _spectrum_from_state(state["spectrum0"])
        saved_test = state.get("test_spectrum")
        return cls(
            u0=state["u0"].to(device),
            spectrum=spectrum,
            test_spectrum=spectrum if saved_test is None else _spectrum_from_state(saved_test),
            H0=None if state["H0"] is None else state["H0"].to(device),
            unstable=bool(state.get("unstable", False)),
            rows=None if state.get("rows") is None else state["rows"].cpu(),
        )
