"""remlstop on a real image data set: a small CNN on scikit-learn's 8x8 handwritten digits.

The 1,797 digits (``sklearn.datasets.load_digits``) are images of shape (1, 8, 8) scaled to
[0, 1]; the ten classes are one-hot float targets and the network is trained on their squared
error (``nn.MSELoss``, ``loss="mse"``), which is the regression the theory covers. The CNN is
Conv(1->8, 3x3) - ReLU - MaxPool(2) - Conv(8->16, 3x3) - ReLU - Linear(256 -> 10), P = 3,818,
trained by full-batch gradient descent (SGD without momentum) from PyTorch's default
initialisation. With ``nn.MSELoss`` one step advances gradient-flow time by 2 * lr (METHOD M2);
with seed 0 the default lr 2 puts 2 * lr * lambda_max at 1.35 on the initial kernel, inside
gradient descent's limit of 2. Other seeds draw other initial kernels (at n = 60, lambda_max
0.59-1.36 for seeds 1-4); there remlstop warns that lr 2 is unstable and names the lr to use
instead.

This network does not stay in the kernel regime: its kernel's top eigenvalue grows during
training until 2 * lr * lambda_max reaches 2, at lr 0.5, 1 and 2 alike (the edge of stability;
the training MSE in the plot oscillates), the "feature learning" case of the README's weak
points. A smaller lr only takes more steps to the same gradient-flow time.

Two modes, chosen by ``--mode``:

* ``plain``: a PyTorch loop with ``remlstop.REMLStopper`` -- ``start()`` before the first step,
  ``step()`` after every ``optimizer.step()``. The loop does not break at the stop: it trains on
  to the budget ``--steps`` so that the stop can be compared with it, and saves the decision
  plot (``--out``).
* ``lightning``: a ``Trainer`` with ``remlstop.lightning.REMLEarlyStopping``, which halts it at
  the stop; a second ``Trainer`` without the callback then trains the same module on to the
  budget (plain SGD keeps no state, so this continues the same run).
* ``both`` (the default): the two, one after the other (the Lightning run only up to its halt),
  and whether they agree. They should: the same seeded initialisation, the same rows in the
  same order, the same optimizer, hence the same decision, the same stop step and the same
  network at the stop.

remlstop reads the training rows only. The held-out test rows exist in this script for one
purpose: to print what the stop is worth (test MSE and accuracy at the stop against the end of
the budget); no decision reads them.

Run (from the repository root)::

    .venv/bin/python examples/digits_cnn.py                    # n = 300, 12,000 steps: 3-4 min
    .venv/bin/python examples/digits_cnn.py --n-train 100 --steps 3000 --mode plain  # ~20 s

The dense kernel is N x N with N = 10 * n-train (n = 300: 3,000 x 3,000, 72 MB in float64);
its eigendecomposition, about 6 s on one thread at n = 300, is most of the decision's cost.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from remlstop import REMLStopper, StopperOptions

HERE = Path(__file__).resolve().parent
N_CLASSES = 10
TEST_EVERY = 10


def load_digits_split(n_train: int, n_test: int, seed: int):
    """Train and test rows from one seeded permutation: the test rows do not depend on n-train."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    if n_train + n_test > len(digits.target):
        raise SystemExit(
            f"--n-train {n_train} + --n-test {n_test} exceeds the {len(digits.target)} digits."
        )
    images = torch.as_tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.as_tensor(digits.target)
    onehot = nn.functional.one_hot(labels, N_CLASSES).float()
    perm = torch.as_tensor(np.random.default_rng(seed).permutation(len(labels)))
    train, test = perm[:n_train], perm[len(perm) - n_test :]
    return images[train], onehot[train], images[test], onehot[test], labels[test]


def make_cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)  # both modes build the same initial network from the seed
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, N_CLASSES),
    )


def held_out_scores(model: nn.Module, data) -> tuple[float, float]:
    """Test MSE = mean over rows and classes of (f - y)^2, and accuracy of the arg-max class."""
    _, _, x_test, y_test, labels_test = data
    with torch.no_grad():
        f = model(x_test)
    return float(((f - y_test) ** 2).mean()), float((f.argmax(1) == labels_test).float().mean())


def run_plain(args, data) -> dict:
    x, y = data[0], data[1]
    model = make_cnn(args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    stopper = REMLStopper(model, x, y, optimizer=opt, loss="mse", criterion=args.criterion)
    decision = stopper.start()  # the test (M5) and every criterion (M4, M9), on (x, y) only
    print(decision)

    train_curve = np.empty(args.steps + 1)
    test_steps, test_curve = [0], [held_out_scores(model, data)[0]]
    stop_step: int | None = 0 if stopper.should_stop else None
    at_stop = held_out_scores(model, data) if stop_step == 0 else None
    loss_fn = nn.MSELoss()
    tic = time.perf_counter()
    for k in range(1, args.steps + 1):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        train_curve[k - 1] = loss.item()
        loss.backward()
        opt.step()
        # Not breaking at the stop, so that the budget's end can be compared with it.
        if stopper.step() and stop_step is None:
            stop_step = k
            at_stop = held_out_scores(model, data)
            print(f"stopper.step() first returned True at step {k}: {stopper.stopping_reason}")
        # The 500-row test forward costs more than a training step: a coarser grid suffices.
        if k % TEST_EVERY == 0 or k == args.steps:
            test_steps.append(k)
            test_curve.append(held_out_scores(model, data)[0])
    with torch.no_grad():
        train_curve[args.steps] = float(loss_fn(model(x), y))
    seconds = time.perf_counter() - tic
    print(f"plain loop: {args.steps} full-batch steps in {seconds:.1f} s")
    test = (np.asarray(test_steps), np.asarray(test_curve))
    _plot(args, stopper, train_curve, test, stop_step)
    best = int(np.argmin(test[1]))
    return {
        "decision": decision,
        "stop_step": stop_step,
        "at_stop": at_stop,
        "at_budget": held_out_scores(model, data),
        "best_step": int(test[0][best]),
        "best_mse": float(test[1][best]),
    }


def _plot(args, stopper, train_curve, test, stop_step) -> None:
    if args.no_plot:
        return
    try:
        import matplotlib.pyplot as plt

        from remlstop.plotting import plot_decision
    except ImportError as err:
        print(f"(no plot: {err})")
        return
    steps = np.arange(args.steps + 1)
    path = args.out / "digits_cnn.png"
    fig = plot_decision(
        stopper,
        path=path,
        train_curve=(steps, train_curve),
        test_curve=test,
        stop_step=stop_step,
    )
    plt.close(fig)
    print(f"plot saved to {path}")


def run_lightning(args, data, to_budget: bool) -> dict:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from remlstop.lightning import REMLEarlyStopping

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)

    class DigitsCNN(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_cnn(args.seed)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # f(x): what the callback reads
            return self.net(x)

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            return nn.functional.mse_loss(self(xb), yb)  # nn.MSELoss: loss="mse"

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=args.lr)

    x, y = data[0], data[1]
    # One batch of all rows, unshuffled: full-batch gradient descent, as in the plain loop.
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x), shuffle=False)
    module = DigitsCNN()

    def trainer(steps: int, callbacks: list) -> pl.Trainer:
        return pl.Trainer(
            max_steps=steps,
            max_epochs=steps,
            callbacks=callbacks,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )

    reml = REMLEarlyStopping(loss="mse", criterion=args.criterion)
    tic = time.perf_counter()
    trainer(args.steps, [reml]).fit(module, loader)
    seconds = time.perf_counter() - tic
    decision = reml.decision
    print(decision)
    stop = reml.stopped_step
    result = {"decision": decision, "stop_step": stop, "at_stop": None}
    if stop is None:
        print(f"Lightning: trained to the budget, {args.steps} steps, in {seconds:.1f} s")
        result["at_budget"] = held_out_scores(module, data)
        return result
    print(f"Lightning: halted at step {stop} in {seconds:.1f} s: {reml.stopping_reason_message}")
    result["at_stop"] = held_out_scores(module, data)
    if to_budget:
        if stop < args.steps:
            trainer(args.steps - stop, []).fit(module, loader)
        result["at_budget"] = held_out_scores(module, data)
    return result


def report(name: str, result: dict, steps: int) -> None:
    d = result["decision"]
    print(
        f"\n[{name}] decision: {'TRAIN' if d.train else 'DO NOT TRAIN'} "
        f"(p = {d.test.pvalue:.3g}); criterion {d.criterion}: stop time t = {d.t_target:.4g} "
        f"= {d.target_steps:.1f} steps; the paper's REML t-hat = {d.fit.t:.4g}; misfit Delta "
        f"= {d.misfit:.1f} nats; kernel {d.kernel_path} path, decision "
        f"{sum(d.seconds.values()):.2f} s"
    )
    if result["stop_step"] is None:
        print(f"[{name}] stop: not reached within {steps} steps")
    else:
        mse_s, acc_s = result["at_stop"]
        print(
            f"[{name}] stop  : step {result['stop_step']:6d}  test MSE {mse_s:.5f}  "
            f"accuracy {acc_s:.4f}"
        )
    if "at_budget" in result:
        mse_b, acc_b = result["at_budget"]
        print(f"[{name}] budget: step {steps:6d}  test MSE {mse_b:.5f}  accuracy {acc_b:.4f}")
    if "best_step" in result:
        print(
            f"[{name}] best test MSE in hindsight (every {TEST_EVERY} steps): step "
            f"{result['best_step']:6d}  test MSE {result['best_mse']:.5f}"
        )


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("plain", "lightning", "both"), default="both")
    p.add_argument("--n-train", type=int, default=300, help="training rows (kernel N = 10 n)")
    p.add_argument("--n-test", type=int, default=500, help="held-out rows, for the report only")
    p.add_argument("--steps", type=int, default=12000, help="step budget (default 12000)")
    p.add_argument("--lr", type=float, default=2.0)
    p.add_argument(
        "--criterion",
        default=StopperOptions().criterion,
        help="remlstop's stop-time criterion (default: the library's, %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="split and initialisation seed")
    p.add_argument(
        "--out", type=Path, default=HERE / "output", help="folder for the plain run's PNG"
    )
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = load_digits_split(args.n_train, args.n_test, args.seed)
    print(
        f"digits: {args.n_train} training rows (N = {N_CLASSES * args.n_train} kernel rows), "
        f"{args.n_test} held-out rows; full-batch SGD, lr {args.lr}, budget {args.steps} steps"
    )
    results: dict[str, dict] = {}
    if args.mode in ("plain", "both"):
        results["plain"] = run_plain(args, data)
    if args.mode in ("lightning", "both"):
        # After a plain run of the same training, its budget's end needs no second run.
        results["lightning"] = run_lightning(args, data, to_budget=args.mode == "lightning")
    for name, result in results.items():
        report(name, result, args.steps)
    if len(results) == 2:
        a, b = results["plain"], results["lightning"]
        same = "the same stop step" if a["stop_step"] == b["stop_step"] else "DIFFERENT stops"
        gap = abs(a["at_stop"][0] - b["at_stop"][0]) if a["at_stop"] and b["at_stop"] else np.nan
        print(
            f"\nplain vs Lightning: {same} ({a['stop_step']} vs {b['stop_step']}); "
            f"|test MSE difference| at the stop {gap:.2g}"
        )
    return results


if __name__ == "__main__":
    main()
