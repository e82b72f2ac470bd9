"""Tests of ``remlstop.plotting.plot_decision`` (figures of the M4 decision)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("matplotlib")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from remlstop import (  # noqa: E402
    KernelSpectrum,
    REMLStopper,
    evaluate_criteria,
    reml_fit,
    variance_component_test,
)
from remlstop.datasets import paper_simple_function  # noqa: E402
from remlstop.decision import Decision  # noqa: E402
from remlstop.plotting import plot_decision  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _small_stopper(track_residual: bool = True) -> tuple[REMLStopper, torch.optim.Optimizer]:
    x, y, _, _ = paper_simple_function(n=160, n_train=120, seed=0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    stopper = REMLStopper(
        net, x, y, optimizer=opt, loss="half_mse", criterion="reml", track_residual=track_residual
    )
    stopper.start()
    for _ in range(400):
        opt.zero_grad()
        (0.5 * ((net(x) - y) ** 2).mean()).backward()
        opt.step()
        if stopper.step():
            break
    return stopper, opt


def _decision_from_spectrum(spectrum: KernelSpectrum) -> Decision:
    fit = reml_fit(spectrum)
    return Decision(
        train=False,
        test=variance_component_test(spectrum),
        fit=fit,
        criteria=evaluate_criteria(spectrum),
        criterion="reml",
        target_steps=fit.t / 0.01,
        dt_per_step=0.01,
        rule="time",
        kernel_path="given",
        n_rows=spectrum.dim,
        n_outputs=1,
    )


def test_four_panels_and_file(tmp_path):
    stopper, _ = _small_stopper()
    assert stopper.stop_step is not None
    path = tmp_path / "sub" / "decision.png"
    steps = np.arange(1, 50)
    fig = plot_decision(stopper, path=path, test_curve=(steps, 1.0 / steps))
    assert len(fig.axes) == 4
    assert path.exists() and path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The stop step is marked on panel (c); the training curve comes from the history.
    labels = [line.get_label() for line in fig.axes[2].get_lines()]
    assert f"stop: step {stopper.stop_step}" in labels
    assert any("training MSE" in lab for lab in labels)
    # Panel (d) marks every criterion with a finite stop time, the one used starred.
    marks = [line.get_label() for line in fig.axes[3].get_lines()]
    fits = stopper.decision.criteria.fits
    for name in ("reml", "reml-linear", "reml-power", "gcv", "average"):
        if math.isfinite(fits[name].t) and fits[name].t > 0:
            assert any(lab.lstrip("*").startswith(f"{name}: t =") for lab in marks)
    assert any(lab.startswith(f"*{stopper.decision.criterion}:") for lab in marks)
    assert "test MSE" in labels


def test_decision_alone_and_no_history():
    stopper, _ = _small_stopper(track_residual=False)
    fig = plot_decision(stopper.decision)
    assert len(fig.axes) == 4
    labels = [line.get_label() for line in fig.axes[2].get_lines()]
    assert any(lab.startswith("target:") for lab in labels)


def test_boundary_case(tmp_path):
    # The residual lies in the low-eigenvalue directions: g-bar(0) <= lambda-bar, t-hat = 0.
    rng = np.random.default_rng(0)
    lam = np.geomspace(1e-3, 10.0, 200)
    z = rng.standard_normal(200) / np.sqrt(1.0 + lam)
    spectrum = KernelSpectrum.from_eigen(lam, z)
    decision = _decision_from_spectrum(spectrum)
    assert decision.fit.boundary and decision.fit.t == 0.0
    path = tmp_path / "boundary.png"
    fig = plot_decision(decision, path=path)
    assert len(fig.axes) == 4
    assert path.exists()
    xlim = fig.axes[0].get_xlim()
    assert xlim[0] == 0.0 and xlim[1] > 0.0 and math.isfinite(xlim[1])


def test_rejects_objects_without_decision():
    with pytest.raises(TypeError, match="Decision"):
        plot_decision(object())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"test_curve": ([1, 2, 3], [0.5, 0.4])}, ValueError, "shapes \\(3,\\) and \\(2,\\)"),
        ({"train_curve": ([], [])}, ValueError, "non-zero length"),
        ({"test_curve": [0.1, 0.2, 0.3]}, TypeError, "a pair \\(steps, values\\)"),
        ({"stop_step": "10"}, ValueError, "non-negative integer step"),
        ({"stop_step": -5}, ValueError, "non-negative integer step"),
        ({"history": [1, 2]}, TypeError, "Check entries"),
    ],
)
def test_bad_arguments_are_refused_naming_the_argument(kwargs, error, match):
    stopper, _ = _small_stopper(track_residual=False)
    with pytest.raises(error, match=match):
        plot_decision(stopper, **kwargs)


def test_a_folder_is_not_a_file_to_save_to(tmp_path):
    stopper, _ = _small_stopper(track_residual=False)
    with pytest.raises(ValueError, match="is a folder"):
        plot_decision(stopper, path=tmp_path)


def test_missing_matplotlib_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    from remlstop import plotting

    with pytest.raises(ImportError, match=r"remlstop\[plot\]"):
        plotting._pyplot()
