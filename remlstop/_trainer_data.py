"""The training data a Lightning ``Trainer`` trains on, for the callback (METHOD M1).

The rows come from ``trainer.train_dataloader``: only the batches ``limit_train_batches``
leaves when the order is fixed, every row of the dataset when a shuffled epoch leaves some
out (``drop_last``), and under DDP every rank's shard gathered back into the dataset's order,
so every rank holds the single-process data.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ._model import preserved_rng
from .data import collect_xy, leaves_rows_out

__all__ = ["distributed", "trainer_xy"]


def distributed(trainer: Any) -> bool:
    return (
        trainer.world_size > 1
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    )


def trainer_xy(trainer: Any, batch_to_xy: Callable | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training rows (X, Y) from ``trainer.train_dataloader``: the batches trained on, and
    under DDP every rank's shard gathered, so every rank holds the same full data."""
    loader = trainer.train_dataloader
    if loader is None:
        raise ValueError(
            "REMLEarlyStopping found no train dataloader; pass data=(X, Y) to the callback."
        )
    loader = _trained_batches(trainer, loader)
    if not distributed(trainer):
        return collect_xy(loader, batch_to_xy=batch_to_xy)
    local: tuple[torch.Tensor, torch.Tensor] | None = None
    error: str | None = None
    whole = leaves_rows_out(loader)
    # A shard that leaves shuffled rows out: rank 0 reads the whole dataset and sends it, so
    # every rank holds the same values even where the dataset augments at random.
    if not whole or trainer.global_rank == 0:
        try:
            local = collect_xy(loader, batch_to_xy=batch_to_xy)
        except (TypeError, ValueError) as err:  # every rank must reach the collective
            error = f"{type(err).__name__}: {err}"
    if whole:
        return _from_rank_zero(local, error)
    return _gather_full_data(trainer, loader, local, error)


def _from_rank_zero(
    local: tuple[torch.Tensor, torch.Tensor] | None, error: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0's (X, Y) on every rank."""
    payload: list[Any] = [
        ("error", error) if local is None else ("ok", (local[0].cpu(), local[1].cpu()))
    ]
    torch.distributed.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise ValueError(f"REMLEarlyStopping could not collect the training data: {value}")
    return value


def _trained_batches(trainer: Any, loader: Any) -> Any:
    """The batches training uses: all of them, or the first ``limit_train_batches`` when the
    loader's order is fixed (a shuffled loader visits every row over the epochs)."""
    try:
        total = len(loader)
    except TypeError:
        return loader
    used = trainer.num_training_batches
    if not math.isfinite(used) or used >= total:
        return loader
    sampler = getattr(loader, "sampler", None)
    fixed = isinstance(sampler, torch.utils.data.SequentialSampler) or (
        isinstance(sampler, torch.utils.data.DistributedSampler) and not sampler.shuffle
    )
    if fixed:
        # A DataLoader's iterator draws its base seed from the global generator.
        with preserved_rng():
            return list(itertools.islice(loader, int(used)))
    warnings.warn(
        f"limit_train_batches leaves {int(used)} of {total} batches per epoch; the loader "
        "shuffles, so training visits every row over the epochs, and the kernel uses them all.",
        RuntimeWarning,
        stacklevel=3,
    )
    return loader


def _sampler_indices(loader: Any, rows: int) -> list[int] | None:
    """Dataset indices of this rank's ``rows`` collected rows, when the loader's order is known.

    Known for a plain ``torch.utils.data.DistributedSampler`` (what Lightning injects under DDP):
    it draws from its own seeded generator, so iterating it again yields the batches' order; a
    batch ``drop_last`` only drops the tail.
    """
    sampler = getattr(loader, "sampler", None)
    if type(sampler) is not torch.utils.data.DistributedSampler:
        return None
    indices = [int(i) for i in iter(sampler)]
    if len(indices) < rows:
        return None
    return indices[:rows]


def _gather_full_data(
    trainer: Any, loader: Any, local: tuple[torch.Tensor, torch.Tensor] | None, error: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' (X, Y) shards on every rank, in the dataset's order when it is known.

    With Lightning's ``DistributedSampler`` each row is put back at its dataset index: the rows
    then equal the single-process data (same order), and the sampler's padding rows (repeats
    that make the shards equal in size) are counted once. Otherwise the shards are concatenated.
    """
    if local is None:
        payload: tuple[str, Any] = ("error", error)
    else:
        X, Y = local[0].detach().cpu(), local[1].detach().cpu()
        payload = ("ok", (X, Y, _sampler_indices(loader, X.shape[0])))
    shards: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(shards, payload)
    errors = [f"rank {r}: {p[1]}" for r, p in enumerate(shards) if p[0] == "error"]
    if errors:
        raise ValueError(
            "REMLEarlyStopping could not collect the training data: " + "; ".join(errors)
        )
    xs, ys, idxs = zip(*(p[1] for p in shards), strict=True)
    if any(i is None for i in idxs):
        return torch.cat(xs), torch.cat(ys)
    index = torch.cat([torch.as_tensor(i, dtype=torch.long) for i in idxs])
    order = torch.unique(index)  # sorted; a padded index appears twice, with the same row
    n = int(index.max()) + 1
    X_all = xs[0].new_empty((n, *xs[0].shape[1:]))
    Y_all = ys[0].new_empty((n, *ys[0].shape[1:]))
    X_all[index] = torch.cat(xs)
    Y_all[index] = torch.cat(ys)
    return X_all[order], Y_all[order]


# ------------------------------------------------------------------------------- the body
