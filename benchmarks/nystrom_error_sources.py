"""Where the Nystrom spectrum's stop-time error comes from (METHOD M10), at a size where the
dense kernel is available.

The Nystrom spectrum (``remlstop.nystrom``) replaces two things of the dense one: the
eigenvalues (resolved ones from the Nystrom projection, the rest as one cluster with the exact
remaining trace) and the residual's measure (its projections on the resolved eigenvectors, the
rest spread evenly over the cluster). This benchmark swaps one of them at a time for its exact
counterpart and reports each criterion's stop time relative to the dense one, so a change to the
large-N path can aim at the part that matters:

* ``nystrom``: the library's spectrum (``nystrom_from_rows(H[S, :], S, tr H, u0).spectrum()``);
* ``nystrom + exact tail``: the resolved Nystrom pairs, and for the rest the exact eigenpairs of
  the kernel compressed to the orthogonal complement of the resolved span, with u0's exact
  projections there (the best any tail model on top of these resolved pairs could do);
* ``exact eigenvalues + Lanczos u0 (k)``: the dense eigenvalues, and u0's spectral measure from
  k steps of Lanczos on H started at u0 (Gauss-Radau quadrature with a node at 0, each node's
  weight put on the eigenvalue nearest it in log scale): what k kernel-vector products give;
* ``nystrom eigenvalues + Lanczos u0 (k)``: the same measure on the Nystrom eigenvalues.

Every stop time comes from ``remlstop.criteria.evaluate_criteria`` on the spectrum named; the
kernel is the paper's MLP's (width 500, depth 2) on the paper's simple function, one output, as
in ``benchmarks/large_n.py``.

Usage (from the repository root)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/nystrom_error_sources.py --n 3000 \
        --landmarks 500,1000 --seeds 0,1 --lanczos 60

Writes ``benchmarks/results/nystrom_error_sources.md``.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from provenance import git_commit

from remlstop.criteria import evaluate_criteria
from remlstop.datasets import paper_mlp, paper_simple_function
from remlstop.ntk import empirical_ntk
from remlstop.nystrom import choose_landmarks, nystrom_from_rows
from remlstop.spectrum import KernelSpectrum

RESULTS = Path(__file__).resolve().parent / "results"


def stop_times(spectrum: KernelSpectrum) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {name: fit.t for name, fit in evaluate_criteria(spectrum).fits.items()}


def dense_case(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """The paper's MLP's kernel H on n rows of the paper's simple function, the residual u0,
    H's eigenvalues (clipped at 0) and eigenvectors, and the dense spectrum's stop times."""
    x, y, _, _ = paper_simple_function(n=n + 10, n_train=n, seed=0)
    model = paper_mlp(width=500, depth=2, seed=0)
    H = empirical_ntk(model, x).numpy()
    with torch.no_grad():
        u0 = (y.double() - model(x).double()).reshape(-1).numpy()
    lam, V = np.linalg.eigh(H)
    lam = np.clip(lam, 0.0, None)
    return H, u0, lam, V, stop_times(KernelSpectrum.from_eigen(lam, V.T @ u0))


def lanczos_radau(H: np.ndarray, v: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights (summing to ||v||^2) of the k+1-point Gauss-Radau rule for v's
    spectral measure under H, with the prescribed node 0 (full reorthogonalisation)."""
    Q = np.zeros((k + 1, v.size))
    Q[0] = v / np.linalg.norm(v)
    alpha, beta = np.zeros(k), np.zeros(k)
    for j in range(k):
        w = H @ Q[j]
        alpha[j] = Q[j] @ w
        w -= Q[: j + 1].T @ (Q[: j + 1] @ w)
        w -= Q[: j + 1].T @ (Q[: j + 1] @ w)
        beta[j] = np.linalg.norm(w)
        Q[j + 1] = w / beta[j]
    T = np.diag(alpha) + np.diag(beta[:-1], 1) + np.diag(beta[:-1], -1)
    e = np.zeros(k)
    e[-1] = beta[-1] ** 2
    radau = np.zeros((k + 1, k + 1))
    radau[:k, :k] = T
    radau[k, k - 1] = radau[k - 1, k] = beta[-1]
    radau[k, k] = np.linalg.solve(T, e)[-1]
    nodes, vectors = np.linalg.eigh(radau)
    return np.clip(nodes, 0.0, None), vectors[0] ** 2 * float(v @ v)


def on_nearest(eigenvalues: np.ndarray, nodes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """z with z_i^2 the quadrature weight of the nodes nearest eigenvalue i in log scale."""
    log_lam = np.log(np.maximum(eigenvalues, 1e-300))
    nearest = np.abs(log_lam[None, :] - np.log(np.maximum(nodes, 1e-300))[:, None]).argmin(1)
    z2 = np.zeros(eigenvalues.size)
    np.add.at(z2, nearest, weights)
    return np.sqrt(z2)


def rank_marks(m: int) -> list[int]:
    """The ranks m/20, m/10, m/5, m/2 and m (1-based)."""
    return [max(1, m // d) for d in (20, 10, 5, 2, 1)]


def exact_tail(H: np.ndarray, u0: np.ndarray, basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues and u0's projections of H compressed to the complement of ``basis``'s span."""
    N, r = basis.shape
    U, _ = np.linalg.qr(basis)
    filler = np.random.default_rng(0).standard_normal((N, N - r))
    full, _ = np.linalg.qr(np.concatenate([U, filler - U @ (U.T @ filler)], axis=1))
    Uc = full[:, r:]
    lam, V = np.linalg.eigh(Uc.T @ H @ Uc)
    return np.clip(lam, 0.0, None), V.T @ (Uc.T @ u0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--landmarks", default="500,1000")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--lanczos", default="60")
    args = parser.parse_args()
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    tic = time.time()
    commit = git_commit()
    n = args.n
    H, u0, lam, V, dense = dense_case(n)
    del V
    names = list(dense)
    rows = []
    ranks: list[str] = []
    quadratures = {k: lanczos_radau(H, u0, k) for k in ints(args.lanczos)}
    for k, (nodes, weights) in quadratures.items():
        spectrum = KernelSpectrum.from_eigen(lam, on_nearest(lam, nodes, weights))
        rows.append(("—", "—", f"exact eigenvalues + Lanczos u0 ({k})", stop_times(spectrum)))
    for m in ints(args.landmarks):
        for seed in ints(args.seeds):
            S = choose_landmarks(n, seed, m)
            factor = nystrom_from_rows(H[S, :], S, float(np.trace(H)), u0, seed=seed)
            # One entry per direction: the ranks and the replaced parts below index them.
            nys = factor.spectrum().expanded()
            rows.append((m, seed, "nystrom", stop_times(nys)))
            top, nys_top = lam[::-1], nys.eigenvalues[::-1]
            ranks.append(
                f"| {m} | {seed} | "
                + " | ".join(f"{nys_top[r - 1] / top[r - 1] - 1:+.0%}" for r in rank_marks(m))
                + " |"
            )
            resolved = nys.approximation.rank
            tail_lam, tail_z = exact_tail(H, u0, H[S, :].T @ factor.mixing)
            with_tail = KernelSpectrum.from_eigen(
                np.concatenate([tail_lam, nys.eigenvalues[-resolved:]]),
                np.concatenate([tail_z, nys.z[-resolved:]]),
            )
            rows.append((m, seed, "nystrom + exact tail", stop_times(with_tail)))
            for k, (nodes, weights) in quadratures.items():
                spectrum = KernelSpectrum.from_eigen(
                    nys.eigenvalues, on_nearest(nys.eigenvalues, nodes, weights)
                )
                rows.append(
                    (m, seed, f"nystrom eigenvalues + Lanczos u0 ({k})", stop_times(spectrum))
                )
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    lines = [
        "# Where the Nystrom spectrum's stop-time error comes from",
        "",
        f"`OMP_NUM_THREADS={threads} python benchmarks/nystrom_error_sources.py --n {n} "
        f"--landmarks {args.landmarks} --seeds {args.seeds} --lanczos {args.lanczos}` at commit "
        f"{commit}, {(time.time() - tic) / 60:.1f} min. The paper's MLP (width 500, depth 2) "
        "on the paper's simple function, one output; each stop time from "
        "`evaluate_criteria` on the spectrum named, relative to the dense spectrum's "
        "(the module docstring defines each variant).",
        "",
        "Dense stop times (t): " + ", ".join(f"{c} {dense[c]:.4g}" for c in names) + ".",
        "",
        "| m | seed | spectrum | " + " | ".join(names) + " |",
        "|" + "---|" * (len(names) + 3),
    ]
    for m, seed, variant, t in rows:
        errs = " | ".join(f"{t[c] / dense[c] - 1:+.1%}" for c in names)
        lines.append(f"| {m} | {seed} | {variant} | {errs} |")
    lines += [
        "",
        "The Nystrom eigenvalues against the exact ones at ranks m/20, m/10, m/5, m/2 and m "
        "(Nystrom / exact − 1, the k-th largest of each):",
        "",
        "| m | seed | m/20 | m/10 | m/5 | m/2 | m |",
        "|---|---|---|---|---|---|---|",
        *ranks,
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "nystrom_error_sources.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
