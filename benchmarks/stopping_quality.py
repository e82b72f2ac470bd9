"""Stopping quality: remlstop's criteria and rules against holdout, a fixed budget and the oracle.

The benchmark drives :class:`remlstop.REMLStopper` exactly as a user would. For each case x
network x repetition (data seed ``1000 + rep``, initialisation seed ``5000 + rep``) it builds
one stopper per variant -- the time rule for every criterion in ``--criteria``, the trajectory
rule for ``reml`` -- all with ``on_insignificant="continue"``, and calls ``start()`` on each
before the first update, so every stopper sees θ0. The network is then trained ONCE by
full-batch gradient descent (``torch.optim.SGD``, half-MSE loss) for K steps, recording the
test MSE after every update k = 0..K and calling ``step()`` on every stopper that has not
stopped yet. A variant's raw stop is its ``stop_step`` (K, flagged ``capped``, when it never
stopped); its decided stop is what ``on_insignificant="stop"`` would do: step 0 (do not train)
when the stopper's own ``decision.test.train`` is False. The oracle is the argmin of the test
curve, the fixed budget is K. Holdout early stopping trains its own run from the same θ0 on 80%
of the training rows: Lightning ``EarlyStopping`` on the validation MSE, patience 10 and 100,
best-validation weights restored.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stopping_quality.py --quick
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stopping_quality.py --jobs 2      # full
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stopping_quality.py --reps 3 --jobs 2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stopping_quality.py --resume --jobs 2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stopping_quality.py --report-only

Outputs (under ``--out``, default ``benchmarks/results``; ``--quick`` adds ``_quick``):
``stopping_quality.csv`` (one row per case x network x repetition x rule, appended as each
repetition finishes), ``stopping_quality.md``, ``stopping_quality_ratios.png``,
``stopping_quality_curve_<case>.png``, ``stopping_quality_curves.npz`` and ``.meta.json``
(for ``--report-only``), and ``stopping_quality_vctest.csv`` (``--test-only``: the test alone).

Clock (METHOD M2): half-MSE loss, so one step of learning rate η advances flow time by η; the
horizon in flow time is T = K·η.
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cases import CASES, NETS, Split, build_net, load_case, mse
from holdout import train_holdout
from provenance import git_commit
from stopping_report import (
    CRITERIA,
    FIELDS,
    TEST_FIELDS,
    load_curves,
    plot_curves,
    save_curves,
    write_report,
)
from torch import nn

from remlstop import Decision, REMLStopper, empirical_ntk

ROOT = Path(__file__).resolve().parents[1]
# lr·λ_max(H at θ0) <= 0.37 (ReLU) and <= 0.16 (tanh) on every case (benchmarks/lambda_max.py).
# The margin is for progressive sharpening: λ_max grows during training (METHOD M6), and by the
# horizon lr·λ_max was 0.8-2.2 (2, the edge of stability, on fair, noise, rough). The horizons
# T = K·lr = 40 and 75 are >= 20x the paper case's t-hat (about 1.6); tanh's is longer because
# its oracle comes late (t of about 45 on the paper case).
LR = {"relu500x2": 0.02, "tanh256x3": 0.025}
STEPS = {"relu500x2": 2000, "tanh256x3": 3000}
QUICK_STEPS = 800
ALPHA = 0.05

log = logging.getLogger("stopping_quality")


@dataclass(frozen=True)
class Variant:
    """One stopper configuration: a criterion and a stop rule."""

    criterion: str
    rule: str  # 'time' or 'trajectory'

    @property
    def name(self) -> str:
        """The rule's name in the CSV, e.g. 'reml-linear_time'."""
        return f"{self.criterion}_{'traj' if self.rule == 'trajectory' else 'time'}"


def variants(criteria: list[str]) -> list[Variant]:
    """The time rule for every criterion, the trajectory rule for 'reml' (the only one)."""
    out = [Variant(c, "time") for c in criteria]
    if "reml" in criteria:
        out.insert(1, Variant("reml", "trajectory"))
    return out


def make_stopper(model: nn.Module, s: Split, opt: torch.optim.Optimizer, v: Variant) -> REMLStopper:
    """The stopper a user would build, with its criterion named (the default may change)."""
    return REMLStopper(
        model,
        s.x_train,
        s.y_train,
        optimizer=opt,
        loss="half_mse",
        rule=v.rule,
        on_insignificant="continue",
        alpha=ALPHA,
        criterion=v.criterion,
    )


def lambda_max(model: nn.Module, x: torch.Tensor) -> float:
    """Largest eigenvalue of H = J Jᵀ / N at the model's current parameters."""
    return float(np.linalg.eigvalsh(empirical_ntk(model, x).numpy())[-1])


@dataclass
class MainRun:
    """The one GD run every stopper watched."""

    test_mse: np.ndarray  # (K+1,) after k updates
    train_mse: np.ndarray  # (K+1,)
    stops: dict[str, int | None]  # variant -> stop_step (None: never stopped)
    decisions: dict[str, Decision]
    start_s: dict[str, float]  # variant -> seconds of start()
    hook_s: dict[str, float]  # variant -> seconds spent in step() over the run
    step_s: float  # forward + backward + update, per step


def train_main(model: nn.Module, s: Split, lr: float, steps: int, vs: list[Variant]) -> MainRun:
    """Start every stopper at θ0, then K full-batch GD steps, stepping every live stopper."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    stoppers = {v.name: make_stopper(model, s, opt, v) for v in vs}
    decisions, start_s = {}, {}
    for name, st in stoppers.items():
        tic = time.perf_counter()
        decisions[name] = st.start()
        start_s[name] = time.perf_counter() - tic
    hook_s = dict.fromkeys(stoppers, 0.0)
    live = dict(stoppers)
    test_mse, train_mse = np.empty(steps + 1), np.empty(steps + 1)
    train_s = 0.0
    for k in range(steps + 1):
        tic = time.perf_counter()
        loss = 0.5 * ((model(s.x_train) - s.y_train) ** 2).mean()
        train_s += time.perf_counter() - tic
        train_mse[k] = 2.0 * float(loss)
        test_mse[k] = mse(model, s.x_test, s.y_test)
        if k == steps:
            break
        tic = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_s += time.perf_counter() - tic
        for name in list(live):
            tic = time.perf_counter()
            if live[name].step():
                del live[name]
            hook_s[name] += time.perf_counter() - tic
    return MainRun(
        test_mse,
        train_mse,
        {n: st.stop_step for n, st in stoppers.items()},
        decisions,
        start_s,
        hook_s,
        train_s / max(steps, 1),
    )


def _decision_fields(d: Decision) -> dict:
    """What a Decision says, read with defaults for attributes this remlstop may lack."""
    crit = getattr(d, "criteria", None)
    fits = getattr(crit, "fits", crit) or {}  # a Criteria object, or a plain mapping
    return dict(
        pvalue=d.test.pvalue,
        reject=int(d.test.train),
        t_hat=d.fit.t,
        dt=d.dt_per_step,
        target_steps=d.target_steps,
        criterion_used=getattr(d, "criterion", "reml"),
        auto_choice=getattr(crit, "auto_choice", ""),
        t_target=getattr(d, "t_target", d.fit.t),
        misfit=getattr(d, "misfit", math.nan),
        **{f"t_{c}": getattr(fits.get(c), "t", math.nan) for c in CRITERIA},
    )


def run_one(
    case: str, net: str, rep: int, steps: int, criteria: list[str], lr: float
) -> tuple[list[dict], dict]:
    """Every rule on one repetition: rows for the CSV and the curves for the plots."""
    s = load_case(case, rep)
    model = build_net(net, s.x_train.shape[1], 5000 + rep)
    model_holdout = copy.deepcopy(model)
    lam0 = lambda_max(model, s.x_train)
    vs = variants(criteria)
    tic = time.perf_counter()
    run = train_main(model, s, lr, steps, vs)
    main_s = time.perf_counter() - tic
    lam_end = lambda_max(model, s.x_train)
    tic = time.perf_counter()
    ho = train_holdout(model_holdout, s, lr, steps, seed=7000 + rep)
    holdout_s = time.perf_counter() - tic
    te = run.test_mse
    oracle = float(te.min())
    k_star = int(np.argmin(te))
    common = {
        "case": case,
        "net": net,
        "rep": rep,
        "n_train": s.x_train.shape[0],
        "n_test": s.x_test.shape[0],
        "steps_budget": steps,
        "lr": lr,
        "horizon_t": steps * lr,
        "lambda_max": lam0,
        "lr_lambda_max": lr * lam0,
        "lr_lambda_max_end": lr * lam_end,
        "oracle_test_mse": oracle,
        "oracle_step": k_star,
        "test_mse_init": float(te[0]),
        "train_step_s": run.step_s,
        "holdout_step_s": ho.step_s,
        "main_s": main_s,
        "holdout_s": holdout_s,
    }
    rows = [
        dict(
            common,
            rule="oracle",
            criterion="oracle",
            mode="",
            stop_step=k_star,
            trained_steps=steps,
            capped=int(k_star == steps),
            test_mse=oracle,
        ),
        dict(
            common,
            rule="budget",
            criterion="budget",
            mode="",
            stop_step=steps,
            trained_steps=steps,
            capped=0,
            test_mse=float(te[steps]),
        ),
    ]
    stops, decided = {}, {}
    for v in vs:
        d = run.decisions[v.name]
        raw = run.stops[v.name]
        k_raw = steps if raw is None else raw
        k_dec = k_raw if d.test.train else 0
        stops[v.name], decided[v.name] = k_raw, k_dec
        extra = dict(
            _decision_fields(d),
            criterion=v.criterion,
            stop_rule=v.rule,
            start_s=run.start_s[v.name],
            hook_s=run.hook_s[v.name],
        )
        for mode, k, capped in (
            ("raw", k_raw, raw is None),
            ("decided", k_dec, raw is None and k_dec > 0),
        ):
            name = v.name if mode == "raw" else f"{v.name}_decided"
            rows.append(
                dict(
                    common,
                    **extra,
                    rule=name,
                    mode=mode,
                    stop_step=k,
                    trained_steps=k,
                    capped=int(capped),
                    test_mse=float(te[k]),
                )
            )
    for rule in ("holdout_p10", "holdout_p100"):
        rows.append(
            dict(
                common,
                rule=rule,
                criterion="holdout",
                mode="",
                stop_step=ho.best_step[rule],
                trained_steps=ho.trained_steps[rule],
                capped=int(ho.trained_steps[rule] >= steps),
                test_mse=ho.test_at[rule],
            )
        )
    for row in rows:
        row["ratio"] = row["test_mse"] / oracle
    curves = {
        "test": te,
        "train": run.train_mse,
        "ho_test": ho.test_curve,
        "stops": dict(stops, oracle=k_star, budget=steps, **ho.best_step),
        "decided": decided,
    }
    return rows, curves


def run_test_only(case: str, net: str, rep: int) -> dict:
    """The decision alone at θ0 (no training), with and without f0 as a test covariate."""
    s = load_case(case, rep)
    model = build_net(net, s.x_train.shape[1], 5000 + rep)
    opt = torch.optim.SGD(model.parameters(), lr=LR[net])
    out = {"case": case, "net": net, "rep": rep, "n_train": s.x_train.shape[0]}
    for suffix, cov in (("", None), ("_f0cov", "f0")):
        tic = time.perf_counter()
        d = REMLStopper(
            model,
            s.x_train,
            s.y_train,
            optimizer=opt,
            loss="half_mse",
            on_insignificant="continue",
            alpha=ALPHA,
            test_covariates=cov,
        ).start()
        out.update(
            {
                f"pvalue{suffix}": d.test.pvalue,
                f"reject{suffix}": int(d.test.train),
                f"start_s{suffix}": time.perf_counter() - tic,
            }
        )
        if cov is None:
            out.update(
                pvalue_method=d.test.method, t_hat=d.fit.t, misfit=getattr(d, "misfit", math.nan)
            )
    return out


def quiet() -> None:
    """Silence Lightning's banners and the stoppers' expected warnings (capped rules)."""
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "pytorch_lightning", "lightning.fabric", "remlstop"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _init_worker(threads: int) -> None:
    """Worker set-up: thread count and silence."""
    torch.set_num_threads(threads)
    quiet()


def _task(
    task: tuple[str, str, int], steps: dict[str, int], criteria: list[str], lr: dict[str, float]
) -> tuple[list[dict], dict, float]:
    """One (case, net, rep): its CSV rows (each with the run's seconds), curves, seconds."""
    tic = time.perf_counter()
    net = task[1]
    rows, cv = run_one(*task, steps[net], criteria, lr[net])
    for row in rows:
        row["run_s"] = time.perf_counter() - tic
    return rows, cv, time.perf_counter() - tic


def _per_net(values: dict) -> str:
    """``{net: v}`` as the CLI writes it: ``net=v,net=v``."""
    return ",".join(f"{net}={v}" for net, v in values.items())


def _parse_lr(spec: str | None) -> dict[str, float]:
    """The default learning rates, overridden by ``--lr net=value,...``."""
    lr = dict(LR)
    for item in filter(None, (spec or "").split(",")):
        net, value = item.split("=")
        if net not in NETS:
            raise ValueError(f"--lr: unknown net {net!r}; choose from {NETS}")
        lr[net] = float(value)
    return lr


def _pending(
    csv_path: Path, tasks: list[tuple[str, str, int]], rules: set[str], resume: bool
) -> list[tuple[str, str, int]]:
    """Tasks still to run. On resume, a task whose rows miss a requested rule (e.g. a criterion
    added since) is rerun and its old rows dropped, so each (case, net, rep) is one run; rows of
    other tasks are kept as they are."""
    if not (resume and csv_path.exists()):
        csv_path.unlink(missing_ok=True)
        return tasks
    with csv_path.open(newline="") as fh:
        old = list(csv.DictReader(fh))
    have: dict[tuple[str, str, int], set[str]] = {}
    for r in old:
        have.setdefault((r["case"], r["net"], int(r["rep"])), set()).add(r["rule"])
    todo = [t for t in tasks if not rules <= have.get(t, set())]
    redo = set(todo)
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(r for r in old if (r["case"], r["net"], int(r["rep"])) not in redo)
    return todo


def _run_test_only(path: Path, cases: list[str], nets: list[str], draws: int) -> None:
    """Rewrite the test-only CSV for these (case, net), keeping rows of other pairs."""
    keep = []
    if path.exists():
        with path.open(newline="") as fh:
            keep = [r for r in csv.DictReader(fh) if r["case"] not in cases or r["net"] not in nets]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=TEST_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(keep)
        for case in cases:
            for net in nets:
                w.writerows(run_test_only(case, net, rep) for rep in range(draws))
                fh.flush()


def main(argv: list[str] | None = None) -> None:
    """Run the repetitions that are missing, append them to the CSV, rebuild the report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: paper and noise, both nets, 1 rep, K = {QUICK_STEPS}",
    )
    p.add_argument("--reps", type=int, default=None, help="repetitions per cell (default 10)")
    p.add_argument(
        "--paper-reps",
        type=int,
        default=None,
        help="repetitions of the paper case (default 20; --reps when that is given)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"horizon K in steps for every net (default: {_per_net(STEPS)})",
    )
    p.add_argument("--lr", default=None, help=f"per-net lr (default: {_per_net(LR)})")
    p.add_argument(
        "--criteria",
        default=",".join(CRITERIA),
        help="comma list of REMLStopper criteria (time rule each; 'reml' also gets "
        "the trajectory rule)",
    )
    p.add_argument("--cases", default=None, help=f"comma list from {','.join(CASES)}")
    p.add_argument("--nets", default=None, help=f"comma list from {','.join(NETS)}")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default=None, help="file suffix (default '_quick' with --quick)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep finished repetitions of the CSV and run the rest",
    )
    p.add_argument("--report-only", action="store_true")
    p.add_argument(
        "--test-only",
        action="store_true",
        help="only the decision at θ0 over --test-reps draws (no training)",
    )
    p.add_argument("--test-reps", type=int, default=200)
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = p.parse_args(argv)
    quiet()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    cases = (args.cases or ("paper,noise" if args.quick else ",".join(CASES))).split(",")
    nets = (args.nets or ",".join(NETS)).split(",")
    criteria = args.criteria.split(",")
    for name, got, allowed in (
        ("case", cases, CASES),
        ("net", nets, NETS),
        ("criterion", criteria, CRITERIA),
    ):
        if bad := [x for x in got if x not in allowed]:
            p.error(f"unknown {name} {bad}; choose from {tuple(allowed)}")
    reps = args.reps if args.reps is not None else (1 if args.quick else 10)
    # The paper case gets 20 by default; an explicit --reps applies to it too.
    paper_reps = (
        args.paper_reps
        if args.paper_reps is not None
        else (20 if args.reps is None and not args.quick else reps)
    )
    steps = (
        dict(STEPS)
        if args.steps is None and not args.quick
        else dict.fromkeys(NETS, args.steps or QUICK_STEPS)
    )
    lr = _parse_lr(args.lr)
    tag = args.tag if args.tag is not None else ("_quick" if args.quick else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"stopping_quality{tag}.csv"
    npz_path = out / f"stopping_quality_curves{tag}.npz"
    meta_path = out / f"stopping_quality{tag}.meta.json"
    command = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python " + " ".join(
        ["benchmarks/stopping_quality.py", *(argv or sys.argv[1:])]
    )
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}

    if args.test_only:
        tic = time.perf_counter()
        _run_test_only(out / f"stopping_quality{tag}_vctest.csv", cases, nets, args.test_reps)
        log.info(
            "test-only: %d draws in %.1f min", args.test_reps, (time.perf_counter() - tic) / 60
        )
    if args.report_only or args.test_only:
        write_report(csv_path, out, meta, tag)
        plot_curves(load_curves(npz_path), out, tag)
        return

    rules = {"oracle", "budget", "holdout_p10", "holdout_p100"}
    rules |= {f"{v.name}{m}" for v in variants(criteria) for m in ("", "_decided")}
    # All cells of rep 0 first, then rep 1, ...: a run cut short stays balanced.
    tasks = [
        (c, n, rep)
        for rep in range(max(reps, paper_reps))
        for c in cases
        for n in nets
        if rep < (paper_reps if c == "paper" else reps)
    ]
    tasks = _pending(csv_path, tasks, rules, args.resume)
    curves = load_curves(npz_path) if args.resume else {}
    if args.resume and meta.get("command"):
        command = f"{meta['command']}` then `{command}"
    prior_wall = float(meta.get("wall_s", 0.0)) if args.resume else 0.0
    start = time.perf_counter()
    if args.jobs > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        pool = cf.ProcessPoolExecutor(
            args.jobs,
            mp_context=mp.get_context("spawn"),
            initializer=_init_worker,
            initargs=(args.threads,),
        )
        task = functools.partial(_task, steps=steps, criteria=criteria, lr=lr)
        results = pool.map(task, tasks)
    else:
        results = (_task(t, steps, criteria, lr) for t in tasks)
    new_file = not csv_path.exists()
    with csv_path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        if new_file:
            w.writeheader()
        for (case, net, rep), (rows, cv, secs) in zip(tasks, results, strict=True):
            w.writerows(rows)
            fh.flush()
            if (case, net) not in curves or rep == 0:
                curves[(case, net)] = cv
                save_curves(curves, npz_path)
            o = rows[0]  # the oracle's row
            log.info(
                "%s %s rep %d: %.0f s, p = %.2g, lr·λmax %.2f -> %.2f, oracle %d | %s",
                case,
                net,
                rep,
                secs,
                rows[2]["pvalue"],
                o["lr_lambda_max"],
                o["lr_lambda_max_end"],
                o["stop_step"],
                " ".join(
                    f"{x['rule']}={x['stop_step']}:{x['ratio']:.3f}"
                    for x in rows[1:]
                    if x["mode"] != "decided"
                ),
            )
            wall = prior_wall + time.perf_counter() - start
            meta = {
                "command": command,
                "commit": git_commit(),
                "threads": args.threads,
                "jobs": args.jobs,
                "wall_s": wall,
                "criteria": criteria,
                "lr": lr,
                "steps": steps,
            }
            meta_path.write_text(json.dumps(meta))
    if args.jobs > 1:
        pool.shutdown()
    write_report(csv_path, out, meta, tag)
    plot_curves(curves, out, tag)
    log.info(
        "done in %.1f min: %s",
        (time.perf_counter() - start) / 60,
        out / f"stopping_quality{tag}.md",
    )


if __name__ == "__main__":
    main()
