"""Peak memory of the decision against the size of the dense kernel (N x N float64).

Each measurement runs in a fresh subprocess, so the process's peak resident memory
(``ru_maxrss``) belongs to that one call: peak during the call minus the resident memory just
before it, divided by the kernel's N^2 * 8 bytes.

Usage (from the repository root)::

    .venv/bin/python benchmarks/peak_memory.py --sizes 1000,3000

Writes ``benchmarks/results/peak_memory.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from provenance import git_commit

RESULTS = Path(__file__).resolve().parent / "results"

_CHILD = r"""
import json, resource, sys, warnings
import torch
from remlstop import KernelSpectrum, REMLStopper, empirical_ntk
from remlstop.datasets import paper_mlp, paper_simple_function

warnings.simplefilter("ignore")
n, what = int(sys.argv[1]), sys.argv[2]
x, y, _, _ = paper_simple_function(n=n + 10, n_train=n, seed=0)
model = paper_mlp(width=500, depth=2, seed=0)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
with torch.no_grad():
    u0 = (y - model(x)).double().reshape(-1)
def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
before = rss_kb()
if what == "start":
    REMLStopper(model, x, y, optimizer=opt).start()
else:
    KernelSpectrum.from_kernel(empirical_ntk(model, x), u0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kb": before, "peak_kb": peak}))
"""


def measure(n: int, what: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(n), what], capture_output=True, text=True, check=True
    )
    row = json.loads(out.stdout.strip().splitlines()[-1])
    kernel = n * n * 8
    row.update(
        n=n,
        what=what,
        kernel_mb=kernel / 2**20,
        ratio=(row["peak_kb"] - row["before_kb"]) * 1024 / kernel,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,3000")
    args = parser.parse_args()
    rows = [
        measure(int(n), what)
        for n in args.sizes.split(",")
        for what in ("start", "kernel+spectrum")
    ]
    commit = git_commit()
    lines = [
        "# Peak memory of the decision",
        "",
        f"`python benchmarks/peak_memory.py --sizes {args.sizes}` at commit {commit}: the paper's "
        "MLP (width 500, depth 2), one output. Peak resident memory during the call minus the "
        "resident memory before it, over the dense kernel's N^2 x 8 bytes.",
        "",
        "| n | call | kernel (MB) | peak increase (MB) | peak / kernel |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        inc = (r["peak_kb"] - r["before_kb"]) / 1024
        lines.append(
            f"| {r['n']} | `{r['what']}` | {r['kernel_mb']:.1f} | {inc:.1f} | {r['ratio']:.2f} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "peak_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
