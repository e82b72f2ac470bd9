"""Figures for a remlstop decision (METHOD M4). matplotlib is an optional extra.

Install it with ``pip install 'remlstop[plot]'``. Importing this module does not import
matplotlib; :func:`plot_decision` does, and selects the non-interactive Agg backend when no
display is available (and pyplot has not been set up already).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .decision import Check, Decision

__all__ = ["plot_decision"]

_INSTALL = "matplotlib is needed for remlstop.plotting: pip install 'remlstop[plot]'"


def _pyplot() -> Any:
    """Import pyplot, choosing Agg when there is no display (M4 figures only need files)."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(_INSTALL) from err
    headless = (
        sys.platform.startswith("linux")
        and not os.environ.get("DISPLAY")
        and not os.environ.get("WAYLAND_DISPLAY")
    )
    if headless and "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curve(curve: Any, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """A ``(steps, values)`` curve as two 1-D float arrays of one non-zero length."""
    if curve is None:
        return None
    try:
        steps, values = curve
        x, y = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (steps, values) of number sequences.") from None
    if x.ndim != 1 or x.shape != y.shape or x.size == 0:
        raise ValueError(
            f"{name} must be (steps, values), two 1-D sequences of one non-zero length; got "
            f"shapes {x.shape} and {y.shape}."
        )
    return x, y


def _unpack(obj: Any) -> tuple[Decision, list[Check], int | None]:
    """(decision, history, stop step) from a Decision, a REMLStopper or a REMLEarlyStopping."""
    from .decision import Decision

    if isinstance(obj, Decision):
        return obj, [], None
    decision = getattr(obj, "decision", None)
    if not isinstance(decision, Decision):
        raise TypeError(
            "plot_decision needs a Decision, a REMLStopper after start(), or a REMLEarlyStopping "
            f"callback after training started; got {type(obj).__name__} without a decision."
        )
    history = list(getattr(obj, "history", []) or [])
    stop = getattr(obj, "stop_step", None)
    if stop is None:
        stop = getattr(getattr(obj, "stopper", None), "stop_step", None)
    return decision, history, stop


def _steps_of(decision: Decision, history: Sequence[Check]) -> Any:
    """Map gradient-flow time to optimizer steps (M2).

    From the stopper's history when it has one (the clock's real (step, t) pairs, so learning
    rate schedules are honoured), extrapolated past its end at the last step's rate; otherwise
    at the decision's time per step at start.
    """
    pts = sorted((c.step, c.t) for c in history if c.drift is None and math.isfinite(c.t))
    dt0 = decision.dt_per_step
    if not pts:
        return (lambda t: t / dt0) if dt0 > 0 else None
    ks = np.array([0.0] + [float(k) for k, _ in pts])
    ts = np.maximum.accumulate(np.array([0.0] + [float(t) for _, t in pts]))
    last_dt = (ts[-1] - ts[-2]) / max(ks[-1] - ks[-2], 1.0)
    if not last_dt > 0:
        last_dt = dt0

    def steps(t: float) -> float:
        if t <= ts[-1]:
            return float(np.interp(t, ts, ks))
        return float(ks[-1] + (t - ts[-1]) / last_dt) if last_dt > 0 else math.inf

    return steps


def _empty_note(ax: Any, text: str) -> None:
    """A grey note in the middle of a panel that has nothing to draw."""
    ax.text(
        0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=8, color="0.4"
    )


def _t_grid(decision: Decision) -> np.ndarray:
    """A grid of gradient-flow times that shows the maximum and the whole interval."""
    fit = decision.fit
    upper = fit.interval[1]
    finite_upper = math.isfinite(upper) and upper > 0
    if math.isfinite(fit.t) and fit.t > 0:
        t_max = max(2.5 * fit.t, 1.5 * upper) if finite_upper else 4.0 * fit.t
    elif finite_upper:  # boundary: t-hat = 0, show the interval [0, upper] and beyond
        t_max = 4.0 * upper
    else:
        lam_bar = fit.mean_eigenvalue
        t_max = 5.0 / lam_bar if lam_bar > 0 else 1.0
    return np.linspace(0.0, t_max, 400)


def _panel_loglik(ax: Any, decision: Decision, to_steps: Any) -> None:
    fit = decision.fit
    t = _t_grid(decision)
    ll = np.asarray(fit.loglik_at(t), dtype=float)
    ax.plot(t, ll, color="C0", lw=1.8, label=r"$\ell(t)$")
    lo, hi = fit.interval
    if math.isfinite(fit.t):
        cut = fit.loglik - 0.5 * float(stats.chi2.ppf(fit.level, df=1))
        cut_label = rf"$\ell(\hat t) - \chi^2_{{1,{fit.level:.2f}}}/2$"
        ax.axhline(cut, color="0.5", ls=":", lw=1, label=cut_label)
        shade_hi = min(hi, t[-1]) if math.isfinite(hi) else t[-1]
        ax.axvspan(lo, shade_hi, color="C0", alpha=0.12, label=f"{fit.level:.0%} interval")
        steps = f" = {to_steps(fit.t):.0f} steps" if to_steps is not None else ""
        label = (
            r"$\hat t$ = 0 (boundary: nothing to learn)"
            if fit.boundary
            else rf"$\hat t$ = {fit.t:.3g}{steps}"
        )
        ax.axvline(fit.t, color="C3", lw=1.5, label=label, clip_on=False, zorder=5)
        # Keep the cut line and the maximum in view without the far tail squashing them.
        ymax = fit.loglik
        span = max(ymax - cut, 1e-9)
        ymin = max(float(np.nanmin(ll)), cut - 4.0 * span)
        ax.set_ylim(ymin - 0.05 * span, ymax + 0.6 * span)
    else:
        ax.text(
            0.5,
            0.1,
            r"no finite $\hat t$: $\ell$ rises for ever",
            transform=ax.transAxes,
            ha="center",
            color="C3",
        )
    ax.set_xlim(t[0], t[-1])
    ax.set_xlabel("gradient-flow time t")
    ax.set_ylabel("profile log-likelihood")
    ax.set_title("(a) REML profile log-likelihood (M4)")
    ax.legend(fontsize=7, loc="lower right")


def _panel_spectrum(ax: Any, decision: Decision) -> None:
    fit = decision.fit
    spectrum = fit.spectrum
    from .flow import log_weights

    lam = spectrum.eigenvalues
    # Per direction: an entry standing for c_j directions shares its energy among them.
    log_counts = np.log(spectrum.counts)
    log_w0 = log_weights(spectrum, 0.0) - log_counts
    keep = (lam > 0) & np.isfinite(log_w0)
    lam_k = lam[keep]
    w0 = np.exp(log_w0[keep])
    ax.scatter(lam_k, w0, s=8, alpha=0.45, color="0.45", label=r"$w_j(0) = z_j^2$")
    if math.isfinite(fit.t) and fit.t > 0:
        w_hat = np.exp((log_weights(spectrum, fit.t) - log_counts)[keep])
        ok = w_hat > 1e-300
        ax.scatter(
            lam_k[ok],
            w_hat[ok],
            s=8,
            alpha=0.6,
            color="C3",
            label=rf"$w_j(\hat t)$, $\hat t$ = {fit.t:.3g}",
        )
    ax.axvline(
        fit.mean_eigenvalue,
        color="C0",
        ls="--",
        lw=1,
        label=rf"$\bar\lambda$ = {fit.mean_eigenvalue:.3g}",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"eigenvalue $\lambda_j$ of the NTK")
    ax.set_ylabel(r"spectral loss $w_j = z_j^2 e^{-t\lambda_j}$")
    ax.set_title(rf"(b) spectrum; Cov$(\lambda, w(\hat t))$ = {fit.decorrelation:.2g}")
    ax.legend(fontsize=7, loc="lower left")


def _panel_curve(
    ax: Any,
    decision: Decision,
    history: Sequence[Check],
    stop_step: int | None,
    test_curve: tuple[Sequence[float], Sequence[float]] | None,
    train_curve: tuple[Sequence[float], Sequence[float]] | None,
    to_steps: Any,
) -> None:
    drew = False
    max_step = 0.0
    if train_curve is not None:
        steps, values = (np.asarray(a, dtype=float) for a in train_curve)
        ax.plot(steps, values, color="C0", lw=1.3, label="training MSE")
        max_step = max(max_step, float(steps.max()) if steps.size else 0.0)
        drew = True
    else:
        pts = [(c.step, c.train_mse) for c in history if c.train_mse is not None]
        if pts:
            steps, values = (np.asarray(a, dtype=float) for a in zip(*pts, strict=True))
            ax.plot(steps, values, color="C0", lw=1.3, label="training MSE (stopper history)")
            max_step = max(max_step, float(steps.max()) if steps.size else 0.0)
            drew = True
    if test_curve is not None:
        steps, values = (np.asarray(a, dtype=float) for a in test_curve)
        ax.plot(steps, values, color="C1", lw=1.3, label="test MSE")
        max_step = max(max_step, float(steps.max()) if steps.size else 0.0)
        drew = True
    lo, hi = decision.fit.interval
    if to_steps is not None and math.isfinite(decision.fit.t) and math.isfinite(hi):
        ax.axvspan(
            to_steps(lo),
            to_steps(hi),
            color="C3",
            alpha=0.08,
            label=f"{decision.fit.level:.0%} interval (steps)",
        )
    if stop_step is not None:
        ax.axvline(stop_step, color="C3", lw=1.5, label=f"stop: step {stop_step}")
    elif math.isfinite(decision.target_steps):
        ax.axvline(
            decision.target_steps,
            color="C3",
            lw=1.5,
            ls="--",
            label=f"target: {decision.target_steps:.0f} steps",
        )
    if drew and max_step > 20 * max(stop_step or decision.target_steps or 1, 1):
        # A long run after an early stop: a log step axis keeps both in view (step 0 dropped).
        ax.set_xscale("log")
        ax.set_xlim(left=1)
    if not drew:
        _empty_note(ax, "no training MSE recorded\n(REMLStopper(track_residual=True) records it)")
    else:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MSE  mean((f - y)^2)")
    ax.set_title("(c) training curve")
    ax.legend(fontsize=7, loc="upper right")


_CRITERION_COLOURS = {
    "reml": "C3",
    "reml-linear": "C0",
    "reml-power": "C2",
    "gcv": "C4",
    "average": "C5",
}


def _panel_criteria(ax: Any, decision: Decision, to_steps: Any) -> None:
    """Each prior family's Bayes risk sigma2 R(t) and GCV(t), relative to their minima (M9)."""
    from .gcv import log_gcv

    fits = decision.criteria.fits
    finite = [f.t for f in fits.values() if math.isfinite(f.t) and f.t > 0]
    if not finite:
        _empty_note(ax, "no criterion has a finite stop time")
        return
    t = np.geomspace(min(finite) / 10.0, max(finite) * 10.0, 300)
    curves = {
        name: fits[name].risk_at(t)
        for name in ("reml", "reml-linear", "reml-power")
        if not fits[name].unbounded
    }
    curves["gcv"] = np.exp(log_gcv(decision.fit.spectrum, t))
    for name, values in curves.items():
        values = np.asarray(values, dtype=float)
        ax.plot(t, values / np.nanmin(values), color=_CRITERION_COLOURS[name], lw=1.3, label=name)
    for name, colour in _CRITERION_COLOURS.items():
        fit = fits[name]
        if math.isfinite(fit.t) and fit.t > 0:
            steps = f" ({to_steps(fit.t):.0f} steps)" if to_steps is not None else ""
            mark = "*" if name == decision.criterion else ""
            ax.axvline(
                fit.t, color=colour, ls="--", lw=1, label=f"{mark}{name}: t = {fit.t:.3g}{steps}"
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("gradient-flow time t")
    ax.set_ylabel("risk / its minimum")
    ax.set_title(f"(d) criteria (M9); misfit Delta = {decision.misfit:.1f} nats")
    ax.legend(fontsize=6, loc="upper center", ncol=2)


def plot_decision(
    stopper_or_decision: Any,
    *,
    history: Sequence[Check] | None = None,
    path: str | os.PathLike[str] | None = None,
    test_curve: tuple[Sequence[float], Sequence[float]] | None = None,
    train_curve: tuple[Sequence[float], Sequence[float]] | None = None,
    stop_step: int | None = None,
) -> Figure:
    """Four panels explaining a stopping decision (METHOD M4, M9).

    (a) the profile log-likelihood l(t) with t-hat and its profile-likelihood interval;
    (b) eigenvalues lambda_j against spectral losses w_j = z_j^2 exp(-t lambda_j) at t = 0 and
    at t-hat (log-log; at t-hat their covariance over j is zero: the spectral decorrelation);
    (c) the training MSE against optimizer steps (from the stopper's history, which holds the
    MSE when the stopper tracks the residual, or from ``train_curve``), an optional
    ``test_curve`` and the stop step; (d) every criterion's curve (each prior family's Bayes
    risk R(t) and GCV(t), relative to their minima) with each stop time marked, the one used
    starred.

    Args:
        stopper_or_decision: a :class:`~remlstop.Decision`, a started
            :class:`~remlstop.REMLStopper` or a ``REMLEarlyStopping`` callback.
        history: checks to plot instead of the stopper's own history.
        path: save the figure there (120 dpi; the format from the suffix, PNG by default)
            when given; parent folders are created.
        test_curve: ``(steps, values)`` of a test MSE curve, in the same units as panel (c).
        train_curve: ``(steps, values)`` of a training MSE curve recorded outside the stopper
            (used instead of the history).
        stop_step: the step to mark as the stop (default: the stopper's ``stop_step``, else the
            decision's target step count, dashed).

    Returns:
        The matplotlib ``Figure`` (close it with ``matplotlib.pyplot.close(fig)`` when done).
    """
    plt = _pyplot()
    decision, own_history, own_stop = _unpack(stopper_or_decision)
    checks = list(history) if history is not None else own_history
    from .decision import Check

    if not all(isinstance(c, Check) for c in checks):
        raise TypeError("history must be a sequence of remlstop Check entries (stopper.history).")
    test_curve = _curve(test_curve, "test_curve")
    train_curve = _curve(train_curve, "train_curve")
    if stop_step is not None and (
        isinstance(stop_step, bool) or not isinstance(stop_step, (int, np.integer)) or stop_step < 0
    ):
        raise ValueError(f"stop_step must be a non-negative integer step; got {stop_step!r}.")
    if path is not None and Path(path).is_dir():
        raise ValueError(f"path {str(path)!r} is a folder; give a file name, e.g. decision.png.")
    stop = stop_step if stop_step is not None else own_stop
    fig, grid = plt.subplots(2, 2, figsize=(13, 9))
    axes = grid.ravel()
    to_steps = _steps_of(decision, checks)
    _panel_loglik(axes[0], decision, to_steps)
    _panel_spectrum(axes[1], decision)
    _panel_curve(axes[2], decision, checks, stop, test_curve, train_curve, to_steps)
    _panel_criteria(axes[3], decision, to_steps)
    verdict = "TRAIN" if decision.train else "DO NOT TRAIN"
    fig.suptitle(
        f"remlstop: {verdict} (p = {decision.test.pvalue:.3g}); {decision.fit.summary()}",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    if path is not None:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    return fig
