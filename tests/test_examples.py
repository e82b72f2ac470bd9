"""The example scripts run end to end with tiny settings and print what a user needs.

Each example runs in a subprocess (as a user would run it), with one torch thread and its PNG
written to a temporary folder. The whole module takes well under a minute.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(script: str, *args: str, timeout: float = 120.0) -> str:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        MPLBACKEND="Agg",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _chosen_steps(out: str) -> float:
    """The starred criterion's step count in the printed decision."""
    m = re.search(r"\* \S+\s+t = \S+ = ([\d.]+) steps", out)
    assert m, out
    return float(m.group(1))


def test_plain_loop(tmp_path):
    out = _run("plain_loop.py", "--steps", "800", "--out", str(tmp_path))
    assert "remlstop decision: TRAIN" in out
    # The default criterion's stop time over dt = 0.01 per step (seed 0: 639 steps).
    m = re.search(r"stopper.step\(\) first returned True at step (\d+)", out)
    assert m and int(m.group(1)) == round(_chosen_steps(out)), out
    assert re.search(rf"\S+ stop : step {int(m.group(1)):5d}", out), out
    assert "best in hindsight" in out and "fixed budget  : step   800" in out
    assert "ratio test MSE at the stop / best" in out
    if _has_matplotlib():
        assert (tmp_path / "plain_loop.png").exists()


def test_plain_loop_budget_before_stop(tmp_path):
    out = _run("plain_loop.py", "--steps", "50", "--out", str(tmp_path))
    assert re.search(r"\S+ stop : not reached within 50 steps", out), out


def test_paper_case1(tmp_path):
    out = _run("paper_case1.py", "--seeds", "0", "--max-steps", "200", "--out", str(tmp_path))
    assert "seed  p-value" in out
    assert re.search(r"ours : REML stop (\d+)-\1 steps", out), out
    assert "paper: REML stop 174-202 steps" in out
    assert "within the paper's ranges" in out
    if _has_matplotlib():
        assert (tmp_path / "paper_case1.png").exists()


def test_lightning_example_via_demo(tmp_path):
    # examples/demo.py (what `make demo` runs) is a thin wrapper over lightning_mlp.main().
    pytest.importorskip("pytorch_lightning")
    out = _run("demo.py", "--out", str(tmp_path))
    assert "decision: TRAIN" in out
    # The stop time's steps at the full lr 0.01, plus at most the 50 warm-up steps' shortfall.
    full = re.search(r"about (\d+) steps at the full rate", out)
    m = re.search(r"halted at step (\d+)", out)
    assert full and m and int(full.group(1)) <= int(m.group(1)) <= int(full.group(1)) + 50, out
    assert "REMLEarlyStopping: time rule" in out
    assert "MSE at the stop" in out and "wall clock: trainer.fit" in out
    if _has_matplotlib():
        assert (tmp_path / "lightning_mlp.png").exists()


def _digits_report(out: str, mode: str) -> dict[str, float]:
    """One mode's target steps, stop step (nan: not reached) and test accuracy at the stop."""
    target = re.search(rf"\[{mode}\] decision: TRAIN .* = ([\d.]+) steps;", out)
    assert target, out
    facts = {"target": float(target.group(1)), "stop": float("nan")}
    stop = re.search(rf"\[{mode}\] stop  : step +(\d+)  test MSE [\d.]+  accuracy ([\d.]+)", out)
    if stop:
        facts.update(stop=float(stop.group(1)), acc_stop=float(stop.group(2)))
    return facts


def test_digits_cnn_plain_and_lightning_agree(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("lightning")
    out = _run("digits_cnn.py", "--n-train", "60", "--steps", "1600", "--out", str(tmp_path))
    assert out.count("remlstop decision: TRAIN") == 2, out
    plain, lightning = _digits_report(out, "plain"), _digits_report(out, "lightning")
    # Seed 0: the default criterion stops at 1540.9 steps, inside the budget; the time rule
    # takes the step nearest the target (printed to 0.1 step).
    assert plain["target"] < 1600
    assert abs(plain["stop"] - plain["target"]) <= 0.55, out
    assert f"stopper.step() first returned True at step {plain['stop']:.0f}" in out
    assert re.search(r"\[plain\] budget: step +1600  test MSE", out), out
    # The same seeded network, rows, order and optimizer: the same decision, stop and network.
    assert lightning["target"] == plain["target"] and lightning["stop"] == plain["stop"], out
    assert f"Lightning: halted at step {plain['stop']:.0f}" in out
    gap = re.search(r"plain vs Lightning: the same stop step .*at the stop (\S+)", out)
    assert gap and float(gap.group(1)) < 1e-6, out
    # Ten classes, chance 0.10; at the stop on the 500 held-out rows seed 0 gives 0.856 (seeds
    # 1 and 2, at this lr, 0.908 and 0.800).
    assert plain["acc_stop"] > 0.75, out
    if _has_matplotlib():
        assert (tmp_path / "digits_cnn.png").exists()


def test_digits_cnn_budget_before_stop():
    pytest.importorskip("sklearn")
    pytest.importorskip("lightning")
    out = _run("digits_cnn.py", "--n-train", "60", "--steps", "300", "--no-plot")
    for mode in ("plain", "lightning"):
        assert _digits_report(out, mode)["target"] > 300, out
        assert f"[{mode}] stop: not reached within 300 steps" in out
        assert re.search(rf"\[{mode}\] budget: step +300  test MSE", out), out
    assert "stopper.step() first returned True" not in out
    assert "Lightning: trained to the budget, 300 steps" in out
    assert "plain vs Lightning: the same stop step (None vs None)" in out
