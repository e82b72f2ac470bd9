"""Stopping quality: REML (time and trajectory rules), GCV, holdout, fixed budget, oracle.

For each case (data set) x network x repetition (data split / subsample seed and initialisation
seed), the network is trained ONCE by full-batch gradient descent for the whole step budget,
recording at every step k = 0..K (k = number of updates taken) the train MSE, the test MSE and
the trajectory statistic D(r_k) = u0' H r_k - lambda_bar u0' r_k (METHOD M4). Every rule that
reads only the training data (REML time rule, REML trajectory rule, GCV, fixed budget) is then
read off that one run; the oracle is the argmin of the recorded test MSE. Holdout early stopping
needs its own run (it trains on 80% of the training rows): Lightning's ``EarlyStopping`` on the
validation MSE, patience 10 and 100, best-validation weights restored.

Usage (from the repository root)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/stopping_quality.py --quick
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/stopping_quality.py            # full
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/stopping_quality.py --reps 8 --resume
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/stopping_quality.py --report-only

Outputs (under ``--out``, default ``benchmarks/results``): ``stopping_quality.csv`` (one row per
case x network x repetition x rule, appended as each repetition finishes, so a partial run
leaves usable rows), ``stopping_quality.md`` (tables), ``stopping_quality_ratios.png`` (box
plots of test-MSE ratio to the oracle), ``stopping_quality_curve_<case>.png`` (one training
curve per case with every rule's stop marked) and ``stopping_quality_curves.npz`` (the curves
of the first repetition, for re-plotting with ``--report-only``).

Clock (METHOD M2): half-MSE loss L = (1/2) mean((f - y)^2), a = 1/2, so one GD step with
learning rate eta advances gradient-flow time dt = 2 a eta = eta; the REML time rule stops at
step round(t_hat / dt) (dt from ``remlstop.clock.GradientFlowClock``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from remlstop.clock import GradientFlowClock  # noqa: E402
from remlstop.datasets import paper_mlp, paper_simple_function  # noqa: E402
from remlstop.reml import gcv_fit, reml_fit  # noqa: E402
from remlstop.spectrum import KernelSpectrum  # noqa: E402
from remlstop.vctest import variance_component_test  # noqa: E402

try:  # the library's kernel (the final runs must use it)
    from remlstop.ntk import empirical_ntk as _library_ntk

    NTK_SOURCE = "remlstop.ntk.empirical_ntk"
except ImportError:  # pragma: no cover - only while remlstop.ntk did not exist yet
    _library_ntk = None
    NTK_SOURCE = "local fallback (torch.func jacrev, J J^T / N in float64)"

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
except ImportError:  # pragma: no cover
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import EarlyStopping
    from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason

LR = 0.01
ALPHA = 0.05
VAL_FRACTION = 0.2

CASES = ("paper", "friedman1", "diabetes", "fair", "noise")
NETS = ("relu500x2", "tanh256x3")
RULES = (
    "oracle",
    "reml_time",
    "reml_time_decided",
    "reml_traj",
    "reml_traj_decided",
    "gcv",
    "holdout_p10",
    "holdout_p100",
    "budget",
)
RULE_LABELS = {
    "oracle": "oracle",
    "reml_time": "REML t̂ (raw)",
    "reml_time_decided": "REML t̂ (as decided)",
    "reml_traj": "REML D≤0 (raw)",
    "reml_traj_decided": "REML D≤0 (as decided)",
    "gcv": "GCV",
    "holdout_p10": "holdout p10",
    "holdout_p100": "holdout p100",
    "budget": "fixed budget",
}
CASE_LABELS = {
    "paper": "paper simple fn (480/120)",
    "friedman1": "Friedman #1 (400/100)",
    "diabetes": "diabetes (353/89)",
    "fair": "fair, log1p(affairs) (800/200)",
    "noise": "pure noise (480/120)",
}

log = logging.getLogger("stopping_quality")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def _standardise(xtr: np.ndarray, xte: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = xtr.mean(axis=0, keepdims=True)
    sd = xtr.std(axis=0, keepdims=True)
    sd = np.where(sd > 0, sd, 1.0)
    return (xtr - mu) / sd, (xte - mu) / sd


def _split(x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float = 0.2) -> Split:
    """Random train/test split; features and target standardised with the TRAIN statistics."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    te, tr = perm[:n_test], perm[n_test:]
    xtr, xte = _standardise(x[tr], x[te])
    ytr, yte = _standardise(y[tr, None], y[te, None])
    f = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    return Split(f(xtr), f(ytr), f(xte), f(yte))


def load_case(case: str, rep: int) -> Split:
    """Data for one repetition; ``rep`` seeds the draw / split / subsample."""
    data_seed = 1000 + rep
    if case == "paper":
        # The paper's setting as published: X ~ N(0, I_10) (already standard), raw targets.
        xtr, ytr, xte, yte = paper_simple_function(n=600, n_train=480, seed=data_seed)
        return Split(xtr, ytr, xte, yte)
    if case == "noise":
        # Targets independent of X: X ~ N(0, I_10), y ~ N(0, 1), n = 600 (480 train / 120 test).
        g = np.random.default_rng(data_seed)
        x = g.standard_normal((600, 10))
        y = g.standard_normal(600)
        f = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
        return Split(f(x[:480]), f(y[:480, None]), f(x[480:]), f(y[480:, None]))
    if case == "friedman1":
        from sklearn.datasets import make_friedman1

        x, y = make_friedman1(n_samples=500, n_features=10, noise=1.0, random_state=data_seed)
        return _split(x, y, data_seed)
    if case == "diabetes":
        from sklearn.datasets import load_diabetes

        d = load_diabetes()
        return _split(np.asarray(d.data, float), np.asarray(d.target, float), data_seed)
    if case == "fair":
        import statsmodels.api as sm

        d = sm.datasets.fair.load_pandas().data
        rng = np.random.default_rng(data_seed)
        idx = rng.choice(len(d), size=1000, replace=False)  # subsample: keeps N = 800
        d = d.iloc[idx]
        y = np.log1p(d["affairs"].to_numpy(float))  # 68% zeros, long right tail: log1p
        x = d.drop(columns=["affairs"]).to_numpy(float)
        return _split(x, y, data_seed + 1)
    raise ValueError(f"unknown case {case!r}; choose from {CASES}")


def build_net(net: str, d_in: int, seed: int) -> nn.Sequential:
    if net == "relu500x2":
        return paper_mlp(width=500, depth=2, d_in=d_in, activation=nn.ReLU, seed=seed)
    if net == "tanh256x3":
        return paper_mlp(width=256, depth=3, d_in=d_in, activation=nn.Tanh, seed=seed)
    raise ValueError(f"unknown net {net!r}; choose from {NETS}")


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------


def _fallback_ntk(model: nn.Module, x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).reshape(-1)

    jf = vmap(jacrev(f), in_dims=(None, 0))
    blocks = []
    for i in range(0, x.shape[0], chunk):
        j = jf(params, x[i : i + chunk])
        blocks.append(torch.cat([v.reshape(v.shape[0] * v.shape[1], -1) for v in j.values()], 1))
    J = torch.cat(blocks).double()
    return J @ J.T / J.shape[0]


def kernel(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if _library_ntk is not None:
        return _library_ntk(model, x)
    return _fallback_ntk(model, x)


# --------------------------------------------------------------------------------------------
# Main training run: every training-data rule is read off it
# --------------------------------------------------------------------------------------------


@dataclass
class MainRun:
    test_mse: np.ndarray  # (K+1,) test MSE after k updates
    train_mse: np.ndarray  # (K+1,)
    D: np.ndarray  # (K+1,) trajectory statistic on the real residual r_k
    step_seconds: float  # forward + backward + update per step (no bookkeeping)
    d_seconds: float  # D evaluation per step


def train_main(model: nn.Module, s: Split, steps: int, h: np.ndarray, u0: np.ndarray,
               lam_bar: float) -> MainRun:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    h_t = torch.as_tensor(h, dtype=torch.float64)
    u_t = torch.as_tensor(u0, dtype=torch.float64)
    test_mse = np.empty(steps + 1)
    train_mse = np.empty(steps + 1)
    D = np.empty(steps + 1)
    t_train = 0.0
    t_d = 0.0
    for k in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(s.x_train)
        loss = 0.5 * ((out - s.y_train) ** 2).mean()  # half-MSE, a = 1/2
        t1 = time.perf_counter()
        with torch.no_grad():
            r = (s.y_train - out).detach().reshape(-1).double()
            D[k] = float(h_t @ r - lam_bar * (u_t @ r))
            train_mse[k] = float((r**2).mean())
            t2 = time.perf_counter()
            test_mse[k] = float(((model(s.x_test) - s.y_test) ** 2).mean())
        t3 = time.perf_counter()
        if k < steps:
            loss.backward()
            opt.step()
        t4 = time.perf_counter()
        t_train += (t1 - t0) + (t4 - t3)
        t_d += t2 - t1
    return MainRun(test_mse, train_mse, D, t_train / max(steps, 1), t_d / (steps + 1))


# --------------------------------------------------------------------------------------------
# Holdout: Lightning EarlyStopping on a 20% validation split of the training rows
# --------------------------------------------------------------------------------------------


class _HoldoutModule(pl.LightningModule):
    def __init__(self, net: nn.Module, s_val: tuple, s_test: tuple):
        super().__init__()
        self.net = net
        self.x_val, self.y_val = s_val
        self.x_test, self.y_test = s_test
        self.val_hist: list[float] = []
        self.test_hist: list[float] = []
        # Best-val weights, tracked manually (strict improvement, as EarlyStopping with
        # min_delta = 0): one copy for each patience. p10 stops updating once it would stop.
        self.best = {"p10": (math.inf, None, -1), "p100": (math.inf, None, -1)}
        self.p10_active = True
        self.train_seconds = 0.0
        self._t0 = 0.0

    def forward(self, x):
        return self.net(x)

    def on_train_batch_start(self, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.train_seconds += time.perf_counter() - self._t0

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * ((self.net(x) - y) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        val = ((self.net(x) - y) ** 2).mean()
        self.log("val_mse", val, on_step=False, on_epoch=True, prog_bar=False)
        test = float(((self.net(self.x_test) - self.y_test) ** 2).mean())
        v = float(val)
        epoch = self.current_epoch
        self.val_hist.append(v)
        self.test_hist.append(test)
        for key in ("p10", "p100"):
            if key == "p10" and not self.p10_active:
                continue
            if v < self.best[key][0]:
                state = {k: t.detach().clone() for k, t in self.net.state_dict().items()}
                self.best[key] = (v, state, epoch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=LR)


class RecordingEarlyStopping(EarlyStopping):
    """Lightning's ``EarlyStopping`` criterion, recording the epoch where it WOULD stop without
    stopping the trainer. Full-batch GD is deterministic, so the patience-10 run is an exact
    prefix of the patience-100 run: one Lightning run serves both patiences."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.triggered_epoch: int | None = None

    def on_train_epoch_end(self, trainer, pl_module):
        if self.triggered_epoch is not None:
            return
        was = trainer.should_stop
        super().on_train_epoch_end(trainer, pl_module)
        if self.stopping_reason != EarlyStoppingReason.NOT_STOPPED:
            self.triggered_epoch = trainer.current_epoch
            pl_module.p10_active = False
        trainer.should_stop = was


@dataclass
class HoldoutRun:
    test_at: dict  # rule -> test MSE with the best-val weights restored
    best_step: dict  # rule -> step of the restored weights (1-based: after epoch e, e+1 steps)
    trained_steps: dict  # rule -> steps actually trained before the rule said stop
    test_curve: np.ndarray  # test MSE after each step of the holdout run (steps 1..)
    val_curve: np.ndarray
    step_seconds: float


def train_holdout(model: nn.Module, s: Split, steps: int, seed: int) -> HoldoutRun:
    from torch.utils.data import DataLoader, TensorDataset

    n = s.x_train.shape[0]
    rng = np.random.default_rng(seed)
    perm = torch.as_tensor(rng.permutation(n))
    n_val = int(round(VAL_FRACTION * n))
    iv, it = perm[:n_val], perm[n_val:]
    xt, yt = s.x_train[it], s.y_train[it]
    xv, yv = s.x_train[iv], s.y_train[iv]
    module = _HoldoutModule(model, (xv, yv), (s.x_test, s.y_test))
    train_dl = DataLoader(TensorDataset(xt, yt), batch_size=len(yt), shuffle=False)
    val_dl = DataLoader(TensorDataset(xv, yv), batch_size=len(yv), shuffle=False)
    es10 = RecordingEarlyStopping(monitor="val_mse", mode="min", patience=10,
                                  check_on_train_epoch_end=True)
    es100 = EarlyStopping(monitor="val_mse", mode="min", patience=100,
                          check_on_train_epoch_end=True)
    trainer = pl.Trainer(
        max_epochs=steps, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, check_val_every_n_epoch=1, callbacks=[es10, es100],
    )  # fmt: skip
    trainer.fit(module, train_dl, val_dl)
    epochs_run = len(module.val_hist)
    test_at, best_step, trained = {}, {}, {}
    for key, es in (("p10", es10), ("p100", es100)):
        _, state, epoch = module.best[key]
        if key == "p10":
            stop_epoch = es.triggered_epoch if es.triggered_epoch is not None else epochs_run - 1
        else:
            stopped = es.stopping_reason != EarlyStoppingReason.NOT_STOPPED
            stop_epoch = es.stopped_epoch if stopped else epochs_run - 1
        model.load_state_dict(state)  # restore the best-val weights, evaluate on the test set
        with torch.no_grad():
            test_at[f"holdout_{key}"] = float(((model(s.x_test) - s.y_test) ** 2).mean())
        best_step[f"holdout_{key}"] = epoch + 1
        trained[f"holdout_{key}"] = stop_epoch + 1
    return HoldoutRun(test_at, best_step, trained, np.array(module.test_hist),
                      np.array(module.val_hist), module.train_seconds / max(epochs_run, 1))


# --------------------------------------------------------------------------------------------
# One repetition
# --------------------------------------------------------------------------------------------


def run_one(case: str, net: str, rep: int, steps: int, holdout: bool = True) -> tuple[list, dict]:
    s = load_case(case, rep)
    init_seed = 5000 + rep
    model = build_net(net, s.x_train.shape[1], init_seed)
    model_holdout = copy.deepcopy(model)  # same theta_0 for the holdout run

    # --- REML machinery, timed: kernel, eigh (spectrum), test, fits
    t0 = time.perf_counter()
    H = kernel(model, s.x_train)
    t1 = time.perf_counter()
    with torch.no_grad():
        u0 = (s.y_train - model(s.x_train)).double().reshape(-1).numpy()
    spec = KernelSpectrum.from_kernel(H, u0)
    t2 = time.perf_counter()
    vt = variance_component_test(spec, alpha=ALPHA)
    t3 = time.perf_counter()
    fit = reml_fit(spec)
    t4 = time.perf_counter()
    gfit = gcv_fit(spec)
    t5 = time.perf_counter()
    lam_bar = spec.mean_eigenvalue
    h = (H @ torch.as_tensor(u0, dtype=H.dtype)).numpy()  # h = H u0, once (trajectory rule)
    del H

    opt_for_clock = torch.optim.SGD(model.parameters(), lr=LR)
    dt = GradientFlowClock(opt_for_clock, "half_mse").dt_per_step()  # = 2 a eta = eta (M2)

    run = train_main(model, s, steps, h, u0, lam_bar)
    te = run.test_mse

    def t_rule(t: float) -> tuple[int, bool]:
        if not math.isfinite(t):
            return steps, True
        k = int(round(t / dt))
        return (min(k, steps), k > steps)

    stops: dict[str, tuple[int, bool]] = {}
    k_star = int(np.argmin(te))
    stops["oracle"] = (k_star, k_star == steps)  # "capped": the best step is the last one
    stops["budget"] = (steps, False)
    stops["reml_time"] = t_rule(fit.t)
    stops["reml_time_decided"] = stops["reml_time"] if vt.train else (0, False)
    below = np.flatnonzero(run.D <= 0)
    stops["reml_traj"] = (int(below[0]), False) if below.size else (steps, True)
    stops["reml_traj_decided"] = stops["reml_traj"] if vt.train else (0, False)
    stops["gcv"] = t_rule(gfit.t)

    ho = train_holdout(model_holdout, s, steps, seed=7000 + rep) if holdout else None

    reml_seconds = t4 - t0  # kernel + eigh + test + REML fit (GCV excluded)
    oracle = float(te.min())
    common = dict(
        case=case, net=net, rep=rep, n_train=int(s.x_train.shape[0]), n_test=int(s.x_test.shape[0]),
        steps_budget=steps, dt=dt, pvalue=vt.pvalue, pvalue_method=vt.method,
        reject=int(vt.train), statistic=vt.statistic, lambda_bar=lam_bar,
        t_hat=fit.t, t_hat_steps=fit.t / dt if math.isfinite(fit.t) else math.inf,
        gcv_t=gfit.t, reml_df=fit.df, reml_sigma2=fit.sigma2,
        kernel_s=t1 - t0, eigh_s=t2 - t1, test_s=t3 - t2, fit_s=t4 - t3, gcv_s=t5 - t4,
        reml_s=reml_seconds, train_step_s=run.step_seconds, d_eval_s=run.d_seconds,
        holdout_step_s=ho.step_seconds if ho else math.nan, oracle_test_mse=oracle,
        test_mse_init=float(te[0]), ntk_source=NTK_SOURCE,
    )
    rows = []
    for rule in RULES:
        if rule.startswith("holdout"):
            if ho is None:
                continue
            stop, capped = ho.best_step[rule], ho.trained_steps[rule] >= steps
            test, trained = ho.test_at[rule], ho.trained_steps[rule]
        else:
            stop, capped = stops[rule]
            test, trained = float(te[stop]), stop
        row = dict(common, rule=rule, stop_step=stop, trained_steps=trained, capped=int(capped),
                   test_mse=test, ratio=test / oracle)
        if rule in ("reml_time", "reml_time_decided"):
            row["overhead_frac"] = (reml_seconds / (run.step_seconds * stop)) if stop > 0 else math.nan
        rows.append(row)
    curves = dict(test=te, train=run.train_mse, D=run.D,
                  stops={r: stops[r][0] for r in stops},
                  ho_test=ho.test_curve if ho else np.array([]),
                  ho_stops=(ho.best_step if ho else {}))
    return rows, curves


def run_test_only(case: str, net: str, rep: int) -> dict:
    """Variance-component test and REML t-hat at theta_0 only (no training): cheap, so many reps."""
    s = load_case(case, rep)
    model = build_net(net, s.x_train.shape[1], 5000 + rep)
    t0 = time.perf_counter()
    H = kernel(model, s.x_train)
    with torch.no_grad():
        f0 = model(s.x_train)
        u0 = (s.y_train - f0).double().reshape(-1).numpy()
    spec = KernelSpectrum.from_kernel(H, u0)
    vt = variance_component_test(spec, alpha=ALPHA)
    fit = reml_fit(spec)
    secs = time.perf_counter() - t0
    y = s.y_train.double().reshape(-1)
    # Diagnostic: the same test on u = y, i.e. as if the network started from f0 = 0. Under
    # "y independent of X" this u really is iid noise, so its rejection rate is the test's size.
    vt_y = variance_component_test(KernelSpectrum.from_kernel(H, y.numpy()), alpha=ALPHA)
    # Remedy a user can apply today: keep u0 but project the initial output off as a fixed
    # effect. With y independent of X, u0 off f0 is y off f0, iid noise in that complement, so
    # this test has exact size; on signal cases it shows how much power the projection costs.
    f0_col = f0.double().reshape(-1, 1).numpy()
    vt_f0 = variance_component_test(KernelSpectrum.from_kernel(H, u0, f0_col), alpha=ALPHA)
    return dict(case=case, net=net, rep=rep, n_train=int(s.x_train.shape[0]), pvalue=vt.pvalue,
                pvalue_method=vt.method, pvalue_satterthwaite=vt.pvalue_satterthwaite,
                reject=int(vt.train), statistic=vt.statistic, lambda_bar=spec.mean_eigenvalue,
                t_hat=fit.t, f0_ms=float((f0.double() ** 2).mean()),
                y_var=float(y.var()), reml_s=secs, pvalue_y=vt_y.pvalue, reject_y=int(vt_y.train),
                pvalue_f0cov=vt_f0.pvalue, reject_f0cov=int(vt_f0.train))


TEST_FIELDS = ["case", "net", "rep", "n_train", "pvalue", "pvalue_method", "pvalue_satterthwaite",
               "reject", "statistic", "lambda_bar", "t_hat", "f0_ms", "y_var", "reml_s",
               "pvalue_y", "reject_y", "pvalue_f0cov", "reject_f0cov"]


def _rate(x, col: str) -> str:
    if col not in x or x[col].isna().all():
        return "–"
    v = x[col].dropna()
    p = v.mean()
    return f"{p:.3f} ({math.sqrt(max(p * (1 - p), 1e-12) / len(v)):.3f})"


def _test_only_section(path: Path, cases: list, nets: list) -> list[str]:
    import pandas as pd

    if not path.exists():
        return []
    d = pd.read_csv(path)
    if d.empty:
        return []
    L = ["## Variance-component test alone, many draws (no training)\n",
         "The same data/initialisation seeds as above, extended to many repetitions: only the "
         "kernel at θ0, the test and t̂ are computed (a fraction of a second each), so the "
         "rejection rates here have usable precision (binomial standard error in brackets). "
         "`f0²/var(y)`: mean squared initial output over the target variance — the part of u0 "
         "that is not noise even when y is independent of X. `rejection on u = y`: the same "
         "test with f0 set to 0 (u = y); with y independent of X that u is iid noise, so this "
         "column is the test's true size on the noise case. `rejection with f0 as covariate`: "
         "the test on u0 with the initial output f0 projected off as a fixed effect "
         "(`variance_component_test(H, u0, covariates=f0)`); exact size on the noise case, and "
         "on the signal cases the power that projection leaves.\n",
         "| case | net | draws | rejection rate (SE) | Satterthwaite rejection rate | "
         "t̂ = 0 rate | median f0²/var(y) | rejection on u = y (SE) | "
         "rejection with f0 as covariate (SE) |",
         "|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        for n in nets:
            x = d[(d.case == c) & (d.net == n)]
            if x.empty:
                continue
            p = x.reject.mean()
            se = math.sqrt(max(p * (1 - p), 1e-12) / len(x))
            L.append(f"| {c} | {n} | {len(x)} | {p:.3f} ({se:.3f}) | "
                     f"{(x.pvalue_satterthwaite < ALPHA).mean():.3f} | {(x.t_hat == 0).mean():.2f} | "
                     f"{(x.f0_ms / x.y_var).median():.3f} | {_rate(x, 'reject_y')} | "
                     f"{_rate(x, 'reject_f0cov')} |")
    L.append("")
    return L


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

FIELDS = [
    "case", "net", "rep", "rule", "stop_step", "trained_steps", "capped", "test_mse", "ratio",
    "oracle_test_mse", "test_mse_init", "n_train", "n_test", "steps_budget", "dt", "pvalue",
    "pvalue_method", "reject", "statistic", "lambda_bar", "t_hat", "t_hat_steps", "gcv_t",
    "reml_df", "reml_sigma2", "kernel_s", "eigh_s", "test_s", "fit_s", "gcv_s", "reml_s",
    "train_step_s", "d_eval_s", "holdout_step_s", "overhead_frac", "ntk_source",
]  # fmt: skip


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       text=True).strip()
    except Exception:  # pragma: no cover
        return "unknown"


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"


def _r(x: float) -> str:
    """Ratios: three decimals (the differences between rules are often a few per cent)."""
    return "–" if not math.isfinite(x) else f"{x:.3f}"


def write_report(csv_path: Path, out: Path, meta: dict, tag: str = "") -> None:
    import pandas as pd

    df = pd.read_csv(csv_path)
    if df.empty:
        return
    cases = [c for c in CASES if c in set(df.case)]
    nets = [n for n in NETS if n in set(df.net)]
    rules = [r for r in RULES if r in set(df.rule)]
    L = []
    L.append("# Stopping quality: REML vs GCV vs holdout vs fixed budget vs oracle\n")
    L.append(f"- command: `{meta.get('command', '?')}`")
    L.append(f"- git commit: `{meta.get('commit', _git_commit())}` (working tree may hold "
             "uncommitted edits by other engineers)")
    L.append(f"- kernel: {', '.join(sorted(set(df.ntk_source)))}")
    L.append(f"- wall time of the run(s) that wrote these rows: {meta.get('wall', '?')}")
    reps = df[df.rule == "oracle"].groupby(["case", "net"]).size()
    L.append("- repetitions per case × network: "
             + ", ".join(f"{c}/{n}: {reps.get((c, n), 0)}" for c in cases for n in nets))
    L.append(f"- step budget K = {sorted(set(df.steps_budget))}, lr = {LR}, full-batch GD, "
             "half-MSE; Δt = η per step (METHOD M2)")
    L.append("- machine: 2 shared CPU cores (other engineers' jobs ran alongside: timings are "
             f"noisy); worker processes = {meta.get('jobs', 1)}, torch threads each = "
             f"{meta.get('threads', '?')}\n")

    L.append("Ratio = test MSE at the rule's stop / the oracle's (min over steps 0..K of the SAME "
             "run; holdout rules train their own run on 80% of the training rows, so their ratio "
             "can fall below 1). `as decided`: step 0 when the variance-component test gives "
             "p ≥ 0.05. `raw`: the rule regardless of the test. `capped`: the rule wanted to go "
             "past K (or never triggered) and was cut at K; for the oracle, its best step is K "
             "itself (test MSE still falling at the budget).\n")

    # Table 1: median ratio per rule per case x net
    L.append("## Median test-MSE ratio to the oracle (per case × network)\n")
    cols = [(c, n) for c in cases for n in nets]
    L.append("| rule | " + " | ".join(f"{c}<br>{n}" for c, n in cols) + " |")
    L.append("|---|" + "---|" * len(cols))
    for r in rules:
        cells = []
        for c, n in cols:
            d = df[(df.case == c) & (df.net == n) & (df.rule == r)]
            cells.append(_r(d.ratio.median()) if len(d) else "–")
        L.append(f"| {RULE_LABELS[r]} | " + " | ".join(cells) + " |")
    L.append("")

    # Table 2: detail per case
    L.append("## Detail: ratio quartiles, mean, stop step (median), share capped at K\n")
    for c in cases:
        for n in nets:
            d0 = df[(df.case == c) & (df.net == n)]
            if d0.empty:
                continue
            L.append(f"### {CASE_LABELS[c]} — {n} ({d0.rep.nunique()} reps)\n")
            L.append("| rule | median ratio | Q1 | Q3 | mean ratio | median test MSE | "
                     "median stop step | median steps trained | capped |")
            L.append("|---|---|---|---|---|---|---|---|---|")
            for r in rules:
                d = d0[d0.rule == r]
                if d.empty:
                    continue
                L.append(
                    f"| {RULE_LABELS[r]} | {_r(d.ratio.median())} | "
                    f"{_r(d.ratio.quantile(.25))} | {_r(d.ratio.quantile(.75))} | "
                    f"{_r(d.ratio.mean())} | {_fmt(d.test_mse.median(), 4)} | "
                    f"{d.stop_step.median():.0f} | {d.trained_steps.median():.0f} | "
                    f"{int(d.capped.sum())}/{len(d)} |"
                )
            L.append("")

    # Table 3: test
    L.append("## Variance-component test (α = 0.05)\n")
    L.append("Signal cases: rejection rate = power. Noise case: rejection rate = type-I error "
             "of the question \"is there anything in y beyond noise?\" — but note that u0 = y − f0 "
             "contains −f0, a kernel-shaped function, so even with y independent of X the "
             "residual is not pure noise: the test answers \"can training improve on f0?\".\n")
    L.append("| case | net | reps | rejection rate | median p | t̂ = 0 (boundary) rate | "
             "median t̂ steps |")
    L.append("|---|---|---|---|---|---|---|")
    o = df[df.rule == "oracle"]
    for c in cases:
        for n in nets:
            d = o[(o.case == c) & (o.net == n)]
            if d.empty:
                continue
            L.append(f"| {c} | {n} | {len(d)} | {d.reject.mean():.2f} ({int(d.reject.sum())}/"
                     f"{len(d)}) | {_fmt(d.pvalue.median())} | {(d.t_hat == 0).mean():.2f} | "
                     f"{_fmt(d.t_hat_steps.median())} |")
    L.append("")
    L += _test_only_section(csv_path.with_name(csv_path.stem + "_vctest.csv"), cases, nets)

    # Table 4: overhead
    L.append("## Overhead of the REML machinery\n")
    L.append("REML seconds = kernel (empirical NTK) + eigh/spectrum + test + REML fit, once at "
             "θ0. Training time to the REML stop = (median forward+backward+update seconds per "
             "step of the main run) × REML time-rule stop step. Fraction = REML seconds / that "
             "time (per rep, then median; reps where REML stops at step 0 are left out). "
             "Also shown against the whole budget K.\n")
    L.append("| case | net | kernel s | eigh s | test+fit s | REML s | s/step | REML stop "
             "(steps) | fraction of training to REML stop | fraction of K steps | "
             "D eval s/step |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    rt = df[df.rule == "reml_time"]
    for c in cases:
        for n in nets:
            d = rt[(rt.case == c) & (rt.net == n)]
            if d.empty:
                continue
            frac_k = (d.reml_s / (d.train_step_s * d.steps_budget)).median()
            L.append(
                f"| {c} | {n} | {_fmt(d.kernel_s.median())} | {_fmt(d.eigh_s.median())} | "
                f"{_fmt((d.test_s + d.fit_s).median())} | {_fmt(d.reml_s.median())} | "
                f"{_fmt(d.train_step_s.median())} | {_fmt(float(d.stop_step.median()))} | "
                f"{_fmt(d.overhead_frac.median())} | {_fmt(frac_k)} | "
                f"{_fmt(d.d_eval_s.median())} |"
            )
    L.append("")

    # Table 5: paired comparison
    L.append("## Paired comparison: REML (as decided, time rule) against each other rule\n")
    L.append("Per rep: log of REML's ratio minus the other rule's. `REML better` counts reps "
             "where REML's test MSE is strictly lower (ties — same stop step — counted apart). "
             "Geometric-mean factor > 1 means REML's test MSE is that many times the other's.\n")
    L.append("| case | net | vs | REML better | tie | REML worse | geo-mean factor REML/other |")
    L.append("|---|---|---|---|---|---|---|")
    for c in cases:
        for n in nets:
            d0 = df[(df.case == c) & (df.net == n)]
            a = d0[d0.rule == "reml_time_decided"].set_index("rep").test_mse
            for r in ("reml_traj_decided", "gcv", "holdout_p10", "holdout_p100", "budget"):
                b = d0[d0.rule == r].set_index("rep").test_mse
                j = a.index.intersection(b.index)
                if len(j) == 0:
                    continue
                aa, bb = a[j], b[j]
                better = int((aa < bb - 1e-12).sum())
                worse = int((aa > bb + 1e-12).sum())
                tie = len(j) - better - worse
                g = float(np.exp(np.mean(np.log(aa / bb))))
                L.append(f"| {c} | {n} | {RULE_LABELS[r]} | {better} | {tie} | {worse} | "
                         f"{g:.3f} |")
    L.append("")
    L.append(f"Figures: `stopping_quality_ratios{tag}.png` (box plots of the ratios), "
             f"`stopping_quality_curve_<case>{tag}.png` (first repetition's training curves with "
             "the stops).\n")
    (out / f"stopping_quality{tag}.md").write_text("\n".join(L))
    _plot_ratios(df, cases, nets, rules, out, tag)


def _plot_ratios(df, cases, nets, rules, out: Path, tag: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rules = [r for r in rules if r != "oracle"]
    fig, axes = plt.subplots(len(cases), 1, figsize=(12, 2.9 * len(cases)), squeeze=False)
    colors = {"relu500x2": "#1f77b4", "tanh256x3": "#ff7f0e"}
    width = 0.38
    for ax, c in zip(axes[:, 0], cases):
        for j, n in enumerate(nets):
            data, pos = [], []
            for i, r in enumerate(rules):
                d = df[(df.case == c) & (df.net == n) & (df.rule == r)].ratio.to_numpy()
                if d.size:
                    data.append(d)
                    pos.append(i + (j - (len(nets) - 1) / 2) * width)
            if not data:
                continue
            bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True,
                            showfliers=True, flierprops=dict(markersize=3))
            for patch in bp["boxes"]:
                patch.set_facecolor(colors[n])
                patch.set_alpha(0.55)
            for med in bp["medians"]:
                med.set_color("black")
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_xticks(range(len(rules)))
        ax.set_xticklabels([RULE_LABELS[r] for r in rules], fontsize=8.5)
        nrep = df[(df.case == c) & (df.rule == "oracle")].groupby("net").size().to_dict()
        reps_txt = ", ".join(f"{n} {nrep.get(n, 0)}" for n in nets)
        ax.set_title(f"{CASE_LABELS[c]}  (reps: {reps_txt})", fontsize=10)
        ax.set_ylabel("test MSE / oracle")
    handles = [matplotlib.patches.Patch(color=colors[n], alpha=0.55, label=n) for n in nets]
    axes[0, 0].legend(handles=handles, loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"stopping_quality_ratios{tag}.png", dpi=110)
    plt.close(fig)


def plot_curves(curves: dict, out: Path, tag: str = "") -> None:
    """curves[(case, net)] = dict from run_one (first repetition)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {
        "oracle": ("black", "-"), "reml_time": ("tab:red", "-"), "reml_traj": ("tab:red", "--"),
        "gcv": ("tab:green", "-"), "holdout_p10": ("tab:purple", ":"),
        "holdout_p100": ("tab:purple", "-."), "budget": ("gray", "-"),
    }  # fmt: skip
    for case in CASES:
        nets = [n for n in NETS if (case, n) in curves]
        if not nets:
            continue
        fig, axes = plt.subplots(2, len(nets), figsize=(6.4 * len(nets), 8.4), squeeze=False,
                                 gridspec_kw=dict(height_ratios=[1.0, 1.0]))
        for j, n in enumerate(nets):
            cv = curves[(case, n)]
            te, tr = np.asarray(cv["test"]), np.asarray(cv["train"])
            k = np.arange(len(te)) + 1  # plotted at step + 1 on a log axis
            ho = np.asarray(cv.get("ho_test", []))
            stops = dict(cv["stops"])
            stops.update(cv.get("ho_stops", {}))
            decided = stops.get("reml_time_decided", None)
            for row in (0, 1):
                ax = axes[row, j]
                ax.plot(k, te, color="tab:blue", lw=1.6, label="test MSE")
                if row == 0:
                    ax.plot(k, tr, color="tab:blue", lw=1.0, alpha=0.45, label="train MSE")
                if ho.size:
                    ax.plot(np.arange(1, ho.size + 1) + 1, ho, color="tab:purple", lw=0.9,
                            alpha=0.6, ls="--", label="test MSE, holdout run (80% rows)")
                for r, (col, ls) in style.items():
                    if r not in stops:
                        continue
                    st = stops[r]
                    lab = f"{RULE_LABELS[r]}: step {st}"
                    if r == "reml_time" and decided == 0 and st != 0:
                        lab += " (p≥0.05 → decided: step 0)"
                    ax.axvline(st + 1, color=col, ls=ls, lw=1.3, label=lab)
                ax.set_xscale("log")
                ax.set_xlabel("step + 1 (log scale)")
                if row == 0:
                    lo = min(te.min(), tr.min())
                    hi = max(te[0], np.percentile(te, 99), tr[0])
                    ax.set_ylim(max(lo * 0.9, 0), hi * 1.05)
                    ax.set_ylabel("MSE")
                    ax.set_title(f"{CASE_LABELS[case]} — {n}, rep 0", fontsize=10)
                    ax.legend(fontsize=7, loc="lower left")
                else:
                    best = te.min()
                    # Tall enough to show every main-run stop, at least oracle x 1.12.
                    at_stops = [te[min(v, len(te) - 1)] for key, v in cv["stops"].items()]
                    top = min(max(1.12 * best, 1.03 * max(at_stops)), max(te[0], 1.12 * best))
                    ax.set_ylim(best * 0.99, top)
                    ax.set_ylabel("test MSE (zoom near the minimum)")
                    ax.set_title("zoom on the test MSE near its minimum", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"stopping_quality_curve_{case}{tag}.png", dpi=110)
        plt.close(fig)


def _save_curves(curves: dict, path: Path) -> None:
    flat = {}
    for (c, n), cv in curves.items():
        key = f"{c}__{n}"
        flat[f"{key}__test"] = cv["test"]
        flat[f"{key}__train"] = cv["train"]
        flat[f"{key}__D"] = cv["D"]
        flat[f"{key}__ho_test"] = cv["ho_test"]
        flat[f"{key}__stops"] = np.array(json.dumps({**cv["stops"], **cv["ho_stops"]}))
    np.savez_compressed(path, **flat)


def _load_curves(path: Path) -> dict:
    if not path.exists():
        return {}
    z = np.load(path)
    out = {}
    for name in z.files:
        c, n, what = name.split("__")
        d = out.setdefault((c, n), {"ho_stops": {}})
        if what == "stops":
            d["stops"] = json.loads(str(z[name]))
        else:
            d[what] = z[name]
    return out


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "pytorch_lightning", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _task(task: tuple[str, str, int], steps: int) -> tuple[list, dict, float]:
    t0 = time.perf_counter()
    rows, cv = run_one(*task, steps)
    return rows, cv, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke-size run: 2 reps, 600 steps, fair subsample as in full")
    p.add_argument("--reps", type=int, default=None, help="repetitions per case x net (full: 20)")
    p.add_argument("--steps", type=int, default=None, help="step budget K (full: 2000)")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--nets", default=",".join(NETS))
    p.add_argument("--rep-start", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default=None,
                   help="suffix for every output file (default: '_quick' with --quick, else '')")
    p.add_argument("--resume", action="store_true", help="skip (case, net, rep) already in the CSV")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--test-reps", type=int, default=None,
                   help="draws of the test-only experiment (no training; full: 200, quick: 20); "
                        "0 skips it")
    p.add_argument("--test-only", action="store_true",
                   help="run only the test-only experiment (then rebuild the report)")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes (each with --threads torch threads)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for training (1 is fastest on 2 shared cores)")
    args = p.parse_args(argv)

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    reps = args.reps if args.reps is not None else (2 if args.quick else 20)
    steps = args.steps if args.steps is not None else (600 if args.quick else 2000)
    cases = [c for c in args.cases.split(",") if c]
    nets = [n for n in args.nets.split(",") if n]
    if args.tag is None:
        args.tag = "_quick" if args.quick else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"stopping_quality{args.tag}.csv"
    npz_path = out / f"stopping_quality_curves{args.tag}.npz"
    meta_path = out / f"stopping_quality{args.tag}.meta.json"
    command = "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?") + " python " + " ".join(
        ["benchmarks/stopping_quality.py", *(argv if argv is not None else sys.argv[1:])])

    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if args.report_only:
        write_report(csv_path, out, meta, args.tag)
        plot_curves(_load_curves(npz_path), out, args.tag)
        print((out / f"stopping_quality{args.tag}.md").read_text())
        return

    test_reps = args.test_reps if args.test_reps is not None else (20 if args.quick else 200)
    vct_path = out / f"stopping_quality{args.tag}_vctest.csv"
    if test_reps > 0 and (args.test_only or not args.resume or not vct_path.exists()):
        t0 = time.perf_counter()
        keep = []  # rows of other (case, net) pairs from an earlier invocation are kept
        if vct_path.exists():
            with vct_path.open(newline="") as fh:
                keep = [r for r in csv.DictReader(fh) if (r["case"], r["net"]) not in
                        {(c, n) for c in cases for n in nets}]
        with vct_path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=TEST_FIELDS)
            w.writeheader()
            w.writerows(keep)
            fh.flush()
            for case in cases:
                for net in nets:
                    for rep in range(test_reps):
                        w.writerow(run_test_only(case, net, rep))
                    fh.flush()
        log.info("test-only experiment: %d draws x %d cases x %d nets in %.1f min", test_reps,
                 len(cases), len(nets), (time.perf_counter() - t0) / 60)
    if args.test_only:
        write_report(csv_path, out, meta, args.tag)
        plot_curves(_load_curves(npz_path), out, args.tag)
        return

    done = set()
    if args.resume and csv_path.exists():
        import pandas as pd

        d = pd.read_csv(csv_path)
        done = set(zip(d.case, d.net, d.rep))
    elif csv_path.exists():
        csv_path.unlink()
    curves = _load_curves(npz_path) if args.resume else {}
    # On --resume the report names every command that wrote rows, in order.
    run_command = (f"{meta['command']}` then `{command}" if args.resume and meta.get("command")
                   else command)
    start = time.perf_counter()
    prior_wall = float(meta.get("wall_s", 0.0)) if args.resume else 0.0
    new_file = not csv_path.exists()
    with csv_path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        if new_file:
            w.writeheader()
        # Interleave: all (case, net) for rep 0 first, then rep 1, ... so a cut run is balanced.
        tasks = [(case, net, rep) for rep in range(args.rep_start, args.rep_start + reps)
                 for case in cases for net in nets if (case, net, rep) not in done]
        if args.jobs > 1:
            import concurrent.futures as cf
            import multiprocessing as mp

            pool = cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"),
                                          initializer=_init_worker, initargs=(args.threads,))
            futures = [pool.submit(_task, t, steps) for t in tasks]
            results = (f.result() for f in futures)  # in task order
        else:
            results = (_task(t, steps) for t in tasks)
        for (case, net, rep), (rows, cv, secs) in zip(tasks, results):
            for row in rows:
                w.writerow(row)
            fh.flush()
            if (case, net) not in curves:
                curves[(case, net)] = cv
                _save_curves(curves, npz_path)
            r = {x["rule"]: x for x in rows}
            log.info(
                "%s %s rep %d: %.0fs p=%.2g reject=%d t̂=%d traj=%d gcv=%d oracle=%d ho100=%d | "
                "ratios reml=%.3f traj=%.3f gcv=%.3f ho10=%.3f ho100=%.3f budget=%.3f",
                case, net, rep, secs, r["oracle"]["pvalue"], r["oracle"]["reject"],
                r["reml_time"]["stop_step"], r["reml_traj"]["stop_step"], r["gcv"]["stop_step"],
                r["oracle"]["stop_step"], r["holdout_p100"]["stop_step"],
                r["reml_time_decided"]["ratio"], r["reml_traj_decided"]["ratio"],
                r["gcv"]["ratio"], r["holdout_p10"]["ratio"], r["holdout_p100"]["ratio"],
                r["budget"]["ratio"],
            )
            wall = prior_wall + time.perf_counter() - start
            meta = dict(command=run_command, commit=_git_commit(), threads=args.threads,
                        jobs=args.jobs, wall_s=wall, wall=f"{wall / 60:.1f} min")
            meta_path.write_text(json.dumps(meta))
        if args.jobs > 1:
            pool.shutdown()
    write_report(csv_path, out, meta, args.tag)
    plot_curves(curves, out, args.tag)
    log.info("done in %.1f min; wrote %s", (time.perf_counter() - start) / 60,
             out / f"stopping_quality{args.tag}.md")


if __name__ == "__main__":
    main()
