"""Dense float64 linear algebra for the statistics, with BLAS threads sized to the machine.

Why this module exists: the BLAS/LAPACK pools that numpy, scipy and torch load size themselves
from the host's CPU count. Where a container or a CI runner is given fewer cores than the host
has (a cgroup CPU quota, a CPU affinity mask), or where several pools spin at once, a dense
``eigh`` oversubscribes the cores it really has and can run two orders of magnitude slower.
Every dense factorisation of the library runs under :func:`blas_threads`, which caps the pools
at the cores this process may really use for the duration of the call only; the user's global
settings are restored on exit.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import numpy as np
import torch
from threadpoolctl import threadpool_limits

__all__ = ["available_cpus", "blas_threads", "symmetric_eigh"]


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by a cgroup v2 (``cpu.max``) or v1 (``cfs_quota_us``) quota, if any."""
    candidates = [
        ("/sys/fs/cgroup/cpu.max", None),
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    ]
    for quota_path, period_path in candidates:
        try:
            with open(quota_path) as fh:
                fields = fh.read().split()
            if period_path is None:
                quota, period = fields[0], fields[1]
            else:
                with open(period_path) as fh:
                    quota, period = fields[0], fh.read().split()[0]
        except (OSError, IndexError):
            continue
        if quota in ("max", "-1"):
            return None
        return max(1.0, float(quota) / float(period))
    return None


def available_cpus() -> int:
    """Cores this process may use: the affinity mask, capped by any cgroup CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, math.floor(quota))
    return max(1, count)


@contextlib.contextmanager
def blas_threads(limit: int | None = None) -> Iterator[int]:
    """Cap numpy/scipy BLAS pools and torch's intra-op threads at ``limit`` for a block.

    ``limit`` defaults to :func:`available_cpus`. Settings are restored on exit, so the
    user's own thread configuration is untouched outside the library's calls.
    """
    limit = available_cpus() if limit is None else max(1, int(limit))
    previous = torch.get_num_threads()
    with threadpool_limits(limits=limit):
        if previous > limit:
            torch.set_num_threads(limit)
        try:
            yield limit
        finally:
            if previous > limit:
                torch.set_num_threads(previous)


def symmetric_eigh(matrix: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a symmetric matrix in float64: ``(eigenvalues, eigenvectors)``.

    Shapes: (N, N) in, (N,) ascending eigenvalues and (N, N) column eigenvectors out, both
    float64 numpy arrays on the CPU. A torch tensor on an accelerator is decomposed there
    and only the results are copied back.
    """
    if isinstance(matrix, torch.Tensor):
        t = matrix.detach().to(torch.float64)
        if t.device.type == "cpu":
            with blas_threads():
                evals, evecs = torch.linalg.eigh(t)
        else:
            evals, evecs = torch.linalg.eigh(t)
        return evals.cpu().numpy(), evecs.cpu().numpy()
    with blas_threads():
        evals, evecs = torch.linalg.eigh(torch.from_numpy(np.asarray(matrix, dtype=np.float64)))
    return evals.numpy(), evecs.numpy()
