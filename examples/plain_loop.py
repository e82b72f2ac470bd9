"""remlstop in a plain PyTorch loop: the paper's simple function and MLP, full-batch GD.

``REMLStopper`` decides before the first step whether training is warranted (the
variance-component test, METHOD M5) and how long to train (REML for the training time, M4);
``stopper.step()`` after each ``optimizer.step()`` counts gradient-flow time (M2) and returns True
at the estimated stop. To show what that stop is worth, this script does not break there: it
trains on to a fixed budget, recording the test MSE at every step, and reports the test error at
the REML stop, at the best step in hindsight and at the end of the budget.

Run (from the repository root)::

    .venv/bin/python examples/plain_loop.py                 # 5,000 steps, ~1-3 min on 2 cores
    .venv/bin/python examples/plain_loop.py --steps 1000    # quicker

Errors are reported as MSE = mean((f - y)^2) on the 120 held-out rows (the training loss is
half of it: half-MSE, 0.5 * mean((f - y)^2); every ratio is the same in either unit).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from remlstop import REMLStopper
from remlstop.datasets import paper_mlp, paper_simple_function

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5000, help="fixed step budget (default 5000)")
    p.add_argument("--seed", type=int, default=0, help="data and initialisation seed")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--out", type=Path, default=HERE / "output", help="folder for the PNG")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: fastest for this model on a busy machine)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    x, y, x_test, y_test = paper_simple_function(seed=args.seed)  # 480 train / 120 test rows
    model = paper_mlp(seed=args.seed)  # 10 -> 500 -> 500 -> 1, ReLU, P = 256,501
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)

    stopper = REMLStopper(model, x, y, optimizer=opt, loss="half_mse")
    decision = stopper.start()  # test (M5) + every criterion (M4, M9), before the first step
    print(decision)
    print()

    def test_mse() -> float:
        with torch.no_grad():
            return float(((model(x_test) - y_test) ** 2).mean())

    train_curve = np.empty(args.steps + 1)
    test_curve = np.empty(args.steps + 1)
    test_curve[0] = test_mse()
    stop_step: int | None = 0 if stopper.should_stop else None
    tic = time.perf_counter()
    for k in range(1, args.steps + 1):
        opt.zero_grad()
        residual = model(x) - y
        loss = 0.5 * (residual**2).mean()  # half-MSE: dt = 2 * 0.5 * lr = lr per step (M2)
        train_curve[k - 1] = 2.0 * loss.item()
        loss.backward()
        opt.step()
        if stopper.step() and stop_step is None:  # after optimizer.step(), before any scheduler
            stop_step = k
            print(f"stopper.step() first returned True at step {k}: {stopper.stopping_reason}")
        test_curve[k] = test_mse()
    with torch.no_grad():
        train_curve[args.steps] = float(((model(x) - y) ** 2).mean())
    seconds = time.perf_counter() - tic

    best = int(np.argmin(test_curve))
    stop_mse = test_curve[stop_step] if stop_step is not None else float("nan")
    print(
        f"\ntrained {args.steps} full-batch GD steps (lr {args.lr}) in {seconds:.1f} s; "
        f"remlstop's decision took {sum(decision.seconds.values()):.2f} s"
    )
    print("test MSE = mean((f - y)^2) on 120 held-out rows (half-MSE is half of it):")
    if stop_step is None:
        print(
            f"  {decision.criterion} stop : not reached within {args.steps} steps "
            f"(target {decision.target_steps:.0f} steps)"
        )
    else:
        print(f"  {decision.criterion} stop : step {stop_step:5d}  test MSE {stop_mse:.4f}")
    print(f"  best in hindsight: step {best:5d}  test MSE {test_curve[best]:.4f}")
    print(f"  fixed budget  : step {args.steps:5d}  test MSE {test_curve[-1]:.4f}")
    ratio = stop_mse / test_curve[best]
    print(
        f"  ratio test MSE at the stop / best = {ratio:.4f}; "
        f"at the budget / best = {test_curve[-1] / test_curve[best]:.4f}"
    )

    try:
        from remlstop.plotting import plot_decision
    except ImportError:  # pragma: no cover
        plot_decision = None
    if plot_decision is not None:
        try:
            steps = np.arange(args.steps + 1)
            path = args.out / "plain_loop.png"
            fig = plot_decision(
                stopper,
                path=path,
                train_curve=(steps, train_curve),
                test_curve=(steps, test_curve),
                stop_step=stop_step,
            )
            import matplotlib.pyplot as plt

            plt.close(fig)
            print(f"plot saved to {path}")
        except ImportError as err:
            print(f"(no plot: {err})")
    return {
        "stop_step": float("nan") if stop_step is None else float(stop_step),
        "best_step": float(best),
        "test_mse_stop": float(stop_mse),
        "test_mse_best": float(test_curve[best]),
        "test_mse_budget": float(test_curve[-1]),
    }


if __name__ == "__main__":
    main()
