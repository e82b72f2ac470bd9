"""Markdown tables and figures of the stopping-quality benchmark, from its CSV alone."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from cases import CASES, NETS

if TYPE_CHECKING:
    import pandas as pd

CRITERIA = ("reml", "reml-linear", "reml-power", "gcv", "auto", "average")
FIELDS = [
    "case",
    "net",
    "rep",
    "rule",
    "criterion",
    "stop_rule",
    "mode",
    "stop_step",
    "trained_steps",
    "capped",
    "test_mse",
    "ratio",
    "oracle_test_mse",
    "oracle_step",
    "test_mse_init",
    "n_train",
    "n_test",
    "steps_budget",
    "lr",
    "horizon_t",
    "dt",
    "lambda_max",
    "lr_lambda_max",
    "lr_lambda_max_end",
    "pvalue",
    "reject",
    "t_hat",
    "t_target",
    "target_steps",
    "criterion_used",
    "auto_choice",
    "misfit",
    *[f"t_{c}" for c in CRITERIA],
    "start_s",
    "hook_s",
    "train_step_s",
    "holdout_step_s",
    "main_s",
    "holdout_s",
    "run_s",
]
TEST_FIELDS = [
    "case",
    "net",
    "rep",
    "n_train",
    "pvalue",
    "pvalue_method",
    "reject",
    "pvalue_f0cov",
    "reject_f0cov",
    "t_hat",
    "misfit",
    "start_s",
    "start_s_f0cov",
]
BASELINES = ("holdout_p10", "holdout_p100", "budget")
LOSS_MARGIN = 1.02  # "loses": cell median above the best rule's by more than 2%
# Stop markers in the curve plots; blue is the test curve's.
BASELINE_STYLE = {
    "oracle": ("black", "-"),
    "budget": ("gray", ":"),
    "holdout_p10": ("tab:purple", "--"),
    "holdout_p100": ("tab:purple", "-."),
}
VARIANT_COLOURS = (
    "tab:red",
    "tab:red",
    "tab:orange",
    "tab:green",
    "tab:olive",
    "tab:cyan",
    "tab:pink",
    "tab:brown",
)

Cell = tuple[str, str]  # (case, net)
Stats = dict[tuple[str, Cell], dict[str, float]]  # (rule, cell) -> statistics of the ratio


def _r(x: float) -> str:
    """A ratio: three decimals (rules often differ by a few per cent)."""
    return "–" if x is None or not math.isfinite(x) else f"{x:.3f}"


def _g(x: float) -> str:
    """Any other number: three significant digits."""
    return "–" if x is None or not math.isfinite(x) else f"{x:.3g}"


def _library_rules(df: pd.DataFrame) -> list[str]:
    """Variant rules in the order of CRITERIA, time before trajectory, raw before decided."""
    names = set(df.rule)
    out = []
    for c in CRITERIA:
        for rule in (f"{c}_time", f"{c}_traj"):
            out += [r for r in (rule, f"{rule}_decided") if r in names]
    return out


def _cells(df: pd.DataFrame) -> list[Cell]:
    have = set(zip(df.case, df.net, strict=True))
    return [(c, n) for c in CASES for n in NETS if (c, n) in have]


def _stats(df: pd.DataFrame, cells: list[Cell], rules: set[str]) -> Stats:
    """Per (rule, cell): ratio quantiles, mean, max, capped share, median stop and trained."""
    g = df.groupby(["rule", "case", "net"])
    out = {}
    for (rule, case, net), d in g:
        if rule in rules and (case, net) in cells:
            q = d.ratio.quantile([0.25, 0.5, 0.75]).to_numpy()
            out[rule, (case, net)] = {
                "n": len(d),
                "q1": q[0],
                "med": q[1],
                "q3": q[2],
                "mean": d.ratio.mean(),
                "max": d.ratio.max(),
                "capped": d.capped.mean(),
                "stop": d.stop_step.median(),
                "trained": d.trained_steps.median(),
            }
    return out


def _header(df: pd.DataFrame, meta: dict) -> list[str]:
    """Command, commit, wall time, repetitions, lr, horizon, lr·λ_max, and the legend."""
    runs = df[df.rule == "oracle"]
    reps = runs.groupby(["case", "net"]).size()
    per_net = runs.groupby("net").agg(
        lr=("lr", "first"),
        K=("steps_budget", "max"),
        horizon=("horizon_t", "max"),
        lam=("lr_lambda_max", "max"),
        lam_end=("lr_lambda_max_end", "max"),
    )
    L = [
        "# Stopping quality: remlstop's criteria vs holdout vs fixed budget vs oracle\n",
        f"- command: `{meta.get('command', '?')}`",
        (
            f"- git commit: `{meta.get('commit', '?')}` "
            "(the working tree may have held uncommitted "
            "edits by other engineers)"
        ),
        (
            "- wall time of the run(s) that wrote these rows: "
            f"{meta.get('wall_s', 0) / 60:.1f} min; "
            f"worker processes {meta.get('jobs', 1)}, torch threads each {meta.get('threads', 1)}"
        ),
        "- repetitions per cell: " + ", ".join(f"{c}/{n} {reps[c, n]}" for c, n in reps.index),
    ]
    for net, r in per_net.iterrows():
        L.append(
            f"- {net}: lr {r.lr:g}, horizon K = {r.K:.0f} steps = flow time T = {r.horizon:g} "
            f"(Δt = lr per step, METHOD M2); max lr·λ_max(H) at θ0 {r.lam:.2f}, after K "
            f"steps {r.lam_end:.2f}"
        )
    bad = int((runs.lr_lambda_max >= 1).sum())
    L.append(f"- runs with lr·λ_max ≥ 1 at θ0: {bad}" + (" — halve that net's lr" if bad else ""))
    L += [
        "",
        (
            "Ratio = test MSE at the rule's stop / the oracle's (min over k = 0..K of the same "
            "run; the holdout rules train their own run on 80% of the rows, so their ratio can be "
            "below 1). `<criterion>_time`: the `REMLStopper(criterion=..., rule='time')` stop; "
            "`reml_traj`: `rule='trajectory'`. Raw: `on_insignificant='continue'`; `_decided`: "
            "step 0 (do not train) when the stopper's variance-component test does not reject at "
            "α = 0.05. `capped`: the rule never stopped within K (for the oracle: its best step is "
            "K). Cells are case/net; every statistic over cells weighs cells equally.\n"
        ),
    ]
    return L


def _overall(st: Stats, cells: list[Cell], rules: list[str]) -> list[str]:
    """One row per rule, every cell weighing the same."""
    L = [
        "## Overall, across cells\n",
        (
            "| rule | median of cell medians | worst cell median (cell) | mean of cell means | "
            "worst run | share capped | cells where best (ties count) |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    best = {c: min(st[r, c]["med"] for r in rules if (r, c) in st) for c in cells}
    for r in rules:
        mine = [c for c in cells if (r, c) in st]
        if not mine:
            continue
        s = [st[r, c] for c in mine]
        worst, cell = max((st[r, c]["med"], c) for c in mine)
        capped = sum(x["capped"] * x["n"] for x in s) / sum(x["n"] for x in s)
        wins = sum(st[r, c]["med"] <= best[c] + 1e-12 for c in mine)
        L.append(
            f"| {r} | {_r(np.median([x['med'] for x in s]))} | {_r(worst)} "
            f"({'/'.join(cell)}) | {_r(np.mean([x['mean'] for x in s]))} | "
            f"{_r(max(x['max'] for x in s))} | {capped:.2f} | {wins} |"
        )
    return L + [""]


def _default_choice(st: Stats, cells: list[Cell], decided: list[str]) -> list[str]:
    """The issue's rule for the default, applied to the time rules as decided: among the
    criteria whose median of cell medians is within 1% of the best, the best worst cell."""
    time_rules = [r for r in decided if r.endswith("_time_decided")]
    summary = {}
    for r in time_rules:
        meds = [st[r, c]["med"] for c in cells if (r, c) in st]
        if len(meds) == len(cells):
            summary[r] = (float(np.median(meds)), max(meds))
    if not summary:
        return []
    best_median = min(m for m, _ in summary.values())
    eligible = {r: v for r, v in summary.items() if v[0] <= 1.01 * best_median}
    choice = min(eligible, key=lambda r: eligible[r][1])
    L = [
        "## The default by the stated rule\n",
        (
            "Rule (fixed before the run): among the time rules as decided, keep those whose "
            "median of cell medians is within 1% of the best, and take the one with the best "
            "worst cell median.\n"
        ),
        "| rule | median of cell medians | worst cell median | within 1% |",
        "|---|---|---|---|",
    ]
    for r, (med, worst) in sorted(summary.items(), key=lambda kv: kv[1][1]):
        L.append(f"| {r} | {_r(med)} | {_r(worst)} | {'yes' if r in eligible else 'no'} |")
    return L + ["", f"Chosen: **{choice}**.", ""]


def _cell_overview(df: pd.DataFrame, cells: list[Cell]) -> list[str]:
    """Per cell: the test, the misfit, t-hat and the oracle."""
    L = [
        "## Cells: the decision and the oracle\n",
        (
            "Δ = ℓ_linear − ℓ_exp in nats (`decision.misfit`, METHOD M9): large when the paper's "
            "prior is rejected by the data. t̂: the paper's REML time, in steps.\n"
        ),
        (
            "| cell | reps | n train/test | rejection rate | median p | median Δ "
            "| median t̂ steps | "
            "median oracle step | oracle capped |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case, net in cells:
        d = df[(df.case == case) & (df.net == net)]
        o = d[d.rule == "oracle"]
        lib = d[d["mode"] == "raw"].drop_duplicates("rep")
        t_steps = (lib.t_hat / lib.dt).median() if len(lib) else math.nan
        L.append(
            f"| {case}/{net} | {len(o)} | {o.n_train.iloc[0]}/{o.n_test.iloc[0]} | "
            f"{_r(lib.reject.mean())} | {_g(lib.pvalue.median())} | "
            f"{_g(lib.misfit.median())} | {_g(t_steps)} | {o.stop_step.median():.0f} | "
            f"{o.capped.mean():.2f} |"
        )
    return L + [""]


def _median_table(st: Stats, cells: list[Cell], rules: list[str], title: str) -> list[str]:
    """Cells x rules: the median ratio."""
    L = [f"## {title}\n", "| cell | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
    for cell in cells:
        L.append(
            f"| {'/'.join(cell)} | "
            + " | ".join(_r(st[r, cell]["med"]) if (r, cell) in st else "–" for r in rules)
            + " |"
        )
    return L + [""]


def _detail(st: Stats, cells: list[Cell], rules: list[str]) -> list[str]:
    """Per cell, per rule: the ratio's quartiles, mean, worst, capped share and steps."""
    L = ["## Detail per cell\n"]
    for cell in cells:
        L += [
            f"### {'/'.join(cell)}\n",
            ("| rule | median | Q1 | Q3 | mean | worst | capped | median stop | median trained |"),
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rules:
            if (r, cell) in st:
                s = st[r, cell]
                L.append(
                    f"| {r} | {_r(s['med'])} | {_r(s['q1'])} | {_r(s['q3'])} | "
                    f"{_r(s['mean'])} | {_r(s['max'])} | {s['capped']:.2f} | "
                    f"{s['stop']:.0f} | {s['trained']:.0f} |"
                )
        L.append("")
    return L


def _losses(st: Stats, cells: list[Cell], lib: list[str], rules: list[str]) -> list[str]:
    """For each library rule, the cells where some rule's median beats it by > 2%."""
    L = [
        (
            f"## Where each criterion loses to the best rule by more than "
            f"{(LOSS_MARGIN - 1) * 100:.0f}% (cell medians)\n"
        )
    ]
    for r in lib:
        items = []
        for cell in cells:
            if (r, cell) not in st:
                continue
            m, b = min((st[x, cell]["med"], x) for x in rules if (x, cell) in st)
            if st[r, cell]["med"] > LOSS_MARGIN * m:
                items.append(
                    f"{'/'.join(cell)} ({b} {_r(m)} vs {_r(st[r, cell]['med'])}, "
                    f"+{(st[r, cell]['med'] / m - 1) * 100:.0f}%)"
                )
        L.append(f"- **{r}**: " + ("; ".join(items) if items else "none"))
    return L + [""]


def _vs_holdout(
    df: pd.DataFrame, st: Stats, cells: list[Cell], lib: list[str], ref: str = "holdout_p10"
) -> list[str]:
    """Each library rule's cell median over ``ref``'s, with cells and paired reps won/lost."""
    if not any((ref, c) in st for c in cells):
        return []
    L = [
        f"## Each criterion vs {ref}: ratio of cell medians (< 1: the criterion is better)\n",
        "| cell | " + " | ".join(lib) + " |",
        "|---|" + "---|" * len(lib),
    ]
    rel: dict[str, list[float]] = {r: [] for r in lib}
    for cell in cells:
        row = []
        for r in lib:
            if (r, cell) in st and (ref, cell) in st:
                rel[r].append(st[r, cell]["med"] / st[ref, cell]["med"])
                row.append(_r(rel[r][-1]))
            else:
                row.append("–")
        L.append(f"| {'/'.join(cell)} | " + " | ".join(row) + " |")
    wide = df.pivot_table(index=["case", "net", "rep"], columns="rule", values="ratio")
    summary = []
    for r in lib:
        x = np.array(rel[r])
        pair = wide[[r, ref]].dropna()
        geo = np.exp(np.log(x).mean()) if x.size else math.nan
        summary.append(
            f"{(x < 1).sum()}/{(x > 1).sum()} cells; geo-mean {_r(geo)}; "
            f"reps {(pair[r] < pair[ref]).sum()}/{(pair[r] > pair[ref]).sum()}"
        )
    L.append("| better/worse | " + " | ".join(summary) + " |")
    return L + [
        "",
        (
            "Last row: cells where the criterion's median is below / above the "
            f"{ref} median, the geometric mean of the ratio over cells, and the paired "
            "repetitions where its test MSE is below / above holdout's.\n"
        ),
    ]


def _overhead(df: pd.DataFrame, cells: list[Cell]) -> list[str]:
    """Seconds of start() and step() against the training they decide about."""
    L = [
        "## Overhead of the stoppers\n",
        (
            "start s: `start()` of the `reml_time` stopper (kernel, spectrum, test, criteria). "
            "Fraction: start s / (s per GD step × its stop step). Hook: seconds per step in "
            "`step()` of the trajectory stopper (one forward pass) and of the time stopper.\n"
        ),
        (
            "| cell | start s | s/step | reml_time stop | fraction | traj hook s/step | "
            "time hook s/step | run s |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, net in cells:
        d = df[(df.case == case) & (df.net == net)]
        t, j = d[d.rule == "reml_time"], d[d.rule == "reml_traj"]
        if t.empty:
            continue
        frac = (t.start_s / (t.train_step_s * t.stop_step.clip(lower=1))).median()
        traj = (j.hook_s / j.stop_step.clip(lower=1)).median() if len(j) else math.nan
        L.append(
            f"| {case}/{net} | {_g(t.start_s.median())} | {_g(t.train_step_s.median())} | "
            f"{t.stop_step.median():.0f} | {_g(frac)} | {_g(traj)} | "
            f"{_g((t.hook_s / t.stop_step.clip(lower=1)).median())} | "
            f"{t.run_s.median():.0f} |"
        )
    return L + [""]


def _test_only(path: Path) -> list[str]:
    """Rejection rates of the test alone over many draws (``--test-only``), if run."""
    import pandas as pd

    if not path.exists() or (d := pd.read_csv(path)).empty:
        return []
    L = [
        "## The decision alone at θ0, many draws (`--test-only`, no training)\n",
        (
            "Rejection rate of the variance-component test (binomial SE in brackets) "
            "on u0 = y − f0, "
            "and with f0 projected off as a covariate (`test_covariates='f0'`), which keeps the "
            "test's size when y is independent of X (METHOD M6).\n"
        ),
        ("| case | net | draws | rejection rate | with f0 as covariate | t̂ = 0 rate | median Δ |"),
        "|---|---|---|---|---|---|---|",
    ]
    for (case, net), x in d.groupby(["case", "net"], sort=False):
        se = [
            math.sqrt(max(p * (1 - p), 1e-12) / len(x))
            for p in (x.reject.mean(), x.reject_f0cov.mean())
        ]
        L.append(
            f"| {case} | {net} | {len(x)} | {x.reject.mean():.3f} ({se[0]:.3f}) | "
            f"{x.reject_f0cov.mean():.3f} ({se[1]:.3f}) | {(x.t_hat == 0).mean():.2f} | "
            f"{_g(x.misfit.median()) if 'misfit' in x else '–'} |"
        )
    return L + [""]


def write_report(csv_path: Path, out: Path, meta: dict, tag: str = "") -> None:
    """``stopping_quality<tag>.md`` and the ratio box plots from the CSV."""
    import pandas as pd

    if not csv_path.exists() or (df := pd.read_csv(csv_path)).empty:
        return
    if "mode" not in df:
        raise SystemExit(
            f"{csv_path} was written by the script before it drove REMLStopper; "
            "rerun the benchmark (without --resume) to rebuild it."
        )
    cells = _cells(df)
    lib = _library_rules(df)
    rules = lib + [r for r in BASELINES if r in set(df.rule)]
    st = _stats(df, cells, {"oracle", *rules})
    decided = [r for r in lib if r.endswith("_decided")]
    L = _header(df, meta) + _overall(st, cells, rules) + _default_choice(st, cells, decided)
    L += _cell_overview(df, cells)
    L += _median_table(st, cells, decided + list(BASELINES), "Median ratio per cell, as decided")
    L += _median_table(st, cells, [r for r in lib if r not in decided], "Median ratio, raw")
    L += _losses(st, cells, lib, rules) + _vs_holdout(df, st, cells, decided)
    L += _overhead(df, cells) + _test_only(csv_path.with_name(f"{csv_path.stem}_vctest.csv"))
    L += _detail(st, cells, ["oracle", *rules])
    L.append(
        f"Figures: `stopping_quality_ratios{tag}.png`, `stopping_quality_curve_<case>{tag}.png`.\n"
    )
    (out / f"stopping_quality{tag}.md").write_text("\n".join(L))
    plot_ratios(df, cells, rules, out, tag)


def plot_ratios(
    df: pd.DataFrame, cells: list[Cell], rules: list[str], out: Path, tag: str = ""
) -> None:
    """Box plots of the ratio per rule, one panel per case, the networks side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cases = list(dict.fromkeys(c for c, _ in cells))
    nets = list(dict.fromkeys(n for _, n in cells))
    colors = dict(zip(NETS, ("#1f77b4", "#ff7f0e"), strict=True))
    width = 0.8 / len(nets)
    fig, axes = plt.subplots(
        len(cases), 1, figsize=(max(8, 0.9 * len(rules)), 3 * len(cases)), squeeze=False
    )
    for ax, case in zip(axes[:, 0], cases, strict=True):
        for j, net in enumerate(nets):
            d = df[(df.case == case) & (df.net == net)]
            pos = [i + (j - (len(nets) - 1) / 2) * width for i in range(len(rules))]
            data = [d[d.rule == r].ratio.to_numpy() for r in rules]
            keep = [i for i, x in enumerate(data) if x.size]
            if not keep:
                continue
            bp = ax.boxplot(
                [data[i] for i in keep],
                positions=[pos[i] for i in keep],
                widths=0.9 * width,
                patch_artist=True,
                flierprops={"markersize": 3},
            )
            for patch in bp["boxes"]:
                patch.set(facecolor=colors[net], alpha=0.55)
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(matplotlib.ticker.FormatStrFormatter("%.2f"))
        ax.set_xticks(range(len(rules)))
        ax.set_xticklabels(rules, fontsize=7, rotation=30, ha="right")
        ax.set_title(CASES[case].label, fontsize=10)
        ax.set_ylabel("test MSE / oracle")
    axes[0, 0].legend(
        handles=[matplotlib.patches.Patch(color=colors[n], alpha=0.55, label=n) for n in nets],
        fontsize=8,
        loc="upper left",
    )
    fig.tight_layout()
    fig.savefig(out / f"stopping_quality_ratios{tag}.png", dpi=100)
    plt.close(fig)


def plot_curves(curves: dict, out: Path, tag: str = "") -> None:
    """First repetition of each case: train/test MSE against step + 1, every rule's stop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for case in CASES:
        nets = [n for n in NETS if (case, n) in curves]
        if not nets:
            continue
        fig, axes = plt.subplots(2, len(nets), figsize=(6.4 * len(nets), 8.4), squeeze=False)
        for j, net in enumerate(nets):
            cv = curves[case, net]
            te, tr, ho = (np.asarray(cv[k]) for k in ("test", "train", "ho_test"))
            k = np.arange(te.size) + 1  # step + 1 on a log axis
            for row, ax in enumerate(axes[:, j]):
                ax.plot(k, te, color="tab:blue", lw=1.6, label="test MSE")
                if row == 0:
                    ax.plot(k, tr, color="tab:blue", lw=1.0, alpha=0.45, label="train MSE")
                if ho.size:
                    ax.plot(
                        np.arange(ho.size) + 2,
                        ho,
                        color="tab:purple",
                        lw=0.9,
                        alpha=0.6,
                        ls="--",
                        label="test MSE, holdout run (80% rows)",
                    )
                palette = iter(VARIANT_COLOURS)
                for rule, st in cv["stops"].items():
                    lab = f"{rule}: {st}"
                    if cv["decided"].get(rule, st) != st:
                        lab += " (decided: 0)"
                    colour, ls = BASELINE_STYLE.get(rule, (None, None))
                    if colour is None:
                        colour, ls = next(palette, "gray"), "--" if rule.endswith("traj") else "-"
                    ax.axvline(st + 1, color=colour, lw=1.2, ls=ls, label=lab)
                ax.set_xscale("log")
                ax.set_xlabel("step + 1 (log scale)")
                best = te.min()
                if row == 0:
                    ax.set_ylim(0.9 * min(best, tr.min()), 1.05 * max(te[0], tr[0]))
                    ax.set_title(f"{CASES[case].label} — {net}, rep 0", fontsize=10)
                    ax.legend(fontsize=6, loc="upper right", ncol=2)
                else:
                    at = [te[min(v, te.size - 1)] for v in cv["stops"].values()]
                    ax.set_ylim(0.99 * best, min(max(1.12 * best, 1.03 * max(at)), te.max()))
                    ax.set_title("zoom near the test minimum", fontsize=9)
                ax.set_ylabel("MSE")
        fig.tight_layout()
        fig.savefig(out / f"stopping_quality_curve_{case}{tag}.png", dpi=100)
        plt.close(fig)


def save_curves(curves: dict, path: Path) -> None:
    """The first repetition's curves and stops, for ``--report-only``."""
    flat = {}
    for (case, net), cv in curves.items():
        for key in ("test", "train", "ho_test"):
            flat[f"{case}__{net}__{key}"] = np.asarray(cv[key])
        flat[f"{case}__{net}__stops"] = np.array(
            json.dumps({k: cv[k] for k in ("stops", "decided")})
        )
    np.savez_compressed(path, **flat)


def load_curves(path: Path) -> dict:
    """Inverse of :func:`save_curves`; {} when the file does not exist."""
    if not path.exists():
        return {}
    z = np.load(path)
    out: dict = {}
    for name in z.files:
        case, net, key = name.split("__")
        d = out.setdefault((case, net), {})
        if key == "stops":
            d.update(json.loads(str(z[name])))
        else:
            d[key] = z[name]
    return out
