"""Generic backend of the empirical NTK (METHOD M1): any ``nn.Module``, by chunked Jacobians.

Per-sample Jacobians (``torch.func.vmap(jacrev)``) are built in row chunks under a memory budget.
Chunks are held and multiplied in the model's dtype (at least float32, at most the kernel's
``dtype``): a float64 model is contracted entirely in float64; for a float32 model the parameter
(inner) dimension is split into groups of ``PRODUCT_GROUP`` = 65,536 parameters whose float32
products are accumulated in float64, so the rounding grows with the group width, not with P.
Accuracy for a float32 model: relative error about 1e-7 (measured max |ΔH| / max |H| = 1.6e-7
on the paper's MLP, P = 256,501, against float64 products of the same Jacobian), the accuracy
of a float32 Jacobian itself; float64 products would cost 2–3× the time and 2× the memory for
no gain. Only the upper block triangle of H is multiplied. Kernel-vector products (vjp then jvp)
and the trace (per-row gradient norms) work on any module too.

The functions here assume the checks and the model preservation of :mod:`remlstop.ntk`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from ._model import check_outputs

_JACREV_BYTES = 24 * 2**20
"""Bound on the Jacobian of one vmap(jacrev) call. Below glibc's largest mmap threshold (32 MiB),
so its outputs come from the reused heap instead of fresh mmaps that are page-faulted in again on
every call: measured 0.34 s against 0.50 s with 64 MiB for J of the paper's MLP at n = 1000."""


def unsupported(model: nn.Module) -> str | None:
    """Why torch.func cannot differentiate ``model``, or None: full backward hooks and backward
    pre-hooks run as an ``autograd.Function`` that functorch's transforms refuse."""
    module_hooks = nn.modules.module
    if module_hooks._global_backward_pre_hooks or (
        module_hooks._global_backward_hooks and module_hooks._global_is_full_backward_hook
    ):
        return "a global full backward hook or backward pre-hook is registered"
    for name, m in model.named_modules():
        if m._backward_pre_hooks or (m._backward_hooks and m._is_full_backward_hook):
            where = f"{type(m).__name__} {name or '(the model)'}"
            return f"{where} has a full backward hook or backward pre-hook"
    return None


def _state(model: nn.Module) -> tuple[Params, Params]:
    """Detached parameters and cloned buffers to hand to functional_call."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    return params, buffers


Params = dict[str, torch.Tensor]
JacobianFn = Callable[[Params, torch.Tensor], tuple[Params, torch.Tensor]]


def _per_sample_jacobian(model: nn.Module, names: list[str]) -> JacobianFn:
    """vmap(jacrev) of one row's K outputs with respect to the parameters in ``names``; it
    returns the Jacobian and the outputs (rows, K). Where vmap fails on the model, jacrev one
    row at a time, with a warning."""
    params, buffers = _state(model)
    fixed = {k: v for k, v in params.items() if k not in names}

    def one_row(free: Params, xi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = functional_call(model, ({**fixed, **free}, buffers), (xi.unsqueeze(0),))
        check_outputs(out, 1, finite=False)  # values are checked outside vmap
        flat = out.reshape(-1)
        return flat, flat

    batched = vmap(jacrev(one_row, has_aux=True), in_dims=(None, 0))
    single = jacrev(one_row, has_aux=True)
    looped = False

    def jacobians(free: Params, x: torch.Tensor) -> tuple[Params, torch.Tensor]:
        nonlocal looped
        if not looped:
            try:
                return batched(free, x)
            except torch.OutOfMemoryError:
                raise  # the memory budget's business, not a batching rule's
            except RuntimeError as error:
                # Some torch ops have no or a wrong batching rule (nn.PReLU's backward under
                # vmap, torch 2.13): one row at a time is slower but needs none. A model that
                # fails on one row too raises that error, which is then its own.
                first = single(free, x[0])
                looped = True
                warnings.warn(
                    "torch.func could not batch this model's per-sample Jacobians "
                    f"({type(error).__name__}: {str(error).splitlines()[0][:120]}); computing "
                    "them one row at a time, which is slower. Supported layers (Linear, "
                    "Conv2d, Embedding, elementwise activations) take the layer-wise path "
                    "instead.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return _stack_rows([first, *(single(free, xi) for xi in x[1:])])
        return _stack_rows([single(free, xi) for xi in x])

    return jacobians


def _stack_rows(rows: list[tuple[Params, torch.Tensor]]) -> tuple[Params, torch.Tensor]:
    """Per-row (Jacobian, output) pairs stacked as vmap would return them."""
    names = rows[0][0].keys()
    return (
        {name: torch.stack([jac[name] for jac, _ in rows]) for name in names},
        torch.stack([out for _, out in rows]),
    )


def _call_rows(rows: int, row_bytes: int, device: torch.device) -> int:
    """Rows per vmap(jacrev) call of :func:`_jacobian_rows` in a chunk of ``rows`` rows whose
    Jacobian takes ``row_bytes`` a row: ``_JACREV_BYTES`` worth on a CPU, all on a GPU."""
    if device.type != "cpu":
        return rows
    return min(rows, max(1, _JACREV_BYTES // row_bytes))


def _jacobian_rows(
    jac_fn: JacobianFn,
    free: Params,
    x: torch.Tensor,
    K: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write the (rows·K) × P_group block of J for the rows of ``x`` into ``out`` (M1 order).

    On a CPU vmap(jacrev) runs on sub-chunks of at most ``_JACREV_BYTES`` of Jacobian: its
    transients stay small enough for glibc to reuse, where chunk-sized fresh allocations would
    be page-faulted in again on every call (measured: slower than the products on small
    machines). A GPU's caching allocator reuses any size: there the chunk is one call, and one
    host synchronisation for its outputs' check. Entries are computed in the model's dtype and
    cast to ``out``'s dtype by the copy.
    """
    rows = x.shape[0]
    itemsize = next(iter(free.values())).element_size()
    step = _call_rows(rows, K * out.shape[1] * itemsize, x.device)
    block = out[: rows * K]
    with torch.no_grad():
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            jac, values = jac_fn(free, x[r0:r1])
            check_outputs(values, r1 - r0)
            offset = 0
            for name, p in free.items():
                piece = jac[name].reshape((r1 - r0) * K, -1)
                block[r0 * K : r1 * K, offset : offset + p.numel()].copy_(piece)
                offset += p.numel()
    return block


def _parameter_groups(params: Params, max_width: int) -> list[list[str]]:
    """Consecutive parameter tensors grouped so each group has at most max_width entries.

    A single tensor wider than max_width forms its own group (its one-row Jacobian is the
    smallest unit this backend can form).
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


def work_dtype(model_dtype: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """dtype of the generic backend's Jacobian chunks and products.

    The model's dtype (at least float32), and never wider than the kernel's ``dtype``: a float32
    model's Jacobian is only float32-accurate, so float64 copies and float64 GEMMs (2–3× slower,
    2× the memory) would buy no accuracy; a float64 model keeps everything in float64.
    """
    work = torch.promote_types(model_dtype, torch.float32)
    return dtype if work.itemsize > dtype.itemsize else work


def layout(
    params: Params, K: int, chunk: int | None, budget: int, itemsize: int
) -> list[tuple[list[str], int]]:
    """The generic backend's parameter groups, each with its rows per Jacobian chunk."""
    if chunk is not None:
        return [(list(params), chunk)]
    groups = _parameter_groups(params, max(1, budget // (K * itemsize)))
    return [
        (names, _generic_rows(K, sum(params[k].numel() for k in names), budget, itemsize))
        for names in groups
    ]


def kernel(
    model: nn.Module,
    params: Params,
    x: torch.Tensor,
    x2: torch.Tensor | None,
    K: int,
    layout: list[tuple[list[str], int]],
    out: torch.Tensor,
    work: torch.dtype,
) -> int:
    """Add every parameter group's J_rows J_colsᵀ into ``out``; returns the rows per chunk.

    ``layout`` is :func:`layout`'s. Jacobian chunks are held in ``work`` (see
    :func:`work_dtype`) and multiplied by :func:`_gram`.
    """
    rows_used = 1
    for names, rows_used in layout:
        free = {name: params[name].detach() for name in names}
        _add_group(model, free, x, x2, K, rows_used, out, work)
    return rows_used


def _add_group(
    model: nn.Module,
    free: Params,
    x: torch.Tensor,
    x2: torch.Tensor | None,
    K: int,
    rows_used: int,
    out: torch.Tensor,
    work: torch.dtype,
) -> None:
    """Add J_rows J_colsᵀ of the parameters ``free`` into ``out``, ``rows_used`` rows per
    Jacobian chunk."""
    jac_fn = _per_sample_jacobian(model, list(free))
    width = sum(p.numel() for p in free.values())
    longest = max(x.shape[0], 0 if x2 is None else x2.shape[0])
    rows = min(rows_used, longest)
    # Reused buffers (the second only when there are several chunks): allocating a chunk afresh
    # each time would page-fault it in again. They are freed when this group is done.
    buffers: list[torch.Tensor] = []

    def jac(inputs: torch.Tensor, r0: int, r1: int, slot: int) -> torch.Tensor:
        while len(buffers) <= slot:
            buffers.append(torch.empty(rows * K, width, dtype=work, device=x.device))
        return _jacobian_rows(jac_fn, free, inputs[r0:r1], K, buffers[slot])

    _blocks(jac, x, x2, K, rows, out)


PRODUCT_GROUP = 2**16
"""Width (parameters) of the column groups whose products are accumulated in the kernel's dtype
when the Jacobian is held in a narrower one: float32 rounding then grows with this width, not
with P (measured on the paper's MLP, P = 256,501, n = 480: max |ΔH| / max |H| = 1.6e-7 against
float64 products of the same float32 Jacobian, 4.4e-7 in one float32 product over all of P)."""


def _gram(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A Bᵀ in ``dtype``: one product when A is already in ``dtype``; otherwise products of
    column groups of ``PRODUCT_GROUP`` parameters in A's dtype, accumulated in ``dtype``."""
    if A.dtype == dtype:
        return A @ B.T
    tile = torch.zeros(A.shape[0], B.shape[0], dtype=dtype, device=A.device)
    for s in range(0, A.shape[1], PRODUCT_GROUP):
        tile += A[:, s : s + PRODUCT_GROUP] @ B[:, s : s + PRODUCT_GROUP].T
    return tile


def _symmetric_gram(J: torch.Tensor, dtype: torch.dtype, pieces: int = 4) -> torch.Tensor:
    """J Jᵀ in ``dtype`` from its upper block triangle, about (pieces + 1) / (2 · pieces) of the
    full work."""
    m = J.shape[0]
    step = -(-m // pieces)
    gram = torch.empty(m, m, dtype=dtype, device=J.device)
    for s in range(0, m, step):
        gram[s : s + step, s:] = _gram(J[s : s + step], J[s:], dtype)
        symmetrize_(gram[s : s + step, s : s + step])
        gram[s + step :, s : s + step] = gram[s : s + step, s + step :].T
    return gram


def symmetrize_(block: torch.Tensor) -> None:
    """Average a square diagonal block with its transpose: BLAS rounds (i, j) and (j, i)
    differently, and the eigensolvers downstream want an exactly symmetric kernel."""
    block.copy_((block + block.T) / 2)


def _blocks(
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


def work_bytes(
    layout: list[tuple[list[str], int]],
    params: Params,
    n: int,
    n2: int | None,
    K: int,
    work_itemsize: int,
    itemsize: int,
    device: torch.device,
) -> int:
    """Working memory (bytes) of :func:`kernel` (see :func:`_blocks`) with the model on
    ``device``: the rows of the two Jacobian chunk buffers that get written, a vmap(jacrev)
    call's Jacobian (:func:`_call_rows`) and the product tiles."""
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
        call = _call_rows(rows, K * width * work_itemsize, device) * K * width * work_itemsize
        peak = max(peak, jacobians + call + tiles)
    return peak


def vector_product(
    model: nn.Module, params: Params, x: torch.Tensor, vs: torch.Tensor, K: int, rows: int
) -> torch.Tensor:
    """J (Jᵀ v) for the m vectors in the rows of ``vs`` (m, N), unnormalised, by a vjp then a
    jvp on ``rows`` rows of ``x`` at a time (M1); returns (N, m) float64."""
    all_params, buffers = _state(model)
    free = {name: all_params[name] for name in params}
    fixed = {k: p for k, p in all_params.items() if k not in free}

    def flat_outputs(inputs: torch.Tensor) -> Callable[[Params], torch.Tensor]:
        def f(theta: Params) -> torch.Tensor:
            return functional_call(model, ({**fixed, **theta}, buffers), (inputs,)).reshape(-1)

        return f

    n = x.shape[0]
    with torch.no_grad():
        jtv: Params | None = None
        for r0 in range(0, n, rows):
            xc = x[r0 : r0 + rows]
            out, vjp_fn = vjp(flat_outputs(xc), free)
            check_outputs(out.view(xc.shape[0], -1), xc.shape[0])
            (part,) = vmap(vjp_fn)(vs[:, r0 * K : (r0 + xc.shape[0]) * K].contiguous())
            jtv = part if jtv is None else {k: jtv[k] + part[k] for k in jtv}
        assert jtv is not None
        pieces = []
        for r0 in range(0, n, rows):
            f = flat_outputs(x[r0 : r0 + rows])
            pieces.append(vmap(lambda t, f=f: jvp(f, (free,), (t,))[1])(jtv))
        return torch.cat(pieces, dim=1).to(torch.float64).T


def trace(
    model: nn.Module, params: Params, x: torch.Tensor, K: int, chunk_size: int | None
) -> torch.Tensor:
    """Σ_i ‖∂f_i/∂θ‖² (float64, unnormalised) from per-sample Jacobians (M1), ``chunk_size``
    rows at a time (default: one vmap(jacrev) call's worth, ``_JACREV_BYTES``)."""
    P = sum(p.numel() for p in params.values())
    itemsize = next(iter(params.values())).element_size()
    rows = chunk_size or _generic_rows(K, P, _JACREV_BYTES, itemsize)
    jac_fn = _per_sample_jacobian(model, list(params))
    free = {name: p.detach() for name, p in params.items()}
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    with torch.no_grad():
        for r0 in range(0, x.shape[0], rows):
            jac, out = jac_fn(free, x[r0 : r0 + rows])
            check_outputs(out, out.shape[0])
            total += sum(j.to(torch.float64).square().sum() for j in jac.values())
    return total
