"""Dense float64 eigh right after torch work: default BLAS threads vs remlstop's scoped limit,
and the full eigendecomposition vs the eigenvalues-plus-projection that the statistics need.

Usage: ``python benchmarks/eigh_threads.py [--sizes 480 1000 2000] [--repeats 3]``; writes
``benchmarks/results/eigh_threads.md``. For each size the NTK of the paper's MLP is computed
(torch work that leaves torch's OpenMP pool warm), then the same kernel is decomposed three
ways, alternating, each timed right after a fresh NTK call: numpy with the default thread pools,
torch.linalg.eigh with the default pools, remlstop.linalg.symmetric_eigh, and
remlstop.linalg.spectral_projection (eigenvalues and z = V^T u for one vector u, without V: what
KernelSpectrum.from_kernel calls). The first three return all eigenvectors; the full-eigh times
include nothing else, so ``symmetric_eigh/projection`` understates what the projection saves by
the V^T u product. Medians of the repeats; ratios are measured side by side in this one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import scipy.linalg.lapack as lapack
import torch
from provenance import git_commit

from remlstop.datasets import paper_mlp
from remlstop.linalg import (
    _tridiagonal_projection,
    blas_threads,
    eigh_threads,
    spectral_projection,
    symmetric_eigh,
)
from remlstop.ntk import empirical_ntk

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[480, 1000, 2000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = paper_mlp(seed=0)
    methods = {
        "numpy default": lambda H, u: np.linalg.eigh(H.numpy()),
        "torch default": lambda H, u: torch.linalg.eigh(H),
        "remlstop": lambda H, u: symmetric_eigh(H),
        "projection": lambda H, u: spectral_projection(H.numpy(), u),
    }
    # The tridiagonal stage of the projection alone, on one T = Q^T H Q: MRRR in blocks (what
    # spectral_projection runs, a quarter of the eigenvectors at a time) against divide and
    # conquer with all N^2 eigenvectors (what it ran before, twice the memory).
    tridiagonal = {
        "mrrr blocks": lambda d, e, w: _tridiagonal_projection(d, e, w, w.shape),
        "divide and conquer": lambda d, e, w: lapack.dstevd(d, e, compute_v=1)[1].T @ w,
    }
    rows = []
    for n in args.sizes:
        x = torch.randn(n, 10, generator=torch.Generator().manual_seed(n))
        u = np.random.default_rng(n).standard_normal(n)
        times: dict[str, list[float]] = {k: [] for k in (*methods, *tridiagonal)}
        for _ in range(args.repeats):
            for name, fn in methods.items():
                H = empirical_ntk(model, x)
                tic = time.perf_counter()
                fn(H, u)
                times[name].append(time.perf_counter() - tic)
        H = empirical_ntk(model, x).numpy()
        _, diag, offdiag, _, _ = lapack.dsytrd(H, lower=1)
        w = u.reshape(-1, 1)
        for _ in range(args.repeats):
            for name, fn in tridiagonal.items():
                tic = time.perf_counter()
                with blas_threads(eigh_threads(n)):
                    fn(diag, offdiag, w)
                times[name].append(time.perf_counter() - tic)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((n, med))
        print(n, {k: round(v, 3) for k, v in med.items()}, flush=True)
    commit = git_commit()
    lines = [
        "# Dense eigh after torch work: thread settings",
        "",
        f"`python benchmarks/eigh_threads.py --sizes {' '.join(map(str, args.sizes))} "
        f"--repeats {args.repeats}` at commit {commit}; {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, load average at the end {os.getloadavg()[0]:.1f}.",
        "",
        "`remlstop`: `symmetric_eigh` (all eigenvectors); `projection`: `spectral_projection` "
        "(eigenvalues and V^T u, what the statistics use).",
    ]
    lines += [
        "",
        "The tridiagonal stage alone (inside `projection`): MRRR in blocks, a quarter of T's "
        "eigenvectors at a time (what `spectral_projection` runs), against divide and conquer "
        "with all of them and an N x N workspace.",
        "",
        "| N | MRRR blocks (s) | divide and conquer (s) | MRRR / D&C |",
        "|---|---|---|---|",
        *(
            f"| {n} | {m['mrrr blocks']:.3f} | {m['divide and conquer']:.3f} | "
            f"{m['mrrr blocks'] / m['divide and conquer']:.1f}× |"
            for n, m in rows
        ),
        "",
        "| N | numpy default (s) | torch default (s) | remlstop (s) | projection (s) "
        "| remlstop threads "
        "| numpy/remlstop | torch/remlstop | remlstop/projection |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, med in rows:
        r = med["remlstop"]
        lines.append(
            f"| {n} | {med['numpy default']:.3f} | {med['torch default']:.3f} | {r:.3f} | "
            f"{med['projection']:.3f} | {eigh_threads(n)} | {med['numpy default'] / r:.1f}× | "
            f"{med['torch default'] / r:.1f}× | {r / med['projection']:.1f}× |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "eigh_threads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
