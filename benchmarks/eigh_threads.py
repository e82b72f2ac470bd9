"""Dense float64 eigh right after torch work: default BLAS threads vs remlstop's scoped limit.

Usage: ``python benchmarks/eigh_threads.py [--sizes 480 1000 2000] [--repeats 3]``; writes
``benchmarks/results/eigh_threads.md``. For each size the NTK of the paper's MLP is computed
(torch work that leaves torch's OpenMP pool warm), then the same kernel is decomposed three
ways, alternating, each timed right after a fresh NTK call: numpy with the default thread pools,
torch.linalg.eigh with the default pools, and remlstop.linalg.symmetric_eigh. Medians of the
repeats; ratios are measured side by side in this one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from remlstop.datasets import paper_mlp
from remlstop.linalg import eigh_threads, symmetric_eigh
from remlstop.ntk import empirical_ntk

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[480, 1000, 2000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = paper_mlp(seed=0)
    methods = {
        "numpy default": lambda H: np.linalg.eigh(H.numpy()),
        "torch default": lambda H: torch.linalg.eigh(H),
        "remlstop": symmetric_eigh,
    }
    rows = []
    for n in args.sizes:
        x = torch.randn(n, 10, generator=torch.Generator().manual_seed(n))
        times: dict[str, list[float]] = {k: [] for k in methods}
        for _ in range(args.repeats):
            for name, fn in methods.items():
                H = empirical_ntk(model, x)
                tic = time.perf_counter()
                fn(H)
                times[name].append(time.perf_counter() - tic)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((n, med))
        print(n, {k: round(v, 3) for k, v in med.items()}, flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Dense eigh after torch work: thread settings",
        "",
        f"`python benchmarks/eigh_threads.py --sizes {' '.join(map(str, args.sizes))} "
        f"--repeats {args.repeats}` at commit {commit}; {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, load average at the end {os.getloadavg()[0]:.1f}.",
        "",
        "| N | numpy default (s) | torch default (s) | remlstop (s) | remlstop threads | numpy/remlstop | torch/remlstop |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, med in rows:
        r = med["remlstop"]
        lines.append(
            f"| {n} | {med['numpy default']:.3f} | {med['torch default']:.3f} | {r:.3f} | "
            f"{eigh_threads(n)} | {med['numpy default'] / r:.1f}× | {med['torch default'] / r:.1f}× |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "eigh_threads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
