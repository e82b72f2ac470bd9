"""What the stopper decided and what it saw: the ``Decision`` and the history's ``Check``."""

from __future__ import annotations

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
