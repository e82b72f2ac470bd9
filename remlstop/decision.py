"""What the stopper decided and what it saw: the ``Decision`` and the history's ``Check``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .criteria import Criteria
from .nystrom import SpectrumApproximation
from .reml import REMLFit
from .vctest import VarianceComponentTest

__all__ = ["Decision", "Check"]


@dataclass(frozen=True)
class Decision:
    """What :meth:`REMLStopper.start` decided before the first step.

    Attributes:
        train: whether training is warranted (the test rejects at ``alpha``, or the user chose
            ``on_insignificant='continue'``/``'warn'``).
        test: the variance-component test (M5).
        fit: the paper's REML fit (M4), whatever the criterion.
        criteria: every criterion's fit on the same spectrum (M9), with the misfit Delta.
        criterion: the criterion whose stop time the time rule follows.
        target_steps: optimizer steps to reach ``t_target`` at the learning rate held at start
            (a schedule changes it; the clock counts the real steps); inf: train to the budget.
        dt_per_step: gradient-flow time per step at start (M2).
        rule: 'time' or 'trajectory'.
        kernel_path: which NTK path ran ('layerwise' or 'generic').
        n_rows, n_outputs: training rows used for the kernel and outputs per row.
        seconds: wall-clock seconds spent (collect, forward, kernel, spectrum, test, fit).
        approximation: None when the dense kernel was decomposed; else how the large-N
            spectrum was obtained and how much of the kernel it resolved (METHOD M10).
    """

    train: bool
    test: VarianceComponentTest
    fit: REMLFit
    criteria: Criteria
    criterion: str
    target_steps: float
    dt_per_step: float
    rule: str
    kernel_path: str
    n_rows: int
    n_outputs: int
    seconds: dict[str, float] = field(default_factory=dict)
    approximation: SpectrumApproximation | None = None

    @property
    def t_target(self) -> float:
        """The chosen criterion's stop time, gradient-flow units (inf: train to the budget)."""
        return float(self.criteria.fits[self.criterion].t)

    @property
    def landmark_check_passed(self) -> bool | None:
        """Whether the Nystrom decision passed its landmark check (M10): the chosen criterion's
        stop time with half of the landmarks lies inside its own interval (95%), and the test
        decides the same there. None on the dense path, without a check, or for a criterion
        without an interval ('gcv', 'average'; :attr:`landmark_check` still reports the shift).

        A failed check shows the stop still moving with m. A passed one is necessary for an
        accurate stop, not sufficient: with few landmarks the unresolved cluster sets both
        stops, and both can be equally late (benchmarks/results/large_n_accuracy.md)."""
        a = self.approximation
        if a is None or self.criterion not in a.check_times:
            return None
        lo, hi = getattr(self.criteria.fits[self.criterion], "interval", (math.nan, math.nan))
        if math.isnan(lo) or math.isnan(hi):
            return None
        same_test = (a.check_pvalue < self.test.alpha) == (self.test.pvalue < self.test.alpha)
        return same_test and lo <= a.check_times[self.criterion] <= hi

    def landmark_check(self) -> str | None:
        """The landmark check in words: the chosen criterion's stop and the test's p-value with
        half of the landmarks against all of them (M10); why it did not run when there were
        too few landmarks for it; None on the dense path."""
        a = self.approximation
        if a is not None and a.check_landmarks == 0:
            return (
                f"landmark check: not run, half of the {a.landmarks} landmarks being fewer than "
                "the 3 a factorisation needs, so how far the stop still moves with the landmarks "
                "is not measured: use landmarks >= 6"
            )
        if a is None or self.criterion not in a.check_times:
            return None
        fit = self.criteria.fits[self.criterion]
        shift = a.check_shift(self.criterion, fit.t)
        line = (
            f"landmark check: with {a.check_landmarks} of the {a.landmarks} landmarks the "
            f"{self.criterion} stop moves {shift:+.1%} (t = {a.check_times[self.criterion]:.4g} "
            f"against {fit.t:.4g}) and p = {a.check_pvalue:.3g} (against {self.test.pvalue:.3g})"
        )
        passed = self.landmark_check_passed
        if passed is None:
            return line
        if passed:
            return line + f"; inside its {fit.level:.0%} interval and the same test decision"
        return (
            line + f": outside its {fit.level:.0%} interval [{fit.interval[0]:.4g}, "
            f"{fit.interval[1]:.4g}] or another test decision, so the stop has not settled in "
            "the landmarks (METHOD M10): raise landmarks="
        )

    @property
    def misfit(self) -> float:
        """Delta = l_linear - l_exp in nats (M9)."""
        return self.criteria.misfit

    def summary(self) -> str:
        verdict = "TRAIN" if self.train else "DO NOT TRAIN"
        chosen = self.criteria.fits[self.criterion]
        if self.rule == "trajectory":
            stop = "stop at the first check where D <= 0 on the real residual (M4)"
        elif chosen.unbounded:
            stop = "no finite stop time: train to the budget (your max_steps)"
        elif self.dt_per_step == 0.0:
            stop = (
                f"stop at t = {chosen.t:.4g}; the learning rate is 0 now, so the clock counts the "
                "time of the steps a schedule makes"
            )
        else:
            stop = (
                f"stop at t = {chosen.t:.4g} = {self.target_steps:.1f} steps at the current "
                "learning rate"
            )
        return "\n".join(
            [
                f"remlstop decision: {verdict}",
                f"  {self.test.summary()}",
                f"  {self.fit.summary()}",
                f"  {self.criteria.misfit_message()}",
                "  stop time by criterion (* = used):",
                *(f"    {line}" for line in self.criteria.lines(self.dt_per_step, self.criterion)),
                f"  criterion = {self.criterion}, rule = {self.rule}: {stop}",
                f"  kernel: {self.kernel_path} path, n = {self.n_rows} rows x K = "
                f"{self.n_outputs} outputs; {sum(self.seconds.values()):.2f} s spent",
                "  spectrum: "
                + (
                    "dense N x N kernel, exact"
                    if self.approximation is None
                    else self.approximation.summary()
                ),
                *([f"  {check}"] if (check := self.landmark_check()) is not None else []),
            ]
        )

    def __str__(self) -> str:
        return self.summary()


@dataclass(frozen=True)
class Check:
    """One entry of the stopper's history (units named: ``t`` is time, ``step`` is steps)."""

    step: int
    t: float
    D: float | None = None
    train_mse: float | None = None
    drift: float | None = None
    t_hat: float | None = None
