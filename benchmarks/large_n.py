"""The large-N (Nystrom) spectrum against the dense one, and its cost as N grows (METHOD M10).

Two parts, each driving ``REMLStopper`` as a user would (``kernel='dense'`` or
``kernel='nystrom'``, ``landmarks=m``, ``seed=s``), on the paper's MLP (width 500, depth 2)
and the paper's simple function, lr 0.01, one output:

* accuracy: for each n in ``--accuracy-n``, the dense decision once and the Nystrom decision for
  every m in ``--landmarks`` and seed in ``--seeds``; the relative error of each criterion's
  stop step, whether the test decides the same, and the ratio of the p-values;
* scale: for each n in ``--scale-n``, one Nystrom decision with the default landmarks in a
  fresh subprocess: wall-clock seconds and the process's peak resident memory;
* convergence: for each n in ``--convergence-n`` (too large for the dense spectrum), the Nystrom
  decision for every m in ``--convergence-landmarks`` and seed in ``--seeds``, each criterion's
  stop step relative to the one with the most landmarks (first seed): where the dense spectrum
  cannot be had, how far the stop still moves as m grows.

``--device cuda`` puts the model and the rows on the GPU (the rows drawn on the CPU, so the same
data), reports the card's peak allocated memory (``torch.cuda.max_memory_allocated``) beside
the process's, and writes its results with the suffix ``_cuda``, beside the CPU ones.

Usage (from the repository root)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/large_n.py \
        --accuracy-n 3000,10000 --landmarks 500,1000,2000,4000 --seeds 0,1 \
        --scale-n 10000,30000,100000
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/large_n.py --accuracy-n '' --scale-n '' \
        --convergence-n 100000 --convergence-landmarks 2048,4096,8192 --seeds 0,1

Writes ``benchmarks/results/large_n_accuracy.md``, ``large_n_scale.md`` and
``large_n_convergence.md`` (each part that ran) and appends every decision to ``large_n.csv``
as it is measured (commit, n, path, landmarks, seed, seconds, peak GB, p-value, stop steps by
criterion); with
``--device cuda``, ``large_n_scale_cuda.md`` and so on.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from provenance import card, git_commit

from remlstop.nystrom import relative_shift

RESULTS = Path(__file__).resolve().parent / "results"

_CHILD = r"""
import json, resource, sys, time, warnings
import torch
from remlstop import REMLStopper
from remlstop.datasets import paper_mlp, paper_simple_function

warnings.simplefilter("ignore")
n, kernel, landmarks, seed = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
device = torch.device(sys.argv[5])
x, y, _, _ = paper_simple_function(n=n + 10, n_train=n, seed=0)
model = paper_mlp(width=500, depth=2, seed=0).to(device)
x, y = x.to(device), y.to(device)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
options = dict(kernel=kernel, seed=seed)
if landmarks != "default":
    options["landmarks"] = int(landmarks)
tic = time.perf_counter()
d = REMLStopper(model, x, y, optimizer=opt, **options).start()
seconds = time.perf_counter() - tic
a = d.approximation
print(json.dumps({
    "n": n, "kernel": kernel, "seed": seed, "seconds": seconds,
    "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "device_peak_gb": (
        torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    ),
    "landmarks": None if a is None else a.landmarks,
    "resolved_trace": None if a is None else a.resolved_trace,
    "tail_energy": None if a is None else a.tail_energy,
    "pvalue": d.test.pvalue, "train": d.train, "criterion": d.criterion,
    "check_landmarks": None if a is None else a.check_landmarks,
    "check_shift": None if a is None else {
        k: a.check_shift(k, f.t) for k, f in d.criteria.fits.items()
    },
    "passed": d.landmark_check_passed,
    "steps": {k: f.steps(d.dt_per_step) for k, f in d.criteria.fits.items()},
    "intervals": {
        k: [v / d.dt_per_step for v in f.interval]
        for k, f in d.criteria.fits.items()
        if getattr(f, "interval", None) is not None and all(v == v for v in f.interval)
    },
    "parts": d.seconds,
}))
"""


def run(n: int, kernel: str, landmarks: str, seed: int, device: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(n), kernel, landmarks, str(seed), device],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(
            f"the decision n={n} kernel={kernel} landmarks={landmarks} seed={seed} on {device} "
            f"failed (exit status {out.returncode}); the decisions before it are in the CSV. "
            f"Its stderr ends:\n{out.stderr[-2000:]}"
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


_CSV_HEADER = [
    "commit",
    "n",
    "kernel",
    "landmarks",
    "seed",
    "seconds",
    "peak_gb",
    "pvalue",
    "steps",
]


def append_csv(table: Path, commit: str, r: dict) -> None:
    """One decision appended to the CSV as soon as it is measured, so a later failure keeps it."""
    new_table = not table.exists()
    with open(table, "a", newline="") as fh:
        writer = csv.writer(fh)
        if new_table:
            writer.writerow(_CSV_HEADER)
        writer.writerow(
            [commit, r["n"], r["kernel"], r["landmarks"], r["seed"], r["seconds"], r["peak_gb"]]
            + [r["pvalue"], json.dumps(r["steps"])]
        )


def check_cell(r: dict) -> str:
    """The decision's landmark check for its criterion: the stop's shift with half of the
    landmarks, and whether the decision's check passed."""
    if not r["check_landmarks"]:
        return "— | —"
    passed = {True: "yes", False: "NO", None: "—"}[r["passed"]]
    return f"{r['check_shift'][r['criterion']]:+.1%} | {passed}"


def p_value_ratio(p: float, reference: float) -> float | str:
    """p over the reference's p; "both 0" where both underflowed."""
    if reference > 0:
        return p / reference
    return "both 0" if p == 0 else math.inf


def fmt_ratio(ratio: float | str) -> str:
    return ratio if isinstance(ratio, str) else f"{ratio:.3g}"


def comparison_cells(r: dict, reference: dict, criteria: list[str]) -> str:
    """The cells comparing a Nystrom decision with a reference decision: each criterion's stop
    step relative to the reference's, the test, the p-value ratio, the resolved shares and the
    landmark check."""
    errs = [relative_shift(r["steps"][c], reference["steps"][c]) for c in criteria]
    return (
        " | ".join(f"{e:+.1%}" for e in errs)
        + f" | {'same' if r['train'] == reference['train'] else 'DIFFERENT'} | "
        f"{fmt_ratio(p_value_ratio(r['pvalue'], reference['pvalue']))} | "
        f"{r['resolved_trace']:.1%} | {r['tail_energy']:.1%} | {check_cell(r)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accuracy-n", default="3000,10000")
    parser.add_argument("--landmarks", default="500,1000,2000,4000")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--scale-n", default="10000,30000,100000")
    parser.add_argument("--convergence-n", default="")
    parser.add_argument("--convergence-landmarks", default="2048,4096,8192")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    args = parser.parse_args()
    kind = torch.device(args.device).type
    try:
        name = card(args.device)
    except ValueError as error:
        parser.error(str(error))
    suffix = "" if kind == "cpu" else f"_{kind}"
    on = "" if name is None else f", on {name}"
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    commit = git_commit()
    tic = time.time()
    table = RESULTS / f"large_n{suffix}.csv"

    def measure(n: int, kernel: str, landmarks: str, seed: int) -> dict:
        r = run(n, kernel, landmarks, seed, args.device)
        append_csv(table, commit, r)
        return r

    accuracy: list[str] = []
    intervals: list[str] = []
    criteria: list[str] = []
    for n in ints(args.accuracy_n):
        dense = measure(n, "dense", "default", 0)
        criteria = list(dense["steps"])
        ends = {
            c: [relative_shift(end, dense["steps"][c]) for end in ends]
            for c, ends in dense["intervals"].items()
            if c in ("reml", "reml-linear")
        }
        intervals.append(
            f"| {n} | "
            + " | ".join(f"{c} ({lo:+.0%}, {hi:+.0%})" for c, (lo, hi) in ends.items())
            + " |"
        )
        for m in ints(args.landmarks):
            if m >= n:
                continue
            for seed in ints(args.seeds):
                r = measure(n, "nystrom", str(m), seed)
                accuracy.append(
                    f"| {n} | {m} | {seed} | {comparison_cells(r, dense, criteria)} | "
                    f"{r['seconds']:.1f} | {dense['seconds']:.1f} |"
                )
    scale: list[str] = []
    for n in ints(args.scale_n):
        r = measure(n, "nystrom", "default", 0)
        parts = ", ".join(f"{k} {v:.1f}" for k, v in r["parts"].items())
        on_card = "" if r["device_peak_gb"] is None else f"{r['device_peak_gb']:.2f} | "
        scale.append(
            f"| {n:,} | {r['landmarks']} | {r['seconds']:.1f} | {r['peak_gb']:.2f} | {on_card}"
            f"{r['resolved_trace']:.1%} | {r['tail_energy']:.1%} | {check_cell(r)} | {parts} |"
        )
    convergence: list[str] = []
    for n in ints(args.convergence_n):
        runs = [
            measure(n, "nystrom", str(m), seed)
            for m in sorted(ints(args.convergence_landmarks), reverse=True)
            for seed in ints(args.seeds)
        ]
        reference = runs[0]
        criteria = list(reference["steps"])
        for r in runs:
            convergence.append(
                f"| {n:,} | {r['landmarks']} | {r['seed']} | "
                f"{comparison_cells(r, reference, criteria)} | {r['seconds']:.1f} | "
                f"{r['peak_gb']:.2f} |"
            )
        convergence.append(
            f"| {n:,} | {reference['landmarks']} | {reference['seed']} | "
            + " | ".join(f"{reference['steps'][c]:,.0f} steps" for c in criteria)
            + " | (the reference's stop steps) | | | | | | | |"
        )
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    header = (
        f"`OMP_NUM_THREADS={threads} python benchmarks/large_n.py --accuracy-n {args.accuracy_n} "
        f"--landmarks {args.landmarks} --seeds {args.seeds} --scale-n {args.scale_n} "
        f"--convergence-n {args.convergence_n} --convergence-landmarks "
        f"{args.convergence_landmarks} --device {args.device}` at commit {commit}{on}, "
        f"{os.cpu_count()} CPUs, "
        f"{(time.time() - tic) / 60:.1f} min, load average "
        f"{os.getloadavg()[0]:.1f} at the end. The paper's MLP (width 500, depth 2) on the "
        "paper's simple function, one output, SGD lr 0.01; every number comes from "
        "`REMLStopper(kernel=..., landmarks=m, seed=s).start()`."
    )
    check_note = (
        "Check: the decision's own landmark check (`Decision.landmark_check()`), the stop of "
        "its criterion (reml-linear) with half of the landmarks relative to its stop with all "
        "of them, and whether the check passed (inside the criterion's 95% interval, the same "
        "test decision)."
    )
    parts = {
        "accuracy": [
            "# The large-N (Nystrom) spectrum against the dense one",
            "",
            header,
            "",
            "Relative error of each criterion's stop step (Nystrom / dense − 1), whether the "
            "test decides the same, the ratio of the p-values, the share of tr H the resolved "
            "eigenvalues hold, the share of ||u0||² left to the unresolved cluster, and the "
            "seconds of both decisions. " + check_note,
            "",
            "| n | m | seed | " + " | ".join(criteria) + " | test | p ratio | resolved tr H | "
            "tail ‖u0‖² | check: m/2 shift | passed | Nystrom s | dense s |",
            "|" + "---|" * (len(criteria) + 11),
            *accuracy,
            "",
            "For scale: the dense fits' own 95% profile-likelihood intervals for the stop step, "
            "relative to their stop step (the criteria that compute one):",
            "",
            "| n | intervals |",
            "|---|---|",
            *intervals,
        ],
        "scale": [
            "# The large-N (Nystrom) decision as N grows (default landmarks)",
            "",
            header,
            "",
            "Peak: the process's peak resident memory (model, data and all)"
            + ("." if kind == "cpu" else "; on the card: its peak allocated memory.")
            + " "
            + check_note,
            "",
            "| n | m | seconds | peak GB | "
            + ("" if kind == "cpu" else "card peak GB | ")
            + "resolved tr H | tail ‖u0‖² | check: m/2 shift | passed | parts (s) |",
            "|---|---|---|---|---|---|---|---|---|" + ("" if kind == "cpu" else "---|"),
            *scale,
        ],
        "convergence": [
            "# The large-N (Nystrom) stop as the landmarks grow, where the dense spectrum is "
            "out of reach",
            "",
            header,
            "",
            "Each criterion's stop step relative to the decision with the most landmarks (the "
            "first seed), whether the test decides the same, the ratio of the p-values, the "
            "share of tr H the resolved eigenvalues hold, the share of ||u0||² left to the "
            "unresolved cluster, seconds and the process's peak resident memory (GB). A stop "
            "that still moves between the two largest m has not converged; agreement between "
            "them is necessary for accuracy, not proof of it (on the dense checks the late "
            "criteria came out late by a bias that shrinks with m). " + check_note,
            "",
            "| n | m | seed | " + " | ".join(criteria) + " | test | p ratio | resolved tr H | "
            "tail ‖u0‖² | check: m/2 shift | passed | seconds | peak GB |",
            "|" + "---|" * (len(criteria) + 11),
            *convergence,
        ],
    }
    RESULTS.mkdir(exist_ok=True)
    produced = {"accuracy": accuracy, "scale": scale, "convergence": convergence}
    for name, lines in parts.items():
        if not produced[name]:
            continue
        (RESULTS / f"large_n_{name}{suffix}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
