"""Holdout early stopping for the stopping-quality benchmark: Lightning's ``EarlyStopping``.

The network trains by full-batch GD on 80% of the training rows, one batch per epoch, with the
validation MSE on the other 20% checked every epoch; patience 10 and 100, best-validation
weights restored and evaluated on the test rows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from cases import Split, mse
from torch import nn

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
except ImportError:  # pragma: no cover - the standalone package instead of the unified one
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import EarlyStopping
    from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason

VAL_FRACTION = 0.2
Batch = tuple[torch.Tensor, torch.Tensor]


class _HoldoutModule(pl.LightningModule):
    """Full-batch GD on the 80% rows; keeps the best-validation weights for each patience."""

    def __init__(self, net: nn.Module, lr: float, test: tuple[torch.Tensor, torch.Tensor]):
        super().__init__()
        self.net, self.lr = net, lr
        self.x_test, self.y_test = test
        self.test_hist: list[float] = []
        # Strict improvement, EarlyStopping's rule with min_delta = 0: (val, state, epoch).
        self.best = {"p10": (math.inf, None, -1), "p100": (math.inf, None, -1)}
        self.p10_active = True
        self.train_seconds = 0.0
        self._tic = 0.0

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        self._tic = time.perf_counter()

    def on_train_batch_end(self, outputs: object, batch: Batch, batch_idx: int) -> None:
        self.train_seconds += time.perf_counter() - self._tic

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return 0.5 * ((self.net(x) - y) ** 2).mean()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        x, y = batch
        val = ((self.net(x) - y) ** 2).mean()
        self.log("val_mse", val, on_step=False, on_epoch=True)
        self.test_hist.append(mse(self.net, self.x_test, self.y_test))
        for key in ("p10", "p100") if self.p10_active else ("p100",):
            if float(val) < self.best[key][0]:
                state = {k: t.detach().clone() for k, t in self.net.state_dict().items()}
                self.best[key] = (float(val), state, self.current_epoch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=self.lr)


class RecordingEarlyStopping(EarlyStopping):
    """``EarlyStopping`` that records the epoch where it WOULD stop and lets training go on.

    Full-batch GD is deterministic, so the patience-10 run is an exact prefix of the
    patience-100 run: one Lightning run serves both patiences.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.triggered_epoch: int | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate as EarlyStopping does, note the first trigger, undo its stop."""
        if self.triggered_epoch is not None:
            return
        was = trainer.should_stop
        super().on_train_epoch_end(trainer, pl_module)
        if self.stopping_reason != EarlyStoppingReason.NOT_STOPPED:
            self.triggered_epoch = trainer.current_epoch
            pl_module.p10_active = False
        trainer.should_stop = was


@dataclass
class HoldoutRun:
    """Per patience ('holdout_p10', 'holdout_p100'): test MSE, restored and trained steps."""

    test_at: dict[str, float]
    best_step: dict[str, int]
    trained_steps: dict[str, int]
    test_curve: np.ndarray  # test MSE after steps 1.. of the holdout run
    step_s: float


def train_holdout(model: nn.Module, s: Split, lr: float, steps: int, seed: int) -> HoldoutRun:
    """Lightning run on 80% of the training rows with patience 10 and 100 on the other 20%."""
    from torch.utils.data import DataLoader, TensorDataset

    n = s.x_train.shape[0]
    perm = torch.as_tensor(np.random.default_rng(seed).permutation(n))
    n_val = round(VAL_FRACTION * n)
    iv, it = perm[:n_val], perm[n_val:]
    module = _HoldoutModule(model, lr, (s.x_test, s.y_test))
    train_dl = DataLoader(TensorDataset(s.x_train[it], s.y_train[it]), batch_size=len(it))
    val_dl = DataLoader(TensorDataset(s.x_train[iv], s.y_train[iv]), batch_size=len(iv))
    es10 = RecordingEarlyStopping(
        monitor="val_mse", mode="min", patience=10, check_on_train_epoch_end=True
    )
    es100 = EarlyStopping(
        monitor="val_mse", mode="min", patience=100, check_on_train_epoch_end=True
    )
    trainer = pl.Trainer(
        max_epochs=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=1,
        callbacks=[es10, es100],
    )
    trainer.fit(module, train_dl, val_dl)
    epochs = len(module.test_hist)
    out = HoldoutRun({}, {}, {}, np.array(module.test_hist), module.train_seconds / max(epochs, 1))
    p100_stopped = es100.stopping_reason != EarlyStoppingReason.NOT_STOPPED
    for key, stopped in (
        ("p10", es10.triggered_epoch),
        ("p100", es100.stopped_epoch if p100_stopped else None),
    ):
        _, state, epoch = module.best[key]
        model.load_state_dict(state)
        rule = f"holdout_{key}"
        out.test_at[rule] = mse(model, s.x_test, s.y_test)
        out.best_step[rule] = epoch + 1  # weights after epoch e have taken e + 1 steps
        out.trained_steps[rule] = epochs if stopped is None else stopped + 1
    return out
