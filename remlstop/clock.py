"""Optimizer steps -> gradient-flow time (METHOD M2).

Units: ``t`` is gradient-flow time of the linearised flow ``df/dt = -H (f - y)`` with the
normalised kernel ``H = J Jᵀ / N`` (M1); ``steps`` counts optimizer steps. A gradient-descent step
on ``L = (a/N)·‖f - y‖²`` with learning rate η moves the outputs by ``-2aη·H (f - y)``, hence
``Δt = 2aη`` per step.

When to count a step: ``dt_per_step``/``advance`` read the learning rate the optimizer holds
*now*, so call ``advance`` after ``optimizer.step()`` and before ``scheduler.step()``. (In
Lightning 2.x step-interval schedulers are updated before ``on_train_batch_end``; count in
``on_before_optimizer_step`` there.)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import brentq
from torch import nn

from .flow import loss_matched_time

__all__ = [
    "LossSpec",
    "parse_loss",
    "GradientFlowClock",
    "loss_matched_time",
    "discrete_residual_factor",
    "continuous_residual_factor",
    "is_discrete_stable",
]


@dataclass(frozen=True)
class LossSpec:
    """A squared-error loss ``L = a·reduce(‖f - y‖²)`` (M1).

    ``reduction`` is ``"mean"`` (divide by the number of scalar residuals in the batch) or
    ``"sum"``; ``a`` is 1/2 for the "half" losses and 1 for ``nn.MSELoss``.
    """

    name: str
    a: float
    reduction: str


_LOSSES = {
    "half_mse": LossSpec("half_mse", 0.5, "mean"),
    "mse": LossSpec("mse", 1.0, "mean"),
    "half_sum": LossSpec("half_sum", 0.5, "sum"),
    "sum": LossSpec("sum", 1.0, "sum"),
}
_CLASSIFICATION_NAMES = {"cross_entropy", "crossentropy", "ce", "nll", "bce", "bce_with_logits"}
_CLASSIFICATION_MODULES = (nn.CrossEntropyLoss, nn.NLLLoss, nn.BCELoss, nn.BCEWithLogitsLoss)
_CLASSIFICATION_MESSAGE = (
    "remlstop's theory (METHOD M1/M6) covers squared-error losses only; classification losses "
    "such as cross-entropy, NLL and BCE are outside it. Use one-hot (float) targets with "
    "loss='mse' instead."
)


def parse_loss(loss: str | nn.Module | LossSpec) -> LossSpec:
    """The :class:`LossSpec` for a loss name, an ``nn.MSELoss`` instance or a ``LossSpec`` (M1).

    Accepted names: ``"half_mse"`` (½·mean), ``"mse"`` (mean), ``"half_sum"`` (½·sum), ``"sum"``.
    Classification losses raise ``ValueError``.
    """
    if isinstance(loss, LossSpec):
        return loss
    if isinstance(loss, _CLASSIFICATION_MODULES):
        raise ValueError(f"{type(loss).__name__}: {_CLASSIFICATION_MESSAGE}")
    if isinstance(loss, nn.MSELoss):
        if loss.reduction == "mean":
            return _LOSSES["mse"]
        if loss.reduction == "sum":
            return _LOSSES["sum"]
        raise ValueError(
            f"nn.MSELoss(reduction={loss.reduction!r}) does not give a scalar loss to train on; "
            "use reduction='mean' or 'sum'."
        )
    if isinstance(loss, str):
        key = loss.strip().lower()
        if key in _LOSSES:
            return _LOSSES[key]
        if key in _CLASSIFICATION_NAMES:
            raise ValueError(f"loss={loss!r}: {_CLASSIFICATION_MESSAGE}")
        raise ValueError(f"unknown loss {loss!r}; accepted names are {sorted(_LOSSES)}.")
    raise TypeError(
        f"loss must be one of the names {sorted(_LOSSES)}, an nn.MSELoss instance or a LossSpec; "
        f"got {type(loss).__name__}."
    )


def _sgd_momentum(group: dict[str, Any]) -> tuple[float, float, bool]:
    """(β, dampening, nesterov) of an SGD param group, β checked to lie in [0, 1)."""
    beta = float(group.get("momentum", 0.0))
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"SGD momentum must lie in [0, 1) for a time map; got {beta}.")
    return beta, float(group.get("dampening", 0.0)), bool(group.get("nesterov", False))


def _momentum_map(
    beta: float, dampening: float, nesterov: bool, buffer: float | None
) -> tuple[float, float]:
    """(c, e) such that the k-th step from now (k = 1, 2, ...) at constant momentum moves by
    2aη·(c + e·β^k) per unit of a constant gradient g (M2; the momentum's transient counted,
    first-order as M2 states). ``buffer``: the momentum buffer's multiplier b of g after the
    steps counted so far, None before the buffer exists.

    Heavy ball, as PyTorch runs it: the first step with momentum copies the gradient (b = 1,
    undampened), then b ← β·b + (1 − d), so b_k = c + (b − c)·β^k with c = (1 − d)/(1 − β);
    from a fresh buffer, (1 − β^k)/(1 − β) for d = 0. Nesterov (PyTorch forbids it with
    dampening) steps along g + β·b_k. Both tend to the steady state c: counting the transient
    puts a fresh heavy ball β/(1 − β) steps (Nesterov β²/(1 − β)) behind the steady-state map.
    A step without momentum moves by g and leaves the buffer as it is. Plain SGD: (1, 0).
    """
    if beta == 0.0:
        return 1.0, 0.0
    d = 0.0 if nesterov else dampening
    c = (1.0 - d) / (1.0 - beta)
    # A fresh buffer is as if b = c + (1 - c)/β before its first step, so that b_1 = 1.
    e = (1.0 - c) / beta if buffer is None else buffer - c
    if nesterov:  # 1 + β(c + e β^k), and 1 + β c = c for d = 0
        return c, beta * e
    return c, e


def _next_buffer(
    beta: float, dampening: float, nesterov: bool, buffer: float | None
) -> float | None:
    """The momentum buffer's multiplier after one more step (see :func:`_momentum_map`)."""
    if beta == 0.0:
        return buffer
    if buffer is None:
        return 1.0
    return beta * buffer + (1.0 - (0.0 if nesterov else dampening))


class GradientFlowClock:
    """Counts gradient-flow time ``t`` over optimizer steps (METHOD M2).

    ``optimizer``: the ``torch.optim`` optimizer (or a Lightning wrapper of one). ``loss``: see
    :func:`parse_loss`. ``n_total``: number of training rows ``n``, used for sum-reduced losses
    when ``batch_size_rows`` is not given (full batch).

    Plain SGD (with momentum/Nesterov/dampening) has a fixed time map. Other optimizers (Adam,
    AdamW, RMSprop, Adagrad, ...) do not: the clock warns once and sets ``fixed_map = False``;
    its ``t`` is then only the *nominal* time 2aη per step, and callers should use
    :func:`loss_matched_time` or the trajectory rule (M4) instead.

    Momentum: the Δt of a step counts the buffer's build-up (see :func:`_momentum_map`): the
    clock follows the buffer's multiplier b ← β·b + (1 − d) step by step with the momentum each
    step was taken at (a schedule that cycles it, OneCycleLR or CyclicLR, or a change by hand),
    so it must see the optimizer's steps from the first. A clock made for an optimizer whose
    momentum buffers already exist (training began earlier) starts from the steady state
    (``warm_start``).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        loss: str | nn.Module | LossSpec = "half_mse",
        *,
        n_total: int | None = None,
    ) -> None:
        if n_total is not None and (
            isinstance(n_total, bool) or int(n_total) != n_total or n_total < 1
        ):
            raise ValueError(f"n_total must be a positive integer number of rows; got {n_total!r}.")
        self.optimizer = optimizer
        self.loss = parse_loss(loss)
        self.n_total = None if n_total is None else int(n_total)
        self.t = 0.0
        self.steps = 0
        self.fixed_map = isinstance(optimizer, torch.optim.SGD)
        # The momentum buffer's multiplier after the counted steps (None: no buffer yet), and
        # the momentum read with the Δt of step ``steps + 1``, which that step is counted at.
        self._buffer: float | None = None
        self._read: tuple[int, tuple[float, float, bool]] | None = None
        self.warm_start = any(
            state.get("momentum_buffer") is not None
            for state in getattr(optimizer, "state", {}).values()
        )
        self._warned_weight_decay = False
        if not self.fixed_map:
            warnings.warn(
                f"{type(optimizer).__name__} has no fixed map from steps to gradient-flow time "
                "(METHOD M2); the clock's own time is nominal, so REMLStopper reads the time from "
                "the training residual at each check (the loss-matched clock). The trajectory "
                "rule is the other choice.",
                RuntimeWarning,
                stacklevel=2,
            )
        self._check_weight_decay()

    def _check_weight_decay(self) -> None:
        if self._warned_weight_decay:
            return
        if any(float(g.get("weight_decay", 0.0)) > 0.0 for g in self.optimizer.param_groups):
            self._warned_weight_decay = True
            warnings.warn(
                "weight_decay > 0 adds a ridge penalty that the linearised model (METHOD M2) does "
                "not have; the clock and the REML estimate ignore it.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _buffer_now(self, beta: float, dampening: float, nesterov: bool) -> float | None:
        """The buffer's multiplier now: the steady state when the buffers predate the clock."""
        if self._buffer is None and self.warm_start and beta > 0.0:
            return (1.0 - (0.0 if nesterov else dampening)) / (1.0 - beta)
        return self._buffer

    def _group_map(self, group: dict[str, Any]) -> tuple[float, float, float, float]:
        """(2aη, c, e, β): the k-th step from now of this group advances 2aη·(c + e·β^k) at
        its current lr and momentum (M2)."""
        if "lr" not in group:
            raise ValueError(f"{type(self.optimizer).__name__} param group has no 'lr'.")
        lr = float(group["lr"])  # lr may be a tensor in recent torch
        if not (math.isfinite(lr) and lr >= 0.0):
            raise ValueError(f"learning rate must be finite and non-negative; got {lr}.")
        base = 2.0 * self.loss.a * lr
        if not self.fixed_map:
            return base, 1.0, 0.0, 0.0
        if group.get("maximize", False):
            raise ValueError(
                "SGD(maximize=True) ascends its objective, which has no gradient-flow time on a "
                "squared-error loss; minimise the loss itself (maximize=False)."
            )
        momentum = _sgd_momentum(group)
        c, e = _momentum_map(*momentum, self._buffer_now(*momentum))
        return base, c, e, momentum[0]

    def _step_map(
        self, batch_size_rows: int | None, n_outputs: int
    ) -> tuple[float, float, float, float]:
        """(Δ, c, e, β) shared by every param group holding parameters: the k-th step from now
        advances Δ·(c + e·β^k), with Δ = 2aη (times B·K for sum reduction)."""
        self._check_weight_decay()
        groups = [g for g in self.optimizer.param_groups if len(g["params"]) > 0]
        if not groups:
            raise ValueError("the optimizer has no parameters to train.")
        maps = [self._group_map(g) for g in groups]
        dts = [base * (c + e * beta) for base, c, e, beta in maps]
        if any(not math.isclose(d, dts[0], rel_tol=1e-12, abs_tol=0.0) for d in dts):
            lrs = [float(g["lr"]) for g in groups]
            raise ValueError(
                f"param groups advance different gradient-flow times per step (lr={lrs}); the "
                "theory (METHOD M2) needs one time for all parameters. Use the same learning rate "
                "(and momentum) in every param group."
            )
        base, c, e, beta = maps[0]
        return base * self._rows_factor(batch_size_rows, n_outputs), c, e, beta

    def _rows_factor(self, batch_size_rows: int | None, n_outputs: int) -> int:
        # Sum over a batch of B rows has expected gradient (B/n)·(full sum) = B·K·(mean gradient).
        if self.loss.reduction == "mean":
            return 1
        rows = self.n_total if batch_size_rows is None else batch_size_rows
        if rows is None:
            raise ValueError(
                f"loss {self.loss.name!r} is sum-reduced: time per step scales with the number of "
                "residuals summed, so pass batch_size_rows= (or n_total= for full batch)."
            )
        if int(rows) != rows or rows < 1 or int(n_outputs) != n_outputs or n_outputs < 1:
            raise ValueError(
                "batch_size_rows and n_outputs must be positive integers; got "
                f"{rows!r}, {n_outputs!r}."
            )
        return int(rows) * int(n_outputs)

    def dt_per_step(self, batch_size_rows: int | None = None, n_outputs: int = 1) -> float:
        """Δt of the step about to be counted (step ``steps + 1``), from the optimizer's current
        lr and momentum (M2). Reading it does not count the step; the step, counted next, is
        counted at the momentum read here.

        Mean reduction: ``2aη·m`` (mini-batch or not). Sum reduction over ``B`` rows of ``K``
        outputs: ``2aη·m·B·K``. ``m`` = 1 for plain SGD; with momentum β it is the buffer's
        multiplier at that step (see :func:`_momentum_map`): (1 − β^i)/(1 − β) for step i of
        the heavy ball at constant β, tending to (1 − dampening)/(1 − β). All param groups
        holding parameters must advance the same time.
        """
        base, c, e, beta = self._step_map(batch_size_rows, n_outputs)
        if self.fixed_map:
            self._read = (self.steps + 1, self._momentum())
        return base * (c + e * beta)

    def _momentum(self) -> tuple[float, float, bool]:
        group = next(g for g in self.optimizer.param_groups if len(g["params"]) > 0)
        return _sgd_momentum(group)

    def is_stable(self, lambda_max: float) -> bool:
        """Whether the steps converge on the kernel's top direction, the linearised model (M2).

        With Δ = 2aη (mean reduction) and the largest kernel eigenvalue λ_max: plain SGD needs
        Δ·λ_max < 2; the heavy ball with momentum β and dampening d, Δ(1 − d)·λ_max < 2(1 + β);
        Nesterov, Δ·λ_max < 2(1 + β)/(1 + 2β). Optimizers without a fixed map count as stable.
        """
        if not self.fixed_map:
            return True
        group = next(g for g in self.optimizer.param_groups if len(g["params"]) > 0)
        step = 2.0 * self.loss.a * float(group["lr"]) * float(lambda_max)
        beta = float(group.get("momentum", 0.0))
        if group.get("nesterov", False):
            return step < 2.0 * (1.0 + beta) / (1.0 + 2.0 * beta)
        return step * (1.0 - float(group.get("dampening", 0.0))) < 2.0 * (1.0 + beta)

    def steps_for_time(
        self, t: float, batch_size_rows: int | None = None, n_outputs: int = 1
    ) -> float:
        """Steps from ``steps`` on, at the current lr and momentum, that advance time ``t`` (M2).

        The momentum transient is counted: Σ_{i=s+1}^{s+k} Δ·(c + e·β^i) = t is solved for k on
        its continuous extension (increasing in k), so the result may be fractional; a time
        that is never reached (lr = 0, or t = inf) gives ``math.inf``.
        """
        t = float(t)
        if not t >= 0.0:
            raise ValueError(f"t must be a non-negative gradient-flow time; got {t}.")
        base, c, e, beta = self._step_map(batch_size_rows, n_outputs)
        if t == 0.0:
            return 0.0
        if base == 0.0 or math.isinf(t):
            return math.inf
        target = t / base
        if e == 0.0:
            return target / c
        head = e * beta / (1.0 - beta)

        def excess(k: float) -> float:
            return c * k + head * (1.0 - beta**k) - target

        # excess(0) < 0 and excess(k) ≥ c·k − |head| − target.
        return brentq(excess, 0.0, (target + abs(head)) / c + 1.0, xtol=1e-12, rtol=1e-14)

    def advance(self, batch_size_rows: int | None = None, n_outputs: int = 1) -> float:
        """Count one step: add :meth:`dt_per_step` to ``t``, increment ``steps``; returns ``t``."""
        return self.count(self.dt_per_step(batch_size_rows, n_outputs))

    def count(self, dt: float, *, skipped: bool = False) -> float:
        """Count one step of gradient-flow time ``dt`` read earlier (by :meth:`dt_per_step`
        before the optimizer moved, say); returns ``t``. ``skipped``: the optimizer did not
        step (a ``GradScaler`` found inf gradients, or there were none), so no time passes and
        the momentum buffer stays as it was; ``dt`` must then be 0."""
        dt = float(dt)
        if not (math.isfinite(dt) and dt >= 0.0):
            raise ValueError(f"a step's gradient-flow time must be finite and >= 0; got {dt}.")
        if skipped and dt != 0.0:
            raise ValueError(f"a skipped step moves nothing: its time must be 0, got {dt}.")
        if self.fixed_map and not skipped:
            read = self._read
            momentum = read[1] if read is not None and read[0] == self.steps + 1 else None
            momentum = momentum or self._momentum()
            self._buffer = _next_buffer(*momentum, self._buffer_now(*momentum))
        self.t += dt
        self.steps += 1
        return self.t

    def state_dict(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "steps": self.steps,
            "loss": self.loss.name,
            "fixed_map": self.fixed_map,
            "warm_start": self.warm_start,
            "momentum_buffer": self._buffer,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("loss", self.loss.name) != self.loss.name:
            raise ValueError(
                f"state was saved with loss {state['loss']!r}, this clock uses {self.loss.name!r}."
            )
        t, steps = float(state["t"]), int(state["steps"])
        if not (math.isfinite(t) and t >= 0.0 and steps >= 0):
            raise ValueError(f"invalid clock state: t={t}, steps={steps}.")
        self.t, self.steps = t, steps
        # States saved before warm_start existed keep what this clock found in the optimizer.
        self.warm_start = bool(state.get("warm_start", self.warm_start))
        self._read = None
        if "momentum_buffer" in state:
            buffer = state["momentum_buffer"]
            self._buffer = None if buffer is None else float(buffer)
        else:  # saved before the buffer was followed: its value at constant momentum
            self._buffer = None
            beta, dampening, nesterov = self._momentum() if self.fixed_map else (0.0, 0.0, False)
            if steps > 0 and beta > 0.0 and not self.warm_start:
                c = (1.0 - (0.0 if nesterov else dampening)) / (1.0 - beta)
                self._buffer = c + (1.0 - c) * beta ** (steps - 1)

    def __repr__(self) -> str:
        return (
            f"GradientFlowClock(t={self.t:.6g}, steps={self.steps}, loss={self.loss.name!r}, "
            f"fixed_map={self.fixed_map})"
        )


def discrete_residual_factor(eigenvalues: Any, dt: float, k: int) -> np.ndarray:
    """(1 - Δt·λ)^k: residual factor per eigen-direction after k gradient steps (M2), float64."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    return (1.0 - float(dt) * lam) ** int(k)


def continuous_residual_factor(eigenvalues: Any, t: float) -> np.ndarray:
    """e^{-tλ}: residual factor per eigen-direction at gradient-flow time t (M2), float64."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    return np.exp(-float(t) * lam)


def is_discrete_stable(lambda_max: float, dt: float) -> bool:
    """Whether gradient descent with step Δt is stable on the linearised model (M2):
    Δt·λ_max < 2."""
    return float(dt) * float(lambda_max) < 2.0
