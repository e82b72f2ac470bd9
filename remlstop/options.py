"""The stopper's options, validated once, shared by ``REMLStopper`` and the Lightning callback."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from .clock import LossSpec, parse_loss
from .criteria import CRITERIA

__all__ = ["DEFAULT_CRITERION", "StopperOptions"]

# Chosen by benchmarks/stopping_quality.py (README "Results"); the paper's REML is 'reml'.
DEFAULT_CRITERION = "reml-linear"

_RULES = ("time", "trajectory")
_ON_INSIGNIFICANT = ("stop", "warn", "continue")
_TEST_COVARIATES = ("f0", "intercept")
_KERNELS = ("auto", "dense", "nystrom")


def _positive_int(value: object, name: str, *, optional: bool = False) -> int | None:
    if optional and value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or int(value) != value
        or value < 1
    ):
        allowed = "None or an integer >= 1" if optional else "an integer >= 1"
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")
    return int(value)


def _real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name} must be a real number, got {value!r}.")
    return float(value)


@dataclass(frozen=True)
class StopperOptions:
    """How :class:`~remlstop.REMLStopper` decides and stops; validated on construction.

    Attributes:
        loss: 'half_mse', 'mse', 'half_sum', 'sum' or an ``nn.MSELoss`` (stored as a
            :class:`~remlstop.clock.LossSpec`); classification losses are refused (M1).
        alpha: level of the variance-component test (M5).
        criterion: the stop time's criterion (M4, M9): 'reml' (the paper's REML), 'reml-linear'
            or 'reml-power' (REML of the kernel mixed model / a power-law prior, then the
            Bayes-risk stop time), 'gcv', 'auto' (the prior family with the best AIC) or
            'average' (the AIC-weighted average of the families' risks). Every criterion is
            computed and shown in the decision; this one sets the stop. None: 'reml' for the
            trajectory rule (its equation is the paper's), else ``DEFAULT_CRITERION``.
        rule: 'time' stops when the clock reaches the criterion's stop time; 'trajectory'
            (criterion 'reml' only) stops at the first check where D = u0^T H r - lambda-bar
            u0^T r <= 0 on the real residual r (M4).
        check_every_n_steps: steps between checks (a check of the trajectory rule, or of a time
            rule under an optimizer with no fixed time map, costs one forward pass).
        refresh_every_n_steps: recompute the NTK every so many steps and re-estimate the stop
            time (M6); None never refreshes.
        on_insignificant: when the test does not reject: 'stop' (the first ``step()`` returns
            True), 'warn' (warn and follow the rule), 'continue' (follow the rule silently).
        max_samples: compute the kernel, test and criteria on a random subset of this many rows
            (seeded by ``seed``); the clock still counts time on the full data.
        drift_threshold: warn when the relative kernel drift at a refresh exceeds this.
        chunk_size: passed to :func:`remlstop.ntk.empirical_ntk`.
        track_residual: record D and the training MSE at every check even under the time rule;
            None means True for the trajectory rule only.
        seed: seeds the row subset of ``max_samples``.
        test_covariates: fixed effects the test projects off (M3, M5): 'f0', 'intercept', or a
            sequence of both. With 'f0' the test asks whether y depends on X at all. The stop
            time is unchanged; the test costs a second eigendecomposition.
        kernel: 'dense' (the N x N kernel, exact), 'nystrom' (the large-N spectrum from
            ``landmarks`` rows of the kernel, METHOD M10) or 'auto': dense when its estimated
            peak (about 2 N^2 x 8 bytes) fits ``memory_budget_bytes`` and N <= 20,000 on any
            device (the eigen-decomposition runs on the CPU and grows as N^3: 258 s at
            N = 10,000 on two cores); Nystrom otherwise. The decision says which ran and how
            much it resolved.
        landmarks: training rows whose kernel rows the Nystrom path computes (None: 8192 / K
            up to N = 10^5, then as many as keep the cost N (m K)^2 there, at least 4096 / K,
            at most n / 2, within half the budget at about 64 (m K)^2 bytes). More resolve more
            of the kernel and cost (m K)^3 + N (m K)^2 flops, 64 (m K)^2 bytes.
        memory_budget_bytes: the budget 'auto' compares with; None: the memory available now
            on the kernel's device and on the CPU (which holds the dense spectrum's
            eigen-decomposition), the dense peak having to fit both. The Nystrom path's
            m K x m K matrices (about 64 (m K)^2 bytes) are held on the CPU and checked against
            it, or against the CPU's available memory when None: explicit ``landmarks`` that do
            not fit raise a MemoryError.
    """

    loss: LossSpec | str | nn.Module = "half_mse"
    alpha: float = 0.05
    criterion: str | None = None
    rule: str = "time"
    check_every_n_steps: int = 1
    refresh_every_n_steps: int | None = None
    on_insignificant: str = "stop"
    max_samples: int | None = None
    drift_threshold: float = 0.1
    chunk_size: int | None = None
    track_residual: bool | None = None
    seed: int = 0
    test_covariates: str | Sequence[str] | None = field(default=())
    kernel: str = "auto"
    landmarks: int | None = None
    memory_budget_bytes: int | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        put("loss", parse_loss(self.loss))
        if not 0 < _real(self.alpha, "alpha") < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}.")
        put("alpha", float(self.alpha))
        if self.criterion is None:
            put("criterion", "reml" if self.rule == "trajectory" else DEFAULT_CRITERION)
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}.")
        if self.rule not in _RULES:
            raise ValueError(f"rule must be one of {_RULES}, got {self.rule!r}.")
        if self.rule == "trajectory" and self.criterion != "reml":
            raise ValueError(
                "rule='trajectory' is the paper's REML equation D(t) = 0 read on the real "
                f"residual (M4); it has no form for criterion={self.criterion!r}. Use "
                "rule='time' with that criterion, or criterion='reml'."
            )
        if self.on_insignificant not in _ON_INSIGNIFICANT:
            raise ValueError(
                f"on_insignificant must be one of {_ON_INSIGNIFICANT}, got "
                f"{self.on_insignificant!r}."
            )
        put("check_every_n_steps", _positive_int(self.check_every_n_steps, "check_every_n_steps"))
        put(
            "refresh_every_n_steps",
            _positive_int(self.refresh_every_n_steps, "refresh_every_n_steps", optional=True),
        )
        put("max_samples", _positive_int(self.max_samples, "max_samples", optional=True))
        put("chunk_size", _positive_int(self.chunk_size, "chunk_size", optional=True))
        if not _real(self.drift_threshold, "drift_threshold") > 0:
            raise ValueError(
                f"drift_threshold must be a positive relative drift, got {self.drift_threshold}."
            )
        put("drift_threshold", float(self.drift_threshold))
        if self.track_residual is None:
            put("track_residual", self.rule == "trajectory")
        if not isinstance(self.track_residual, bool):
            raise ValueError(
                f"track_residual must be True, False or None, got {self.track_residual!r}."
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")
        put("seed", int(self.seed))
        put("test_covariates", _parse_test_covariates(self.test_covariates))
        if self.kernel not in _KERNELS:
            raise ValueError(f"kernel must be one of {_KERNELS}, got {self.kernel!r}.")
        put("landmarks", _positive_int(self.landmarks, "landmarks", optional=True))
        if self.landmarks is not None and self.landmarks < 3:
            raise ValueError(f"landmarks must be at least 3, got {self.landmarks}.")
        put(
            "memory_budget_bytes",
            _positive_int(self.memory_budget_bytes, "memory_budget_bytes", optional=True),
        )
        if self.kernel == "nystrom" and self.refresh_every_n_steps is not None:
            raise ValueError(
                "refresh_every_n_steps needs the dense kernel (its drift is measured on it); "
                "kernel='nystrom' has none. Use kernel='dense' or drop refresh_every_n_steps."
            )

    def replace(self, **changes: object) -> StopperOptions:
        """A copy with some options changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _parse_test_covariates(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    if not (spec is None or isinstance(spec, (str, list, tuple))):
        raise ValueError(
            f"test_covariates must be None, one of {_TEST_COVARIATES} or a list of them; got "
            f"{type(spec).__name__} (for covariates of your own, pass KernelSpectrum.from_kernel "
            "covariates=)."
        )
    names = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    bad = [n for n in names if not isinstance(n, str) or n not in _TEST_COVARIATES]
    if bad or len(set(names)) != len(names):
        raise ValueError(
            f"test_covariates must be None, one of {_TEST_COVARIATES} or a sequence of them "
            f"without repeats; got {spec!r}."
        )
    return names
