"""Collect training inputs and targets (X, Y) from tensors or a DataLoader (METHOD M1).

The kernel, the test and REML need the whole training set at once (M1: y has N = n·K entries).
Targets must be real-valued: the theory covers squared-error losses only (M1, M6).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from ._model import preserved_rng

__all__ = [
    "default_batch_adapter",
    "collect_xy",
    "as_target_matrix",
    "every_row_loader",
    "leaves_rows_out",
    "row_keys",
    "find_rows",
]

Batch = Any
BatchToXY = Callable[[Batch], "tuple[torch.Tensor, torch.Tensor]"]

_DICT_KEYS = (("x", "y"), ("input", "target"))
_MIN_ROWS = 3


def default_batch_adapter(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a batch into (x, y).

    Accepts a 2-element tuple/list ``(x, y)`` (what a ``TensorDataset`` yields through a
    ``DataLoader``) or a mapping with keys ``"x"``/``"y"``, else ``"input"``/``"target"`` (checked
    in that order). Anything else raises ``TypeError``: pass ``batch_to_xy=`` then.
    """
    if isinstance(batch, Mapping):
        for kx, ky in _DICT_KEYS:
            if kx in batch and ky in batch:
                return _check_tensors(batch[kx], batch[ky])
        raise TypeError(
            f"batch is a mapping with keys {sorted(map(str, batch))}; the default adapter needs "
            "'x'/'y' or 'input'/'target'. Pass batch_to_xy= to say how to get (x, y)."
        )
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return _check_tensors(batch[0], batch[1])
    raise TypeError(
        f"cannot read (x, y) from a batch of type {type(batch).__name__}"
        + (f" with {len(batch)} elements" if isinstance(batch, (tuple, list)) else "")
        + "; the default adapter takes (x, y) pairs or dicts with 'x'/'y' or 'input'/'target'. "
        "Pass batch_to_xy= (a function batch -> (x, y))."
    )


def _check_tensors(x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise TypeError(
            f"x and y must be torch tensors; got {type(x).__name__} and {type(y).__name__}. "
            "Pass batch_to_xy= to convert them."
        )
    return x, y


def as_target_matrix(Y: torch.Tensor) -> torch.Tensor:
    """Targets as an (n, K) floating matrix (M1): 1-D Y -> (n, 1); trailing dims are flattened
    row-major, so ``as_target_matrix(Y).reshape(-1)`` is the vector y of length N = n·K."""
    _check_targets(Y)
    if Y.ndim == 0:
        raise ValueError("Y is a scalar; it needs one row per training example.")
    return Y.reshape(Y.shape[0], -1)


def _check_targets(Y: torch.Tensor) -> None:
    if Y.dtype == torch.bool or not (Y.is_floating_point() or Y.is_complex()):
        raise TypeError(
            f"targets have dtype {Y.dtype}, which looks like class labels; the theory covers "
            "squared error only (METHOD M1/M6). One-hot encode them and use float targets with "
            "loss='mse'."
        )
    if Y.is_complex():
        raise TypeError(f"targets must be real floating point; got {Y.dtype}.")


def _gather_batches(
    data: Any, batch_to_xy: BatchToXY
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    # A shuffled DataLoader draws its permutation seed from the global RNG; restoring it keeps
    # the user's training run identical with or without remlstop.
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    with preserved_rng():
        for i, batch in enumerate(data):
            x, y = batch_to_xy(batch)
            if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"batch {i}: x has shape {tuple(x.shape)} and y {tuple(y.shape)}; they need "
                    "the same number of rows (first dimension)."
                )
            device = xs[0].device if xs else x.device
            xs.append(x.detach().to(device))
            ys.append(y.detach().to(device))
    return xs, ys


def _subset_rows(n: int, max_samples: int, generator: torch.Generator | int | None) -> torch.Tensor:
    if isinstance(generator, torch.Generator):
        gen = generator
    else:
        gen = torch.Generator().manual_seed(0 if generator is None else int(generator))
    idx = torch.randperm(n, generator=gen, device=gen.device)[:max_samples]
    return torch.sort(idx).values


def collect_xy(
    data: Any,
    *,
    batch_to_xy: BatchToXY | None = None,
    max_samples: int | None = None,
    generator: torch.Generator | int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All training rows as (X, Y): X (n, ...) and Y (n, ...) floating, detached (M1).

    ``data``: an ``(X, Y)`` pair of tensors (or a dict batch) taken as one batch, or a
    ``DataLoader``/iterable of batches, each split by ``batch_to_xy`` (default
    :func:`default_batch_adapter`) and concatenated on the device of the first batch.
    The global torch RNGs (CPU, and every CUDA device's) are saved before and restored after
    iterating, so collecting from a shuffled ``DataLoader`` does not change the user's training
    run.

    A shuffled ``DataLoader`` whose epoch leaves rows out (``drop_last``, a ``RandomSampler``
    that draws fewer rows than the dataset holds or draws with replacement) is read through
    :func:`every_row_loader`: training visits every row over the epochs.

    ``max_samples``: keep a uniformly random subset of that many rows (original order), drawn
    from ``generator`` (a ``torch.Generator`` or an int seed; default seed 0), never from the
    global RNG. The kernel, the test and REML are then computed on that subset, while the clock
    (M2) still counts time on the full data. The full data is materialised before subsetting.
    """
    _refuse_misplaced_data(data, default_adapter=batch_to_xy is None)
    data = every_row_loader(data)
    adapter = default_batch_adapter if batch_to_xy is None else batch_to_xy
    one_batch = isinstance(data, Mapping) or (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(d, torch.Tensor) for d in data)
    )
    if isinstance(data, torch.Tensor) or not (one_batch or isinstance(data, Iterable)):
        raise TypeError(
            "data must be an (X, Y) pair of tensors or an iterable of batches (e.g. a "
            f"DataLoader); got {type(data).__name__}."
        )
    xs, ys = _gather_batches([data] if one_batch else data, adapter)
    if not xs:
        raise ValueError("the train dataloader yielded no batches; there is no data to collect.")
    for y in ys:  # per batch: concatenation would promote integer labels mixed with floats
        _check_targets(y)
    try:
        X, Y = torch.cat(xs), torch.cat(ys)
    except RuntimeError as err:
        raise ValueError(
            f"batches have inconsistent shapes beyond the first dimension: {err}"
        ) from err
    _check_finite(X, "X")
    _check_finite(Y, "Y")
    n = X.shape[0]
    if n < _MIN_ROWS:
        raise ValueError(f"need at least {_MIN_ROWS} training rows; got {n}.")
    if max_samples is not None:
        integer = not isinstance(max_samples, bool) and int(max_samples) == max_samples
        if not integer or max_samples < _MIN_ROWS:
            raise ValueError(f"max_samples must be an integer >= {_MIN_ROWS}; got {max_samples!r}.")
        if max_samples < n:
            idx = _subset_rows(n, int(max_samples), generator).to(X.device)
            X, Y = X[idx], Y[idx]
    return X, Y


def leaves_rows_out(data: Any) -> bool:
    """Whether ``data`` is a ``DataLoader`` that shuffles and leaves rows out of each epoch
    (``drop_last`` with a partial last batch, a ``RandomSampler`` drawing fewer rows than the
    dataset holds or with replacement, a shuffling ``DistributedSampler`` that drops its tail)."""
    if not isinstance(data, DataLoader) or data.batch_size is None:
        return False
    sampler = data.sampler
    if isinstance(sampler, RandomSampler):
        partial = sampler.replacement or sampler.num_samples != len(sampler.data_source)
    elif isinstance(sampler, DistributedSampler) and sampler.shuffle:
        partial = sampler.drop_last
    else:
        return False
    return bool(partial or (data.drop_last and len(sampler) % data.batch_size))


def every_row_loader(data: Any) -> Any:
    """``data`` itself, or, where it :func:`leaves_rows_out`, a loader over every row of its
    dataset in order (same batch size, ``collate_fn`` and workers): the rows of one such epoch
    are a random subset, and the decision would be made on it."""
    if not leaves_rows_out(data):
        return data
    if type(data) is not DataLoader:  # a subclass may batch its own way: not rebuilt
        warnings.warn(
            f"this {type(data).__name__} shuffles and leaves rows out of each epoch, so the "
            "decision reads one epoch's random subset of the rows; pass every row as (X, Y) "
            "tensors to decide on all of them.",
            RuntimeWarning,
            stacklevel=4,
        )
        return data
    return DataLoader(
        data.dataset,
        batch_size=data.batch_size,
        collate_fn=data.collate_fn,
        num_workers=data.num_workers,
        worker_init_fn=data.worker_init_fn,
        multiprocessing_context=data.multiprocessing_context if data.num_workers else None,
    )


def _is_array(obj: Any) -> bool:
    """Array data that is not a torch tensor (numpy arrays, pandas frames, ...)."""
    return not isinstance(obj, torch.Tensor) and hasattr(obj, "__array__")


def _refuse_misplaced_data(data: Any, default_adapter: bool) -> None:
    """TypeError with its own advice for the common wrong forms of ``data``.

    Each would otherwise be iterated as batches and fail with "cannot read (x, y) from a
    batch ... pass batch_to_xy=", which is not the fix for any of them.
    """
    parts = list(data) if isinstance(data, (tuple, list)) and len(data) <= 3 else []
    if len(parts) == 2:
        loader, targets = parts
        batch_like = (torch.Tensor, tuple, list, Mapping)
        if (
            (isinstance(targets, torch.Tensor) or _is_array(targets))
            and isinstance(loader, Iterable)
            and not (isinstance(loader, batch_like) or _is_array(loader))
        ):
            raise TypeError(
                f"data is a {type(loader).__name__} given together with targets; a DataLoader "
                "already yields (x, y) batches, so pass it alone (REMLStopper(model, loader, "
                "optimizer=...)), or pass the tensors X and Y instead of the loader."
            )
    if default_adapter and (_is_array(data) or any(_is_array(p) for p in parts)):
        kinds = " and ".join(type(p).__name__ for p in parts) if parts else type(data).__name__
        raise TypeError(
            f"X and Y must be torch tensors; got {kinds}. Convert them first: "
            "X = torch.as_tensor(X, dtype=torch.float32), and Y likewise (float64 for a "
            "float64 model)."
        )
    if default_adapter and len(parts) == 3 and all(isinstance(p, torch.Tensor) for p in parts):
        raise TypeError(
            f"data is a {type(data).__name__} of 3 tensors; remlstop takes an (X, Y) pair. The "
            "theory (METHOD M1) is unweighted squared error, so per-row weights or other extra "
            "tensors have no place: pass (X, Y). For a DataLoader whose batches carry more, "
            "pass batch_to_xy=lambda b: (b[0], b[1])."
        )


def _check_finite(T: torch.Tensor, name: str) -> None:
    if (T.is_floating_point() or T.is_complex()) and not bool(torch.isfinite(T).all()):
        raise ValueError(f"{name} contains NaN or inf; clean the data before fitting.")


_KEY_SEED = 20260527
_KEY_CHUNK = 2**22  # values hashed at once


def row_keys(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """(n, 2) int64 keys of the rows of (X, Y), X (n, ...) and Y (n, ...): equal rows have equal
    keys wherever they sit in the data, distinct rows differ but with probability about 2^-64
    per key. Each key is Σ_j bits_ij a_j mod 2^64 over the bit patterns of the row's values
    (float64 for floats, int64 for integers, real and imaginary parts of complex numbers), with
    fixed random odd multipliers a_j: exact integer arithmetic, so a row's key does not depend
    on its batch or position, as a floating-point projection's rounding could."""
    n = X.shape[0]
    values = [_real(T.detach().reshape(n, -1)) for T in (X, Y)]
    width = sum(v.shape[1] for v in values)
    rng = np.random.default_rng(_KEY_SEED)
    multipliers = rng.integers(0, 2**63, size=(width, 2), dtype=np.uint64) * 2 + 1
    keys = np.zeros((n, 2), dtype=np.uint64)
    step = max(1, _KEY_CHUNK // max(1, width))
    for start in range(0, n, step):
        bits = np.concatenate([_bits(v[start : start + step]) for v in values], axis=1)
        with np.errstate(over="ignore"):
            keys[start : start + step] = bits @ multipliers
    return torch.from_numpy(keys.view(np.int64))


def _real(T: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor's values as real columns (complex ones as real and imaginary parts)."""
    return torch.view_as_real(T).flatten(1) if T.is_complex() else T


def _bits(block: torch.Tensor) -> np.ndarray:
    """The uint64 bit patterns of a block of real values: integers (and booleans) as int64,
    floats as float64 with -0.0 made 0.0 (equal values, equal bits)."""
    block = block.cpu()
    if block.is_floating_point():
        return (block.double() + 0.0).numpy().view(np.uint64)
    return block.long().numpy().view(np.uint64)


def _as_void(keys: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(keys.cpu().numpy()).view(np.dtype((np.void, 16))).ravel()


def find_rows(saved: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(index, missing): ``index`` into the rows of (X, Y) that gives the rows whose
    :func:`row_keys` are ``saved`` ((m, 2)), in that order, whatever the order of (X, Y) (a
    shuffled loader, another process's seed) and whether or not a ``max_samples`` subset was
    drawn from them; ``missing``, how many saved rows are not there (``index`` is then
    meaningless)."""
    have, want = _as_void(row_keys(X, Y)), _as_void(saved)
    have_order = np.argsort(have, kind="stable")
    want_order = np.argsort(want, kind="stable")
    have_sorted, want_sorted = have[have_order], want[want_order]
    # The j-th of several equal saved rows takes the j-th equal row given.
    repeat = np.arange(want.size) - np.searchsorted(want_sorted, want_sorted, side="left")
    position = np.searchsorted(have_sorted, want_sorted, side="left") + repeat
    found = position < have.size
    found[found] = have_sorted[position[found]] == want_sorted[found]
    index = np.zeros(want.size, dtype=np.int64)
    index[want_order[found]] = have_order[position[found]]
    return torch.from_numpy(index), int((~found).sum())
