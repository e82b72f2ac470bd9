"""Empirical neural tangent kernel (METHOD M1): dense kernels, kernel-vector products, trace.

Notation (M1): a network f(x; θ) maps each of the n rows of ``x`` to K outputs (trailing output
dimensions are flattened), the outputs are stacked row-major into a vector of length N = n·K
(all outputs of row 1, then row 2, ...), J = ∂f/∂θ is the N × P Jacobian over the *trainable*
parameters (``requires_grad=True``) and the empirical NTK is H = J Jᵀ / N. For test rows x2 the
cross kernel is C = J(x2) J(x)ᵀ / N with N the training N.

This module validates the arguments, checks memory and chooses one of two backends in one
place (:func:`_dispatch`) for all three public functions:

* ``"layerwise"`` (:mod:`remlstop._ntk_layerwise`): networks of ``nn.Linear``, ``nn.Conv2d``
  and ``nn.Embedding`` (of the integer inputs) layers, row-wise activations and 2-D pooling in
  nested ``nn.Sequential`` (or wrappers around one), exact kernels from Gram matrices of layer
  activations and output gradients (Linear) and from per-sample gradients of the conv and
  embedding layers, with one backward pass per output.
* ``"generic"`` (:mod:`remlstop._ntk_generic`): any ``nn.Module``, by per-sample Jacobians
  built in row chunks under a memory budget (relative error about 1e-7 for a float32 model,
  float64 throughout for a float64 one); the only backend with kernel-vector products.

Every function leaves the model exactly as it found it (the same parameter and buffer objects
and their values, ``requires_grad``, ``.grad``, train/eval modes, CPU and CUDA RNG states; see
:mod:`remlstop._model`), evaluates it in eval mode, and works under ``torch.inference_mode()``.
``empirical_ntk`` estimates its peak memory before allocating the kernel and raises a
``MemoryError`` that says what to do when it cannot fit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import numbers
import time

import torch
from torch import nn

from . import _ntk_generic as generic
from . import _ntk_layerwise as layerwise
from ._model import device_dtype, differentiable_evaluation, model_inputs, outputs

__all__ = [
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "NTKInfo",
    "empirical_ntk",
    "ntk_trace",
    "ntk_vector_product",
]

logger = logging.getLogger("remlstop")

DEFAULT_MEMORY_BUDGET_BYTES = 2**30
"""Default bound on one chunk of working memory (bytes): one Jacobian chunk on the generic path,
one Gram tile on the layerwise path. See :func:`empirical_ntk` for the resulting peak."""

_PATHS = ("auto", "layerwise", "generic")

_OPERATIONS = {"layerwise": ("kernel", "trace"), "generic": ("kernel", "trace", "product")}
"""What each backend implements: the layer-wise factors give no cheaper products than a vjp
and a jvp, so products always take the generic backend."""


@dataclasses.dataclass(frozen=True)
class NTKInfo:
    """How a kernel was computed (M1).

    Attributes: ``path`` ("layerwise" or "generic"); ``seconds`` (wall time); ``n`` (rows of
    the training inputs); ``K`` (outputs per row); ``N`` = n·K; ``P`` (trainable parameters);
    ``chunk_size`` (rows of the inputs per chunk: Jacobian chunk or Gram tile); ``reason``
    (why ``path="auto"`` did not take the layer-wise backend; None when it did or when
    ``path="generic"`` was asked for).
    """

    path: str
    seconds: float
    n: int
    K: int
    N: int
    P: int
    chunk_size: int
    reason: str | None = None


# ---------------------------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------------------------


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            "the model has no trainable parameters (requires_grad=True), so its NTK is zero; "
            "unfreeze the parameters that training updates."
        )
    complex_params = [name for name, p in params.items() if not p.is_floating_point()]
    if complex_params:
        raise TypeError(
            f"trainable parameters {complex_params} are not real floating point; the NTK (M1) "
            "is defined for real parameters and outputs."
        )
    return params


def _check_inputs(
    x: object, name: str, device: torch.device, dtype: torch.dtype | None
) -> torch.Tensor:
    """Validate a batch of inputs and move it to the model's device (floats to its dtype)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor with one row per sample, got {type(x).__name__}."
        )
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(
            f"{name} must have at least one row (shape (n, ...)), got shape {tuple(x.shape)}."
        )
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device and holds no values.")
    if (x.is_floating_point() or x.is_complex()) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values; clean or impute them first.")
    return model_inputs(x, device, dtype)


# Rows given together and one at a time may differ by the rounding of other GEMM kernels.
_ROW_TOLERANCE = 1e-3


def _check_chunk_size(chunk_size: int | None) -> int | None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, numbers.Integral)
        or chunk_size < 1
    ):
        raise ValueError(
            f"chunk_size must be a positive integer (rows per chunk) or None, got {chunk_size!r}."
        )
    return None if chunk_size is None else int(chunk_size)


def _probe_outputs(model: nn.Module, x: torch.Tensor) -> int:
    """K from a forward pass on a few rows (M1: trailing output dimensions are flattened),
    after checking that each row's output is its own: the NTK is per row (M1), and a forward
    that mixes the rows of a batch (x - x.mean(0), batch statistics) has no such kernel."""
    with torch.no_grad():
        batch = outputs(model, x[:4])
        alone = torch.cat([outputs(model, x[i : i + 1]) for i in range(batch.shape[0])])
    tol = max(_ROW_TOLERANCE, 100 * torch.finfo(batch.dtype).eps) * float(batch.abs().max())
    if batch.shape[0] > 1 and float((batch - alone).abs().max()) > tol:
        raise ValueError(
            "the model's output for a row depends on the other rows of the batch, or on chance "
            "(rows given together and one at a time differ): the NTK (M1) is that of a "
            "deterministic per-row map f(x_i), so layers that mix rows or draw noise in eval "
            "mode must go (batch norm and dropout are already evaluated in eval mode)."
        )
    return batch.shape[1]


def _resolve_device(device: torch.device | str | None, model_device: torch.device) -> torch.device:
    if device is None:
        return model_device
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError("device='meta' holds no values; ask for the kernel on a real device.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r}, but this torch has no CUDA device; ask for the kernel on "
            "'cpu' (the default is the model's device)."
        )
    return device


def _check_dtype(dtype: torch.dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"dtype must be a floating torch.dtype (default torch.float64), got {dtype!r}."
        )
    if dtype.itemsize < 4:  # a sum of P products overflows float16 (max 65504)
        raise TypeError(
            f"dtype={dtype} cannot hold a kernel's sums; use torch.float64 (the default) or "
            "torch.float32 (the model itself may run in any dtype)."
        )


# ---------------------------------------------------------------------------------------------
# Dispatch: the one choice of backend.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Backend:
    """The backend chosen for one call: ``path`` ("layerwise" or "generic"), the module it runs
    on (for a wrapper, its layer-wise sub-module) and why the layer-wise backend was not chosen
    (None when it was, or when ``path="generic"`` asked for the generic one)."""

    path: str
    network: nn.Module
    reason: str | None


def _dispatch(model: nn.Module, x: torch.Tensor, path: str, operation: str) -> _Backend:
    """Choose the backend for ``operation`` ("kernel", "trace" or "product") on the rows ``x``.

    "auto": the layer-wise backend when it implements the operation and supports the model or
    a sub-module that computes the same map on ``x`` (:func:`_ntk_layerwise.delegate`), else
    the generic one; "layerwise": that, or a ValueError naming what it does not support;
    "generic": the generic backend.
    """
    if path == "generic":
        return _generic_backend(model, None)
    if operation not in _OPERATIONS["layerwise"]:
        reason = f"the layer-wise backend has no {operation}"
    else:
        reason = layerwise.unsupported(model, x)
        if reason is None:
            return _Backend("layerwise", model, None)
        inner = layerwise.delegate(model, x)
        if inner is not None:
            return _Backend("layerwise", inner, None)
    if path == "layerwise":
        raise ValueError(
            f"path='layerwise' does not support this model: {reason}. Use path='generic'."
        )
    return _generic_backend(model, reason)


def _generic_backend(model: nn.Module, reason: str | None) -> _Backend:
    """The generic backend, or a ValueError when torch.func cannot differentiate ``model``."""
    hooks = generic.unsupported(model)
    if hooks is not None:
        also = "" if reason is None else f", and the layer-wise backend does not apply ({reason})"
        raise ValueError(
            f"{hooks}: torch.func, which the generic backend's per-row Jacobians use, cannot run "
            f"through it{also}. The kernel is the forward map's, which backward hooks do not "
            "change: hook the parameters instead (p.register_hook, which the kernel's "
            "computation does not run), or remove the module hook while the kernel is computed."
        )
    return _Backend("generic", model, reason)


# ---------------------------------------------------------------------------------------------
# Memory: estimate the peak before allocating the kernel.
# ---------------------------------------------------------------------------------------------

_GB = 1e9

# (limit, usage, statistics) files of cgroup v2 and v1: inside a container MemAvailable is the
# host's, and exceeding the container's limit gets the process killed without a message.
_CGROUP_FILES = (
    (
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory.current",
        "/sys/fs/cgroup/memory.stat",
        "inactive_file",
    ),
    (
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        "/sys/fs/cgroup/memory/memory.stat",
        "total_inactive_file",
    ),
)


def _meminfo_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes, or None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file says kB, meaning KiB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom() -> int | None:
    """Bytes left under this process's cgroup memory limit, or None when there is no limit.

    Inactive page cache is counted as free: the kernel reclaims it before it kills anything.
    """
    for limit_file, usage_file, stat_file, inactive_key in _CGROUP_FILES:
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read())
        except (OSError, ValueError):
            continue
        if not limit.isdigit() or int(limit) >= 2**60:  # "max" or the v1 "unlimited" value
            return None
        inactive = 0
        with contextlib.suppress(OSError, ValueError):
            with open(stat_file) as f:
                stats = dict(line.split() for line in f if len(line.split()) == 2)
            inactive = int(stats.get(inactive_key, 0))
        return max(0, int(limit) - usage + inactive)
    return None


def _memory_device(device: torch.device) -> torch.device:
    """``device`` with its index, so that "cuda" and "cuda:0" count against one memory."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _available_bytes(device: torch.device) -> int | None:
    """Bytes that can be allocated on ``device`` now, or None when unknown (no check then).

    CPU: MemAvailable (psutil's figure when psutil is installed, else /proc/meminfo), capped by
    the headroom under a cgroup limit. CUDA: the driver's free memory plus the blocks PyTorch's
    allocator has cached but not handed out.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        import psutil  # optional: not a dependency
    except ImportError:
        available = _meminfo_available()
    else:
        available = int(psutil.virtual_memory().available)
    headroom = _cgroup_headroom()
    if available is None or headroom is None:
        return headroom if available is None else available
    return min(available, headroom)


def _fits(needs: dict[torch.device, int], limit: int | None) -> bool:
    """Whether every device's estimated peak is within ``limit`` (default: what is available
    there now; unknown counts as enough)."""
    for device, need in needs.items():
        available = _available_bytes(device) if limit is None else limit
        if available is not None and need > available:
            return False
    return True


def _check_memory(
    needs: dict[torch.device, int],
    kernel_bytes: int,
    limit: int | None,
    shape: tuple[int, int],
    n: int,
    K: int,
    dtype: torch.dtype,
) -> None:
    """MemoryError when the estimated peak on a device exceeds ``limit`` (default: what is
    available there now), before anything is allocated; torch's own message would not say
    why the kernel is this large or what to do about it."""
    for device, need in needs.items():
        available = _available_bytes(device) if limit is None else limit
        if available is None or need <= available:
            continue
        raise MemoryError(
            f"the dense NTK (METHOD M1) needs about {need / _GB:.3g} GB on {device} "
            f"({kernel_bytes / _GB:.3g} GB for the {shape[0]} × {shape[1]} {dtype} kernel, "
            f"N = n·K = {n}·{K}, plus working memory) but {available / _GB:.3g} GB is "
            "available. The kernel grows as N²: REMLStopper / REMLEarlyStopping with "
            "kernel='nystrom' compute only landmark rows of it (METHOD M10; fewer landmarks= "
            "take less memory); max_samples= computes it on a random subset of rows (the stop "
            "time grows with N, so a subset's is biased); or reduce the number of outputs K per "
            "row (e.g. fewer targets)."
        )


# ---------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------


def empirical_ntk(
    model: nn.Module,
    x: torch.Tensor,
    x2: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    memory_budget_bytes: int | None = None,
    memory_limit_bytes: int | None = None,
    path: str = "auto",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, NTKInfo]:
    """Dense empirical NTK H = J Jᵀ / N, or cross kernel C = J(x2) J(x)ᵀ / N (METHOD M1).

    Args:
        model: the network f(x; θ); J is taken over its parameters with ``requires_grad=True``
            at their current values. It is evaluated in eval mode (a ``UserWarning`` says so
            when dropout or batch normalisation was in train mode) and left exactly as found.
        x: training inputs, shape (n, ...), on any device (moved to the model's; floating inputs
            are cast to the model's dtype). The model output, shape (n,) or (n, ...), gives
            K = number of outputs per row (trailing dimensions flattened), N = n·K.
        x2: optional test inputs, shape (n2, ...) with the feature shape of ``x``.
        chunk_size: rows of the inputs per chunk (Jacobian chunk on the generic path, Gram
            tile on the layerwise path); default from ``memory_budget_bytes``.
        memory_budget_bytes: bound in bytes on one chunk, default ``DEFAULT_MEMORY_BUDGET_BYTES``
            (1 GiB). Generic path: one chunk is rows·K·P values in the working dtype (the model's,
            at least float32 and at most ``dtype``: 4 bytes for a float32 model); two chunks are
            alive at once (one when a chunk holds all rows) and ``vmap(jacrev)`` runs on sub-chunks
            of 24 MiB of Jacobian on a CPU (the whole chunk on a GPU), so the peak is about the
            kernel (8·N·N2 bytes) + 2 × budget + that sub-chunk + its activations + one tile of
            products; parameters are split into groups when even one row exceeds the budget.
            Layerwise path: the peak is about the kernel + budget + the per-layer features, n·(Σ
            d_in + K·Σ d_out) values for the Linear layers and n·K·P_conv (the trainable parameters
            of the Conv2d and Embedding layers) for the others, in the model's dtype.
            With ``path="auto"`` a model whose layer-wise features do not fit where the generic
            backend's chunks do takes the generic path.
        memory_limit_bytes: bytes the kernel and this working memory may take on each device
            involved (the kernel's and the model's). Default None: the memory available there
            now (MemAvailable, capped by a cgroup limit, on the CPU; free plus cached memory on
            CUDA; no check where it is unknown). The peak is estimated as above before
            anything is allocated, and a ``MemoryError`` that states the need, the available
            memory and the ways out (``max_samples=``, fewer outputs) is raised when it does
            not fit.
        path: "auto" (layerwise when the model supports it, else generic), "layerwise"
            (ValueError naming the unsupported module otherwise) or "generic". The layer-wise
            formula holds for torch's own layers only: a subclass with its own ``forward``, a
            parametrized weight or a forward hook on a layer or a container sends "auto" to the
            generic path (``NTKInfo.reason`` says why).
        dtype: dtype of the kernel. Default float64, as the statistics downstream expect.
            Layerwise path: Jacobian factors are computed in the model's dtype and multiplied
            in ``dtype``; the per-sample gradients of conv layers, Jacobian columns, are
            multiplied as the generic path multiplies its chunks. Generic path: Jacobian
            chunks are multiplied in the model's dtype (at least float32, at most ``dtype``) in
            groups of 65,536 parameters accumulated in ``dtype`` (relative error about 1e-7 for
            a float32 model; exact float64 products for a float64 model, see
            :mod:`remlstop._ntk_generic`). A float16 or bfloat16 model's kernel is only as
            exact as its forward and backward passes in that dtype: cast a copy of the model
            to float32 for a finer one.
        device: device of the returned kernel; default the model's device. Tiles are computed
            on the model's device and copied, so a GPU model can fill a CPU kernel.
        return_info: also return an :class:`NTKInfo`.

    Returns:
        H of shape (N, N), or C of shape (n2·K, N) when ``x2`` is given (rows and columns in
        M1's row-major order: all outputs of row 1, then row 2, ...); with ``return_info``,
        ``(kernel, NTKInfo)``. Units: output units squared (per parameter), divided by N.
    """
    start = time.perf_counter()
    if path not in _PATHS:
        raise ValueError(f"path must be one of {_PATHS}, got {path!r}.")
    chunk_size = _check_chunk_size(chunk_size)
    _check_dtype(dtype)
    for name, value in (
        ("memory_budget_bytes", memory_budget_bytes),
        ("memory_limit_bytes", memory_limit_bytes),
    ):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1
        ):
            raise ValueError(f"{name} must be a positive number of bytes, got {value!r}.")
    budget = int(memory_budget_bytes or DEFAULT_MEMORY_BUDGET_BYTES)
    memory_limit_bytes = None if memory_limit_bytes is None else int(memory_limit_bytes)
    params = _trainable(model)
    model_device, model_dtype = device_dtype(model)
    assert model_dtype is not None  # _trainable: the first trainable parameter is real floating
    out_device = _resolve_device(device, model_device)
    P = sum(p.numel() for p in params.values())
    with differentiable_evaluation(model):
        x = _check_inputs(x, "x", model_device, model_dtype)
        if x2 is not None:
            x2 = _check_inputs(x2, "x2", model_device, model_dtype)
            if x2.shape[1:] != x.shape[1:]:
                raise ValueError(
                    f"x2 has feature shape {tuple(x2.shape[1:])} but x has "
                    f"{tuple(x.shape[1:])}; test rows must have the training rows' shape."
                )
        n = x.shape[0]
        n2 = None if x2 is None else x2.shape[0]
        K = _probe_outputs(model, x)
        N = n * K
        rows_out = N if x2 is None else x2.shape[0] * K
        backend = _dispatch(model, x if x2 is None else torch.cat([x, x2]), path, "kernel")
        itemsize = dtype.itemsize
        kernel_bytes = rows_out * N * itemsize

        def needs(work_bytes: int) -> dict[torch.device, int]:
            total: dict[torch.device, int] = {}
            for where, size in ((out_device, kernel_bytes), (model_device, work_bytes)):
                total[_memory_device(where)] = total.get(_memory_device(where), 0) + size
            return total

        work = generic.work_dtype(model_dtype, dtype)
        layout = generic.layout(params, K, chunk_size, budget, work.itemsize)
        generic_work = generic.work_bytes(
            layout, params, n, n2, K, work.itemsize, itemsize, x.device
        )
        need = needs(generic_work)
        if backend.path == "layerwise":
            rows = chunk_size or layerwise.tile_rows(n, K, budget, itemsize)
            layerwise_need = needs(
                layerwise.work_bytes(backend.network, x, n2, K, rows, itemsize, budget)
            )
            # The per-sample gradients of wide conv layers are held for every row, where the
            # generic backend recomputes Jacobian chunks: it takes over when only it fits.
            limit = memory_limit_bytes
            if path != "auto" or _fits(layerwise_need, limit) or not _fits(need, limit):
                need = layerwise_need
            else:
                backend = _generic_backend(model, "its per-row features do not fit in memory")
        _check_memory(need, kernel_bytes, memory_limit_bytes, (rows_out, N), n, K, dtype)
        if backend.path == "layerwise":  # writes every entry, already divided by N
            kernel = torch.empty(rows_out, N, dtype=dtype, device=out_device)
            layerwise.kernel(backend.network, x, x2, K, rows, kernel, budget, N)
        else:
            kernel = torch.zeros(rows_out, N, dtype=dtype, device=out_device)
            rows = generic.kernel(model, params, x, x2, K, layout, kernel, work)
            kernel /= N
    info = NTKInfo(backend.path, time.perf_counter() - start, n, K, N, P, rows, backend.reason)
    logger.info(
        "empirical NTK (M1): path=%s n=%d K=%d N=%d P=%d chunk=%d rows in %.3f s%s",
        info.path,
        n,
        K,
        N,
        P,
        rows,
        info.seconds,
        "" if info.reason is None else f" (not layerwise: {info.reason})",
    )
    return (kernel, info) if return_info else kernel


def ntk_vector_product(
    model: nn.Module,
    x: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """H v = J (Jᵀ v) / N without forming H or J (METHOD M1), by a vjp then a jvp.

    Args:
        model: the network; derivatives over its trainable parameters, in eval mode, left as
            found.
        x: training inputs (n, ...), N = n·K.
        v: shape (N,) or (N, m) for m vectors at once (batched with ``vmap``), in M1's
            row-major order.
        chunk_size: rows of ``x`` per forward/backward pass (default: all rows at once); Jᵀ v
            is accumulated over chunks, then J w is formed chunk by chunk.

    Returns:
        float64 tensor of v's shape on the model's device. The products run in the model's
        dtype, so a float32 model gives float32-accurate products.
    """
    chunk_size = _check_chunk_size(chunk_size)
    params = _trainable(model)
    model_device, model_dtype = device_dtype(model)
    if not isinstance(v, torch.Tensor):
        raise TypeError(
            f"v must be a torch.Tensor of shape (N,) or (N, m), got {type(v).__name__}."
        )
    with differentiable_evaluation(model):
        x = _check_inputs(x, "x", model_device, model_dtype)
        n = x.shape[0]
        K = _probe_outputs(model, x)
        N = n * K
        if v.dim() not in (1, 2) or v.shape[0] != N:
            raise ValueError(
                f"v must have shape ({N},) or ({N}, m) for N = n·K = {n}·{K}, got {tuple(v.shape)}."
            )
        if not bool(torch.isfinite(v).all()):
            raise ValueError("v contains NaN or infinite values.")
        vs = model_inputs(v, model_device, model_dtype).to(model_dtype).reshape(N, -1).T
        backend = _dispatch(model, x, "auto", "product")
        hv = generic.vector_product(backend.network, params, x, vs, K, chunk_size or n) / N
    return hv.reshape(v.shape)


def ntk_trace(model: nn.Module, x: torch.Tensor, *, chunk_size: int | None = None) -> float:
    """Exact tr(H) = Σ_i ‖∂f_i/∂θ‖² / N from per-row gradient norms (METHOD M1).

    Uses the layer-wise features when the model supports them (‖G_ik A_iᵀ‖² = ‖G_ik‖²‖A_i‖² for
    a Linear, per-sample gradients for a Conv2d or Embedding), per-sample Jacobians otherwise;
    rows are processed ``chunk_size`` at a time (default from ``DEFAULT_MEMORY_BUDGET_BYTES``).
    The mean eigenvalue of H is ``ntk_trace(...) / N``.
    """
    chunk_size = _check_chunk_size(chunk_size)
    params = _trainable(model)
    model_device, model_dtype = device_dtype(model)
    with differentiable_evaluation(model):
        x = _check_inputs(x, "x", model_device, model_dtype)
        K = _probe_outputs(model, x)
        backend = _dispatch(model, x, "auto", "trace")
        if backend.path == "layerwise":
            budget = DEFAULT_MEMORY_BUDGET_BYTES
            total = layerwise.trace(backend.network, x, K, chunk_size, budget)
        else:
            total = generic.trace(model, params, x, K, chunk_size)
    return float(total) / (x.shape[0] * K)
