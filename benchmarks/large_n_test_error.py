"""Does the large-N (Nystrom) path's stop-time error matter for prediction? (METHOD M10)

For each criterion, the stop time of ``REMLStopper(kernel='dense').start()`` and of
``REMLStopper(kernel='nystrom', landmarks=m, seed=s).start()`` are read from the decisions
(``Decision.criteria.fits[name].t``, gradient-flow time), and the test error at each is measured
on the network linearised at its initialisation (the model the decision is about, M1): gradient
flow on the kernel gives f_t(x*) = f0(x*) + H*ᵀ V diag((1 - e^{-t lambda}) / lambda) Vᵀ u0,
with H = J Jᵀ / N the training kernel and H* = J Jᵀ(x*) / N the train-test one, both from
``empirical_ntk``. The oracle is the best test error of that flow over t (a grid of 400 times,
log-spaced up to 100x the latest stop). Errors are against the noiseless test function.

Usage (from the repository root)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/large_n_test_error.py --n 3000,10000 \
        --landmarks 1000,2000,4000 --seeds 0,1

Writes ``benchmarks/results/large_n_test_error.md`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from provenance import git_commit

from remlstop import REMLStopper
from remlstop.datasets import paper_mlp, paper_simple_function
from remlstop.ntk import empirical_ntk

RESULTS = Path(__file__).resolve().parent / "results"
N_TEST = 2000


def decision_times(model, x, y, **options) -> dict[str, float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = REMLStopper(model, x, y, optimizer=opt, **options).start()
    return {name: fit.t for name, fit in d.criteria.fits.items()}


class LinearisedFlow:
    """Test MSE of gradient flow on the network's initial kernel, as a function of time."""

    def __init__(self, model, x, y, x_test, f_test) -> None:
        H = empirical_ntk(model, x).numpy()
        cross = empirical_ntk(model, x, x_test).numpy()  # (n_test, N)
        with torch.no_grad():
            u0 = (y.double() - model(x).double()).reshape(-1).numpy()
            self.f0 = model(x_test).double().reshape(-1).numpy()
        lam, V = np.linalg.eigh(H)
        del H
        self.lam = np.clip(lam, 0.0, None)
        self.a = V.T @ u0  # coefficients of u0
        self.B = cross @ V  # (n_test, N)
        self.f = f_test

    def mse(self, t: float) -> float:
        if math.isinf(t):
            gain = np.where(self.lam > 0, 1.0 / np.maximum(self.lam, 1e-300), 0.0)
        else:
            tl = t * self.lam
            gain = np.where(tl > 1e-12, -np.expm1(-tl) / np.maximum(self.lam, 1e-300), t)
        pred = self.f0 + self.B @ (gain * self.a)
        return float(np.mean((pred - self.f) ** 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="3000,10000")
    parser.add_argument("--landmarks", default="1000,2000,4000")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", default="large_n_test_error.md", help="file under results/")
    args = parser.parse_args()
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    tic = time.time()
    commit = git_commit()
    lines: list[str] = []
    summary: dict[str, list[float]] = {}
    criteria: list[str] = []
    for n in ints(args.n):
        x, y, x_test, _ = paper_simple_function(n=n + N_TEST, n_train=n, seed=0)
        clean = paper_simple_function(n=n + N_TEST, n_train=n, noise_sd=0.0, seed=0)[3]
        model = paper_mlp(width=500, depth=2, seed=0)
        flow = LinearisedFlow(model, x, y, x_test, clean.double().reshape(-1).numpy())
        dense = decision_times(model, x, y, kernel="dense")
        criteria = list(dense)
        finite = [t for t in dense.values() if math.isfinite(t)]
        grid = np.geomspace(1e-3 * min(finite), 100 * max(finite), 400)
        oracle = min(flow.mse(t) for t in grid)
        dense_mse = {c: flow.mse(t) for c, t in dense.items()}
        lines.append(
            f"| {n} | dense | — | "
            + " | ".join(f"{dense_mse[c] / oracle:.3f}" for c in criteria)
            + f" | {oracle:.4g} |"
        )
        for m in ints(args.landmarks):
            if m >= n:
                continue
            for seed in ints(args.seeds):
                times = decision_times(model, x, y, kernel="nystrom", landmarks=m, seed=seed)
                cells = []
                for c in criteria:
                    ratio = flow.mse(times[c]) / dense_mse[c]
                    summary.setdefault(c, []).append(ratio)
                    cells.append(f"{flow.mse(times[c]) / oracle:.3f} ({ratio - 1:+.1%})")
                lines.append(f"| {n} | nystrom m = {m} | {seed} | " + " | ".join(cells) + " | |")
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    out = [
        "# Test error at the large-N (Nystrom) stop against the dense stop",
        "",
        f"`OMP_NUM_THREADS={threads} python benchmarks/large_n_test_error.py --n {args.n} "
        f"--landmarks {args.landmarks} --seeds {args.seeds} --out {args.out}` at commit "
        f"{commit}, "
        f"{(time.time() - tic) / 60:.1f} min. The paper's MLP (width 500, depth 2) on the "
        f"paper's simple function ({N_TEST} test rows, noiseless targets), SGD lr 0.01; stop "
        "times from `REMLStopper(...).start()`; test MSE of the network linearised at its "
        "initialisation, trained by gradient flow to each stop time (module docstring).",
        "",
        "Each cell: test MSE at the criterion's stop over the oracle's (the best of that flow), "
        "and in brackets the Nystrom stop's test MSE relative to the dense stop's.",
        "",
        "| n | spectrum | seed | " + " | ".join(criteria) + " | oracle MSE |",
        "|" + "---|" * (len(criteria) + 4),
        *lines,
        "",
        "Nystrom test MSE over dense test MSE, all runs: "
        + "; ".join(
            f"{c} median {np.median(r) - 1:+.1%}, worst {max(r) - 1:+.1%}"
            for c, r in summary.items()
        )
        + ".",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
