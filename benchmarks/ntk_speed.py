"""Speed and peak memory of the empirical NTK (METHOD M1): layerwise, generic, naive baseline.

Every measurement runs in a fresh subprocess (``--worker``) so that its peak resident set size
is its own: the worker builds the model and inputs, warms the method up on 8 rows (first-call
costs of torch.func), reads its resident set size (VmRSS), runs the method once, and reports the
wall time and ``ru_maxrss - VmRSS_before``, the extra memory the call needed at its peak (the
kernel included). Each configuration is repeated ``--repeats`` times; the table gives medians.

With ``--device cuda`` the model, the rows and the kernel live on the GPU and the measurements
run in this one process (a CUDA context takes seconds to start, and the card's allocator counts
its own peak): the time between two ``torch.cuda.synchronize()``, and the peak as
``torch.cuda.max_memory_allocated() - memory_allocated()`` before the call. Results go to
``ntk_speed_cuda.md`` and ``.csv``, beside the CPU ones, with the card's name.

The baseline is the naive recipe of the authors' reference: ``vmap(jacrev)`` over all rows at
once, giving the full per-sample Jacobian dict, then one ``einsum`` per parameter summed, in
float32. It is skipped where its estimated peak (3.5 × the float32 Jacobian + 0.3 GB, fitted to
measurements on this machine) exceeds 12 GB.

Two references are measured beside the kernel paths, on the same rows in one batch: forward,
one plain forward pass (``torch.no_grad``), a floor for any kernel path, which must evaluate
every row; and step, the forward and backward pass of the summed outputs with respect to the
parameters, what one full-batch gradient over the n rows costs. A kernel path needs at least
a forward and K backward passes and the per-sample gradients of the conv layers, about K steps,
plus its Gram products: with one output and a cheap Gram (lenet), generic / step bounds the
speed-up over the generic path that a path built from autograd's kernels can reach.

Usage: ``OMP_NUM_THREADS=2 python benchmarks/ntk_speed.py [--quick] [--repeats 3]
[--models cnn,lenet,lenet10] [--device cuda]``; writes ``benchmarks/results/ntk_speed.md`` and
``.csv``. With ``--models`` only those models are measured and the committed rows of the others
are kept, each row with the command and commit that measured it (the full run takes about 15
minutes).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from provenance import card, git_commit
from torch import nn
from torch.func import functional_call, jacrev, vmap

from remlstop.datasets import lenet

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE_LIMIT_BYTES = 12e9


def build_model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """The benchmarked networks and their input feature shapes."""
    if name == "mlp500":  # the paper's MLP: P = 256,501
        model = nn.Sequential(
            nn.Linear(10, 500), nn.ReLU(), nn.Linear(500, 500), nn.ReLU(), nn.Linear(500, 1)
        )
        return model, (10,)
    if name == "mlp3":
        model = nn.Sequential(
            nn.Linear(10, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 3)
        )
        return model, (10,)
    if name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 12 * 12, 1),
        )
        return model, (1, 16, 16)
    if name in ("lenet", "lenet10"):  # LeNet-5-sized, on 28 × 28 images
        model = lenet(outputs=10 if name == "lenet10" else 1, seed=0)
        return model, (1, 28, 28)
    raise ValueError(name)


def outputs_per_row(model_name: str) -> int:
    model, shape = build_model(model_name)
    with torch.no_grad():
        return model(torch.zeros(1, *shape)).numel()


def naive_ntk(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference recipe: full per-sample Jacobians, einsum per parameter, float32."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one_row(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).reshape(-1)

    jac = vmap(jacrev(one_row), (None, 0))(params, x)
    flat = [j.flatten(2) for j in jac.values()]
    return sum(torch.einsum("Naf,Mbf->NMab", j, j) for j in flat)


def run_method(method: str, model: nn.Module, x: torch.Tensor) -> None:
    from remlstop.ntk import empirical_ntk

    with torch.no_grad() if method in ("baseline", "forward") else torch.enable_grad():
        if method == "baseline":
            naive_ntk(model, x)
        elif method == "forward":
            model(x)
        elif method == "step":
            model(x).sum().backward()
        else:
            empirical_ntk(model, x, path=method)


def _rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def worker(model_name: str, method: str, n: int, device: str = "cpu") -> dict[str, float]:
    torch.manual_seed(0)
    model, shape = build_model(model_name)
    x = torch.randn(n, *shape)  # drawn on the CPU: the same rows on every device
    model, x = model.to(device), x.to(device)
    run_method(method, model, x[:8])
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        allocated = torch.cuda.memory_allocated(x.device)
        start = time.perf_counter()
        run_method(method, model, x)
        torch.cuda.synchronize(x.device)
        seconds = time.perf_counter() - start
        return {
            "seconds": seconds,
            "peak_bytes": float(torch.cuda.max_memory_allocated(x.device) - allocated),
        }
    before = _rss_kb()
    start = time.perf_counter()
    run_method(method, model, x)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "peak_bytes": (peak - before) * 1024.0}


def measure(
    model_name: str, method: str, n: int, repeats: int, device: str = "cpu"
) -> dict[str, float]:
    runs = []
    for _ in range(repeats):
        if device != "cpu":
            runs.append(worker(model_name, method, n, device))
            continue
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", model_name, method, str(n)],
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "peak_bytes": statistics.median(r["peak_bytes"] for r in runs),
    }


def baseline_fits(model_name: str, n: int) -> bool:
    model, _ = build_model(model_name)
    K = outputs_per_row(model_name)
    P = sum(p.numel() for p in model.parameters())
    return 3.5 * n * K * P * 4 + 0.3e9 <= BASELINE_LIMIT_BYTES


MODELS = ("mlp500", "mlp3", "cnn", "lenet", "lenet10")


def configs(quick: bool) -> list[tuple[str, int]]:
    if quick:
        return [("mlp500", 200), ("mlp3", 100), ("cnn", 100), ("lenet", 100)]
    return [
        ("mlp500", 480),
        ("mlp500", 1000),
        ("mlp500", 2000),
        ("mlp500", 4000),
        ("mlp3", 500),
        ("cnn", 500),
        ("lenet", 1000),
        ("lenet10", 1000),
    ]


def fmt_gb(b: float | None) -> str:
    return "—" if b is None else f"{b / 1e9:.2f}"


def fmt_s(s: float | None, digits: int = 2) -> str:
    return "—" if s is None else f"{s:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b <= 0 else f"{a / b:.1f}×"


FIELDS = ["model", "n", "P", "K"] + [
    f"{m}_{q}"
    for m in ("layerwise", "generic", "baseline", "forward", "step")
    for q in ("seconds", "peak_bytes")
]
"""Columns of the CSV, then the provenance of each row: ``run`` (its command and commit)."""


def result_paths(device: str) -> tuple[Path, Path]:
    """The CSV and Markdown results of ``device``'s type (the CPU's have no suffix)."""
    kind = torch.device(device).type
    stem = "ntk_speed" if kind == "cpu" else f"ntk_speed_{kind}"
    return RESULTS / f"{stem}.csv", RESULTS / f"{stem}.md"


def machine(device: str) -> str:
    """The machine the measurements ran on, the card's name included."""
    cpus = f"{os.cpu_count()} CPUs, torch {torch.__version__}"
    name = card(device)
    return cpus if name is None else f"{name}, {cpus}"


def previous_rows(models: list[str], device: str) -> tuple[list[dict[str, object]], list[str]]:
    """The rows of the committed results for the models not measured now, with their run
    (command and commit; a file written before runs were recorded: its first line and the
    commit that last wrote it), and its large-n line when mlp500 is not measured now."""
    csv_path, md_path = result_paths(device)
    if not csv_path.exists() or not md_path.exists():
        return [], []
    lines = md_path.read_text().splitlines()
    old_commit = subprocess.run(
        ["git", "log", "-1", "--format=%h", "--", str(csv_path)], capture_output=True, text=True
    ).stdout.strip()
    old_run = f"{lines[0]} (results committed in {old_commit})"
    with open(csv_path, newline="") as fh:
        kept = [r for r in csv.DictReader(fh) if r["model"] not in models]
    rows: list[dict[str, object]] = []
    for r in kept:
        row: dict[str, object] = {k: (float(r[k]) if r.get(k) else None) for k in FIELDS[4:]}
        row["model"], row["n"], row["P"] = r["model"], int(r["n"]), int(r["P"])
        row["K"] = int(r["K"]) if r.get("K") else outputs_per_row(r["model"])
        row["run"] = r.get("run") or old_run
        rows.append(row)
    large = [line for line in lines if line.startswith("Fast path at n =")]
    return rows, large if "mlp500" not in models else []


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small n only (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--large-n", type=int, default=20000, help="n for the one large fast-path run (0: skip)"
    )
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help="comma-separated models to measure (default: all); the committed rows of the "
        "others are kept, each with the command and commit that measured it",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the model, the rows and the kernel live (cpu, cuda, cuda:1, ...)",
    )
    parser.add_argument(
        "--worker", nargs=3, metavar=("MODEL", "METHOD", "N"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        model_name, method, n = args.worker
        print(json.dumps(worker(model_name, method, int(n))))
        return
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    try:
        card(args.device)
    except ValueError as error:
        parser.error(str(error))

    command = (
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '<unset>')} "
        f"{os.path.relpath(sys.executable)} benchmarks/ntk_speed.py {' '.join(sys.argv[1:])}"
    )
    run = f"`{command}` at commit {git_commit()}"
    load_start = os.getloadavg()[0]
    rows = []
    for model_name, n in configs(args.quick):
        if model_name not in models:
            continue
        model, _ = build_model(model_name)
        P = sum(p.numel() for p in model.parameters())
        K = outputs_per_row(model_name)
        result: dict[str, object] = {"model": model_name, "n": n, "P": P, "K": K, "run": run}
        for method in ("layerwise", "generic", "baseline", "forward", "step"):
            if method == "baseline" and not baseline_fits(model_name, n):
                result[f"{method}_seconds"] = result[f"{method}_peak_bytes"] = None
                continue
            m = measure(model_name, method, n, args.repeats, args.device)
            result[f"{method}_seconds"], result[f"{method}_peak_bytes"] = (
                m["seconds"],
                m["peak_bytes"],
            )
            print(model_name, n, method, m, flush=True)
        rows.append(result)
    large_lines: list[str] = []
    if not args.quick and args.large_n and "mlp500" in models:
        large = measure("mlp500", "layerwise", args.large_n, 1, args.device)
        print("large", args.large_n, large, flush=True)
        large_lines = [
            f"Fast path at n = {args.large_n} (mlp500, one run): {large['seconds']:.1f} s, "
            f"peak {large['peak_bytes'] / 1e9:.2f} GB (the float64 kernel alone is "
            f"{args.large_n**2 * 8 / 1e9:.2f} GB)."
        ]
    load_end = os.getloadavg()[0]
    if not args.quick and set(models) != set(MODELS):
        kept, kept_large = previous_rows(models, args.device)
        order = {name: i for i, name in enumerate(MODELS)}
        rows = sorted(kept + rows, key=lambda r: (order[str(r["model"])], int(r["n"])))
        large_lines = large_lines or kept_large
    write_results(rows, large_lines, args, run, load_start, load_end)


def write_results(rows, large_lines, args, run, load_start, load_end) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = result_paths(args.device)
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*FIELDS, "run"])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k) for k in [*FIELDS, "run"]})
    runs = list(dict.fromkeys(str(r["run"]) for r in rows))
    g = lambda r, k: r.get(k)  # noqa: E731
    lines = [
        run,
        "",
        "# Empirical NTK: speed and peak memory",
        "",
        f"Machine: {machine(args.device)}, {args.repeats} repeats (median), "
        f"{'one fresh subprocess per measurement' if args.device == 'cpu' else 'in one process'}"
        ". Load average (1 min) at start "
        f"{load_start:.1f}, at end {load_end:.1f}: the machine was shared with other jobs, so "
        "absolute times are noisy; the ratios compare methods measured in the same run.",
        "",
        "Runs (the `run` column; a row's ratios compare methods of the same run). `--models` "
        "measures only the models it names and keeps the committed rows of the others, so the "
        "rows of an earlier run were not measured again:",
        "",
        *[f"{i + 1}. {r}" for i, r in enumerate(runs)],
        "",
        (
            "Peak memory = peak RSS of the measuring process (`ru_maxrss`) minus its RSS just "
            "before the call"
            if args.device == "cpu"
            else "Peak memory = the card's peak allocated memory "
            "(`torch.cuda.max_memory_allocated`) minus what was allocated just before the call"
        )
        + " (after building the model and inputs and a warm-up on 8 rows): the extra "
        "memory the call needs, the kernel included. Baseline = `vmap(jacrev)` over all rows + "
        '`einsum` per parameter, float32; "—" = skipped (estimated peak above 12 GB). Fast = '
        "layerwise path; both library paths return float64. The models are float32: the "
        "generic path holds its Jacobian chunks in float32 and multiplies them in float32 in "
        "groups of 65,536 parameters accumulated in float64 (relative error about 1e-7), and "
        "so does the layerwise path with the per-sample gradients of conv layers; its chunk "
        "budget is the default 1 GiB, so at most two chunks of 1,046 rows of the mlp500 "
        "Jacobian are alive at once. Forward = one plain forward pass over the n rows (no "
        "gradients, one batch); step = forward and backward of the summed outputs to the "
        "parameters, one full-batch gradient (rows measured before these columns existed show "
        "—). A kernel path needs a forward, K backward passes and the conv layers' per-sample "
        "gradients, about K steps, plus its Gram products: with K = 1 and a cheap Gram (lenet) "
        "generic/step bounds the speed-up over the generic path that a path built from "
        "autograd's kernels can reach.",
        "",
        "| model | n | K | P | fast s | generic s | baseline s | fast GB | generic GB | "
        "baseline GB | generic/fast time | baseline/fast time | baseline/generic time | "
        "baseline/fast mem | baseline/generic mem | forward s | step s | fast/step time | "
        "generic/step time | run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['n']} | {r['K']} | {r['P']:,} | "
            f"{fmt_s(g(r, 'layerwise_seconds'))} | "
            f"{fmt_s(g(r, 'generic_seconds'))} | {fmt_s(g(r, 'baseline_seconds'))} | "
            f"{fmt_gb(g(r, 'layerwise_peak_bytes'))} | {fmt_gb(g(r, 'generic_peak_bytes'))} | "
            f"{fmt_gb(g(r, 'baseline_peak_bytes'))} | "
            f"{ratio(g(r, 'generic_seconds'), g(r, 'layerwise_seconds'))} | "
            f"{ratio(g(r, 'baseline_seconds'), g(r, 'layerwise_seconds'))} | "
            f"{ratio(g(r, 'baseline_seconds'), g(r, 'generic_seconds'))} | "
            f"{ratio(g(r, 'baseline_peak_bytes'), g(r, 'layerwise_peak_bytes'))} | "
            f"{ratio(g(r, 'baseline_peak_bytes'), g(r, 'generic_peak_bytes'))} | "
            f"{fmt_s(g(r, 'forward_seconds'), 3)} | {fmt_s(g(r, 'step_seconds'), 3)} | "
            f"{ratio(g(r, 'layerwise_seconds'), g(r, 'step_seconds'))} | "
            f"{ratio(g(r, 'generic_seconds'), g(r, 'step_seconds'))} | "
            f"{runs.index(str(r['run'])) + 1} |"
        )
    lines += [
        "",
        "Models: mlp500 = the paper's MLP (10 → 500 → 500 → 1, ReLU); mlp3 = 10 → 256 → 256 → 3 "
        "(tanh, K = 3, N = 3n); cnn = Conv2d(1,16,3)-ReLU-Conv2d(16,16,3)-ReLU-Flatten-Linear on "
        "1×16×16 inputs; lenet = Conv2d(1,6,5)-ReLU-MaxPool2d(2)-Conv2d(6,16,5)-ReLU-MaxPool2d(2)"
        "-Flatten-Linear(256,120)-ReLU-Linear(120,84)-ReLU-Linear(84,1) on 1×28×28 inputs "
        "(random), lenet10 the same with 10 outputs (N = 10n).",
    ]
    if large_lines:
        lines += ["", *large_lines]
    md_path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
