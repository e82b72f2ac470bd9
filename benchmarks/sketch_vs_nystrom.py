"""Two large-N spectra against the dense one: a JL sketch of the per-sample gradients and Nystrom.

METHOD M10 names two ways to avoid the N x N kernel. This script measures, at a size where the
dense spectrum is available, how far each criterion's stop time moves under each:

* **sketch**: per Linear layer the per-row gradient is g_i a_i^T, projected by a Kronecker map
  (R1^T g_i) (x) (R2^T [a_i, 1]) with Gaussian R1, R2 (E[R R^T] = I, so the sketched kernel is
  unbiased), the sketch dimension split over layers by their share of tr H; the spectrum of
  Phi Phi^T / N from the d x d Gram, the rest of the trace and of ||u0||^2 in one cluster, as
  the Nystrom path does;
* **nystrom**: ``remlstop.nystrom.nystrom_kernel`` with m landmark rows, what the library runs.

Usage (from the repository root)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sketch_vs_nystrom.py --n 3000

Writes ``benchmarks/results/sketch_vs_nystrom.md``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from provenance import git_commit
from torch import nn

from remlstop import KernelSpectrum, empirical_ntk
from remlstop.criteria import evaluate_criteria
from remlstop.datasets import paper_mlp, paper_simple_function
from remlstop.nystrom import nystrom_kernel

RESULTS = Path(__file__).resolve().parent / "results"


def layer_factors(model: nn.Sequential, x: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """(A with a column of ones, G) per Linear layer, one output: rows are independent, so
    the gradient of sum_i f(x_i) with respect to a layer's outputs holds each row's own."""
    inputs, outputs = [], []
    h = x.detach().double().requires_grad_(True)
    layers = [m.double() for m in model]
    for layer in layers:
        if isinstance(layer, nn.Linear):
            inputs.append(h.detach())
            h = layer(h)
            outputs.append(h)
        else:
            h = layer(h)
    grads = torch.autograd.grad(h.sum(), outputs)
    ones = torch.ones(x.shape[0], 1, dtype=torch.float64)
    return [
        (torch.cat([a, ones], 1).numpy(), g.numpy()) for a, g in zip(inputs, grads, strict=True)
    ]


def sketch_spectrum(factors, u0: np.ndarray, trace: float, d: int, seed: int) -> KernelSpectrum:
    rng = np.random.default_rng(seed)
    n = u0.size
    shares = np.array([((a**2).sum(1) * (g**2).sum(1)).sum() for a, g in factors])
    blocks = []
    for (a, g), share in zip(factors, shares / shares.sum(), strict=True):
        dl = max(16, int(d * share))
        din, dout = a.shape[1], g.shape[1]
        d2 = min(din, max(1, round(math.sqrt(dl * din / dout))))
        d1 = min(dout, max(1, dl // d2))
        a = a if d2 == din else a @ (rng.standard_normal((din, d2)) / math.sqrt(d2))
        g = g if d1 == dout else g @ (rng.standard_normal((dout, d1)) / math.sqrt(d1))
        blocks.append(np.einsum("ni,no->nio", a, g).reshape(n, -1))
    phi = np.hstack(blocks) / math.sqrt(n)
    s2, V = np.linalg.eigh(phi.T @ phi)
    keep = s2 > 1e-10 * s2[-1]
    s2, V = s2[keep], V[:, keep]
    z = V.T @ (phi.T @ u0) / np.sqrt(s2)
    rest = n - s2.size
    if rest == 0:  # a sketch as wide as the data: its own spectrum, nothing left over
        return KernelSpectrum.from_eigen(s2, z)
    tail = max(trace - s2.sum(), 0.0) / rest
    energy = max(u0 @ u0 - z @ z, 0.0)
    return KernelSpectrum.from_eigen(
        np.concatenate([np.full(rest, tail), s2]),
        np.concatenate([np.full(rest, math.sqrt(energy / rest)), z]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--dims", default="1000,2000,4000")
    parser.add_argument("--landmarks", default="500,1000,1500")
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()
    n = args.n
    x, y, _, _ = paper_simple_function(n=n + 10, n_train=n, seed=0)
    model = paper_mlp(width=500, depth=2, seed=0).double()
    x, y = x.double(), y.double()
    with torch.no_grad():
        u0 = (y - model(x)).reshape(-1)
    H = empirical_ntk(model, x)
    dense = evaluate_criteria(KernelSpectrum.from_kernel(H, u0))
    trace = float(torch.trace(H))
    del H
    names = list(dense.fits)
    factors = layer_factors(model, x)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for d in (int(v) for v in args.dims.split(",")):
            spec = sketch_spectrum(factors, u0.numpy(), trace, d, seed)
            rows.append(("sketch", d, seed, evaluate_criteria(spec)))
        for m in (int(v) for v in args.landmarks.split(",")):
            spec = nystrom_kernel(model, x, u0, landmarks=m, seed=seed).spectrum()
            rows.append(("nystrom", m, seed, evaluate_criteria(spec)))
    commit = git_commit()
    lines = [
        "# A JL sketch of the per-sample gradients against Nystrom (METHOD M10)",
        "",
        f"`python benchmarks/sketch_vs_nystrom.py --n {n} --dims {args.dims} --landmarks "
        f"{args.landmarks} --seeds {args.seeds}` at commit {commit}: the paper's MLP (width 500, "
        "depth 2, float64) on the paper's simple function. Relative error of each criterion's "
        "stop time against the dense spectrum's; size = sketch dimension d or landmark rows m.",
        "",
        "| method | size | seed | " + " | ".join(names) + " | worst |",
        "|" + "---|" * (len(names) + 4),
    ]
    for method, size, seed, crit in rows:
        errs = [crit.fits[c].t / dense.fits[c].t - 1 for c in names]
        lines.append(
            f"| {method} | {size} | {seed} | "
            + " | ".join(f"{e:+.1%}" for e in errs)
            + f" | {max(abs(e) for e in errs):.1%} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sketch_vs_nystrom.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
