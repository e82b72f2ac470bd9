"""What every criterion together adds to the decision, against the paper's REML alone.

For each training-set size n: the paper's MLP on the paper's data, ``REMLStopper.start()``
(which computes the kernel, the spectrum, the test and every criterion), then, on the same
spectrum and in the same process, ``reml_fit`` alone and ``evaluate_criteria`` (all of them),
each the median of ``--repeats`` timings. The added share is
(criteria - reml_fit) / (start - criteria + reml_fit): the decision's time before the criteria
were added is start() with reml_fit in place of the criteria.

Usage (from the repository root)::

    .venv/bin/python benchmarks/criteria_cost.py --sizes 480,1000,2000 --repeats 5

Writes ``benchmarks/results/criteria_cost.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch
from provenance import git_commit

from remlstop import REMLStopper, evaluate_criteria, reml_fit
from remlstop.datasets import paper_mlp, paper_simple_function

RESULTS = Path(__file__).resolve().parent / "results"


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def measure(n: int, repeats: int) -> dict:
    """Median seconds of start(), reml_fit and evaluate_criteria at n training rows."""
    x, y, _, _ = paper_simple_function(n=n + 10, n_train=n, seed=0)
    model = paper_mlp(width=500, depth=2, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    starts, spectrum = [], None
    for _ in range(repeats):
        stopper = REMLStopper(model, x, y, optimizer=opt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tic = time.perf_counter()
            stopper.start()
            starts.append(time.perf_counter() - tic)
        spectrum = stopper.spectrum
    return {
        "n": n,
        "start": statistics.median(starts),
        "reml": _median_seconds(lambda: reml_fit(spectrum), repeats),
        "criteria": _median_seconds(lambda: evaluate_criteria(spectrum), repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="480,1000,2000")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(int(n), args.repeats) for n in args.sizes.split(",")]
    commit = git_commit()
    lines = [
        "# Cost of the criteria in the decision",
        "",
        f"`python benchmarks/criteria_cost.py --sizes {args.sizes} --repeats {args.repeats}` at "
        f"commit {commit}, one torch thread; medians of {args.repeats} timings in one process.",
        "",
        "| n | start() s | reml_fit s | all criteria s | added to the decision |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        before = r["start"] - r["criteria"] + r["reml"]
        added = (r["criteria"] - r["reml"]) / before
        lines.append(
            f"| {r['n']} | {r['start']:.3f} | {r['reml']:.4f} | {r['criteria']:.3f} | "
            f"{added:+.1%} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "criteria_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
