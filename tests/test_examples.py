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
