"""remlstop in PyTorch Lightning: ``REMLEarlyStopping`` on the paper's simple function and MLP.

Mini-batch SGD (batch 32, shuffled) with a learning-rate schedule (linear warm-up, then
constant, stepped every optimizer step). Before the first step the callback tests whether
training is warranted (variance-component test, METHOD M5) and estimates how long to train
(REML for the gradient-flow time t-hat, M4); it then counts time over the real steps, at the
learning rate each step used (M2: warm-up steps count for less), and halts the Trainer mid-epoch
on the step the clock reaches t-hat. No validation split is used: the decision reads the
training data only.

Run (from the repository root)::

    .venv/bin/python examples/lightning_mlp.py          # or: make demo

Reports the decision, the step where training was halted and why, the test MSE there, and how
much of the fit's wall-clock time remlstop took; saves the decision plot
(``examples/output/lightning_mlp.png``). Errors are MSE = mean((f - y)^2); the training loss is
half-MSE, 0.5 * mean((f - y)^2).
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from remlstop.datasets import paper_mlp, paper_simple_function
from remlstop.lightning import REMLEarlyStopping

HERE = Path(__file__).resolve().parent


class Regressor(pl.LightningModule):
    """The paper's MLP (10 -> 500 -> 500 -> 1, ReLU) trained on half-MSE by SGD."""

    def __init__(self, lr: float = 0.01, warmup_steps: int = 50, seed: int = 0) -> None:
        super().__init__()
        self.net = paper_mlp(seed=seed)
        self.lr = lr
        self.warmup_steps = warmup_steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # f(x): what REMLEarlyStopping reads
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * ((self(x) - y) ** 2).mean()  # half-MSE, matches loss="half_mse"

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        warmup = max(1, self.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class CurveRecorder(pl.Callback):
    """Full-data training MSE and test MSE after every optimizer step (for the plot only)."""

    def __init__(self, x, y, x_test, y_test) -> None:
        self.data = (x, y, x_test, y_test)
        self.steps: list[int] = []
        self.train: list[float] = []
        self.test: list[float] = []
        self.seconds = 0.0

    def _record(self, trainer, pl_module) -> None:
        tic = time.perf_counter()
        x, y, x_test, y_test = self.data
        with torch.no_grad():
            self.train.append(float(((pl_module(x) - y) ** 2).mean()))
            self.test.append(float(((pl_module(x_test) - y_test) ** 2).mean()))
        self.steps.append(int(trainer.global_step))
        self.seconds += time.perf_counter() - tic

    def on_train_start(self, trainer, pl_module) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record(trainer, pl_module)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="data, initialisation and shuffling seed")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--max-epochs", type=int, default=500, help="safety cap; remlstop stops first")
    p.add_argument("--out", type=Path, default=HERE / "output", help="folder for the PNG")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)

    x, y, x_test, y_test = paper_simple_function(seed=args.seed)  # 480 train / 120 test rows
    torch.manual_seed(args.seed)  # the DataLoader's shuffling draws from the global RNG
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True)
    module = Regressor(lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed)

    reml = REMLEarlyStopping(loss="half_mse", verbose=True)
    recorder = CurveRecorder(x, y, x_test, y_test)
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        callbacks=[recorder, reml],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    tic = time.perf_counter()
    trainer.fit(module, loader)
    fit_seconds = time.perf_counter() - tic

    decision = reml.decision
    chosen = decision.criteria.fits[decision.criterion]
    print()
    print(
        f"decision: {'TRAIN' if decision.train else 'DO NOT TRAIN'} "
        f"(variance-component test p = {decision.test.pvalue:.3g}); criterion "
        f"{decision.criterion}: stop time t = {chosen.t:.4g} gradient-flow time; the paper's "
        f"REML t-hat = {decision.fit.t:.4g}; misfit Delta = {decision.misfit:.1f} nats; "
        f"kernel path {decision.kernel_path}"
    )
    print(
        f"  ({decision.target_steps:.0f} steps at the warm-up learning rate of step 0; the "
        f"clock counts each real step at its own learning rate, about {chosen.t / args.lr:.0f} "
        f"steps at the full rate {args.lr})"
    )
    stop = reml.stopped_step
    print(
        f"\nhalted at step {stop} (epoch {reml.stopped_epoch}, batch size {args.batch_size}): "
        f"{reml.stopping_reason_message}"
    )
    with torch.no_grad():
        test_stop = float(((module(x_test) - y_test) ** 2).mean())
        train_stop = float(((module(x) - y) ** 2).mean())
    steps = np.asarray(recorder.steps)
    test_curve = np.asarray(recorder.test)
    best = int(np.argmin(test_curve))
    print(
        f"MSE at the stop: train {train_stop:.4f}, test {test_stop:.4f} "
        f"(lowest test MSE seen up to the stop: {test_curve[best]:.4f} at step {steps[best]})"
    )
    overhead = sum(decision.seconds.values())
    own = fit_seconds - recorder.seconds
    parts = ", ".join(f"{k} {v:.3f}" for k, v in decision.seconds.items())
    print(
        f"wall clock: trainer.fit {fit_seconds:.2f} s, of which remlstop's decision "
        f"{overhead:.2f} s ({overhead / own:.1%} of the fit without the plot's curve "
        f"recording, {recorder.seconds:.2f} s); parts: {parts}"
    )

    if not args.no_plot:
        try:
            from remlstop.plotting import plot_decision

            path = args.out / "lightning_mlp.png"
            fig = plot_decision(
                reml,
                path=path,
                train_curve=(steps, np.asarray(recorder.train)),
                test_curve=(steps, test_curve),
                stop_step=stop,
            )
            import matplotlib.pyplot as plt

            plt.close(fig)
            print(f"plot saved to {path}")
        except ImportError as err:
            print(f"(no plot: {err})")
    return {
        "stop_step": float(stop) if stop is not None else float("nan"),
        "test_mse_stop": test_stop,
        "fit_seconds": fit_seconds,
        "remlstop_seconds": overhead,
    }


if __name__ == "__main__":
    main()
