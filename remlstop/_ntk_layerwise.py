"""Layer-wise backend of the empirical NTK (METHOD M1): the exact dense kernel from layer features.

Networks made only of ``nn.Linear``, ``nn.Conv2d`` and ``nn.Embedding`` layers (an embedding
reading the integer inputs) and parameter-free row-wise modules (elementwise activations, 2-D
pooling, ``Flatten``, ``Unflatten``, ``Dropout``), possibly in
nested ``nn.Sequential``, each parameter used once (a layer applied twice or a tied weight would
need the cross terms between its uses, so such networks take the generic backend). Each layer
with a trainable parameter contributes one block to every kernel entry:

* Linear, from factors: with input activations A (n × d_in) and output gradients G_k
  (n × d_out) of output k, the per-row gradient of the weight is the outer product G_k[i] A[i]ᵀ,
  so the block is (A Aᵀ + 1[bias]) ⊙ (G_k G_lᵀ): per-sample gradients are never formed and the
  cost is that of Gram matrices of the activations.
* Conv2d, from flat per-sample gradients Φ: the weight gradient of row i and output k is
  Σ_p G_ik[:, p] U_i[:, p]ᵀ over the output positions p, with U_i the row's unfolded (padded)
  input patches, group by group, and the bias gradient is Σ_p G_ik[:, p]. These are small
  (c_out × c_in/groups × kh × kw values), so they are formed for every row, all rows of a chunk
  at once as the weight gradient of one grouped convolution, and the block is Φ Φᵀ, far cheaper
  than the factor formula over pairs of positions.
* Embedding, the same way: row v of the weight's gradient is the sum of the output gradients
  at the positions holding index v (V × d values per row, so only for small tables: a large
  one sends the network to the generic backend through the memory check). The flat gradients
  of all conv and embedding layers sit side by side in one Φ.

A wrapper (a LightningModule whose ``forward`` calls ``self.net``) gets this backend through
:func:`delegate`.

The functions here assume the checks and the model preservation of :mod:`remlstop.ntk`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional
from torch.nn.utils import parametrize

from ._model import check_outputs
from ._ntk_generic import PRODUCT_GROUP, symmetrize_, work_dtype

# Parameter-free modules that act on each row on its own; in eval mode dropout is the identity.
# Pooling acts on each channel of each row (the checks below make sure it sees a batch).
_ROWWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Tanhshrink,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.modules.dropout._DropoutNd,
)

_LAYERS = (nn.Linear, nn.Conv2d, nn.Embedding)
_2D_MODULES = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def flatten_sequential(model: nn.Module) -> list[nn.Module]:
    """The leaf modules of nested ``nn.Sequential``s that run torch's own ``forward``, in order
    of application (a subclass that overrides it is a leaf: it computes something else)."""
    if isinstance(model, nn.Sequential) and not _overrides_forward(model):
        return [leaf for child in model for leaf in flatten_sequential(child)]
    return [model]


def _overrides_forward(module: nn.Module) -> bool:
    """Whether ``module``'s class takes its ``forward`` from outside ``torch.nn`` (a subclass that
    rescales a Linear's output, say): the formulas here hold for torch's layers only."""
    base = next((c for c in type(module).__mro__ if c.__module__.startswith("torch.nn.")), None)
    return base is None or type(module).forward is not base.forward


_FORWARD_HOOKS = ("_forward_hooks", "_forward_pre_hooks")
_BACKWARD_HOOKS = ("_backward_hooks", "_backward_pre_hooks")


def _hooked(model: nn.Module, layers: list[nn.Module]) -> str | None:
    """Why hooks make the layer-wise formula wrong, or None.

    The backend calls each Linear, Conv2d and Embedding through its functional form and opens
    the ``nn.Sequential`` containers, so their forward hooks and pre-hooks, which may change what
    the network computes (the old ``weight_norm`` and ``spectral_norm`` are such pre-hooks),
    would not run; their backward hooks do not run either, which is right: the kernel is the
    forward map's. The row-wise modules are called as modules, so that their forward hooks run,
    except those with a backward hook, whose ``forward`` is called (:func:`_call`), so that it
    cannot change the gradients the features are read from; such a module cannot also have a
    forward hook.
    """
    module_hooks = nn.modules.module
    if any(getattr(module_hooks, f"_global{name}", None) for name in _FORWARD_HOOKS):
        return "a global forward hook is registered, which the layer-wise formula bypasses"
    if any(getattr(module_hooks, f"_global{name}", None) for name in _BACKWARD_HOOKS):
        return "a global backward hook is registered, which could change the gradients it reads"
    called = {id(layer) for layer in layers if not isinstance(layer, _LAYERS)}
    for name, m in model.named_modules():
        where = f"{type(m).__name__} {name or '(the model)'}"
        if id(m) not in called and _has_forward_hooks(m):
            return f"{where} has a forward hook or pre-hook, which the layer-wise formula bypasses"
        if id(m) in called and _has_backward_hooks(m) and _has_forward_hooks(m):
            return (
                f"{where} has a forward hook, which must run, and a backward hook, which could "
                "change the gradients the layer-wise formula reads"
            )
    return None


def _has_forward_hooks(module: nn.Module) -> bool:
    return any(getattr(module, attr, None) for attr in _FORWARD_HOOKS)


def _has_backward_hooks(module: nn.Module) -> bool:
    return any(getattr(module, attr, None) for attr in _BACKWARD_HOOKS)


def _call(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A row-wise module on ``h``: through ``forward`` when it has backward hooks (it has no
    forward hook then, :func:`_hooked`), which would otherwise run in the features' backward."""
    return layer.forward(h) if _has_backward_hooks(layer) else layer(h)


def delegate(model: nn.Module, x: torch.Tensor) -> nn.Module | None:
    """A sub-module that computes exactly what ``model`` computes on ``x`` with all of its
    trainable parameters and that the layer-wise backend supports, or None.

    Wrappers (a LightningModule whose ``forward`` calls ``self.net``, say) then get the fast
    backend: the kernel depends only on the map x -> f(x; theta), which the two modules share when
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
            if unsupported(sub, x) is not None:
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


def unsupported(model: nn.Module, x: torch.Tensor) -> str | None:
    """Why the layer-wise formula does not apply to ``model`` on ``x``, or None if it does."""
    layers = flatten_sequential(model)
    for m in model.modules():
        if parametrize.is_parametrized(m):
            return (
                f"{type(m).__name__} is parametrized (torch.nn.utils.parametrize): its weight is a "
                "function of other parameters"
            )
    hooked = _hooked(model, layers)
    if hooked is not None:
        return hooked
    seen: set[int] = set()
    for layer in layers:
        if isinstance(layer, _LAYERS + _ROWWISE_MODULES + (nn.Sequential,)) and (
            _overrides_forward(layer)
        ):
            return f"{type(layer).__name__} overrides the forward of the torch module it subclasses"
        if isinstance(layer, _LAYERS):
            # A Parameter reached twice (a layer applied twice, or one weight tied between two
            # layers) has per-row gradient G1 A1ᵀ + G2 A2ᵀ, whose cross terms the sum over
            # layers would miss: identity of parameters, not of modules, decides.
            for p in layer.parameters():
                if id(p) in seen:
                    return f"a parameter of {layer!r} is used more than once (shared weights)"
                seen.add(id(p))
        elif list(layer.parameters()):
            return f"{layer!r} has parameters outside nn.Linear, nn.Conv2d and nn.Embedding"
        elif not isinstance(layer, _ROWWISE_MODULES):
            return (
                f"{type(layer).__name__} ({layer!r}) is not nn.Linear, nn.Conv2d, nn.Embedding "
                "or a row-wise parameter-free module"
            )
        elif getattr(layer, "return_indices", False):
            return f"{layer!r} returns pooling indices, not a tensor"
        if isinstance(layer, nn.Embedding) and layer.max_norm is not None:
            return f"{layer!r} renormalises its weight in place in every forward (max_norm)"
        if isinstance(layer, nn.Embedding) and layer.scale_grad_by_freq:
            # The gradient is divided by each index's count in the batch: not one row's own.
            return f"{layer!r} scales its gradients by the batch's index counts"
    with torch.no_grad():
        h = x[:1]
        for layer in layers:
            if isinstance(layer, nn.Linear) and h.dim() != 2:
                return (
                    f"{layer!r} receives inputs of shape {tuple(h.shape)}; the layer-wise formula "
                    "needs 2-D (rows × features) inputs to every Linear"
                )
            if isinstance(layer, _2D_MODULES) and h.dim() != 4:
                # An unbatched (C, H, W) input would make the rows the channels.
                return (
                    f"{layer!r} receives inputs of shape {tuple(h.shape)}; the layer-wise formula "
                    "needs 4-D (rows × channels × height × width) inputs to every 2-D layer"
                )
            if isinstance(layer, nn.Flatten) and layer.start_dim % h.dim() == 0:
                return f"{layer!r} flattens the row dimension, mixing rows"
            if isinstance(layer, nn.Unflatten) and (
                isinstance(layer.dim, str) or layer.dim % h.dim() == 0
            ):
                return f"{layer!r} unflattens the row dimension (or a named one)"
            # The backend's own re-run of the network, as the features pass makes it.
            h = _forward(layer, h) if isinstance(layer, _LAYERS) else layer(h)
        # A last guard for what the checks above cannot see (a weight property, say): that
        # re-run must give the model's output.
        reference = model(x[:1])
        if not isinstance(reference, torch.Tensor) or not _same_output(h, reference):
            return "re-running its layers one by one does not reproduce the model's output"
    return None


def _same_output(rebuilt: torch.Tensor, reference: torch.Tensor) -> bool:
    """Equal up to the rounding of one differently scheduled kernel (GPU libraries may choose
    another algorithm from one call to the next)."""
    if rebuilt.shape != reference.shape or not reference.is_floating_point():
        return rebuilt.shape == reference.shape and torch.equal(rebuilt, reference)
    tol = 64 * torch.finfo(reference.dtype).eps * float(reference.abs().max())
    return bool((rebuilt - reference).abs().max() <= tol)


def _is_trainable(layer: nn.Module) -> bool:
    """Whether ``layer`` is a Linear, Conv2d or Embedding with a trainable parameter (one with
    features)."""
    return isinstance(layer, _LAYERS) and any(p.requires_grad for p in layer.parameters())


def _flat_width(layer: nn.Conv2d | nn.Embedding) -> int:
    """Trainable parameters of a conv or embedding layer: the width of its flat per-sample
    gradients."""
    if isinstance(layer, nn.Embedding):
        return layer.weight.numel() * layer.weight.requires_grad
    bias = layer.bias is not None and layer.bias.requires_grad
    return layer.weight.numel() * layer.weight.requires_grad + layer.out_channels * bias


def _feature_dtype(layers: list[nn.Module], x: torch.Tensor) -> torch.dtype:
    """The dtype of the features: the inputs' (the model's, cast by :mod:`remlstop.ntk`), or the
    first layer's parameters' when the inputs are indices into an Embedding."""
    if x.is_floating_point():
        return x.dtype
    return next(p for layer in layers for p in layer.parameters()).dtype


def _padding(layer: nn.Conv2d) -> tuple[int, int, int, int]:
    """``functional.pad``'s (left, right, top, bottom) for the padding ``layer`` applies; 'same'
    puts the odd pixel right and below, as torch does."""
    pads: list[int] = []
    for i in (1, 0):  # functional.pad takes the last dimension first
        if layer.padding == "same":
            total = layer.dilation[i] * (layer.kernel_size[i] - 1)
            pads += [total // 2, total - total // 2]
        elif layer.padding == "valid":
            pads += [0, 0]
        else:
            pads += [layer.padding[i]] * 2
    left, right, top, bottom = pads
    return left, right, top, bottom


def _forward(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A Linear's, Conv2d's or Embedding's output with its parameters detached: only the
    gradients with respect to its output are needed, and autograd then skips the parameters'
    own."""
    weight = layer.weight.detach()
    if isinstance(layer, nn.Embedding):  # max_norm and scale_grad_by_freq are refused above
        return functional.embedding(h, weight, layer.padding_idx)
    bias = None if layer.bias is None else layer.bias.detach()
    if isinstance(layer, nn.Linear):
        return functional.linear(h, weight, bias)
    padding = layer.padding
    if layer.padding_mode != "zeros":  # as nn.Conv2d does: pad in the layer's mode, then convolve
        h, padding = functional.pad(h, _padding(layer), mode=layer.padding_mode), 0
    return functional.conv2d(h, weight, bias, layer.stride, padding, layer.dilation, layer.groups)


def _conv_gradients(
    layer: nn.Conv2d, inputs: torch.Tensor | None, grads: torch.Tensor, out: torch.Tensor
) -> None:
    """Write each row's and output's flat gradient of a conv layer's trainable parameters into
    ``out`` (rows·K × width, M1 order): the weight's Σ_p G[:, p] U[:, p]ᵀ (U: the row's padded
    input patches at output position p), then the bias's Σ_p G[:, p].

    ``grads``: the gradients of the K outputs with respect to the layer's output, shape
    (rows, K, c_out, h_out, w_out); ``inputs``: the layer's inputs (None when the weight is
    frozen).
    """
    rows, K, c_out = grads.shape[:3]
    width = 0
    if layer.weight.requires_grad:
        assert inputs is not None
        pads = _padding(layer)
        if any(pads):
            mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
            inputs = functional.pad(inputs, pads, mode=mode)
        # The weight gradient of a convolution with rows·groups groups over the rows stacked as
        # channels of one image is every row's own, and the K outputs ride along as output
        # channels of each group: one call, where unfolded patches would take 3x the time.
        groups, per_group = layer.groups, c_out // layer.groups
        g = grads.view(rows, K, groups, per_group, *grads.shape[3:]).transpose(1, 2)
        c_in, kh, kw = layer.weight.shape[1:]
        weight = torch.nn.grad.conv2d_weight(
            inputs.reshape(1, -1, *inputs.shape[2:]),
            (rows * groups * K * per_group, c_in, kh, kw),
            g.reshape(1, -1, *grads.shape[3:]),
            stride=layer.stride,
            dilation=layer.dilation,
            groups=rows * groups,
        )
        width = layer.weight.numel()
        target = out[:, :width].view(rows, K, groups, per_group, -1)
        target.copy_(weight.view(rows, groups, K, per_group, -1).transpose(1, 2))
    if layer.bias is not None and layer.bias.requires_grad:
        out[:, width:].copy_(grads.sum((3, 4)).view(rows * K, c_out))


def _embedding_gradients(
    layer: nn.Embedding, indices: torch.Tensor, grads: torch.Tensor, out: torch.Tensor
) -> None:
    """Write each row's and output's flat gradient of an embedding's weight into ``out``
    (rows·K × V·d, M1 order): row v of the weight gets the sum of the output gradients at the
    row's positions holding index v, none for ``padding_idx``, as the embedding's backward does.

    ``indices``: the layer's inputs, (rows, ...); ``grads``: the gradients of the K outputs
    with respect to its output, (rows, K, ..., d).
    """
    rows, K = grads.shape[:2]
    V, d = layer.weight.shape
    index = indices.reshape(rows, 1, -1).expand(rows, K, -1).reshape(rows * K, -1)
    values = grads.reshape(rows * K, -1, d)
    if layer.padding_idx is not None:
        values = values * (index != layer.padding_idx)[..., None]
    which = torch.arange(rows * K, device=out.device)[:, None].expand_as(index)
    out.zero_()
    out.view(rows * K, V, d).index_put_((which, index), values, accumulate=True)


@dataclasses.dataclass(frozen=True)
class _LinearFeatures:
    """One Linear layer's factors of the M1 kernel: rows of A (inputs) and G (output gradients).

    ``inputs`` is None when the weight is frozen; ``bias`` says whether a trainable bias adds
    the all-ones Gram term; ``grads`` has n·K rows in M1's row-major order. Both are held in
    the dtype they were computed in (the model's), which holds them exactly, and are cast to
    the kernel's dtype one tile at a time: a float32 model's factors take half the memory.
    """

    inputs: torch.Tensor | None
    bias: bool
    grads: torch.Tensor

    def rows(self, start: int, stop: int, K: int) -> _LinearFeatures:
        """The factors of input rows start to stop."""
        inputs = None if self.inputs is None else self.inputs[start:stop]
        return _LinearFeatures(inputs, self.bias, self.grads[start * K : stop * K])

    def add_block(
        self, other: _Features, K: int, tile: torch.Tensor, first: bool, scratch: _Scratch
    ) -> None:
        """Add (A_r A_cᵀ + 1[bias]) ⊙ (G_r G_cᵀ) (M1), multiplied in the tile's dtype, to
        ``tile``, or write it there when ``first``."""
        assert isinstance(other, _LinearFeatures)
        dtype = tile.dtype
        block = tile if first else scratch.get("block", tile.shape, dtype)
        torch.mm(self.grads.to(dtype), other.grads.to(dtype).T, out=block)
        if self.inputs is None:
            if not first:
                tile.add_(block)
            return
        assert other.inputs is not None
        nr, nc = self.inputs.shape[0], other.inputs.shape[0]
        gram = scratch.get("gram", (nr, nc), dtype)
        torch.mm(self.inputs.to(dtype), other.inputs.to(dtype).T, out=gram)
        if self.bias:
            gram += 1.0
        factor = gram[:, None, :, None]
        if first:
            block.view(nr, K, nc, K).mul_(factor)
        else:  # one pass over the tile for the product and the sum
            tile.view(nr, K, nc, K).addcmul_(block.view(nr, K, nc, K), factor)

    def squared_norm(self, K: int) -> torch.Tensor:
        """Σ_ik ‖∂f_k(x_i)/∂θ_layer‖² in float64: ‖G_ik A_iᵀ‖² = ‖G_ik‖² ‖A_i‖², plus ‖G_ik‖²
        for a trainable bias."""
        g2 = self.grads.double().square().sum(1).view(-1, K)
        a2 = torch.zeros(g2.shape[0], dtype=torch.float64, device=g2.device)
        if self.inputs is not None:
            a2 += self.inputs.double().square().sum(1)
        if self.bias:
            a2 += 1.0
        return (a2[:, None] * g2).sum()


@dataclasses.dataclass(frozen=True)
class _FlatFeatures:
    """The conv and embedding layers' per-sample gradients: row i·K + k of ``grads`` is
    ∂f_k(x_i)/∂θ over the trainable parameters of every such layer, layer after layer (M1
    order), held in the model's dtype."""

    grads: torch.Tensor

    def rows(self, start: int, stop: int, K: int) -> _FlatFeatures:
        """The gradients of input rows start to stop."""
        return _FlatFeatures(self.grads[start * K : stop * K])

    def add_block(
        self, other: _Features, K: int, tile: torch.Tensor, first: bool, scratch: _Scratch
    ) -> None:
        """Add Φ_r Φ_cᵀ (M1) to ``tile``, or write it there when ``first``, multiplied as the
        generic backend multiplies its Jacobian chunks, for these are Jacobian columns: in the
        model's dtype (at least float32), in column groups of ``PRODUCT_GROUP`` accumulated in
        the tile's dtype."""
        assert isinstance(other, _FlatFeatures)
        work = work_dtype(self.grads.dtype, tile.dtype)
        for s in range(0, self.grads.shape[1], PRODUCT_GROUP):
            a = self.grads[:, s : s + PRODUCT_GROUP].to(work)
            b = other.grads[:, s : s + PRODUCT_GROUP].to(work)
            if work != tile.dtype:
                product = torch.mm(a, b.T, out=scratch.get("product", tile.shape, work))
                if first:
                    tile.copy_(product)
                else:
                    tile.add_(product)
            elif first:
                torch.mm(a, b.T, out=tile)
            else:
                tile.addmm_(a, b.T)
            first = False

    def squared_norm(self, K: int) -> torch.Tensor:
        """Σ_ik ‖∂f_k(x_i)/∂θ_layer‖² in float64."""
        return self.grads.double().square().sum()


_Features = _LinearFeatures | _FlatFeatures


def _layer_features(
    layers: list[nn.Module], x: torch.Tensor, K: int, chunk: int
) -> list[_Features]:
    """The features of the layers with a trainable parameter: the flat per-sample gradients of
    every Conv2d and Embedding in one :class:`_FlatFeatures` (first, when there is one), then
    the factors A and G of each Linear, from one backward per output column per chunk.

    Rows are independent, so the gradient of Σ_i f_k(x_i) with respect to a layer's outputs
    holds, in row i, the gradient of f_k(x_i) alone: K backward passes per chunk of rows give
    every per-row output gradient without per-sample loops.
    """
    trainable = [m for m in layers if _is_trainable(m)]
    # Filled chunk by chunk in place: concatenating chunks would hold every feature twice.
    n, dtype = x.shape[0], _feature_dtype(layers, x)
    inputs = {
        id(m): torch.empty((n, m.in_features), dtype=dtype, device=x.device)
        for m in trainable
        if isinstance(m, nn.Linear) and m.weight.requires_grad
    }
    grads = {
        id(m): torch.empty((n * K, m.out_features), dtype=dtype, device=x.device)
        for m in trainable
        if isinstance(m, nn.Linear)
    }
    # Every conv and embedding layer's flat gradients side by side in one matrix: their blocks
    # sum to one product Φ Φᵀ, one large multiplication and one pass over each tile instead of
    # one per layer (a first conv layer's few columns multiply far below BLAS's peak alone).
    flat_layers = [m for m in trainable if not isinstance(m, nn.Linear)]
    widths = [_flat_width(m) for m in flat_layers]
    flat = torch.empty((n * K, sum(widths)), dtype=dtype, device=x.device)
    offsets = itertools.accumulate(widths, initial=0)
    for m, offset, width in zip(flat_layers, offsets, widths, strict=False):
        grads[id(m)] = flat[:, offset : offset + width]
    for start in range(0, n, chunk):
        xc = x[start : start + chunk]
        rows = xc.shape[0]
        outputs: list[torch.Tensor] = []
        flat_inputs: dict[int, torch.Tensor] = {}
        with torch.enable_grad():
            # Indices into an Embedding have no gradient: the graph starts at its output.
            h = xc.detach().requires_grad_(True) if xc.is_floating_point() else xc.detach()
            for layer in layers:
                if not isinstance(layer, _LAYERS):
                    h = _call(layer, h)
                    continue
                if id(layer) in inputs:
                    inputs[id(layer)][start : start + rows] = h.detach()
                elif not isinstance(layer, nn.Linear) and layer.weight.requires_grad:
                    flat_inputs[id(layer)] = h.detach()
                h = _forward(layer, h)
                if isinstance(layer, nn.Embedding):
                    h.requires_grad_(True)
                if id(layer) in grads:
                    outputs.append(h)
            out = h.reshape(rows, -1)
            check_outputs(h.detach(), rows)
            columns = [
                torch.autograd.grad(out[:, k].sum(), outputs, retain_graph=k < K - 1)
                for k in range(K)
            ]
        for i, layer in enumerate(trainable):
            # (rows, K, ...) -> rows ordered i*K + k, as in M1.
            g = torch.stack([col[i] for col in columns], dim=1)
            target = grads[id(layer)][start * K : (start + rows) * K]
            if isinstance(layer, nn.Linear):
                target.copy_(g.reshape(rows * K, -1))
            elif isinstance(layer, nn.Embedding):
                _embedding_gradients(layer, flat_inputs[id(layer)], g, target)
            else:
                _conv_gradients(layer, flat_inputs.get(id(layer)), g, target)
    # The flat block first: written from its float32 product by a copy, where adding it to a
    # tile would read and write the tile once more.
    linear: list[_Features] = [
        _LinearFeatures(
            inputs=inputs.get(id(m)),
            bias=m.bias is not None and m.bias.requires_grad,
            grads=grads[id(m)],
        )
        for m in trainable
        if isinstance(m, nn.Linear)
    ]
    return ([_FlatFeatures(flat)] if flat_layers else []) + linear


@dataclasses.dataclass(frozen=True)
class _RowSizes:
    """Values per input row that the layer-wise backend holds: ``kept``, the features of every
    row until the kernel is filled; ``transient``, what one feature pass holds besides
    (activations autograd keeps and their gradients, K output gradients of every trainable layer
    and their stacked copy, a conv layer's padded input and per-sample gradients before they are
    stored)."""

    kept: int
    transient: int


def _row_sizes(layers: list[nn.Module], x: torch.Tensor, K: int) -> _RowSizes:
    """:class:`_RowSizes` from a forward pass on the first row of ``x``."""
    kept = transient = 0
    with torch.no_grad():
        h = x[:1]
        for layer in layers:
            out = layer(h)
            transient += 2 * out.numel()
            if isinstance(layer, nn.Linear) and _is_trainable(layer):
                kept += layer.in_features * layer.weight.requires_grad + K * layer.out_features
                transient += 2 * K * out.numel()
            elif _is_trainable(layer):
                width = _flat_width(layer)
                kept += K * width
                transient += 3 * K * out.numel() + 2 * K * width + 2 * h.numel()
            h = out
    return _RowSizes(kept, transient)


def _pass_rows(sizes: _RowSizes, chunk: int, budget: int, itemsize: int) -> int:
    """Rows per feature pass: at most ``chunk``, and as many as ``budget`` bytes hold."""
    return max(1, min(chunk, budget // max(1, itemsize * sizes.transient)))


class _Scratch:
    """Buffers reused from tile to tile: the tile, a layer's block, its Gram matrix and a float32
    product. Fresh tensors of tens of MB (a tile for K > 1 or n of several thousands) are
    returned to the system when freed and page-faulted in again for every tile."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous ``shape`` view of the buffer ``name``, grown when too small."""
        size = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < size or buffer.dtype != dtype:
            buffer = torch.empty(size, dtype=dtype, device=self.device)
            self._buffers[name] = buffer
        return buffer[:size].view(shape)


def _tile(
    rows: list[_Features], cols: list[_Features], K: int, dtype: torch.dtype, scratch: _Scratch
) -> torch.Tensor:
    """Σ_layers of each layer's block (M1) for one block of rows against columns, multiplied in
    ``dtype``; a view of ``scratch``'s tile buffer, valid until the next tile."""
    tile = scratch.get("tile", (rows[0].grads.shape[0], cols[0].grads.shape[0]), dtype)
    for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
        r.add_block(c, K, tile, i == 0, scratch)
    return tile


_PIECE = 256
"""Side of the square pieces in which a tile is transposed: read or written whole, the
transpose of a tile of thousands of rows takes 2–5x as long (cache and TLB misses)."""


def _symmetrize(tile: torch.Tensor) -> None:
    """:func:`symmetrize_` of a square tile, in pieces of ``_PIECE``: the same values."""
    m = tile.shape[0]
    for i in range(0, m, _PIECE):
        symmetrize_(tile[i : i + _PIECE, i : i + _PIECE])
        for j in range(i + _PIECE, m, _PIECE):
            upper = tile[i : i + _PIECE, j : j + _PIECE]
            lower = tile[j : j + _PIECE, i : i + _PIECE]
            mean = (upper + lower.T) / 2
            upper.copy_(mean)
            lower.copy_(mean.T)


def _fill_kernel(
    out: torch.Tensor,
    n_rows: int,
    n_cols: int,
    K: int,
    chunk: int,
    tile_fn: Callable[[int, int, int, int], torch.Tensor],
    symmetric: bool,
    N: int,
) -> None:
    """Write tile_fn(row block, column block) / N into ``out`` in square blocks of ``chunk``
    rows; dividing as the tile is written spares a pass over it.

    When symmetric only the upper block triangle is computed and mirrored, halving the work.
    Square blocks keep the working memory at a few chunk² tiles, whatever n is.
    """
    for r0 in range(0, n_rows, chunk):
        r1 = min(n_rows, r0 + chunk)
        for c0 in range(r0 if symmetric else 0, n_cols, chunk):
            c1 = min(n_cols, c0 + chunk)
            tile = tile_fn(r0, r1, c0, c1).to(out.device)
            if symmetric and c0 == r0:
                _symmetrize(tile)  # before it is written: the tile is contiguous, ``out`` is not
            torch.div(tile, N, out=out[r0 * K : r1 * K, c0 * K : c1 * K])
            if symmetric and c0 != r0:
                mirror = out[c0 * K : c1 * K, r0 * K : r1 * K]
                for i in range(0, tile.shape[0], _PIECE):
                    for j in range(0, tile.shape[1], _PIECE):
                        piece = tile[i : i + _PIECE, j : j + _PIECE].T
                        torch.div(piece, N, out=mirror[j : j + _PIECE, i : i + _PIECE])
            del tile


def tile_rows(n: int, K: int, budget: int, itemsize: int) -> int:
    """Rows b of the square Gram tiles of :func:`kernel` (M1), b·K × b·K kernel entries each, so
    that one tile's working set holds in ``budget`` bytes (``itemsize``: the kernel's)."""
    # A b × b tile holds b·K × b·K values twice (the tile and one layer's block) plus b × b, and
    # a conv layer's float32 product before it is accumulated (4 bytes per value).
    b = math.isqrt(max(1, budget // ((2 * itemsize + 4) * K * K + itemsize)))
    # Tiles of about n/8 rows let the symmetric kernel skip most of its lower triangle, while
    # each product, of b·K kernel entries a side, stays large enough (256) for BLAS to run at
    # full speed: the floor is in entries, so ten outputs allow tiles of a tenth of the rows.
    return max(1, min(n, b, max(-(-256 // K), -(-n // 8))))


def kernel(
    model: nn.Module,
    x: torch.Tensor,
    x2: torch.Tensor | None,
    K: int,
    chunk: int,
    out: torch.Tensor,
    budget: int,
    N: int,
) -> None:
    """Write H (x2 None) or C = J(x2) J(x)ᵀ, divided by ``N``, into every entry of ``out`` in
    tiles of ``chunk`` rows (M1 row-major order); the features are computed in passes of at most
    ``chunk`` rows that hold at most ``budget`` bytes. Dividing tile by tile spares a pass over
    the whole kernel."""
    layers = flatten_sequential(model)
    itemsize = _feature_dtype(layers, x).itemsize
    rows = _pass_rows(_row_sizes(layers, x, K), chunk, budget, itemsize)
    feats = _layer_features(layers, x, K, rows)
    feats2 = feats if x2 is None else _layer_features(layers, x2, K, rows)
    scratch = _Scratch(x.device)

    def tile(r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        left, right = [f.rows(r0, r1, K) for f in feats2], [f.rows(c0, c1, K) for f in feats]
        return _tile(left, right, K, out.dtype, scratch)

    n = x.shape[0]
    rows_2 = n if x2 is None else x2.shape[0]
    _fill_kernel(out, rows_2, n, K, chunk, tile, symmetric=x2 is None, N=N)


def work_bytes(
    network: nn.Module,
    x: torch.Tensor,
    n2: int | None,
    K: int,
    rows: int,
    itemsize: int,
    budget: int,
) -> int:
    """Working memory (bytes) of :func:`kernel` on the n rows of ``x`` (and n2 test rows): the
    features of every row in the model's dtype (A and G of every trainable Linear, K flat
    per-sample gradients of every trainable Conv2d), plus the larger of one feature pass and
    one b × b Gram tile (b = ``rows``, see :func:`tile_rows`) with two tiles' features cast to
    the kernel's ``itemsize``."""
    layers = flatten_sequential(network)
    sizes = _row_sizes(layers, x, K)
    n, model_itemsize = x.shape[0], _feature_dtype(layers, x).itemsize
    b = min(rows, n, n2 or n)
    features = (n + (n2 or 0)) * sizes.kept * model_itemsize
    feature_pass = _pass_rows(sizes, rows, budget, model_itemsize) * sizes.transient
    tiles = (2 * itemsize + 4) * (b * K) ** 2 + itemsize * (b * b + 2 * b * sizes.kept)
    return features + max(feature_pass * model_itemsize, tiles)


def trace(
    network: nn.Module, x: torch.Tensor, K: int, chunk_size: int | None, budget_bytes: int
) -> torch.Tensor:
    """Σ_i ‖∂f_i/∂θ‖² (float64, unnormalised) from the layer features (M1): ‖G_ik A_iᵀ‖² =
    ‖G_ik‖² ‖A_i‖² (plus ‖G_ik‖² for a trainable bias) for a Linear, the squared norms of the
    flat per-sample gradients for a Conv2d; ``chunk_size`` rows at a time (default: as many as
    ``budget_bytes`` holds)."""
    layers = flatten_sequential(network)
    sizes = _row_sizes(layers, x, K)
    # Per row: its features and one pass's transients in the model's dtype, and a float64 copy
    # of the features.
    per_row = _feature_dtype(layers, x).itemsize * (sizes.kept + sizes.transient) + 8 * sizes.kept
    rows = chunk_size or max(1, budget_bytes // max(1, per_row))
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for r0 in range(0, x.shape[0], rows):
        for f in _layer_features(layers, x[r0 : r0 + rows], K, rows):
            total += f.squared_norm(K)
    return total
