"""Layer-wise backend of the empirical NTK (METHOD M1): the exact dense kernel from layer factors.

Networks made only of ``nn.Linear`` layers and parameter-free row-wise modules (elementwise
activations, ``Flatten``, ``Dropout``), possibly in nested ``nn.Sequential``, each parameter used
once (a layer applied twice or a tied weight would need the cross terms between its uses, so
such networks take the generic backend). For a Linear layer with input activations A (n × d_in)
and output gradients G_k (n × d_out) of output k, the per-row gradient of its weight is the
outer product G_k[i] A[i]ᵀ, so its kernel block is (A Aᵀ + 1[bias]) ⊙ (G_k G_lᵀ): per-sample
gradients are never formed and the cost is that of Gram matrices of the activations. A wrapper
(a LightningModule whose ``forward`` calls ``self.net``) gets this backend through
:func:`delegate`.

The functions here assume the checks and the model preservation of :mod:`remlstop.ntk`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import nn

from ._model import check_outputs
from ._ntk_generic import symmetrize_

# Parameter-free modules that act on each row on its own; in eval mode dropout is the identity.
_ROWWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
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
    nn.modules.dropout._DropoutNd,
)


def flatten_sequential(model: nn.Module) -> list[nn.Module]:
    """The leaf modules of nested ``nn.Sequential``s, in order of application."""
    if isinstance(model, nn.Sequential):
        return [leaf for child in model for leaf in flatten_sequential(child)]
    return [model]


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
    the all-ones Gram term; ``grads`` has n·K rows in M1's row-major order. Both are held in
    the dtype they were computed in (the model's), which holds them exactly, and are cast to
    the kernel's dtype one tile at a time: a float32 model's factors take half the memory.
    """

    inputs: torch.Tensor | None
    bias: bool
    grads: torch.Tensor


def _layer_features(
    layers: list[nn.Module], x: torch.Tensor, K: int, chunk: int
) -> list[_LinearFeatures]:
    """A and G for every Linear with a trainable parameter, from one backward per output column.

    Rows are independent, so the gradient of Σ_i f_k(x_i) with respect to a layer's outputs
    holds, in row i, the gradient of f_k(x_i) alone: K backward passes per chunk of rows give
    every per-row output gradient without per-sample loops.
    """
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    trainable = [
        m
        for m in linears
        if m.weight.requires_grad or (m.bias is not None and m.bias.requires_grad)
    ]
    # Filled chunk by chunk in place: concatenating chunks would hold every factor twice.
    n, dtype = x.shape[0], x.dtype
    inputs = {
        id(m): torch.empty((n, m.in_features), dtype=dtype, device=x.device)
        for m in trainable
        if m.weight.requires_grad
    }
    grads = {
        id(m): torch.empty((n * K, m.out_features), dtype=dtype, device=x.device) for m in trainable
    }
    for start in range(0, n, chunk):
        xc = x[start : start + chunk]
        rows = xc.shape[0]
        outputs: list[torch.Tensor] = []
        with torch.enable_grad():
            h = xc.detach().requires_grad_(True)
            for layer in layers:
                if isinstance(layer, nn.Linear):
                    if id(layer) in inputs:
                        inputs[id(layer)][start : start + rows] = h.detach()
                    bias = None if layer.bias is None else layer.bias.detach()
                    h = nn.functional.linear(h, layer.weight.detach(), bias)
                    if id(layer) in grads:
                        outputs.append(h)
                else:
                    h = layer(h)
            out = h.reshape(rows, -1)
            check_outputs(h.detach(), rows)
            columns = [
                torch.autograd.grad(out[:, k].sum(), outputs, retain_graph=k < K - 1)
                for k in range(K)
            ]
        for i, layer in enumerate(trainable):
            # (rows, K, d_out) -> rows ordered i*K + k, as in M1.
            g = torch.stack([col[i] for col in columns], dim=1)
            grads[id(layer)][start * K : (start + rows) * K] = g.reshape(rows * K, -1)
    return [
        _LinearFeatures(
            inputs=inputs.get(id(m)),
            bias=m.bias is not None and m.bias.requires_grad,
            grads=grads[id(m)],
        )
        for m in trainable
    ]


def _tile(
    rows: list[_LinearFeatures], cols: list[_LinearFeatures], K: int, dtype: torch.dtype
) -> torch.Tensor:
    """Σ_layers (A_r A_cᵀ + 1[bias]) ⊙ (G_r G_cᵀ) for one block of rows against columns (M1),
    multiplied in ``dtype``."""
    tile: torch.Tensor | None = None
    for r, c in zip(rows, cols, strict=True):
        block = r.grads.to(dtype) @ c.grads.to(dtype).T
        nr, nc = block.shape[0] // K, block.shape[1] // K
        if r.inputs is not None:
            assert c.inputs is not None
            gram = r.inputs.to(dtype) @ c.inputs.to(dtype).T
            if r.bias:
                gram += 1.0
            block.view(nr, K, nc, K).mul_(gram[:, None, :, None])
        tile = block if tile is None else tile.add_(block)
    assert tile is not None
    return tile


def _slice_features(
    features: list[_LinearFeatures], start: int, stop: int, K: int
) -> list[_LinearFeatures]:
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
    """Write tile_fn(row block, column block) into ``out`` in square blocks of ``chunk`` rows.

    When symmetric only the upper block triangle is computed and mirrored, halving the work.
    Square blocks keep the working memory at a few chunk² tiles, whatever n is.
    """
    for r0 in range(0, n_rows, chunk):
        r1 = min(n_rows, r0 + chunk)
        for c0 in range(r0 if symmetric else 0, n_cols, chunk):
            c1 = min(n_cols, c0 + chunk)
            tile = tile_fn(r0, r1, c0, c1).to(out.device)
            out[r0 * K : r1 * K, c0 * K : c1 * K] = tile
            if symmetric and c0 == r0:
                symmetrize_(out[r0 * K : r1 * K, r0 * K : r1 * K])
            elif symmetric:
                out[c0 * K : c1 * K, r0 * K : r1 * K] = tile.T
            del tile


def tile_rows(n: int, K: int, budget: int, itemsize: int) -> int:
    # A b × b tile holds b·K × b·K values twice (the tile and one layer's block) plus b × b.
    b = math.isqrt(max(1, budget // (itemsize * (2 * K * K + 1))))
    # Tiles of about n/8 rows (not below 256) let the symmetric kernel skip most of its lower
    # triangle while each product stays large enough for BLAS to run at full speed.
    return max(1, min(n, b, max(256, -(-n // 8))))


def _feature_rows(layers: list[nn.Module], K: int, budget_bytes: int) -> int:
    # Per row: float64 copies of every Linear's input and K output gradients, plus autograd's
    # activations (about the same again).
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    per_row = 16 * sum(m.in_features + K * m.out_features for m in linears)
    return max(1, budget_bytes // max(1, per_row))


def kernel(
    model: nn.Module,
    x: torch.Tensor,
    x2: torch.Tensor | None,
    K: int,
    chunk: int,
    out: torch.Tensor,
) -> None:
    """Write H (x2 None) or C = J(x2) J(x)ᵀ, unnormalised, into ``out`` in tiles of ``chunk``
    rows (M1 row-major order)."""
    layers = flatten_sequential(model)
    feats = _layer_features(layers, x, K, chunk)
    n = x.shape[0]
    if x2 is None:

        def tile(r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
            rows, cols = _slice_features(feats, r0, r1, K), _slice_features(feats, c0, c1, K)
            return _tile(rows, cols, K, out.dtype)

        _fill_kernel(out, n, n, K, chunk, tile, symmetric=True)
    else:
        feats2 = _layer_features(layers, x2, K, chunk)

        def tile(r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
            rows, cols = _slice_features(feats2, r0, r1, K), _slice_features(feats, c0, c1, K)
            return _tile(rows, cols, K, out.dtype)

        _fill_kernel(out, x2.shape[0], n, K, chunk, tile, symmetric=False)


def work_bytes(network: nn.Module, n: int, n2: int | None, K: int, rows: int, itemsize: int) -> int:
    """Working memory (bytes) of :func:`kernel`: A and G of every trainable Linear for the n
    training (and n2 test) rows in the model's dtype, one b × b Gram tile (b = ``rows``, see
    :func:`tile_rows`) and two tiles' factors cast to the kernel's ``itemsize``."""
    per_row = 0
    for m in flatten_sequential(network):
        if isinstance(m, nn.Linear) and any(p.requires_grad for p in m.parameters()):
            per_row += m.in_features * m.weight.requires_grad + K * m.out_features
    b = min(rows, n, n2 or n)
    features = (n + (n2 or 0)) * per_row * next(network.parameters()).element_size()
    return features + itemsize * (2 * b * K * b * K + b * b + 2 * b * per_row)


def trace(
    network: nn.Module, x: torch.Tensor, K: int, chunk_size: int | None, budget_bytes: int
) -> torch.Tensor:
    """Σ_i ‖∂f_i/∂θ‖² (float64, unnormalised) from the layer factors: ‖G_ik A_iᵀ‖² =
    ‖G_ik‖² ‖A_i‖², plus ‖G_ik‖² for a trainable bias (M1); ``chunk_size`` rows at a time
    (default: as many as ``budget_bytes`` holds)."""
    layers = flatten_sequential(network)
    rows = chunk_size or _feature_rows(layers, K, budget_bytes)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for r0 in range(0, x.shape[0], rows):
        for f in _layer_features(layers, x[r0 : r0 + rows], K, rows):
            g2 = f.grads.double().square().sum(1).view(-1, K)
            a2 = torch.zeros(g2.shape[0], dtype=torch.float64, device=x.device)
            if f.inputs is not None:
                a2 += f.inputs.double().square().sum(1)
            if f.bias:
                a2 += 1.0
            total += (a2[:, None] * g2).sum()
    return total
