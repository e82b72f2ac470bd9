"""Largest eigenvalue of the empirical NTK at θ0 per case and network (picks the benchmark's lr).

Gradient descent on the half-MSE loss is stable for the linearised model when lr·λ_max(H) < 2
(METHOD M2); the stopping-quality benchmark keeps lr·λ_max < 1. This prints λ_max of
H = J Jᵀ / N over a few repetitions (the benchmark's data and initialisation seeds) for every
case and network, and the largest lr that keeps lr·λ_max below the margin on all of them.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lambda_max.py --reps 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from cases import CASES, NETS, build_net, load_case

from remlstop import empirical_ntk


def lambda_max(case: str, net: str, rep: int) -> float:
    """λ_max of H at θ0 for repetition ``rep`` (same seeds as ``stopping_quality.py``)."""
    s = load_case(case, rep)
    model = build_net(net, s.x_train.shape[1], 5000 + rep)
    H = empirical_ntk(model, s.x_train).numpy()
    return float(np.linalg.eigvalsh(H)[-1])


def main(argv: list[str] | None = None) -> None:
    """Print λ_max per case and net, and the lr bounds it implies."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--nets", default=",".join(NETS))
    p.add_argument("--margin", type=float, default=0.5, help="target lr·λ_max (< 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print("| case | net | n_train | λ_max min | λ_max max | seconds |")
    print("|---|---|---|---|---|---|")
    worst: dict[str, float] = {}
    for net in args.nets.split(","):
        for case in args.cases.split(","):
            tic = time.perf_counter()
            lams = [lambda_max(case, net, rep) for rep in range(args.reps)]
            n = load_case(case, 0).x_train.shape[0]
            worst[net] = max(worst.get(net, 0.0), max(lams))
            print(
                f"| {case} | {net} | {n} | {min(lams):.3f} | {max(lams):.3f} | "
                f"{time.perf_counter() - tic:.1f} |",
                flush=True,
            )
    for net, lam in worst.items():
        print(
            f"{net}: max λ_max = {lam:.3f}; lr for lr·λ_max = {args.margin}: "
            f"{args.margin / lam:.4f}; lr·λ_max < 1 needs lr < {1 / lam:.4f}"
        )


if __name__ == "__main__":
    main()
