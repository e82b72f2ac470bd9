"""The Lightning callback's body, written once for both Lightning packages (METHOD M2, M4-M6).

Every number (test, criteria, clock, rule) comes from :class:`remlstop.REMLStopper`; this module
only moves data and decisions between a ``Trainer`` and the stopper. ``remlstop.lightning`` and
``remlstop.pytorch_lightning`` each combine it with their package's ``Callback``.

What the callback does
----------------------
* ``on_train_start``: collects (X, Y) from ``trainer.train_dataloader`` (or ``data=``), takes the
  optimizer ``trainer.optimizers[0]``, builds the :class:`~remlstop.REMLStopper` and calls
  ``start()`` (test M5 + criteria M4, M9) -- or, when resuming from a checkpoint, restores the
  saved decision and clock. When the test finds no signal and ``on_insignificant='stop'``, the
  trainer stops before any optimizer update.
* ``on_before_optimizer_step``: reads Δt of the step about to happen from the stopper's clock
  (M2). Lightning 2.x steps step-interval LR schedulers *before* ``on_train_batch_end``, so the
  learning rate must be read here. A batch whose ``training_step`` returned ``None`` leaves every
  gradient unset, so the optimizer moves nothing: it counts as a step of Δt = 0.
* ``on_train_batch_end``: for each optimizer step of this batch (none while gradients accumulate)
  calls ``stopper.step(dt=...)``; when it says stop, sets ``trainer.should_stop`` -- mid-epoch --
  and keeps setting it on every later batch, so ``min_steps``/``min_epochs`` delay the stop to the
  first allowed step and no further.
* Metrics ``remlstop/pvalue``, ``remlstop/t_hat`` (the chosen criterion's stop time),
  ``remlstop/target_steps``, ``remlstop/df``, ``remlstop/misfit`` (Delta, nats), ``remlstop/t``
  (clock time) and ``remlstop/D`` (when the residual is tracked) are logged with
  ``pl_module.log`` from ``on_train_batch_end`` -- at the first step, every
  ``trainer.log_every_n_steps`` steps and at the stop (``pl_module.log`` is too slow to call on
  every step of a small model) -- and sent to ``trainer.loggers`` at train start (where Lightning
  forbids ``pl_module.log``). ``callback.metrics`` always holds the current values.
* ``state_dict``/``load_state_dict`` delegate to the stopper's (tensors and plain values only, so
  checkpoints load with ``weights_only=True``); a resumed run stops on the same step.

Distributed data parallel
-------------------------
Each rank sees a shard of the data. The shards are gathered (``all_gather_object``) so that every
rank holds the full (X, Y); with Lightning's ``DistributedSampler`` every row is put back at its
dataset index and the sampler's padding repeats are counted once, so the data equal the
single-process data, in the same order (other samplers: the shards are concatenated). Rank 0
alone computes the kernel, test and criteria and broadcasts the stopper's state; the other ranks
load it, so the decision is one decision. Every stop signal is reduced across ranks
(``reduce_boolean_decision``): all ranks stop on the same step. The clock needs no correction:
each rank's mean-reduced batch loss, with gradients averaged across ranks, moves the parameters
by the full-batch expected update, the same Δt per step as one process (M2); a sum-reduced loss
is counted with each rank's own batch rows, as DDP averages the ranks' sums. With ``data=`` the
tensors are taken as the full data on every rank and not gathered.

Requirements on the LightningModule: ``forward(x)`` returns the network outputs f(x), shape
(n,) or (n, K) (or pass ``model=``: the sub-module, or its attribute name, that maps x to f), and
``training_step`` minimises the squared-error loss named by ``loss`` (``"half_mse"`` is
``0.5 * mean((f - y)**2)``, ``"mse"`` is ``nn.MSELoss()``). One optimizer.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._trainer_data import distributed, trainer_xy
from .clock import LossSpec
from .data import collect_xy, default_batch_adapter
from .decision import Check, Decision
from .options import StopperOptions
from .stopper import REMLStopper

__all__ = ["REMLEarlyStoppingBody", "bind"]

logger = logging.getLogger("remlstop")

# The import each Lightning package's users write, for messages that name the right one.
IMPORTS = {
    "lightning.pytorch": "from remlstop.lightning import REMLEarlyStopping",
    "pytorch_lightning": "from remlstop.pytorch_lightning import REMLEarlyStopping",
}
_PIP = {"lightning.pytorch": "lightning", "pytorch_lightning": "pytorch-lightning"}


def bind(package: str, module: str) -> type:
    """``REMLEarlyStopping`` as a subclass of ``package``'s ``Callback``, to be the attribute
    of the remlstop module ``module`` (so it pickles by name). ImportError names the pip
    command when the package is missing."""
    try:
        pl = importlib.import_module(package)
        early_stopping = importlib.import_module(f"{package}.callbacks.early_stopping")
    except ImportError as err:
        other = next(p for p in IMPORTS if p != package)
        raise ImportError(
            f"{module} needs the `{_PIP[package]}` package ({err}): pip install "
            f"{_PIP[package]} (or pip install 'remlstop[{_PIP[package]}]'). With `{other}` "
            f"installed instead, write `{IMPORTS[other]}`."
        ) from err
    return type(
        "REMLEarlyStopping",
        (REMLEarlyStoppingBody, pl.Callback),
        {
            "__module__": module,
            "__qualname__": "REMLEarlyStopping",
            "__doc__": REMLEarlyStoppingBody.__doc__,
            "_pl_package": package,
            "_es_module": early_stopping,
        },
    )


# ---------------------------------------------------------------------------------- helpers
def _batch_rows(batch: Any, batch_to_xy: Callable | None) -> int:
    x, _ = (batch_to_xy or default_batch_adapter)(batch)
    return int(x.shape[0])


def _grad_norm(optimizer: Any) -> float:
    """The total 2-norm of the optimizer's gradients, as ``clip_grad_norm_`` computes it."""
    grads = [
        p.grad.detach() for g in optimizer.param_groups for p in g["params"] if p.grad is not None
    ]
    if not grads:
        return 0.0
    return float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    )


def _has_gradients(optimizer: Any) -> bool:
    return any(p.grad is not None for g in optimizer.param_groups for p in g["params"])


def _fingerprint(model: nn.Module) -> tuple[tuple[int, ...], float]:
    """The model's parameter objects and a checksum of their values: a later fit of the same
    network, as this fit left it, has both."""
    params = list(model.parameters())
    with torch.no_grad():
        total = sum(float((p.double() * (1.0 + i)).sum()) for i, p in enumerate(params))
    return tuple(id(p) for p in params), total


def _scaler_skips(trainer: Any, grad_norm: Callable[[], float]) -> bool:
    """Whether the precision plugin's gradient scaler will skip this step: Lightning unscales
    the gradients before this hook, and ``GradScaler.step`` skips the step exactly when they
    hold an inf or NaN (16-bit mixed precision on a GPU), so no gradient-flow time passes."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return False
    return not math.isfinite(grad_norm())


def _accumulation_factor(trainer: Any, pl_module: Any, batches: int) -> float:
    """The step's scale under gradient accumulation: Lightning divides every batch's loss by
    ``accumulate_grad_batches``, also on the last step of an epoch, which gets the batches left
    over, so that step moves ``batches / accumulate_grad_batches`` of a full one (M2)."""
    accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
    if accumulate == 1 or not getattr(pl_module, "automatic_optimization", True):
        return 1.0
    return batches / accumulate


class REMLEarlyStoppingBody:
    """Stop Lightning training at the REML estimate of the training time (METHOD M2, M4-M6).

    A thin adapter over :class:`remlstop.REMLStopper`: before the first step it tests whether
    training is warranted (M5) and estimates the stop time t-hat by REML on the empirical NTK
    (M4); it then counts gradient-flow time over the optimizer steps (M2) and stops the trainer
    on the step the rule names -- mid-epoch if need be, on the same step on every DDP rank.

    Args:
        loss: the training loss, 'half_mse' (``0.5 * mean((f - y)**2)``), 'mse', 'half_sum',
            'sum' or an ``nn.MSELoss``; classification losses are refused (M1, M6).
        batch_to_xy: function batch -> (x, y) for batches that are not ``(x, y)`` pairs or dicts
            with 'x'/'y' or 'input'/'target' keys.
        data: an ``(X, Y)`` pair of tensors to use instead of the train dataloader (taken as the
            full data on every rank under DDP).
        model: the network f whose NTK is computed: None (the LightningModule, whose
            ``forward(x)`` must return f(x)), an attribute name of the LightningModule (e.g.
            ``"net"``), or a function ``pl_module -> nn.Module``.
        verbose: log the decision and the stop (rank-aware, like ``EarlyStopping``).
        log_rank_zero_only: log from rank 0 only (the decision is the same on every rank).
        **options: the stopper's options (``criterion=``, ``rule=``, ``alpha=``,
            ``on_insignificant=``, ...), the fields of :class:`remlstop.StopperOptions`, where
            each is documented; validated here, at construction.

    Attributes:
        stopper: the :class:`~remlstop.REMLStopper` (None before ``on_train_start``).
        decision: the stopper's :class:`~remlstop.Decision` (None before training starts).
        history: the stopper's list of :class:`~remlstop.stopper.Check`.
        stopped_epoch: epoch at which training was stopped (0 if it was not).
        stopped_step: ``trainer.global_step`` at which training was stopped (None if it was
            not); differs from ``stopper.stop_step`` only when ``min_steps``/``min_epochs``
            delayed the stop.
        stopping_reason_message: why training stopped (None if it was not).
        metrics: the current metric values (``remlstop/...``), as floats.
    """

    # Set by each package's subclass: the package name and its early_stopping module (for the
    # EarlyStoppingReason enum that EarlyStopping users read).
    _pl_package: str = ""
    _es_module: Any = None

    def __init__(
        self,
        loss: str | nn.Module | LossSpec = "half_mse",
        *,
        batch_to_xy: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] | None = None,
        data: tuple[torch.Tensor, torch.Tensor] | None = None,
        model: str | nn.Module | Callable[[Any], nn.Module] | None = None,
        verbose: bool = False,
        log_rank_zero_only: bool = True,
        **options: Any,
    ) -> None:
        super().__init__()
        self.verbose = verbose
        self.log_rank_zero_only = log_rank_zero_only
        self.stopped_epoch = 0
        self.stopping_reason = self._reason("NOT_STOPPED")
        self.stopping_reason_message: str | None = None
        if data is not None and not (
            isinstance(data, (tuple, list))
            and len(data) == 2
            and all(isinstance(d, torch.Tensor) for d in data)
        ):
            raise TypeError(
                "data must be None (use the train dataloader) or an (X, Y) pair of tensors; got "
                f"{type(data).__name__}."
            )
        try:
            self.options = StopperOptions(loss=loss, **options)
        except TypeError as err:
            raise TypeError(
                f"{err}; REMLEarlyStopping takes the fields of remlstop.StopperOptions as options."
            ) from None
        self.batch_to_xy = batch_to_xy
        self._data = data
        self._model_spec = model
        self.stopper: REMLStopper | None = None
        self.stopped_step: int | None = None
        self.metrics: dict[str, float] = {}
        self._pending_state: dict[str, Any] | None = None
        self._stop_signalled = False
        self._step_dts: list[float | None] = []
        self._rows_since_step: list[int] = []
        self._batches_since_step = 0
        self._global_step_seen = 0
        self._fit_end_parameters: tuple[tuple[int, ...], float] | None = None
        self._logged_once = False
        self._warned_clip = False

    # ------------------------------------------------------------------ public views
    @property
    def decision(self) -> Decision | None:
        return None if self.stopper is None else self.stopper.decision

    @property
    def history(self) -> list[Check]:
        return [] if self.stopper is None else self.stopper.history

    @property
    def state_key(self) -> str:
        # The same key for both packages' classes, so a checkpoint moves between them.
        return f"REMLEarlyStopping{{'rule': {self.options.rule!r}}}"

    def _reason(self, name: str) -> Any:
        """Lightning's ``EarlyStoppingReason`` member (its name where the enum does not exist)."""
        enum = getattr(self._es_module, "EarlyStoppingReason", None)
        return getattr(enum, name) if enum is not None else name

    # ----------------------------------------------------------------------- set-up
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        trainer_cls = importlib.import_module(self._pl_package).Trainer
        if not isinstance(trainer, trainer_cls):
            other = next(p for p in IMPORTS if p != self._pl_package)
            raise TypeError(
                f"this REMLEarlyStopping is a {self._pl_package} callback, but the Trainer comes "
                f"from another package ({type(trainer).__module__}). With {other}.Trainer use "
                f"`{IMPORTS[other]}`."
            )

    def _resolve_model(self, pl_module: Any) -> nn.Module:
        spec = self._model_spec
        if spec is None:
            return pl_module
        if isinstance(spec, nn.Module):
            return spec
        if isinstance(spec, str):
            model = getattr(pl_module, spec, None)
            if not isinstance(model, nn.Module):
                raise ValueError(
                    f"model={spec!r}: the LightningModule has no sub-module of that name."
                )
            return model
        if callable(spec):
            model = spec(pl_module)
            if not isinstance(model, nn.Module):
                raise TypeError(
                    f"model(pl_module) must return an nn.Module, got {type(model).__name__}."
                )
            return model
        raise TypeError(
            f"model must be None, a str, an nn.Module or a callable; got {type(spec).__name__}."
        )

    def _collect(self, trainer: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self._data is not None:
            return collect_xy(tuple(self._data))  # an (X, Y) pair, not a batch for batch_to_xy
        return trainer_xy(trainer, self.batch_to_xy)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._step_dts, self._rows_since_step, self._batches_since_step = [], [], 0
        self._global_step_seen = int(trainer.global_step)
        self.stopped_step = None
        self._logged_once = False
        if trainer.fast_dev_run:
            self.stopper = None
            self._log(trainer, "REMLEarlyStopping is disabled under fast_dev_run.")
            return
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(
                f"REMLEarlyStopping needs exactly one optimizer (its learning rate is the clock, "
                f"METHOD M2); configure_optimizers returned {len(optimizers)}."
            )
        X, Y = self._collect(trainer)
        model = self._resolve_model(pl_module)
        stopper = REMLStopper(model, (X, Y), optimizer=optimizers[0], options=self.options)
        pending, self._pending_state = self._pending_state, None
        previous = self.stopper
        # A second fit of the network this callback decided for, as the first fit left it,
        # continues that decision: a decision made now would not be made at its start.
        continuing = not pending and previous is not None and previous.started
        continuing = continuing and self._fit_end_parameters == _fingerprint(model)
        if continuing:
            assert previous is not None
            pending = previous.state_dict()
            if optimizers[0] is not previous.optimizer:  # configure_optimizers made a new one
                pending["clock"] = {**pending["clock"], "momentum_buffer": None}
                pending["clock"]["warm_start"] = False
        elif not pending:  # a new run (a second fit of another network): nothing carried
            self._stop_signalled = False
            self.stopped_epoch = 0
            self.stopping_reason_message = None
            self.stopping_reason = self._reason("NOT_STOPPED")
        if pending:
            stopper.load_state_dict(pending)  # a resumed run keeps the saved decision
            try:
                stopper.resume()
            except ValueError as err:
                if not continuing:
                    raise
                raise ValueError(
                    f"{err} This callback decided for this network in an earlier fit; for a new "
                    "decision on other data, use a new REMLEarlyStopping."
                ) from err
            steps = stopper.clock.steps if stopper.clock is not None else 0
            if continuing:
                done = "; it had stopped, so this fit stops at once" if stopper.should_stop else ""
                self._log(
                    trainer,
                    f"REMLEarlyStopping continues the decision of this network's earlier fit, "
                    f"after its {steps} counted steps{done}.",
                )
            elif not stopper.should_stop and steps != trainer.global_step:
                logger.warning(
                    "REMLEarlyStopping resumed with %d counted steps but trainer.global_step = %d; "
                    "the stop step will be off by the difference.",
                    steps,
                    trainer.global_step,
                )
            if self.verbose:
                t_now = stopper.clock.t if stopper.clock is not None else 0.0
                self._log(
                    trainer,
                    f"REMLEarlyStopping resumed at step {steps} (t = {t_now:.4g}); keeping the "
                    "saved decision.",
                )
        elif distributed(trainer):
            self._start_on_rank_zero(trainer, stopper)
        else:
            stopper.start()
        self.stopper = stopper
        self._update_metrics()
        for lg in trainer.loggers:
            lg.log_metrics(dict(self.metrics), step=trainer.global_step)
        if self.verbose and stopper.decision is not None and not pending:
            self._log(trainer, stopper.decision.summary())
        if stopper.should_stop or self._stop_signalled:
            self._signal_stop(trainer)

    def _start_on_rank_zero(self, trainer: Any, stopper: REMLStopper) -> None:
        """Rank 0 decides; the others load its state, so every rank holds one decision."""
        payload: tuple[str, Any] | None = None
        error: BaseException | None = None
        if trainer.global_rank == 0:
            try:
                stopper.start()
                payload = ("ok", stopper.state_dict())
            except Exception as err:  # the other ranks wait in broadcast: tell them, then raise
                error = err
                payload = ("error", f"{type(err).__name__}: {err}")
        payload = trainer.strategy.broadcast(payload, src=0)
        if error is not None:
            raise error
        if payload[0] == "error":
            raise RuntimeError(f"REMLEarlyStopping failed on rank 0: {payload[1]}")
        if trainer.global_rank != 0:
            stopper.load_state_dict(payload[1])
            stopper.resume()  # loads the data for the checks; keeps rank 0's decision

    # ------------------------------------------------------------------------ steps
    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        stopper = self.stopper
        self._batches_since_step += 1
        if stopper is not None and stopper.loss.reduction == "sum":
            self._rows_since_step.append(_batch_rows(batch, self.batch_to_xy))

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        stopper = self.stopper
        if stopper is None or stopper.clock is None or stopper.decision is None:
            return
        rows, batches = self._rows_since_step, self._batches_since_step
        self._rows_since_step, self._batches_since_step = [], 0
        # The gradients' norm, read by the scaler's check and by norm clipping: once a step.
        grad_norm = functools.cache(lambda: _grad_norm(optimizer))
        if not _has_gradients(optimizer) or _scaler_skips(trainer, grad_norm):
            # training_step returned None (Lightning still calls this hook and counts a global
            # step, but the optimizer skips every parameter), or the scaler skips the step: no
            # gradient-flow time passes and the momentum buffer stays (None marks it).
            self._step_dts.append(None)
            return
        dt = stopper.step_time(rows)
        factor = self._clip_factor(trainer, grad_norm) * _accumulation_factor(
            trainer, pl_module, batches
        )
        self._step_dts.append(dt * factor)

    def _clip_factor(self, trainer: Any, grad_norm: Callable[[], float]) -> float:
        """The step's scale under gradient clipping, which Lightning applies after this hook.

        Norm clipping scales the whole update by min(1, c / ||g||): the step then moves like one
        at that fraction of the learning rate, so its time does too (M2). Value clipping changes
        the direction as well; it is warned about and ignored.
        """
        clip = getattr(trainer, "gradient_clip_val", None)
        if not clip:
            return 1.0
        algorithm = getattr(trainer, "gradient_clip_algorithm", None)
        if algorithm is not None and algorithm != "norm":  # Lightning's default is norm
            if not self._warned_clip:
                self._warned_clip = True
                warnings.warn(
                    "gradient_clip_algorithm='value' changes the direction of each update, which "
                    "the gradient-flow clock (METHOD M2) cannot count; the stop assumes "
                    "unclipped steps. Use norm clipping, which the clock counts exactly.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return 1.0
        # torch.nn.utils.clip_grad_norm_'s coefficient, eps included.
        return min(1.0, float(clip) / (grad_norm() + 1e-6))

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stopper = self.stopper
        if stopper is None:
            return
        # LBFGS evaluates its closure, and Lightning calls on_before_optimizer_step, several
        # times per step: the global step counts the steps; the first reading is the step's.
        taken = int(trainer.global_step) - self._global_step_seen
        self._global_step_seen = int(trainer.global_step)
        dts = self._step_dts[: max(taken, 0)] if len(self._step_dts) > taken else self._step_dts
        if self._step_dts:  # an optimizer step happened on this batch (not while accumulating)
            for dt in dts:
                if dt is None:
                    stopper.step(skipped=True)
                else:
                    stopper.step(dt=dt)
            self._step_dts = []
            # The same number of steps on every rank, so every rank reaches this collective.
            stop = trainer.strategy.reduce_boolean_decision(bool(stopper.should_stop), all=False)
            self._stop_signalled = self._stop_signalled or bool(stop)
            self._update_metrics()
            # pl_module.log costs ~2 ms a call: log on the trainer's logging cadence, at the
            # first step and at the stop (``self.metrics`` is always current).
            every = max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1))
            if not self._logged_once or self._stop_signalled or trainer.global_step % every == 0:
                self._logged_once = True
                for name, value in self.metrics.items():
                    pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)
        if self._stop_signalled or stopper.should_stop:
            self._signal_stop(trainer)

    def _signal_stop(self, trainer: Any) -> None:
        """Ask the trainer to stop; repeated on every batch until min_steps/min_epochs allow it."""
        first = not self._stop_signalled or self.stopping_reason_message is None
        self._stop_signalled = True
        trainer.should_stop = True
        self.stopped_epoch = trainer.current_epoch
        if first:
            stopper = self.stopper
            reason = (
                stopper.stopping_reason
                if stopper is not None and stopper.stopping_reason
                else "another rank's stopper said stop"
            )
            self.stopping_reason_message = (
                f"REMLEarlyStopping: {reason}. Signaling Trainer to stop."
            )
            self.stopping_reason = self._reason("STOPPING_THRESHOLD")
            if self.verbose:
                self._log(trainer, self.stopping_reason_message)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._stop_signalled:
            self.stopped_step = int(trainer.global_step)
        if self.stopper is not None:
            self._fit_end_parameters = _fingerprint(self.stopper.model)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.stopper is None and not trainer.fast_dev_run and trainer.num_training_batches == 0:
            raise ValueError(
                "REMLEarlyStopping: the train dataloader has no batches, so nothing was trained "
                "and no decision was made; check the dataset and limit_train_batches."
            )

    # ---------------------------------------------------------------------- metrics
    def _update_metrics(self) -> None:
        stopper = self.stopper
        if stopper is None or stopper.decision is None:
            return
        d = stopper.decision
        m = {
            "remlstop/pvalue": float(d.test.pvalue),
            "remlstop/t_hat": float(stopper.t_target),
            "remlstop/target_steps": float(d.target_steps),
            "remlstop/df": float(d.fit.df),
            "remlstop/misfit": float(d.misfit),
            "remlstop/t": float(stopper.t),
        }
        last_D = next((c.D for c in reversed(stopper.history) if c.D is not None), None)
        if last_D is not None:
            m["remlstop/D"] = float(last_D)
        self.metrics = m

    def _log(self, trainer: Any, message: str) -> None:
        """Log at INFO, as EarlyStopping does: rank 0 only, or every rank with its rank named."""
        rank = int(getattr(trainer, "global_rank", 0))
        if trainer.world_size > 1:
            if self.log_rank_zero_only and rank != 0:
                return
            if not self.log_rank_zero_only:
                message = f"[rank: {rank}] {message}"
        logger.info(message)

    # ------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        if self.stopper is not None and self.stopper.started:
            stopper_state = self.stopper.state_dict()
        else:
            stopper_state = dict(self._pending_state or {})
        return {
            "stopper": stopper_state,
            "stop_signalled": bool(self._stop_signalled),
            "stopped_epoch": int(self.stopped_epoch),
            "stopped_step": self.stopped_step,
            "stopping_reason_message": self.stopping_reason_message,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the stopper's state for ``on_train_start`` (the optimizer exists only then)."""
        self._pending_state = dict(state_dict.get("stopper") or {})
        self._stop_signalled = bool(state_dict.get("stop_signalled", False))
        self.stopped_epoch = int(state_dict.get("stopped_epoch", 0))
        self.stopped_step = state_dict.get("stopped_step")
        self.stopping_reason_message = state_dict.get("stopping_reason_message")

    def __repr__(self) -> str:
        o = self.options
        return (
            f"{type(self).__name__}(loss={o.loss.name!r}, alpha={o.alpha}, "
            f"criterion={o.criterion!r}, rule={o.rule!r}, on_insignificant={o.on_insignificant!r})"
        )
