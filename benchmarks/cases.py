"""Data sets and networks of the stopping-quality benchmark; all load offline.

Every case returns a :class:`Split` of float32 tensors for one repetition; ``rep`` seeds the draw,
the subsample and the train/test split, so a repetition's data depend on its number only. Except
for ``paper`` and ``noise`` (already standard, kept as published), X and y are standardised with
the training rows' statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from remlstop.datasets import paper_mlp, paper_simple_function

NETS = ("relu500x2", "tanh256x3")


@dataclass(frozen=True)
class Split:
    """Train and test rows of one repetition (targets shaped (n, 1))."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass(frozen=True)
class Case:
    """One benchmark data set: a label for the report and a loader ``rep -> Split``."""

    name: str
    label: str
    load: Callable[[int], Split]


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.float32)


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = train.mean(axis=0, keepdims=True)
    sd = train.std(axis=0, keepdims=True)
    sd = np.where(sd > 0, sd, 1.0)  # a constant column in a subsample stays finite
    return (train - mu) / sd, (test - mu) / sd


def _split(x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float = 0.2) -> Split:
    """Random train/test split, standardised with the train statistics."""
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = round(test_fraction * len(y))
    te, tr = perm[:n_test], perm[n_test:]
    xtr, xte = _standardise(x[tr], x[te])
    ytr, yte = _standardise(y[tr, None], y[te, None])
    return Split(_tensor(xtr), _tensor(ytr), _tensor(xte), _tensor(yte))


def _seed(rep: int) -> int:
    return 1000 + rep


def _paper(rep: int) -> Split:
    return Split(*paper_simple_function(n=600, n_train=480, seed=_seed(rep)))


def _noise(rep: int) -> Split:
    g = np.random.default_rng(_seed(rep))
    x = g.standard_normal((600, 10))
    y = g.standard_normal((600, 1))
    return Split(_tensor(x[:480]), _tensor(y[:480]), _tensor(x[480:]), _tensor(y[480:]))


def _friedman(which: int, noise: float) -> Callable[[int], Split]:
    def load(rep: int) -> Split:
        from sklearn import datasets

        make = getattr(datasets, f"make_friedman{which}")
        kw = {"n_features": 10} if which == 1 else {}
        x, y = make(n_samples=500, noise=noise, random_state=_seed(rep), **kw)
        return _split(x, y, _seed(rep))

    return load


def _smooth(rep: int) -> Split:
    g = np.random.default_rng(_seed(rep))
    x = g.standard_normal((500, 8))
    f = np.sin(x[:, 0]) + 0.5 * x[:, 1] ** 2 + 0.5 * x[:, 2] * x[:, 3] + np.tanh(2 * x[:, 4])
    return _split(x, f + 0.5 * g.standard_normal(500), _seed(rep))


def _rough(rep: int) -> Split:
    g = np.random.default_rng(_seed(rep))
    x = g.uniform(-1.0, 1.0, (500, 8))
    f = (
        np.sin(4 * np.pi * x[:, 0])
        + np.cos(4 * np.pi * x[:, 1])
        + 2 * np.abs(x[:, 2])
        - 2 * np.abs(x[:, 3] - 0.4)
        + 0.5 * np.sign(x[:, 4])
    )
    return _split(x, f + 0.3 * g.standard_normal(500), _seed(rep))


def _diabetes(rep: int) -> Split:
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    return _split(np.asarray(d.data, float), np.asarray(d.target, float), _seed(rep))


def _subsample(frame, size: int, seed: int):
    idx = np.random.default_rng(seed).choice(len(frame), size=size, replace=False)
    return frame.iloc[idx]


def _fair(rep: int) -> Split:
    import statsmodels.api as sm

    d = _subsample(sm.datasets.fair.load_pandas().data, 1000, _seed(rep))
    y = np.log1p(d["affairs"].to_numpy(float))  # 68% zeros and a long right tail
    return _split(d.drop(columns=["affairs"]).to_numpy(float), y, _seed(rep) + 1)


def _randhie(rep: int) -> Split:
    import statsmodels.api as sm

    d = _subsample(sm.datasets.randhie.load_pandas().data, 600, _seed(rep))
    y = np.log1p(d["mdvis"].to_numpy(float))  # visit counts: 31% zeros, long right tail
    return _split(d.drop(columns=["mdvis"]).to_numpy(float), y, _seed(rep) + 1)


def _anes96(rep: int) -> Split:
    import statsmodels.api as sm

    d = sm.datasets.anes96.load_pandas().data
    x = d.drop(columns=["selfLR", "popul"]).to_numpy(float)  # popul: logpopul is kept
    return _split(x, d["selfLR"].to_numpy(float), _seed(rep))


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("paper", "paper simple fn (480/120)", _paper),
        Case("friedman1", "Friedman #1 (400/100)", _friedman(1, 1.0)),
        Case("diabetes", "diabetes (354/88)", _diabetes),
        Case("fair", "fair, log1p(affairs) (800/200)", _fair),
        Case("noise", "pure noise (480/120)", _noise),
        Case("friedman2", "Friedman #2 (400/100)", _friedman(2, 125.0)),
        Case("friedman3", "Friedman #3 (400/100)", _friedman(3, 0.1)),
        Case("smooth", "smooth surface (400/100)", _smooth),
        Case("rough", "rough surface (400/100)", _rough),
        Case("randhie", "RAND HIE, log1p(mdvis) (480/120)", _randhie),
        Case("anes96", "ANES 1996, selfLR (755/189)", _anes96),
    )
}


def load_case(case: str, rep: int) -> Split:
    """The data of repetition ``rep`` of ``case``."""
    if case not in CASES:
        raise ValueError(f"unknown case {case!r}; choose from {tuple(CASES)}")
    return CASES[case].load(rep)


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared error of ``model`` on the rows (x, y), without gradients."""
    with torch.no_grad():
        return float(((model(x) - y) ** 2).mean())


def build_net(net: str, d_in: int, seed: int) -> nn.Sequential:
    """One of :data:`NETS`, initialised from ``seed`` (PyTorch default init)."""
    if net == "relu500x2":
        return paper_mlp(width=500, depth=2, d_in=d_in, activation=nn.ReLU, seed=seed)
    if net == "tanh256x3":
        return paper_mlp(width=256, depth=3, d_in=d_in, activation=nn.Tanh, seed=seed)
    raise ValueError(f"unknown net {net!r}; choose from {NETS}")
