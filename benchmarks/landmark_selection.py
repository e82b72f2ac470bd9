"""How the choice of landmarks moves the Nystrom spectrum's stop times (METHOD M10), at sizes
where the dense kernel is available.

The library draws its landmarks uniformly (``remlstop.nystrom.choose_landmarks``). The
Nystrom projection H_S is never above H, so its eigenvalues come out low, and most where the
landmarks' kernel columns explain H least (``nystrom_error_sources.py``: 16-52% low from rank
m/5 on). Landmarks chosen for how much of H they leave unexplained resolve more of it with the
same number of kernel rows. This benchmark compares, with the same m:

* ``uniform``: the library's draw;
* ``diagonal``: m rows drawn without replacement with probability proportional to H_ii, the
  exact per-row gradient norms, which cost no kernel rows beyond those of the landmarks;
* ``rpcholesky (T rounds)``: block randomly pivoted Cholesky (Chen, Epperly, Tropp and Webber,
  2023): T rounds, each drawing m / T rows in proportion to the diagonal of the residual
  H - F Fᵀ, computing their kernel rows and extending the Cholesky factor F; at large N each
  round is one pass of kernel rows, as the landmark rows are now, so T rounds cost T passes.

Each landmark set goes through the library's factorisation (``nystrom_from_rows``) and every
criterion's stop time comes from ``remlstop.criteria.evaluate_criteria``, relative to the dense
spectrum's; the share of ||u0||^2 left to the unresolved cluster says how much each set
resolved. The kernel is the paper's MLP's (width 500, depth 2) on the paper's simple function,
one output, as in ``benchmarks/large_n.py``.

Usage (from the repository root)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/landmark_selection.py --n 3000,10000 \
        --landmarks 1000,2000 --seeds 0,1 --rounds 4,16

Writes ``benchmarks/results/landmark_selection.md``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from nystrom_error_sources import RESULTS, dense_case, stop_times
from provenance import git_commit
from scipy.linalg import lapack, solve_triangular

from remlstop.nystrom import choose_landmarks, nystrom_from_rows


def diagonal_draw(H: np.ndarray, m: int, seed: int) -> np.ndarray:
    """m distinct rows drawn with probability proportional to the kernel's diagonal."""
    d = np.clip(np.diag(H), 0.0, None)
    return np.sort(np.random.default_rng(seed).choice(H.shape[0], m, replace=False, p=d / d.sum()))


def rpcholesky(H: np.ndarray, m: int, rounds: int, seed: int) -> np.ndarray:
    """Block randomly pivoted Cholesky: ``rounds`` blocks of about m / rounds pivots, each drawn
    (without replacement within the block) in proportion to the residual diagonal; a block's
    pivots whose residual is below 1e-10 of the largest are dropped by a pivoted Cholesky of
    the block, as ``nystrom_from_rows`` drops them."""
    rng = np.random.default_rng(seed)
    N = H.shape[0]
    F = np.zeros((N, 0))
    d = np.clip(np.diag(H).copy(), 0.0, None)
    chosen: list[int] = []
    sizes = [m // rounds + (i < m % rounds) for i in range(rounds)]
    for b in sizes:
        p = d.copy()
        p[chosen] = 0.0
        s = rng.choice(N, b, replace=False, p=p / p.sum())
        G = H[:, s] - F @ F[s].T
        block = G[s].copy()
        L, piv, rank, _ = lapack.dpstrf(block, lower=1, tol=1e-10 * block.diagonal().max())
        order = piv[:rank] - 1
        L = np.tril(L[:rank, :rank])
        Fb = solve_triangular(L, G[:, order].T, lower=True).T
        F = np.concatenate([F, Fb], axis=1)
        d = np.clip(d - (Fb**2).sum(1), 0.0, None)
        chosen += [int(i) for i in s[order]]
    return np.sort(np.array(chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="3000")
    parser.add_argument("--landmarks", default="500,1000")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--rounds", default="4,16")
    args = parser.parse_args()
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    tic = time.time()
    commit = git_commit()
    rows = []
    names: list[str] = []
    for n in ints(args.n):
        H, u0, _, _, dense = dense_case(n)
        names = list(dense)
        trace = float(np.trace(H))
        for m in ints(args.landmarks):
            if m >= n:
                continue
            for seed in ints(args.seeds):
                draws = {
                    "uniform": choose_landmarks(n, seed, m),
                    "diagonal": diagonal_draw(H, m, seed),
                }
                for T in ints(args.rounds):
                    draws[f"rpcholesky ({T} rounds)"] = rpcholesky(H, m, T, seed)
                for variant, S in draws.items():
                    spectrum = nystrom_from_rows(H[S, :], S, trace, u0, seed=seed).spectrum()
                    t = stop_times(spectrum)
                    errs = {c: t[c] / dense[c] - 1 for c in names}
                    tail = spectrum.approximation.tail_energy
                    rows.append((n, m, seed, variant, S.size, errs, tail))
                    print(n, m, seed, variant, S.size, f"tail {tail:.3f}", flush=True)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    lines = [
        "# Landmark selection for the Nystrom spectrum",
        "",
        f"`OMP_NUM_THREADS={threads} python benchmarks/landmark_selection.py --n {args.n} "
        f"--landmarks {args.landmarks} --seeds {args.seeds} --rounds {args.rounds}` at commit "
        f"{commit}, {(time.time() - tic) / 60:.1f} min. The paper's MLP (width 500, depth 2) on "
        "the paper's simple function, one output; each stop time from `evaluate_criteria` on "
        "`nystrom_from_rows(H[S, :])` with the landmark set S named (the module docstring "
        "defines them), relative to the dense spectrum's; `kept` = landmarks left after the "
        "pivots below 1e-10 are dropped; `tail ‖u0‖²` = the share of ||u0||² left to the "
        "unresolved cluster; `worst` = the largest |error| over the criteria.",
        "",
        "| n | m | seed | landmarks | kept | " + " | ".join(names) + " | worst | tail ‖u0‖² |",
        "|" + "---|" * (len(names) + 7),
    ]
    for n, m, seed, variant, kept, errs, tail in rows:
        worst = max(abs(e) for e in errs.values())
        lines.append(
            f"| {n} | {m} | {seed} | {variant} | {kept} | "
            + " | ".join(f"{errs[c]:+.1%}" for c in names)
            + f" | {worst:.1%} | {tail:.1%} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "landmark_selection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
