"""Where a benchmark's numbers came from: the commit every results file names, and the card."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def git_commit(root: Path = ROOT) -> str:
    """Short hash of HEAD (the working tree may hold other engineers' uncommitted edits).

    A copy without .git (a lent GPU machine's) is told its commit in ``REMLSTOP_COMMIT`` by
    ``benchmarks/gpu_check.sh``; with neither, "unknown".
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    return commit or os.environ.get("REMLSTOP_COMMIT", "unknown")


def card(device: str) -> str | None:
    """The GPU's name and CUDA version for a CUDA ``device``, None for the CPU.

    Raises ValueError when ``device`` is not the CPU and this torch sees no CUDA device."""
    if torch.device(device).type == "cpu":
        return None
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine's torch sees no CUDA device")
    return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
