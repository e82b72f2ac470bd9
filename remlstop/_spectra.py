"""The stopper's initial spectra, from the dense kernel or from landmark rows (METHOD M4, M10).

Which path runs is decided here once: the dense N x N kernel when its peak fits the memory
budget (``memory_budget_bytes``, default what the kernel's device and the CPU have available
now) and N is at most ``_DENSE_MAX_N``; the Nystrom spectrum otherwise (or when
``kernel='nystrom'`` asks for it). Both give the stopper the
same things: the criteria's spectrum, the test's spectrum, H u0 for the trajectory rule and, for
refreshes, the dense kernel itself. The Nystrom spectrum comes with its landmark check: the
criteria and the test once more on the nested approximation from half of the landmarks.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ._model import device_dtype, trained_only
from .criteria import evaluate_criteria
from .ntk import _available_bytes, _memory_device, empirical_ntk, ntk_vector_product
from .nystrom import NystromKernel, choose_landmarks, nystrom_kernel
from .options import StopperOptions
from .spectrum import KernelSpectrum
from .vctest import variance_component_test

__all__ = [
    "InitialSpectra",
    "default_landmarks",
    "dense_peak_bytes",
    "initial_spectra",
    "nystrom_peak_bytes",
    "plan",
]

# The dense decision's peak over the kernel's N^2 x 8 bytes: 1.92 measured at n = 3,000
# (benchmarks/peak_memory.py), rounded up.
_DENSE_PEAK = 2.0
# Above this N the dense decision takes too long to be a default: 258 s at N = 10,000 on two
# cores (benchmarks/large_n.py), growing as N^3 (about 35 min at 20,000, 2 h at 30,000). On a
# GPU too: the kernel is computed there, but its eigen-decomposition is LAPACK's, on the host.
_DENSE_MAX_N = 20_000
# Landmark columns (m K) by default: 8,192 while the decision's N (m K)^2 flops (C C^T, and
# about as many for the rows themselves) stay within what they cost at N = 10^5, the scale the
# issue set (265 s on two cores, benchmarks/large_n.py); fewer beyond, as 1 / sqrt(N), down to
# 4,096 (from N = 4 x 10^5). At N = 20,000 every criterion's stop was within 1.2% of the dense
# one with 8,000 columns and 2.2-3.1% off with 4,000; at N = 10^5, 4,096 stopped the late
# criteria 4-7% later than 8,192.
_MIN_LANDMARK_COLUMNS = 4096
_MAX_LANDMARK_COLUMNS = 8192
_LANDMARK_FLOPS = 100_000 * _MAX_LANDMARK_COLUMNS**2
# The Nystrom decision's peak over 8 (m K)^2 bytes: W, C C^T, the mixing M, the Gram and the
# factorisation's and eigendecomposition's work (C is streamed): the whole process peaked at
# 4.47 GB, 8.3 of them, at m K = 8,192, N = 10^5 (benchmarks/large_n.py). They may take this
# share of the budget, the kernel backends' working memory and the model's own the rest.
_NYSTROM_PEAK = 8.0
_LANDMARK_SHARE = 0.5
# Rows per forward/backward pass of the exact kernel-vector products on the Nystrom path.
_PRODUCT_ROWS = 4096


def dense_peak_bytes(n_obs: int) -> int:
    """Estimated peak of the dense decision for N = ``n_obs`` residuals (bytes)."""
    return int(_DENSE_PEAK * 8 * n_obs * n_obs)


def nystrom_peak_bytes(columns: int) -> int:
    """Estimated peak of the Nystrom decision with ``columns`` = m K landmark rows of the
    kernel (bytes): ``_NYSTROM_PEAK`` x 8 (m K)^2, whatever N."""
    return int(_NYSTROM_PEAK * 8 * columns * columns)


def default_landmarks(n: int, K: int, budget: int | None) -> int:
    """Landmark rows m for n training rows of K outputs: m K columns as many as keep the
    decision's N (m K)^2 flops within ``_LANDMARK_FLOPS`` (8,192 up to N = n K = 10^5, then
    falling as 1 / sqrt(N) to 4,096 from N = 4 x 10^5), at most half the rows (the rest is
    what the approximation is for) and at most what fits ``_LANDMARK_SHARE`` of ``budget``
    bytes at ``_NYSTROM_PEAK`` x 8 (m K)^2."""
    N = n * K
    if n // 2 < 3:
        raise ValueError(
            f"n = {n} training rows are too few for the Nystrom path, which needs at least 6 (3 "
            "landmark rows and as many left for it to approximate); use kernel='dense'."
        )
    affordable = math.isqrt(_LANDMARK_FLOPS // N)
    columns = min(_MAX_LANDMARK_COLUMNS, max(_MIN_LANDMARK_COLUMNS, affordable))
    m = min(max(3, columns // K), n // 2)
    if budget is not None:
        fits = math.isqrt(int(_LANDMARK_SHARE * budget / nystrom_peak_bytes(1)))
        m = min(m, fits // K)
    if m < 3:
        raise MemoryError(
            f"not even 3 landmark rows of the kernel (N = {N}, K = {K}) fit the memory budget "
            f"of {budget / 2**30:.3g} GB; raise memory_budget_bytes or pass max_samples=."
        )
    return m


def _budget(options: StopperOptions, device: torch.device) -> int | None:
    """``memory_budget_bytes``, or the memory available on ``device`` now (None: unknown)."""
    if options.memory_budget_bytes is not None:
        return options.memory_budget_bytes
    return _available_bytes(_memory_device(device))


def plan(n: int, K: int, options: StopperOptions, device: torch.device) -> tuple[str, int | None]:
    """('dense', None) or ('nystrom', m landmark rows) for n rows of K outputs (M10)."""
    # The spectra are numpy arrays: a dense kernel on a GPU is decomposed in the CPU's memory,
    # and the Nystrom path's m K x m K matrices live there too.
    host = _budget(options, torch.device("cpu"))
    path = options.kernel
    if path == "auto":
        budgets = {host} if device.type == "cpu" else {host, _budget(options, device)}
        fits = all(b is None or dense_peak_bytes(n * K) <= b for b in budgets)
        path = "dense" if fits and n * K <= _DENSE_MAX_N else "nystrom"
    if path == "dense":
        return "dense", None
    m = options.landmarks or default_landmarks(n, K, host)
    if m >= n:
        raise ValueError(
            f"landmarks = {m} but there are only n = {n} training rows; use kernel='dense' "
            "or fewer landmarks."
        )
    need = nystrom_peak_bytes(m * K)
    if options.landmarks and host is not None and need > host:
        raise MemoryError(
            f"landmarks = {m} ({m * K} kernel rows) need about {need / 2**30:.3g} GB for the "
            f"Nystrom decision (METHOD M10) but {host / 2**30:.3g} GB are available; pass "
            f"fewer landmarks (the default picks what fits) or raise memory_budget_bytes."
        )
    return "nystrom", m


def _with_landmark_check(
    spectrum: KernelSpectrum,
    factor: NystromKernel,
    kernel_times: np.ndarray | None,
    seed: int,
) -> KernelSpectrum:
    """``spectrum`` with its approximation's check filled in (M10): every criterion's stop time
    and the test's p-value from half of the landmarks (drawn among them with ``seed``), so the
    decision can say how far its stop still moves with m. ``kernel_times``: H Q for the test's
    covariates (None: none)."""
    half = factor.landmarks // 2
    if half < 3:
        return spectrum
    nested = factor.nested(choose_landmarks(factor.landmarks, seed, half))
    check = nested.spectrum()
    test_check = check if kernel_times is None else nested.spectrum(kernel_times)
    assert spectrum.approximation is not None
    return spectrum.with_approximation(
        dataclasses.replace(
            spectrum.approximation,
            check_landmarks=half,
            check_times={k: float(f.t) for k, f in evaluate_criteria(check).fits.items()},
            check_pvalue=float(variance_component_test(test_check).pvalue),
        )
    )


@dataclass(frozen=True)
class InitialSpectra:
    """What the stopper reads at theta0: the criteria's and the test's spectra, h = H u0
    (N,) float64 on the model's device, the dense kernel when refreshes need it, and which
    kernel backend and spectrum path ran."""

    spectrum: KernelSpectrum
    test_spectrum: KernelSpectrum
    Hu0: torch.Tensor
    H0: torch.Tensor | None
    kernel_path: str
    seconds: dict[str, float] = field(default_factory=dict)


def initial_spectra(
    model: nn.Module,
    X: torch.Tensor,
    u0: torch.Tensor,
    covariates: np.ndarray | None,
    options: StopperOptions,
    trained: list[torch.nn.Parameter],
) -> InitialSpectra:
    """The spectra of the kernel over the ``trained`` parameters at X (M1, M4, M5, M10)."""
    n = X.shape[0]
    K = u0.numel() // n
    path, m = plan(n, K, options, device_dtype(model)[0])
    seconds: dict[str, float] = {}
    tic = time.perf_counter()
    with trained_only(model, trained):
        if path == "dense":
            H, info = empirical_ntk(model, X, chunk_size=options.chunk_size, return_info=True)
            seconds["kernel"] = time.perf_counter() - tic
            tic = time.perf_counter()
            # Copied off a GPU once, for both spectra.
            H_host = H.cpu()
            spectrum = KernelSpectrum.from_kernel(H_host, u0)
            test_spectrum = spectrum
            if covariates is not None:
                test_spectrum = KernelSpectrum.from_kernel(H_host, u0, covariates)
            seconds["spectrum"] = time.perf_counter() - tic
            return InitialSpectra(
                spectrum=spectrum,
                test_spectrum=test_spectrum,
                Hu0=H @ u0.to(H.device),
                H0=H if options.refresh_every_n_steps is not None else None,
                kernel_path=info.path,
                seconds=seconds,
            )
        if options.refresh_every_n_steps is not None:
            raise ValueError(
                f"refresh_every_n_steps needs the dense kernel, but N = {n * K} takes the "
                "Nystrom path (METHOD M10); pass kernel='dense' (and enough memory_budget_bytes) "
                "or drop refresh_every_n_steps."
            )
        assert m is not None
        factor = nystrom_kernel(
            model,
            X,
            u0,
            landmarks=m,
            covariates=covariates,
            seed=options.seed,
            chunk_size=options.chunk_size,
        )
        seconds["kernel"] = time.perf_counter() - tic
        tic = time.perf_counter()
        spectrum = factor.spectrum()
        test_spectrum = spectrum
        # H u0 exactly (one vjp and one jvp over the rows), for the trajectory rule's D.
        chunk = options.chunk_size or _PRODUCT_ROWS
        products = [u0.to(torch.float64)]
        if factor.covariate_basis is not None:
            products.append(torch.from_numpy(factor.covariate_basis).to(u0.device))
        V = torch.column_stack(products)
        HV = ntk_vector_product(model, X, V, chunk_size=chunk).to(torch.float64)
        HQ = None if factor.covariate_basis is None else HV[:, 1:].cpu().numpy()
        if HQ is not None:
            test_spectrum = factor.spectrum(kernel_times=HQ)
        seconds["spectrum"] = time.perf_counter() - tic
        tic = time.perf_counter()
        spectrum = _with_landmark_check(spectrum, factor, HQ, options.seed)
        if HQ is None:
            test_spectrum = spectrum
        seconds["check"] = time.perf_counter() - tic
    return InitialSpectra(
        spectrum=spectrum,
        test_spectrum=test_spectrum,
        Hu0=HV[:, 0].to(u0.device),
        H0=None,
        kernel_path=factor.kernel_path,
        seconds=seconds,
    )
