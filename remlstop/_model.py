"""Model handling: the one home for every forward the library makes (METHOD M1, M2, M4).

The kernel (M1), the stopper's initial outputs f0 and its residual checks (M4) all evaluate
the user's network; they do it through the contexts here, so that each leaves the model exactly
as it found it: the same parameter and buffer objects with the same values, ``.grad``,
``requires_grad``, train/eval modes, and the random number generators of the CPU and of every
CUDA device. Inputs are moved and cast to the model here, and outputs are checked here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

_LIGHTNING_HINT = (
    "With the Lightning callback pass model= (the sub-module or attribute name that maps x to "
    "f(x))."
)


# ---------------------------------------------------------------------------------------------
# Random number generators.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RNGState:
    """The global generators' states: the CPU's, and every CUDA device's (None when CUDA was
    not initialised: reading its state would initialise it)."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None


def rng_state() -> RNGState:
    """Save the CPU generator and, when CUDA is initialised, every CUDA device's generator."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return RNGState(torch.get_rng_state(), cuda)


def restore_rng_state(state: RNGState) -> None:
    """Put the generators back as :func:`rng_state` found them.

    When CUDA was initialised in between, its generators are reseeded with their initial seeds:
    the state they had at initialisation, which is what they would have held without us.
    """
    torch.set_rng_state(state.cpu)
    if state.cuda is not None:
        torch.cuda.set_rng_state_all(state.cuda)
    elif torch.cuda.is_initialized():
        for generator in torch.cuda.default_generators:
            generator.manual_seed(generator.initial_seed())


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run the body and restore the CPU and CUDA generators afterwards."""
    state = rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


# ---------------------------------------------------------------------------------------------
# Model state.
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Run the body and restore everything about ``model`` afterwards.

    Parameters and buffers are cloned (O(P) memory, for as long as the body runs) so that even
    a forward that writes to them in place (a call counter, an EMA buffer) cannot change the
    model; they are copied back only if their version counter moved. The objects registered on
    every module are restored too, so the model (and the optimizer holding its parameters)
    keeps the very same ``nn.Parameter`` and buffer objects, even when a forward assigns a new
    tensor to a buffer. Modes, ``requires_grad``, ``.grad`` and the RNGs are restored as well.
    """
    inference = [
        name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_inference()
    ]
    if inference:
        raise ValueError(
            f"{inference[:3]} were created under torch.inference_mode(), and inference tensors "
            "cannot be differentiated or restored: build the model outside inference_mode "
            "(calling remlstop inside it is fine)."
        )
    modes = [(module, module.training) for module in model.modules()]
    tables = [
        (table, dict(table))
        for module in model.modules()
        for table in (module._parameters, module._buffers)
    ]
    params = list(model.parameters())
    flags = [(p, p.requires_grad, p.grad) for p in params]
    tensors = [(t, t._version, t.detach().clone()) for t in [*params, *model.buffers()]]
    rng = rng_state()
    try:
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
            for tensor, version, saved_value in tensors:
                if tensor._version != version:
                    tensor.copy_(saved_value)
        for p, requires_grad, grad in flags:
            p.requires_grad_(requires_grad)
            if p.grad is not grad:
                p.grad = grad
        restore_rng_state(rng)


def optimizer_parameters(model: nn.Module, optimizer: Any) -> list[nn.Parameter]:
    """The model's trainable parameters that ``optimizer`` updates (the kernel's, M1).

    Raises ValueError when it updates none of them; warns when some trainable ones are missing
    (they never move, so they take no part in the flow the clock counts).
    """
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    updated = [p for p in trainable if id(p) in held]
    if not updated:
        raise ValueError(
            f"the optimizer updates none of the model's {len(trainable)} trainable parameter "
            "tensors (was it built for another model, or before the model was copied?); build "
            "it from model.parameters() of the network you pass."
        )
    if len(updated) < len(trainable):
        warnings.warn(
            f"{len(trainable) - len(updated)} of the model's {len(trainable)} trainable "
            "parameter tensors are not in the optimizer; the kernel is taken over the "
            f"{len(updated)} it updates (set requires_grad=False on the others to silence this).",
            RuntimeWarning,
            stacklevel=3,
        )
    outside = len(held - {id(p) for p in model.parameters()})
    if outside:
        warnings.warn(
            f"the optimizer also updates {outside} parameter tensor(s) that are not the "
            "model's; the kernel (M1), and so the decision, sees the model's alone. If the "
            "trained function depends on them (a LightningModule's parameter outside the "
            "callback's model=, say), pass the module that holds them all.",
            RuntimeWarning,
            stacklevel=3,
        )
    return updated


@contextlib.contextmanager
def trained_only(model: nn.Module, trained: list[nn.Parameter]) -> Iterator[None]:
    """The body sees only ``trained`` as trainable (requires_grad restored afterwards), so the
    kernel is taken over the parameters the optimizer moves."""
    keep = {id(p) for p in trained}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
    try:
        for p in frozen:
            p.requires_grad_(False)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# Float32 precision.
# ---------------------------------------------------------------------------------------------


def _precision_handles() -> list[Any]:
    """The backends' per-operator float32 precision settings (torch >= 2.9): cuBLAS matmul,
    cuDNN and oneDNN convolution, RNN and (oneDNN) matmul."""
    ops = [(b, op) for b in ("cudnn", "mkldnn") for op in ("conv", "rnn", "matmul")]
    handles = [getattr(getattr(torch.backends, b), op, None) for b, op in ops]
    matmul = torch.backends.cuda.matmul
    return [h for h in [matmul, *handles] if h is not None and hasattr(h, "fp32_precision")]


@contextlib.contextmanager
def full_float32_precision() -> Iterator[None]:
    """The model's own dtype for the body: no autocast (CPU or CUDA), and float32 products and
    convolutions in IEEE float32; the user's settings restored afterwards.

    Autocast would run a float32 network in bfloat16 or float16 (about 3 significant digits),
    TF32 (cuDNN convolutions use it by default on Ampere and later GPUs, cuBLAS after
    ``torch.set_float32_matmul_precision("high")``) or oneDNN's bf16 keep about 10 bits of
    the mantissa: a float32 network's kernel came out 1.7e-4 off, where float32 holds it to
    about 1e-7 (M1). Set through the per-operator ``fp32_precision`` of torch >= 2.9 when it
    exists (the legacy flags would then mix two APIs, which torch refuses), the legacy
    ``allow_tf32`` flags before."""
    cpu, cuda = torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False)
    with cpu, cuda, _ieee_float32():
        yield


@contextlib.contextmanager
def _ieee_float32() -> Iterator[None]:
    """IEEE float32 products and convolutions for the body (see :func:`full_float32_precision`)."""
    handles = _precision_handles()
    if handles:
        saved = [h.fp32_precision for h in handles]
        try:
            for h in handles:
                h.fp32_precision = "ieee"
            yield
        finally:
            for h, value in zip(handles, saved, strict=True):
                h.fp32_precision = value
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@contextlib.contextmanager
def evaluation(model: nn.Module) -> Iterator[None]:
    """Side-effect-free forward passes without gradients (the stopper's f0 and residuals, M4):
    eval mode and no_grad inside :func:`preserved`, in IEEE float32
    (:func:`full_float32_precision`)."""
    with preserved(model), torch.no_grad(), full_float32_precision():
        model.eval()
        yield


@contextlib.contextmanager
def differentiable_evaluation(model: nn.Module) -> Iterator[None]:
    """Forwards that the kernel (M1) differentiates: eval mode inside :func:`preserved`, with
    autograd on even under an outer ``torch.inference_mode()`` (inputs made there are cloned
    by :func:`model_inputs`), in IEEE float32 (:func:`full_float32_precision`). Warns when
    eval mode changes what the model computes."""
    with torch.inference_mode(False), preserved(model), full_float32_precision():
        _warn_train_mode_layers(model)
        model.eval()
        yield


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
    # Levels: this function, differentiable_evaluation, contextlib's __enter__, the public
    # kernel function, its caller.
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
# Device, dtype, inputs and outputs.
# ---------------------------------------------------------------------------------------------


def device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    """The model's device and floating dtype, read from its first trainable parameter (else any
    parameter, else any buffer); (CPU, None) for a model holding no tensors. ``None`` dtype:
    no floating tensor to cast inputs to."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    first = next(iter([*trainable, *model.parameters(), *model.buffers()]), None)
    if first is None:
        return torch.device("cpu"), None
    if first.device.type == "meta":
        raise ValueError(
            "the model's parameters are on the meta device and hold no values; materialise "
            "them (e.g. model.to_empty(device=...) and load weights) first."
        )
    if first.device.type == "mps":
        raise ValueError(
            "the model is on Apple's MPS device, which has no float64; remlstop forms the kernel "
            "(METHOD M1) and its statistics in float64 on the model's device. Run the model and "
            "data on the CPU (model.cpu(); Lightning: accelerator='cpu') or on a CUDA GPU."
        )
    return first.device, first.dtype if first.is_floating_point() else None


def model_inputs(x: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """``x`` detached on ``device``, floating inputs cast to ``dtype`` (a float64 X into a
    float32 model would otherwise fail inside its first layer). Outside inference mode a tensor
    made under it is cloned into a normal one, which autograd can use."""
    x = x.detach().to(device)
    if dtype is not None and x.is_floating_point():
        x = x.to(dtype)
    if x.is_inference() and not torch.is_inference_mode_enabled():
        x = x.clone()
    return x


def check_outputs(out: object, rows: int, *, finite: bool = True) -> int:
    """K, the outputs per row (M1: trailing dimensions flattened), of a forward on ``rows``
    input rows, after checking that ``out`` is a floating tensor with one row per input row
    and, when ``finite``, that its values are finite (leave it off inside ``vmap``)."""
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"the model's forward returns a {type(out).__name__}; remlstop needs a tensor of "
            f"shape (n,) or (n, K), one output row per input row. {_LIGHTNING_HINT}"
        )
    if out.dim() == 0 or out.shape[0] != rows:
        raise ValueError(
            f"the model output has shape {tuple(out.shape)} for a batch of {rows} rows; its first "
            "dimension must be the batch dimension: remlstop needs a tensor of shape (n,) or "
            f"(n, K), one output row per input row. {_LIGHTNING_HINT}"
        )
    if not out.is_floating_point():
        raise ValueError(f"the model output must be floating point, got {out.dtype}.")
    if finite and not bool(torch.isfinite(out).all()):
        raise ValueError(
            "the model output contains NaN or infinite values; check the inputs' scale and the "
            "parameters."
        )
    return math.prod(out.shape[1:])


def outputs(model: nn.Module, x: torch.Tensor, *, finite: bool = True) -> torch.Tensor:
    """f(x) as an (n, K) matrix (M1 row-major order), inputs moved and cast to the model.

    Call it inside :func:`evaluation` or :func:`differentiable_evaluation`.
    """
    device, dtype = device_dtype(model)
    x = model_inputs(x, device, dtype)
    out = model(x)
    check_outputs(out, x.shape[0], finite=finite)
    return out.reshape(x.shape[0], -1)


def evaluate(model: nn.Module, x: torch.Tensor, *, finite: bool = True) -> torch.Tensor:
    """:func:`outputs` inside :func:`evaluation`: the stopper's forwards (f0, residuals, M4)."""
    with evaluation(model):
        return outputs(model, x, finite=finite)
