"""Empirical neural tangent kernel (METHOD M1): dense kernels, kernel-vector products, trace.

Notation (M1): a network f(x; θ) maps each of the n rows of ``x`` to K outputs (trailing output
dimensions are flattened), the outputs are stacked row-major into a vector of length N = n·K
(all outputs of row 1, then row 2, ...), J = ∂f/∂θ is the N × P Jacobian over the *trainable*
parameters (``requires_grad=True``) and the empirical NTK is H = J Jᵀ / N. For test rows x2 the
cross kernel is C = J(x2) J(x)ᵀ / N with N the training N.

Two ways to build the dense kernel:

* ``"layerwise"``: networks made only of ``nn.Linear`` layers and parameter-free row-wise
  modules (elementwise activations, ``Flatten``, ``Dropout``), possibly in nested
  ``nn.Sequential``, each parameter used once (a layer applied twice or a tied weight would need
  the cross terms between its uses, so such networks take the generic path). For a Linear layer with input activations A (n × d_in) and output gradients
  G_k (n × d_out) of output k, the per-row gradient of its weight is the outer product
  G_k[i] A[i]ᵀ, so its kernel block is (A Aᵀ + 1[bias]) ⊙ (G_k G_lᵀ): per-sample gradients are
  never formed and the cost is that of Gram matrices of the activations.
* ``"generic"``: any ``nn.Module``, by per-sample Jacobians (``torch.func.vmap(jacrev)``) built
  in row chunks under a memory budget. Chunks are held and multiplied in the model's dtype (at
  least float32, at most the kernel's ``dtype``): a float64 model is contracted entirely in
  float64; for a float32 model the parameter (inner) dimension is split into groups of 65,536
  parameters whose float32 products are accumulated in float64, so the rounding grows with the
  group width, not with P. Accuracy for a float32 model: relative error about 1e-7 (measured
  max |ΔH| / max |H| = 1.6e-7 on the paper's MLP, P = 256,501, against float64 products of the
  same Jacobian), the accuracy of a float32 Jacobian itself; float64 products would cost 2–3× the
  time and 2× the memory for no gain. Only the upper block triangle of H is multiplied.

Every function leaves the model exactly as it found it (the same parameter and buffer objects
and their values, ``requires_grad``, ``.grad``, train/eval modes, RNG state), and evaluates it in
eval mode. ``empirical_ntk`` estimates its peak memory before allocating the kernel and raises a
``MemoryError`` that says what to do when it cannot fit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

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

_JACREV_BYTES = 24 * 2**20
"""Bound on the Jacobian of one vmap(jacrev) call. Below glibc's largest mmap threshold (32 MiB),
so its outputs come from the reused heap instead of fresh mmaps that are page-faulted in again on
every call: measured 0.34 s against 0.50 s with 64 MiB for J of the paper's MLP at n = 1000."""

# Parameter-free modules that act on each row on its own; in eval mode dropout is the identity.
_ROWWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Tanhshrink, nn.Identity, nn.Flatten,
    nn.modules.dropout._DropoutNd,
)


@dataclasses.dataclass(frozen=True)
class NTKInfo:
    """How a kernel was computed (M1).

    Attributes: ``path`` ("layerwise" or "generic"); ``seconds`` (wall time); ``n`` (rows of
    the training inputs); ``K`` (outputs per row); ``N`` = n·K; ``P`` (trainable parameters);
    ``chunk_size`` (rows of the inputs per chunk: Jacobian chunk or Gram tile).
    """

    path: str
    seconds: float
    n: int
    K: int
    N: int
    P: int
    chunk_size: int


# ---------------------------------------------------------------------------------------------
# Model state: snapshot, evaluation mode, restore.
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _preserved_model(model: nn.Module) -> Iterator[None]:
    """Run the body with ``model`` in eval mode and restore everything about it afterwards.

    Parameters and buffers are cloned (O(P) memory) so that even a forward that writes to them
    in place cannot change the model; they are copied back only if their version counter moved.
    The objects registered on every module are restored too, so the model (and the optimizer
    holding its parameters) keeps the very same ``nn.Parameter`` and buffer objects.
    """
    modes = [(module, module.training) for module in model.modules()]
    tables = [
        (table, dict(table))
        for module in model.modules()
        for table in (module._parameters, module._buffers)
    ]
    params = list(model.parameters())
    flags = [(p, p.requires_grad, p.grad) for p in params]
    tensors = [(t, t._version, t.detach().clone()) for t in [*params, *model.buffers()]]
    cpu_rng = torch.get_rng_state()
    cuda_rng = (
        torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else None
    )
    try:
        _warn_train_mode_layers(model)
        model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training
        # functional_call swaps tensors into these tables and back; for a module reached twice
        # (one layer applied twice) it puts back the swapped-in plain tensor, not the Parameter.
        for table, saved in tables:
            if table.keys() != saved.keys() or any(table[k] is not v for k, v in saved.items()):
                table.clear()
                table.update(saved)
        with torch.no_grad():
            for tensor, version, saved in tensors:
                if tensor._version != version:
                    tensor.copy_(saved)
        for p, requires_grad, grad in flags:
            p.requires_grad_(requires_grad)
            if p.grad is not grad:
                p.grad = grad
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _warn_train_mode_layers(model: nn.Module) -> None:
    """Warn when eval mode changes what the model computes (active dropout, batch statistics)."""
    dropout = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
    ]
    batchnorm = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    if dropout:
        warnings.warn(
            f"dropout is active in {dropout}; the NTK (M1) is that of the deterministic network, "
            "so it is evaluated in eval mode (dropout off). Call model.eval() to silence this.",
            UserWarning,
            stacklevel=5,
        )
    if batchnorm:
        warnings.warn(
            f"batch normalisation in train mode in {batchnorm}: batch statistics couple the rows, "
            "so the NTK (M1) is evaluated in eval mode with the running statistics, which are "
            "not updated. Call model.eval() to silence this.",
            UserWarning,
            stacklevel=5,
        )
    untracked = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None
    ]
    if untracked:
        raise ValueError(
            f"batch normalisation without running statistics in {untracked} normalises with "
            "batch statistics even in eval mode, so rows are coupled and the per-row NTK (M1) is "
            "undefined; use track_running_stats=True."
        )


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
    return params


def _model_device_dtype(params: dict[str, torch.Tensor]) -> tuple[torch.device, torch.dtype]:
    first = next(iter(params.values()))
    if first.device.type == "meta":
        raise ValueError(
            "the model's parameters are on the meta device and hold no values; materialise "
            "them (e.g. model.to_empty(device=...) and load weights) first."
        )
    return first.device, first.dtype


def _check_inputs(x: object, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Validate a batch of inputs and move it to the model's device (floats to its dtype)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor with one row per sample, got {type(x).__name__}.")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} must have at least one row (shape (n, ...)), got shape {tuple(x.shape)}.")
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device and holds no values.")
    if (x.is_floating_point() or x.is_complex()) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values; clean or impute them first.")
    x = x.detach().to(device)
    return x.to(dtype) if x.is_floating_point() else x


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer (rows per chunk) or None, got {chunk_size!r}.")


def _outputs_per_row(out: torch.Tensor, rows: int) -> int:
    """K of a model output for ``rows`` input rows, after checking its shape and values."""
    if out.dim() == 0 or out.shape[0] != rows:
        raise ValueError(
            f"the model output has shape {tuple(out.shape)} for a batch of {rows} rows; its first "
            "dimension must be the batch dimension (one output row per input row)."
        )
    if not out.is_floating_point():
        raise ValueError(f"the model output must be floating point, got {out.dtype}.")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(
            "the model output contains NaN or infinite values; check the inputs' scale and the "
            "parameters."
        )
    return math.prod(out.shape[1:])


def _probe_outputs(model: nn.Module, x: torch.Tensor) -> int:
    """K from a forward pass on a few rows (M1: trailing output dimensions are flattened)."""
    rows = min(x.shape[0], 4)
    with torch.no_grad():
        return _outputs_per_row(model(x[:rows]), rows)


def _resolve_device(device: torch.device | str | None, model_device: torch.device) -> torch.device:
    if device is None:
        return model_device
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError("device='meta' holds no values; ask for the kernel on a real device.")
    return device


def _check_dtype(dtype: torch.dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (default torch.float64), got {dtype!r}.")


# ---------------------------------------------------------------------------------------------
# Layer-wise path.
# ---------------------------------------------------------------------------------------------


def _flatten_sequential(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, nn.Sequential):
        return [leaf for child in model for leaf in _flatten_sequential(child)]
    return [model]


def _layerwise_delegate(model: nn.Module, x: torch.Tensor) -> nn.Module | None:
    """A sub-module that computes exactly what ``model`` computes on ``x`` with all of its
    trainable parameters and that the layer-wise path supports, or None.

    Wrappers (a LightningModule whose ``forward`` calls ``self.net``, say) then get the fast
    path: the kernel depends only on the map x -> f(x; theta), which the two modules share when
    they hold the same trainable parameters and give bit-identical outputs on every row of ``x``.
    """
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    with torch.no_grad():
        reference: torch.Tensor | None = None
        for sub in model.modules():
            if sub is model or not isinstance(sub, nn.Sequential):
                continue
            if {id(p) for p in sub.parameters() if p.requires_grad} != trainable:
                continue
            if _layerwise_unsupported(sub, x) is not None:
                continue
            if reference is None:
                reference = model(x)
            out = sub(x)
            if (
                isinstance(reference, torch.Tensor)
                and out.shape[0] == reference.shape[0]
                and out.numel() == reference.numel()
                and torch.equal(out.reshape(reference.shape), reference)
            ):
                return sub
    return None


def _layerwise_unsupported(model: nn.Module, x: torch.Tensor) -> str | None:
    """Why the layer-wise formula does not apply to ``model`` on ``x``, or None if it does."""
    layers = _flatten_sequential(model)
    seen: set[int] = set()
    for layer in layers:
        if isinstance(layer, nn.Linear):
            # A Parameter reached twice (a layer applied twice, or one weight tied between two
            # layers) has per-row gradient G1 A1ᵀ + G2 A2ᵀ, whose cross terms the sum over
            # layers would miss: identity of parameters, not of modules, decides.
            for p in layer.parameters():
                if id(p) in seen:
                    return f"a parameter of {layer!r} is used more than once (shared weights)"
                seen.add(id(p))
        elif isinstance(layer, nn.PReLU):
            return f"{layer!r} has parameters outside nn.Linear"
        elif not isinstance(layer, _ROWWISE_MODULES) or list(layer.parameters()):
            return f"{type(layer).__name__} ({layer!r}) is not nn.Linear or a row-wise activation"
        if isinstance(layer, nn.Flatten) and layer.start_dim == 0:
            return "nn.Flatten(start_dim=0) mixes rows"
    with torch.no_grad():
        h = x[:1]
        for layer in layers:
            if isinstance(layer, nn.Linear) and h.dim() != 2:
                return (
                    f"{layer!r} receives inputs of shape {tuple(h.shape)}; the layer-wise formula "
                    "needs 2-D (rows × features) inputs to every Linear"
                )
            h = layer(h)
    return None


@dataclasses.dataclass(frozen=True)
class _LinearFeatures:
    """One Linear layer's factors of the M1 kernel: rows of A (inputs) and G (output gradients).

    ``inputs`` is None when the weight is frozen; ``bias`` says whether a trainable bias adds
    the all-ones Gram term; ``grads`` has n·K rows in M1's row-major order.
    """

    inputs: torch.Tensor | None
    bias: bool
    grads: torch.Tensor


def _layer_features(
    layers: list[nn.Module], x: torch.Tensor, K: int, chunk: int, dtype: torch.dtype
) -> list[_LinearFeatures]:
    """A and G for every Linear with a trainable parameter, from one backward per output column.

    Rows are independent, so the gradient of Σ_i f_k(x_i) with respect to a layer's outputs
    holds, in row i, the gradient of f_k(x_i) alone: K backward passes per chunk of rows give
    every per-row output gradient without per-sample loops.
    """
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    trainable = [
        m for m in linears
        if m.weight.requires_grad or (m.bias is not None and m.bias.requires_grad)
    ]
    inputs: dict[int, list[torch.Tensor]] = {id(m): [] for m in trainable}
    grads: dict[int, list[torch.Tensor]] = {id(m): [] for m in trainable}
    for start in range(0, x.shape[0], chunk):
        xc = x[start : start + chunk]
        rows = xc.shape[0]
        outputs: list[torch.Tensor] = []
        with torch.enable_grad():
            h = xc.detach().requires_grad_(True)
            for layer in layers:
                if isinstance(layer, nn.Linear):
                    if id(layer) in inputs:
                        inputs[id(layer)].append(h.detach().to(dtype))
                    bias = None if layer.bias is None else layer.bias.detach()
                    h = nn.functional.linear(h, layer.weight.detach(), bias)
                    if id(layer) in grads:
                        outputs.append(h)
                else:
                    h = layer(h)
            out = h.reshape(rows, -1)
            _outputs_per_row(h.detach(), rows)
            columns = [
                torch.autograd.grad(out[:, k].sum(), outputs, retain_graph=k < K - 1)
                for k in range(K)
            ]
        for i, layer in enumerate(trainable):
            # (rows, K, d_out) -> rows ordered i*K + k, as in M1.
            g = torch.stack([col[i] for col in columns], dim=1)
            grads[id(layer)].append(g.reshape(rows * K, -1).to(dtype))
    return [
        _LinearFeatures(
            inputs=torch.cat(inputs[id(m)]) if m.weight.requires_grad else None,
            bias=m.bias is not None and m.bias.requires_grad,
            grads=torch.cat(grads[id(m)]),
        )
        for m in trainable
    ]


def _layerwise_tile(
    rows: list[_LinearFeatures], cols: list[_LinearFeatures], K: int
) -> torch.Tensor:
    """Σ_layers (A_r A_cᵀ + 1[bias]) ⊙ (G_r G_cᵀ) for one block of rows against columns (M1)."""
    tile: torch.Tensor | None = None
    for r, c in zip(rows, cols):
        block = r.grads @ c.grads.T
        nr, nc = block.shape[0] // K, block.shape[1] // K
        if r.inputs is not None:
            gram = r.inputs @ c.inputs.T
            if r.bias:
                gram += 1.0
            block.view(nr, K, nc, K).mul_(gram[:, None, :, None])
        tile = block if tile is None else tile.add_(block)
    assert tile is not None
    return tile


def _slice_features(features: list[_LinearFeatures], start: int, stop: int, K: int) -> list[_LinearFeatures]:
    return [
        _LinearFeatures(
            inputs=None if f.inputs is None else f.inputs[start:stop],
            bias=f.bias,
            grads=f.grads[start * K : stop * K],
        )
        for f in features
    ]


def _fill_kernel(
    out: torch.Tensor,
    n_rows: int,
    n_cols: int,
    K: int,
    chunk: int,
    tile_fn: Callable[[int, int, int, int], torch.Tensor],
    symmetric: bool,
) -> None:
    """Write tile_fn(row block, column range) into ``out`` block by block.

    When symmetric only the upper block triangle is computed and mirrored, halving the work.
    """
    for r0 in range(0, n_rows, chunk):
        r1 = min(n_rows, r0 + chunk)
        c0 = r0 if symmetric else 0
        tile = tile_fn(r0, r1, c0, n_cols).to(out.device)
        out[r0 * K : r1 * K, c0 * K : n_cols * K] = tile
        if symmetric:
            _symmetrize_(out[r0 * K : r1 * K, r0 * K : r1 * K])
            out[r1 * K : n_cols * K, r0 * K : r1 * K] = tile[:, (r1 - c0) * K :].T


def _layerwise_rows(n: int, K: int, budget: int, itemsize: int) -> int:
    # A tile of b rows holds b·K × N values twice (the tile and one layer's block) plus b × n.
    per_row = itemsize * (2 * K * n * K + n)
    # Tiles of about n/8 rows (not below 256) let the symmetric kernel skip most of its lower
    # triangle while each product stays large enough for BLAS to run at full speed.
    return max(1, min(n, budget // per_row, max(256, -(-n // 8))))


def _feature_rows(layers: list[nn.Module], K: int, budget: int) -> int:
    # Per row: float64 copies of every Linear's input and K output gradients, plus autograd's
    # activations (about the same again).
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    per_row = 16 * sum(m.in_features + K * m.out_features for m in linears)
    return max(1, budget // max(1, per_row))


def _layerwise_kernel(
    model: nn.Module,
    x: torch.Tensor,
    x2: torch.Tensor | None,
    K: int,
    chunk: int,
    out: torch.Tensor,
) -> None:
    layers = _flatten_sequential(model)
    feats = _layer_features(layers, x, K, chunk, out.dtype)
    n = x.shape[0]
    if x2 is None:
        def tile(r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
            return _layerwise_tile(_slice_features(feats, r0, r1, K), _slice_features(feats, c0, c1, K), K)

        _fill_kernel(out, n, n, K, chunk, tile, symmetric=True)
    else:
        feats2 = _layer_features(layers, x2, K, chunk, out.dtype)

        def tile(r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
            return _layerwise_tile(_slice_features(feats2, r0, r1, K), _slice_features(feats, c0, c1, K), K)

        _fill_kernel(out, x2.shape[0], n, K, chunk, tile, symmetric=False)


# ---------------------------------------------------------------------------------------------
# Generic path.
# ---------------------------------------------------------------------------------------------


def _state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Detached parameters and cloned buffers to hand to functional_call."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    return params, buffers


def _per_sample_jacobian(
    model: nn.Module, names: list[str]
) -> Callable[[dict[str, torch.Tensor], torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """vmap(jacrev) of one row's K outputs with respect to the parameters in ``names``."""
    params, buffers = _state(model)
    fixed = {k: v for k, v in params.items() if k not in names}

    def one_row(free: dict[str, torch.Tensor], xi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = functional_call(model, ({**fixed, **free}, buffers), (xi.unsqueeze(0),))
        if out.dim() == 0 or out.shape[0] != 1:
            raise ValueError(
                f"the model output has shape {tuple(out.shape)} for a batch of 1 row; its first "
                "dimension must be the batch dimension."
            )
        flat = out.reshape(-1)
        return flat, flat

    return vmap(jacrev(one_row, has_aux=True), in_dims=(None, 0))


def _jacobian_rows(
    jac_fn: Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]],
    free: dict[str, torch.Tensor],
    x: torch.Tensor,
    K: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write the (rows·K) × P_group block of J for the rows of ``x`` into ``out`` (M1 order).

    vmap(jacrev) runs on sub-chunks of at most ``_JACREV_BYTES`` of Jacobian: its transients
    stay small enough for the allocator to reuse, where chunk-sized fresh allocations would be
    page-faulted in again on every call (measured: slower than the products on small machines).
    Entries are computed in the model's dtype and cast to ``out``'s dtype by the copy.
    """
    rows = x.shape[0]
    width = out.shape[1]
    itemsize = next(iter(free.values())).element_size()
    step = max(1, _JACREV_BYTES // (K * width * itemsize))
    block = out[: rows * K]
    with torch.no_grad():
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            jac, values = jac_fn(free, x[r0:r1])
            _outputs_per_row(values, r1 - r0)
            offset = 0
            for name, p in free.items():
                block[r0 * K : r1 * K, offset : offset + p.numel()].copy_(jac[name].reshape((r1 - r0) * K, -1))
                offset += p.numel()
    return block


def _parameter_groups(params: dict[str, torch.Tensor], max_width: int) -> list[list[str]]:
    """Consecutive parameter tensors grouped so each group has at most max_width entries.

    A single tensor wider than max_width forms its own group (its one-row Jacobian is the
    smallest unit the generic path can form).
    """
    groups: list[list[str]] = [[]]
    width = 0
    for name, p in params.items():
        if groups[-1] and width + p.numel() > max_width:
            groups.append([])
            width = 0
        groups[-1].append(name)
        width += p.numel()
    return groups


def _generic_rows(K: int, P: int, budget: int, itemsize: int) -> int:
    return max(1, budget // (K * P * itemsize))


def _work_dtype(model_dtype: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """dtype of the generic path's Jacobian chunks and products.

    The model's dtype (at least float32), and never wider than the kernel's ``dtype``: a float32
    model's Jacobian is only float32-accurate, so float64 copies and float64 GEMMs (2–3× slower,
    2× the memory) would buy no accuracy; a float64 model keeps everything in float64.
    """
    work = torch.promote_types(model_dtype, torch.float32)
    return dtype if work.itemsize > dtype.itemsize else work


def _generic_layout(
    params: dict[str, torch.Tensor], K: int, chunk: int | None, budget: int, itemsize: int
) -> list[tuple[list[str], int]]:
    """The generic path's parameter groups, each with its rows per Jacobian chunk."""
    if chunk is not None:
        return [(list(params), chunk)]
    groups = _parameter_groups(params, max(1, budget // (K * itemsize)))
    return [
        (names, _generic_rows(K, sum(params[k].numel() for k in names), budget, itemsize))
        for names in groups
    ]


def _generic_kernel(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    x2: torch.Tensor | None,
    K: int,
    layout: list[tuple[list[str], int]],
    out: torch.Tensor,
    work: torch.dtype,
) -> int:
    """Add every parameter group's J_rows J_colsᵀ into ``out``; returns the rows per chunk.

    ``layout`` is :func:`_generic_layout`'s. Jacobian chunks are held in ``work`` (see
    :func:`_work_dtype`) and multiplied by :func:`_gram`.
    """
    rows_used = 1
    for names, rows_used in layout:
        jac_fn = _per_sample_jacobian(model, names)
        free = {name: params[name].detach() for name in names}
        width = sum(p.numel() for p in free.values())
        longest = max(x.shape[0], 0 if x2 is None else x2.shape[0])
        rows = min(rows_used, longest)
        # Reused buffers (the second only when there are several chunks): allocating a chunk
        # afresh each time would page-fault it in again.
        buffers: list[torch.Tensor] = []

        def jac(inputs: torch.Tensor, r0: int, r1: int, slot: int) -> torch.Tensor:
            while len(buffers) <= slot:
                buffers.append(torch.empty(rows * K, width, dtype=work, device=x.device))
            return _jacobian_rows(jac_fn, free, inputs[r0:r1], K, buffers[slot])

        _generic_blocks(jac, x, x2, K, rows, out)
        del buffers
    return rows_used


_PRODUCT_GROUP = 2**16
"""Width (parameters) of the column groups whose products are accumulated in the kernel's dtype
when the Jacobian is held in a narrower one: float32 rounding then grows with this width, not
with P (measured on the paper's MLP, P = 256,501, n = 480: max |ΔH| / max |H| = 1.6e-7 against
float64 products of the same float32 Jacobian, 4.4e-7 in one float32 product over all of P)."""


def _gram(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A Bᵀ in ``dtype``: one product when A is already in ``dtype``; otherwise products of
    column groups of ``_PRODUCT_GROUP`` parameters in A's dtype, accumulated in ``dtype``."""
    if A.dtype == dtype:
        return A @ B.T
    tile = torch.zeros(A.shape[0], B.shape[0], dtype=dtype, device=A.device)
    for s in range(0, A.shape[1], _PRODUCT_GROUP):
        tile += A[:, s : s + _PRODUCT_GROUP] @ B[:, s : s + _PRODUCT_GROUP].T
    return tile


def _symmetric_gram(J: torch.Tensor, dtype: torch.dtype, pieces: int = 4) -> torch.Tensor:
    """J Jᵀ in ``dtype`` from its upper block triangle, about (pieces + 1) / (2 · pieces) of the
    full work."""
    m = J.shape[0]
    step = -(-m // pieces)
    gram = torch.empty(m, m, dtype=dtype, device=J.device)
    for s in range(0, m, step):
        gram[s : s + step, s:] = _gram(J[s : s + step], J[s:], dtype)
        _symmetrize_(gram[s : s + step, s : s + step])
        gram[s + step :, s : s + step] = gram[s : s + step, s + step :].T
    return gram


def _symmetrize_(block: torch.Tensor) -> None:
    """Average a square diagonal block with its transpose: BLAS rounds (i, j) and (j, i)
    differently, and the eigensolvers downstream want an exactly symmetric kernel."""
    block.copy_((block + block.T) / 2)


def _generic_blocks(
    jac: Callable[[torch.Tensor, int, int, int], torch.Tensor],
    x: torch.Tensor,
    x2: torch.Tensor | None,
    K: int,
    rows: int,
    out: torch.Tensor,
) -> None:
    """Tile products J_I J_Jᵀ with at most two Jacobian chunks (buffer slots 0 and 1) alive.

    Chunks of the column side are recomputed for every row chunk: recomputing is cheaper than
    exceeding the memory budget. For the symmetric kernel only the upper triangle is formed, and
    the column chunks of row chunk I run from the last down to I + 1, so the last one computed
    is the next row chunk and is reused as such (b chunks cost 1 + b(b − 1)/2 Jacobian chunk
    computations instead of b(b + 1)/2).
    """
    n = x.shape[0]
    symmetric = x2 is None
    left = x if x2 is None else x2
    row_slot, carried = 0, None  # ``carried``: the next row chunk, already computed
    for r0 in range(0, left.shape[0], rows):
        r1 = min(left.shape[0], r0 + rows)
        J_rows = carried if carried is not None else jac(left, r0, r1, row_slot)
        carried = None
        col_slot = 1 - row_slot
        if symmetric:
            with torch.no_grad():
                tile = _symmetric_gram(J_rows, out.dtype).to(out.device)
            out[r0 * K : r1 * K, r0 * K : r1 * K] += tile
            columns = list(range(r1, n, rows))[::-1]
        else:
            columns = list(range(0, n, rows))
        for c0 in columns:
            c1 = min(n, c0 + rows)
            J_cols = jac(x, c0, c1, col_slot)
            with torch.no_grad():
                tile = _gram(J_rows, J_cols, out.dtype).to(out.device)
            out[r0 * K : r1 * K, c0 * K : c1 * K] += tile
            if symmetric:
                out[c0 * K : c1 * K, r0 * K : r1 * K] += tile.T
        if symmetric and columns:  # the last column chunk started at r1
            row_slot, carried = col_slot, J_cols


# ---------------------------------------------------------------------------------------------
# Memory: estimate the peak before allocating the kernel.
# ---------------------------------------------------------------------------------------------

_GB = 1e9

# (limit, usage, statistics) files of cgroup v2 and v1: inside a container MemAvailable is the
# host's, and exceeding the container's limit gets the process killed without a message.
_CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
     "inactive_file"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
     "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"),
)  # fmt: skip


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


def _layerwise_work_bytes(
    layers: list[nn.Module], n: int, n2: int | None, K: int, rows: int, itemsize: int
) -> int:
    """Working memory of the layerwise path: A and G of every trainable Linear for the n
    training (and n2 test) rows, twice (the per-chunk pieces and their concatenation), and one
    Gram tile of ``rows`` rows (see :func:`_layerwise_rows`)."""
    per_row = 0
    for m in layers:
        if isinstance(m, nn.Linear) and any(p.requires_grad for p in m.parameters()):
            per_row += m.in_features * m.weight.requires_grad + K * m.out_features
    tile_rows = min(rows, n2 or n)
    features = 2 * (n + (n2 or 0)) * per_row
    return itemsize * (features + 2 * tile_rows * K * n * K + tile_rows * n)


def _generic_work_bytes(
    layout: list[tuple[list[str], int]],
    params: dict[str, torch.Tensor],
    n: int,
    n2: int | None,
    K: int,
    work_itemsize: int,
    itemsize: int,
) -> int:
    """Working memory of the generic path (see :func:`_generic_blocks`): the rows of the two
    Jacobian chunk buffers that get written, a vmap(jacrev) sub-chunk and the product tiles."""
    longest = max(n, n2 or 0)
    peak = 0
    for names, rows_used in layout:
        rows = min(rows_used, longest)
        width = sum(params[k].numel() for k in names)
        # The second buffer holds column chunks: of a symmetric kernel in two chunks, only the
        # last (n - rows rows); untouched pages of an empty() buffer take no memory.
        second = rows if n2 is not None else min(rows, n - rows)
        m = rows * K
        if second == 0:  # _symmetric_gram: the tile, and one of its 4 row pieces being formed
            tiles = m * m * itemsize + -(-m // 4) * m * (itemsize + work_itemsize)
        else:  # _gram forms the next tile while the previous one is still held
            tiles = m * m * (2 * itemsize + work_itemsize)
        jacobians = (rows + second) * K * width * work_itemsize
        peak = max(peak, jacobians + _JACREV_BYTES + tiles)
    return peak


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
            "available. The kernel grows as N²: pass max_samples= to REMLStopper / "
            "REMLEarlyStopping to compute it on a random subset of rows, or reduce the number "
            "of outputs K per row (e.g. fewer targets)."
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
        memory_budget_bytes: bound in bytes on one chunk, default
            ``DEFAULT_MEMORY_BUDGET_BYTES`` (1 GiB). Generic path: one chunk is rows·K·P
            values in the working dtype (the model's, at least float32 and at most ``dtype``:
            4 bytes for a float32 model); two chunks are alive at once (one when a chunk holds
            all rows) and ``vmap(jacrev)`` runs on sub-chunks of 24 MiB of Jacobian, so the peak
            is about the kernel (8·N·N2 bytes) + 2 × budget + 24 MiB + that sub-chunk's
            activations + one tile of products; parameters are split into
            groups when even one row exceeds the budget. Layerwise path: the peak is about the kernel +
            budget + the per-layer activations and output gradients, n·(Σ d_in + K·Σ d_out)
            values in ``dtype``.
        memory_limit_bytes: bytes the kernel and this working memory may take on each device
            involved (the kernel's and the model's). Default None: the memory available there
            now (MemAvailable, capped by a cgroup limit, on the CPU; free plus cached memory on
            CUDA; no check where it is unknown). The peak is estimated as above before
            anything is allocated, and a ``MemoryError`` that states the need, the available
            memory and the ways out (``max_samples=``, fewer outputs) is raised when it does
            not fit.
        path: "auto" (layerwise when the model supports it, else generic), "layerwise"
            (ValueError naming the unsupported module otherwise) or "generic".
        dtype: dtype of the kernel. Default float64, as the statistics downstream expect.
            Layerwise path: Jacobian factors are computed in the model's dtype and multiplied
            in ``dtype``. Generic path: Jacobian chunks are multiplied in the model's dtype
            (at least float32, at most ``dtype``) in groups of 65,536 parameters accumulated in
            ``dtype`` (relative error about 1e-7 for a float32 model; exact float64 products
            for a float64 model, see the module docstring).
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
    _check_chunk_size(chunk_size)
    _check_dtype(dtype)
    for name, value in (("memory_budget_bytes", memory_budget_bytes),
                        ("memory_limit_bytes", memory_limit_bytes)):  # fmt: skip
        if value is not None and value < 1:
            raise ValueError(f"{name} must be positive, got {value!r}.")
    budget = memory_budget_bytes or DEFAULT_MEMORY_BUDGET_BYTES
    params = _trainable(model)
    model_device, model_dtype = _model_device_dtype(params)
    out_device = _resolve_device(device, model_device)
    x = _check_inputs(x, "x", model_device, model_dtype)
    if x2 is not None:
        x2 = _check_inputs(x2, "x2", model_device, model_dtype)
        if x2.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"x2 has feature shape {tuple(x2.shape[1:])} but x has {tuple(x.shape[1:])}; "
                "test rows must have the training rows' shape."
            )
    P = sum(p.numel() for p in params.values())
    n = x.shape[0]
    with _preserved_model(model):
        K = _probe_outputs(model, x)
        N = n * K
        rows_out = N if x2 is None else x2.shape[0] * K
        reason = None if path == "generic" else _layerwise_unsupported(model, x)
        network = model
        if reason is not None and path != "generic":
            inner = _layerwise_delegate(model, x if x2 is None else torch.cat([x, x2]))
            if inner is not None:
                network, reason = inner, None
        if path == "layerwise" and reason is not None:
            raise ValueError(f"path='layerwise' does not support this model: {reason}. Use path='generic'.")
        chosen = "generic" if reason is not None or path == "generic" else "layerwise"
        itemsize = dtype.itemsize
        n2 = None if x2 is None else x2.shape[0]
        if chosen == "layerwise":
            rows = chunk_size or _layerwise_rows(n, K, budget, itemsize)
            layers = _flatten_sequential(network)
            work_bytes = _layerwise_work_bytes(layers, n, n2, K, rows, itemsize)
        else:
            work = _work_dtype(model_dtype, dtype)
            layout = _generic_layout(params, K, chunk_size, budget, work.itemsize)
            work_bytes = _generic_work_bytes(layout, params, n, n2, K, work.itemsize, itemsize)
        kernel_bytes = rows_out * N * itemsize
        needs: dict[torch.device, int] = {}
        for where, size in ((out_device, kernel_bytes), (model_device, work_bytes)):
            needs[_memory_device(where)] = needs.get(_memory_device(where), 0) + size
        _check_memory(needs, kernel_bytes, memory_limit_bytes, (rows_out, N), n, K, dtype)
        kernel = torch.zeros(rows_out, N, dtype=dtype, device=out_device)
        if chosen == "layerwise":
            _layerwise_kernel(network, x, x2, K, rows, kernel)
        else:
            rows = _generic_kernel(model, params, x, x2, K, layout, kernel, work)
    kernel /= N
    info = NTKInfo(chosen, time.perf_counter() - start, n, K, N, P, rows)
    logger.info(
        "empirical NTK (M1): path=%s n=%d K=%d N=%d P=%d chunk=%d rows in %.3f s%s",
        info.path, n, K, N, P, rows, info.seconds, "" if reason is None else f" (not layerwise: {reason})",
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
    _check_chunk_size(chunk_size)
    params = _trainable(model)
    model_device, model_dtype = _model_device_dtype(params)
    x = _check_inputs(x, "x", model_device, model_dtype)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"v must be a torch.Tensor of shape (N,) or (N, m), got {type(v).__name__}.")
    n = x.shape[0]
    rows = chunk_size or n
    with _preserved_model(model):
        K = _probe_outputs(model, x)
        N = n * K
        if v.dim() not in (1, 2) or v.shape[0] != N:
            raise ValueError(f"v must have shape ({N},) or ({N}, m) for N = n·K = {n}·{K}, got {tuple(v.shape)}.")
        if not bool(torch.isfinite(v).all()):
            raise ValueError("v contains NaN or infinite values.")
        vs = v.detach().to(model_device, model_dtype).reshape(N, -1).T  # (m, N)
        all_params, buffers = _state(model)
        free = {name: all_params[name] for name in params}
        fixed = {k: p for k, p in all_params.items() if k not in free}

        def flat_outputs(inputs: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
            def f(theta: dict[str, torch.Tensor]) -> torch.Tensor:
                return functional_call(model, ({**fixed, **theta}, buffers), (inputs,)).reshape(-1)

            return f

        with torch.no_grad():
            jtv: dict[str, torch.Tensor] | None = None
            for r0 in range(0, n, rows):
                xc = x[r0 : r0 + rows]
                out, vjp_fn = vjp(flat_outputs(xc), free)
                _outputs_per_row(out.view(xc.shape[0], -1), xc.shape[0])
                (part,) = vmap(vjp_fn)(vs[:, r0 * K : (r0 + xc.shape[0]) * K].contiguous())
                jtv = part if jtv is None else {k: jtv[k] + part[k] for k in jtv}
            assert jtv is not None
            pieces = []
            for r0 in range(0, n, rows):
                f = flat_outputs(x[r0 : r0 + rows])
                pieces.append(vmap(lambda t: jvp(f, (free,), (t,))[1])(jtv))
            hv = torch.cat(pieces, dim=1).to(torch.float64).T / N  # (N, m)
    return hv.reshape(v.shape)


def ntk_trace(model: nn.Module, x: torch.Tensor, *, chunk_size: int | None = None) -> float:
    """Exact tr(H) = Σ_i ‖∂f_i/∂θ‖² / N from per-row gradient norms (METHOD M1).

    Uses the layer-wise factors when the model supports them (‖G_ik A_iᵀ‖² = ‖G_ik‖²‖A_i‖²),
    per-sample Jacobians otherwise; rows are processed ``chunk_size`` at a time (default from
    ``DEFAULT_MEMORY_BUDGET_BYTES``). The mean eigenvalue of H is ``ntk_trace(...) / N``.
    """
    _check_chunk_size(chunk_size)
    params = _trainable(model)
    model_device, model_dtype = _model_device_dtype(params)
    x = _check_inputs(x, "x", model_device, model_dtype)
    n = x.shape[0]
    with _preserved_model(model):
        K = _probe_outputs(model, x)
        P = sum(p.numel() for p in params.values())
        total = torch.zeros((), dtype=torch.float64, device=model_device)
        if _layerwise_unsupported(model, x) is None:
            layers = _flatten_sequential(model)
            rows = chunk_size or _feature_rows(layers, K, DEFAULT_MEMORY_BUDGET_BYTES)
            for r0 in range(0, n, rows):
                feats = _layer_features(layers, x[r0 : r0 + rows], K, rows, torch.float64)
                for f in feats:
                    g2 = f.grads.square().sum(1).view(-1, K)
                    a2 = torch.zeros(g2.shape[0], dtype=torch.float64, device=model_device)
                    if f.inputs is not None:
                        a2 += f.inputs.square().sum(1)
                    if f.bias:
                        a2 += 1.0
                    total += (a2[:, None] * g2).sum()
        else:
            rows = chunk_size or _generic_rows(K, P, _JACREV_BYTES, model_dtype.itemsize)
            jac_fn = _per_sample_jacobian(model, list(params))
            free = {name: p.detach() for name, p in params.items()}
            with torch.no_grad():
                for r0 in range(0, n, rows):
                    jac, out = jac_fn(free, x[r0 : r0 + rows])
                    _outputs_per_row(out, out.shape[0])
                    total += sum(j.to(torch.float64).square().sum() for j in jac.values())
    return float(total) / (n * K)
