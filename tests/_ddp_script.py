"""Helper for tests/test_lightning.py: a REMLEarlyStopping run under DDP (or one process).

Usage: python tests/_ddp_script.py OUT_DIR DEVICES N_TRAIN  (or call ``run`` in-process)

Lightning's ``ddp`` strategy re-runs this script once per extra rank; every rank writes
``OUT_DIR/rank{r}.json`` with its stop step and its view of the decision. Not a test module
(its name starts with an underscore so pytest does not collect it).
"""

from __future__ import annotations

import json
import os
import sys

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from remlstop.datasets import paper_simple_function
from remlstop.pytorch_lightning import REMLEarlyStopping

LR = 0.05


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * ((self(x) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def _digest(X: torch.Tensor, Y: torch.Tensor) -> list[float]:
    """Order-sensitive fingerprint of the rows the stopper holds (for comparing runs)."""
    X, Y = X.double(), Y.double()
    w = torch.arange(1, X.shape[0] + 1, dtype=torch.float64).unsqueeze(1)
    return [float(X.sum()), float((w * X).sum()), float(Y.sum()), float((w * Y).sum())]


def run(out_dir: str, devices: int, n_train: int) -> None:
    """Train until REMLEarlyStopping stops; each rank writes OUT_DIR/rank{r}.json."""
    x, y, _, _ = paper_simple_function(n=n_train + 50, n_train=n_train)
    # Full batch: one batch per epoch (under DDP each rank's batch is its shard of the data).
    loader = DataLoader(TensorDataset(x, y), batch_size=n_train, shuffle=False, num_workers=0)
    callback = REMLEarlyStopping(loss="half_mse", criterion="reml")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=5000,
        callbacks=[callback],
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(Regressor(), loader)
    d = callback.decision
    assert d is not None
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "stop_step": callback.stopper.stop_step,
        "stopped_step": callback.stopped_step,
        "t_hat": d.fit.t,
        "pvalue": d.test.pvalue,
        "dt": d.dt_per_step,
        "n_rows": d.n_rows,
        "target_steps": d.target_steps,
        "data_digest": _digest(*callback.stopper.data),
    }
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
