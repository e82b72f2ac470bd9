"""REMLStopper: the framework-free state machine that decides whether to train and when to stop.

Both the Lightning callback and plain training loops drive this one class; every number it
reports is computed here once (METHOD M2 clock, M4 REML and trajectory rule, M5 test, M6 refresh).
"""

from __future__ import annotations

import logging
import math
import numbers
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import nn

from ._baseline import Baseline, KernelView
from ._model import device_dtype, evaluate, optimizer_parameters, trained_only
from ._spectra import initial_spectra, nystrom_peak_bytes
from .clock import GradientFlowClock, LossSpec, loss_matched_time
from .criteria import evaluate_criteria
from .data import as_target_matrix, collect_xy, find_rows, row_keys
from .decision import Check, Decision
from .ntk import empirical_ntk
from .options import StopperOptions
from .spectrum import KernelSpectrum, expand_covariates
from .vctest import variance_component_test

__all__ = ["REMLStopper", "Decision", "Check"]

logger = logging.getLogger("remlstop")

# A training MSE this many times the initial one means divergence, not a transient (gradient
# descent at a stable step size does not raise the linearised model's loss at all).
_DIVERGED = 10.0


_STATE_KEYS = (
    "clock",
    "should_stop",
    "stop_step",
    "stopping_reason",
    "baseline",
    "kernel",
    "decision",
    "history",
)


class REMLStopper:
    """Decide whether to train and when to stop, from the training data alone.

    Args:
        model: the network being trained (any ``nn.Module``; its state is never disturbed).
        data: training inputs X (with ``targets``), an ``(X, Y)`` pair, or a DataLoader of
            batches split by ``batch_to_xy``.
        targets: Y when ``data`` is the input tensor X.
        optimizer: the optimizer whose learning rate drives the clock (M2).
        batch_to_xy: function batch -> (x, y) for batches that are not ``(x, y)`` pairs.
        options: a :class:`~remlstop.options.StopperOptions`; keyword options (``loss=``,
            ``criterion=``, ``rule=``, ``alpha=``, ...: every field of ``StopperOptions``, where
            each is documented) override its fields.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        targets: torch.Tensor | None = None,
        *,
        optimizer: torch.optim.Optimizer,
        batch_to_xy: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] | None = None,
        options: StopperOptions | None = None,
        **option_values: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer (its learning rate drives the clock, "
                f"METHOD M2); got {type(optimizer).__name__}. Pass the optimizer you train "
                "with, e.g. optimizer=torch.optim.SGD(model.parameters(), lr=0.01)."
            )
        try:
            # Built from the keywords when no options are given, so the defaults that depend
            # on other options (criterion and track_residual on the rule) follow them.
            if options is None:
                self.options = StopperOptions(**option_values)
            else:
                self.options = options.replace(**option_values) if option_values else options
        except TypeError as err:
            raise TypeError(f"{err}; the options are the fields of StopperOptions.") from None
        self.model = model
        self.optimizer = optimizer
        self._data = data if targets is None else (data, targets)
        self._batch_to_xy = batch_to_xy
        self.clock: GradientFlowClock | None = None
        self.decision: Decision | None = None
        self.history: list[Check] = []
        self.should_stop = False
        self.stop_step: int | None = None
        self.stopping_reason = ""
        # What start() decided from (built once) and the kernel the rules read now (replaced
        # at refreshes); both restored as units by load_state_dict().
        self._baseline: Baseline | None = None
        self._kernel: KernelView | None = None
        self._collected: int | None = None  # rows collected for a loaded decision
        # The training data the checks read, loaded by start() or resume().
        self._X: torch.Tensor | None = None
        self._Y: torch.Tensor | None = None

    @property
    def loss(self) -> LossSpec:
        return self.options.loss

    @property
    def rule(self) -> str:
        return self.options.rule

    @property
    def criterion(self) -> str:
        return self.options.criterion

    # ----------------------------------------------------------------- start
    def start(self) -> Decision:
        """Collect (X, Y), compute f0, the NTK, the test (M5) and every criterion (M4, M9);
        before step 1.

        After :meth:`load_state_dict` this is :meth:`resume`: the saved decision is kept.
        """
        o = self.options
        if self.decision is not None and self._X is None:
            return self.resume()
        if self.decision is not None:
            assert self.clock is not None
            if self.clock.steps == 0:
                return self.decision
            raise RuntimeError(
                f"start() was already called and {self.clock.steps} steps have been counted "
                "since: the decision was made at the initial parameters and is kept (read "
                "stopper.decision). To decide afresh, build a new REMLStopper before training; "
                "to resume from a checkpoint, load_state_dict() first."
            )
        trained = optimizer_parameters(self.model, self.optimizer)
        seconds: dict[str, float] = {}
        tic = time.perf_counter()
        self._load_data()
        seconds["collect"] = time.perf_counter() - tic

        tic = time.perf_counter()
        f0 = evaluate(self.model, self._X, finite=False)
        if f0.shape != self._Y.shape:
            raise ValueError(
                f"targets have shape {tuple(self._Y.shape)} (as (n, K)) but the model outputs "
                f"{tuple(f0.shape)}; give one target per model output."
            )
        if not bool(torch.isfinite(f0).all()):
            raise ValueError(
                "the model's initial outputs contain NaN or inf; check the initialisation and "
                "the input scaling."
            )
        u0 = (self._Y.to(torch.float64) - f0.to(torch.float64)).reshape(-1)
        seconds["forward"] = time.perf_counter() - tic

        spectra = initial_spectra(
            self.model, self._X, u0, _covariate_matrix(o.test_covariates, f0), o, trained
        )
        spectrum, test_spectrum = spectra.spectrum, spectra.test_spectrum
        seconds.update(spectra.seconds)
        tic = time.perf_counter()
        test = variance_component_test(test_spectrum, alpha=o.alpha)
        seconds["test"] = time.perf_counter() - tic
        tic = time.perf_counter()
        criteria = evaluate_criteria(spectrum)
        seconds["fit"] = time.perf_counter() - tic

        lam_max = float(spectrum.eigenvalues[-1])
        assert self.clock is not None
        self._baseline = Baseline(
            u0=u0.to(spectra.Hu0.device),
            spectrum=spectrum,
            test_spectrum=test_spectrum,
            H0=spectra.H0,
            unstable=not self.clock.is_stable(lam_max),
            rows=row_keys(self._X, self._Y),
        )
        self._kernel = KernelView(
            spectrum, spectra.Hu0, spectrum.mean_eigenvalue, criteria.fits[o.criterion].t
        )
        if self._baseline.unstable:
            warnings.warn(
                f"the step size is unstable on this kernel: a step of the learning rate "
                f"{self.optimizer.param_groups[0]['lr']:g} times its largest eigenvalue "
                f"{lam_max:.4g} exceeds the gradient-descent limit (METHOD M2): on this "
                "kernel training would diverge along its top direction, and a network that "
                "converges anyway has left the kernel the decision reads (its stop time then "
                "does not apply). Lower the learning rate below "
                f"{self.optimizer.param_groups[0]['lr'] / (lam_max * self._dt_now() / 2):.3g}"
                " (plain SGD).",
                RuntimeWarning,
                stacklevel=2,
            )
        dt = self._dt_now()
        train = test.train or o.on_insignificant != "stop"
        t_target = self._kernel.t_target
        self.decision = Decision(
            train=train,
            test=test,
            fit=criteria.fits["reml"],
            criteria=criteria,
            criterion=o.criterion,
            target_steps=self.clock.steps_for_time(t_target, n_outputs=int(self._Y.shape[1]))
            if self.clock.fixed_map
            else t_target / dt,
            dt_per_step=dt,
            rule=o.rule,
            kernel_path=spectra.kernel_path,
            approximation=spectrum.approximation,
            n_rows=int(self._X.shape[0]),
            n_outputs=int(self._Y.shape[1]),
            seconds=seconds,
        )
        logger.info("%s", self.decision.summary())
        approximation = spectrum.approximation
        if self.decision.landmark_check_passed is False:
            warnings.warn(
                f"the Nystrom decision has not settled in the landmarks: "
                f"{self.decision.landmark_check()} (now {approximation.landmarks}; the cost "
                f"grows as N (landmarks x K)^2 flops, the memory as {nystrom_peak_bytes(1)} "
                "(landmarks x K)^2 bytes).",
                RuntimeWarning,
                stacklevel=2,
            )
        elif approximation is not None and approximation.check_landmarks == 0:
            warnings.warn(f"{self.decision.landmark_check()}.", RuntimeWarning, stacklevel=2)
        if not test.train:
            if o.on_insignificant == "stop":
                self._stop(
                    0,
                    "the variance-component test finds no signal to learn "
                    f"(p = {test.pvalue:.3g} >= alpha = {o.alpha:g})",
                )
            elif o.on_insignificant == "warn":
                warnings.warn(
                    f"the variance-component test finds no signal to learn (p = "
                    f"{test.pvalue:.3g}); training anyway because on_insignificant='warn'.",
                    UserWarning,
                    stacklevel=2,
                )
        if train and o.rule == "time":
            if not math.isfinite(t_target):
                warnings.warn(
                    f"criterion {o.criterion!r} finds no finite stop time: the time rule will "
                    "not stop this run; it trains to your budget (max_steps).",
                    RuntimeWarning,
                    stacklevel=2,
                )
            if o.criterion == "reml" and criteria.prior_rejected:
                warnings.warn(
                    f"{criteria.misfit_message()} Consider a criterion that does not assume "
                    "it (see the decision's list).",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self.decision

    def _load_data(self, rows: torch.Tensor | None = None, collected: int | None = None) -> None:
        """(X, Y) onto the model's device, and the clock when there is none yet (M2); with
        ``rows`` (saved :func:`row_keys`), those rows in their saved order, found among the
        data collected now; ``collected``: how many rows were collected then."""
        o = self.options
        X, Y = collect_xy(self._data, batch_to_xy=self._batch_to_xy)
        n_full = X.shape[0]
        missing = 0
        if rows is not None:
            index, missing = find_rows(rows, X, Y)
            if missing and n_full != collected:
                raise ValueError(
                    f"{missing} of the {rows.shape[0]} rows the saved decision was made on are "
                    f"not among the {n_full} training rows given at resume (collected then: "
                    f"{collected if collected is not None else 'unknown'}): resume with the "
                    "data the decision was made on."
                )
            if missing:
                warnings.warn(
                    f"{missing} of the {rows.shape[0]} rows the saved decision was made on are "
                    f"not among the training rows given at resume, which are as many as then "
                    f"({n_full}): taken to be the same rows with other values, as a dataset that "
                    "augments at random gives, the checks read them as they come now.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        if rows is not None and not missing:
            X, Y = X[index.to(X.device)], Y[index.to(Y.device)]
        elif o.max_samples is not None and o.max_samples < n_full:
            X, Y = collect_xy((X, Y), max_samples=o.max_samples, generator=o.seed)
        device, _ = device_dtype(self.model)
        self._X = X.to(device)
        self._Y = as_target_matrix(Y).to(device)
        if self.clock is None:
            self.clock = GradientFlowClock(self.optimizer, o.loss, n_total=n_full)
        self.clock.n_total = n_full

    def resume(self) -> Decision:
        """After :meth:`load_state_dict`: reload the training data for the checks and keep the
        saved decision (the parameters have moved, so a new kernel would answer another
        question). Returns that decision."""
        if self.decision is None or self._baseline is None:
            raise RuntimeError("resume() follows load_state_dict(); use start() for a new run.")
        self._load_data(self._baseline.rows, self._collected)
        assert self._X is not None and self._Y is not None
        shape = (self.decision.n_rows, self.decision.n_outputs)
        outputs = evaluate(self.model, self._X[:1], finite=False).shape[1]
        if tuple(self._Y.shape) != shape or outputs != shape[1]:
            raise ValueError(
                f"this state was saved for n = {shape[0]} rows of K = {shape[1]} outputs, but "
                f"the data give targets of shape {tuple(self._Y.shape)} and the model "
                f"{outputs} outputs: resume with the network and data it was saved from."
            )
        return self.decision

    def _dt_now(self, batch_size_rows: int | None = None) -> float:
        assert self.clock is not None and self._Y is not None
        return self.clock.dt_per_step(batch_size_rows, n_outputs=int(self._Y.shape[1]))

    def step_time(self, batch_rows: Sequence[int] = ()) -> float:
        """Δt of the step about to be taken, read before the optimizer moves (M2).

        ``batch_rows``: the rows of each batch accumulated into this step, for sum-reduced
        losses (empty for mean-reduced ones or full batch). Batches of unequal sizes average
        their losses, so the step moves like a sum over their mean number of rows.
        """
        if self._Y is None:
            raise RuntimeError("call start() (or resume()) before step_time().")
        rows = list(batch_rows)
        if any(isinstance(r, bool) or int(r) != r or r < 1 for r in rows):
            raise ValueError(f"batch_rows must be positive integers (rows per batch); got {rows}.")
        if rows and len(set(rows)) > 1:
            return self._dt_now(1) * (sum(rows) / len(rows))
        return self._dt_now(rows[0] if rows else None)

    # ------------------------------------------------------------------ step
    @property
    def started(self) -> bool:
        return self.decision is not None

    @property
    def t_target(self) -> float:
        """The current stop time in gradient-flow units (re-estimated at refreshes)."""
        return math.nan if self._kernel is None else self._kernel.t_target

    @property
    def t(self) -> float:
        """The gradient-flow time the time rule compares with :attr:`t_target` (M2): the
        clock's under a fixed time map (SGD), else the loss-matched time at the last check;
        0 before the first."""
        if self.clock is None:
            return 0.0
        if self.clock.fixed_map:
            return self.clock.t
        return self.history[-1].t if self.history else 0.0

    @property
    def data(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(X, Y) as the stopper reads them (Y as (n, K)), on the model's device; None before
        start() or resume()."""
        return None if self._X is None or self._Y is None else (self._X, self._Y)

    @property
    def spectrum(self) -> KernelSpectrum | None:
        """The spectrum the rules read now: the initial kernel's, or the last refresh's."""
        return None if self._kernel is None else self._kernel.spectrum

    def step(
        self,
        *,
        dt: float | None = None,
        batch_size_rows: int | None = None,
        skipped: bool = False,
    ) -> bool:
        """Count one optimizer step and return True when the rule says stop (M2, M4).

        Call it after ``optimizer.step()`` and before ``scheduler.step()``, so the clock reads
        the learning rate the step used; or pass ``dt`` read earlier (the Lightning callback
        reads it before the optimizer step). ``batch_size_rows`` is needed for sum-reduced
        losses only. ``skipped=True`` for a step the optimizer did not take (one a
        ``torch.amp.GradScaler`` skipped): no time passes and the momentum count stays.
        """
        if not self.started:
            raise RuntimeError("call start() before the first step() (it computes the decision).")
        if self._X is None:
            raise RuntimeError(
                "after load_state_dict(), call start() before step(): it reloads the training "
                "data for the checks and keeps the saved decision."
            )
        assert self.clock is not None
        if self.should_stop:
            return True
        if dt is not None and (
            isinstance(dt, bool) or not isinstance(dt, (numbers.Real, torch.Tensor))
        ):
            raise TypeError(f"dt must be a number, a step's gradient-flow time; got {dt!r}.")
        if skipped:
            step_dt = 0.0
        elif dt is None:
            step_dt = self._dt_now(batch_size_rows)
        else:
            step_dt = float(dt)
        self.clock.count(step_dt, skipped=skipped)
        k = self.clock.steps
        assert self._baseline is not None and self._kernel is not None

        o = self.options
        if o.refresh_every_n_steps is not None and k % o.refresh_every_n_steps == 0:
            self._refresh(k)
        if k % o.check_every_n_steps != 0:
            return False
        need_residual = o.track_residual or o.rule == "trajectory" or not self.clock.fixed_map
        D = mse = None
        t_now = self.clock.t
        if need_residual:
            D, mse, r_norm2 = self._residual_check()
            if not self.clock.fixed_map:
                # Loss-matched clock (M2): the time at which the linear flow has this residual.
                spectrum = self._kernel.spectrum
                t_now = loss_matched_time(spectrum.eigenvalues, spectrum.z, r_norm2)
        self.history.append(Check(step=k, t=t_now, D=D, train_mse=mse))
        mse0 = self._baseline.mse0
        if mse is not None and mse > _DIVERGED * mse0:
            self._stop(
                k,
                f"diverged: the training MSE rose from {mse0:.4g} to {mse:.4g} "
                f"by step {k}; lower the learning rate",
            )
            warnings.warn(f"remlstop: {self.stopping_reason}.", RuntimeWarning, stacklevel=2)
        elif self.rule == "trajectory":
            if D is not None and D <= 0:
                self._stop(k, f"trajectory rule: D = {D:.3g} <= 0 at step {k}")
        # Under a fixed time map the stop goes to the step nearest t-hat; the loss-matched
        # clock has no step size of its own, so there the first check past t-hat stops.
        elif t_now + (0.5 * step_dt if self.clock.fixed_map else 0.0) >= self._kernel.t_target:
            unstable = (
                " (with an unstable step size: see the warning at start)"
                if self._baseline.unstable
                else ""
            )
            self._stop(
                k,
                f"time rule: t = {t_now:.4g} reached the stop time "
                f"{self._kernel.t_target:.4g}{unstable}",
            )
        return self.should_stop

    def _residual_check(self) -> tuple[float, float, float]:
        """D = u0^T H r - lambda-bar u0^T r on the real residual r (M4), the MSE and ||r||^2."""
        f = evaluate(self.model, self._X, finite=False)
        if not bool(torch.isfinite(f).all()):
            raise FloatingPointError(
                "the model's outputs became NaN or inf during training (diverged): lower the "
                "learning rate."
            )
        base, view = self._baseline, self._kernel
        assert base is not None and view is not None and self._Y is not None
        r = (self._Y.to(torch.float64) - f.to(torch.float64)).reshape(-1).to(base.u0.device)
        D = float(view.Hu0 @ r - view.lam_bar * (base.u0 @ r))
        r_norm2 = float(r @ r)
        return D, r_norm2 / r.numel(), r_norm2

    def _refresh(self, k: int) -> None:
        """Recompute the NTK at the current parameters, record drift, re-estimate t-hat (M6)."""
        with trained_only(self.model, optimizer_parameters(self.model, self.optimizer)):
            H, _ = empirical_ntk(
                self.model, self._X, chunk_size=self.options.chunk_size, return_info=True
            )
        base = self._baseline
        assert base is not None and self.clock is not None
        drift = math.nan
        if base.H0 is not None:
            drift = _kernel_drift(H, base.H0)
        spectrum = KernelSpectrum.from_kernel(H, base.u0)
        t_hat = evaluate_criteria(spectrum).fits[self.options.criterion].t
        self._kernel = KernelView.build(H, base.u0, spectrum, t_hat)
        self.history.append(Check(step=k, t=self.clock.t, drift=drift, t_hat=t_hat))
        logger.info("refresh at step %d: drift %.3g, stop time %.4g", k, drift, t_hat)
        if drift > self.options.drift_threshold:
            warnings.warn(
                f"the NTK drifted by {drift:.1%} (relative Frobenius) at step {k}: the network "
                "is leaving the linearised regime the theory assumes (METHOD M6).",
                RuntimeWarning,
                stacklevel=3,
            )

    def _stop(self, k: int, reason: str) -> None:
        self.should_stop = True
        self.stop_step = k
        self.stopping_reason = reason
        logger.info("remlstop: stop at step %d (%s)", k, reason)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume and stop on exactly the same step.

        Only tensors and plain Python values, so checkpoints load with ``weights_only=True``;
        the decision is rebuilt from the saved initial spectrum on load (cheap and exact).
        """
        if not self.started:
            return {}
        assert self.clock is not None and self.decision is not None
        assert self._baseline is not None and self._kernel is not None
        d = self.decision
        return {
            "clock": self.clock.state_dict(),
            "criterion": self.options.criterion,
            "should_stop": self.should_stop,
            "stop_step": self.stop_step,
            "stopping_reason": self.stopping_reason,
            "baseline": self._baseline.state(),
            "kernel": self._kernel.state(),
            "decision": {
                "train": d.train,
                "target_steps": d.target_steps,
                "dt_per_step": d.dt_per_step,
                "kernel_path": d.kernel_path,
                "n_rows": d.n_rows,
                "n_outputs": d.n_outputs,
                "seconds": dict(d.seconds),
            },
            "history": [asdict(c) for c in self.history],
            "model_parameters": _network_size(self.model),
            "collected_rows": self.clock.n_total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`; then call :meth:`resume` (or
        ``start()``, which resumes) before the next ``step()``."""
        if not state:
            return
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(
                f"not a REMLStopper state: it lacks {missing}; pass what state_dict() returned "
                "(the callback keeps it under its checkpoint entry's 'stopper')."
            )
        saved_size = state.get("model_parameters")
        size = _network_size(self.model)
        if saved_size is not None and int(saved_size) != size:
            raise ValueError(
                f"this state was saved for a network with {int(saved_size)} parameters, but "
                f"this stopper's model has {size}: load it into the network it was saved from."
            )
        saved = state.get("criterion", "reml")
        if saved != self.options.criterion:
            raise ValueError(
                f"this state was saved by a stopper with criterion={saved!r}, but this one has "
                f"criterion={self.options.criterion!r}; resume with the same criterion."
            )
        device, _ = device_dtype(self.model)
        self.clock = GradientFlowClock(self.optimizer, self.options.loss)
        self.clock.load_state_dict(state["clock"])
        self.should_stop = bool(state["should_stop"])
        self.stop_step = state["stop_step"]
        self.stopping_reason = state["stopping_reason"]
        self._collected = state.get("collected_rows")
        self._baseline = Baseline.from_state(state["baseline"], device)
        n_obs = int(state["decision"]["n_rows"]) * int(state["decision"]["n_outputs"])
        if self._baseline.u0.numel() != n_obs:
            raise ValueError(
                f"this state is inconsistent: its residual has {self._baseline.u0.numel()} "
                f"entries for n x K = {n_obs}; it was not saved by state_dict() as it is."
            )
        self._kernel = KernelView.from_state(state["kernel"], device)
        self._X = self._Y = None
        criteria = evaluate_criteria(self._baseline.spectrum)
        self.decision = Decision(
            test=variance_component_test(self._baseline.test_spectrum, alpha=self.options.alpha),
            fit=criteria.fits["reml"],
            criteria=criteria,
            criterion=saved,
            rule=self.options.rule,
            approximation=self._baseline.spectrum.approximation,
            **state["decision"],
        )
        self.history = [Check(**c) for c in state["history"]]


def _network_size(model: nn.Module) -> int:
    """Values in all of the network's parameters, trained or frozen: what tells a state saved
    for another network (freezing schedules change the trained part)."""
    return sum(p.numel() for p in model.parameters())


def _kernel_drift(H: torch.Tensor, H0: torch.Tensor, rows: int = 1024) -> float:
    """‖H − H0‖_F / ‖H0‖_F (METHOD M6) for (N, N) kernels, in blocks of ``rows`` rows: no
    third N x N matrix beside the two."""
    change = sum(
        float(torch.linalg.norm(H[i : i + rows] - H0[i : i + rows]) ** 2)
        for i in range(0, H.shape[0], rows)
    )
    return math.sqrt(change) / float(torch.linalg.norm(H0))


def _covariate_matrix(names: tuple[str, ...], f0: torch.Tensor) -> np.ndarray | None:
    """Z (N, q) float64 in the row-major order of the residual: f0 as one column, an
    intercept as one column per output; None when no column remains."""
    n, k = f0.shape
    columns = []
    for name in names:
        if name == "intercept":
            columns.append(expand_covariates(np.ones((n, 1)), n * k))
        elif bool(f0.any()):
            columns.append(expand_covariates(f0.reshape(-1, 1), n * k))
        else:
            # A network that starts at zero output: y - f0 = y already, nothing to project.
            logger.info("test_covariates: f0 is identically zero; no column added for it")
    return np.hstack(columns) if columns else None
