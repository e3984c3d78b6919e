"""Batches for training: endless, reshuffled every epoch, resumable, and sharded by rank.

:func:`batch_stream` is a function of ``(seed, position)``: a resumed run sees the data
an uninterrupted one would have seen, and the ranks of a torchrun job together see the
global batch that one process would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from vqgen.core.errors import VqgenError

__all__ = ["batch_stream"]


class _EpochBatches:
    """Index batches, a fresh permutation per epoch, starting at batch ``start``.

    Each global batch holds ``batch_size × world`` indices; rank ``r`` gets the
    ``r``-th slice, so the ranks together see what one process with the global
    batch would.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.rank, self.world = rank, world
        self.global_batch = batch_size * world
        self.drop_last = n >= self.global_batch
        self.per_epoch = n // self.global_batch if self.drop_last else 1

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.start, self.per_epoch)
        g0, bs = self.rank * self.batch_size, self.batch_size
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            for b in range(offset, self.per_epoch):
                batch = perm[b * self.global_batch : (b + 1) * self.global_batch]
                yield batch[g0 : g0 + bs] if self.world > 1 else batch
            epoch, offset = epoch + 1, 0


def batch_stream(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int = 0,
    start: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world: int = 1,
) -> Iterator[Any]:
    """Endless collated batches; reshuffled every epoch, a function of ``(seed, position)``.

    ``start`` skips that many batches (without loading them), so a resumed run sees
    the data an uninterrupted one would have seen. With ``world > 1`` this process
    gets slice ``rank`` of each global batch of ``batch_size × world`` samples.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise VqgenError("the dataset is empty")
    if world > 1 and n < batch_size * world:
        raise VqgenError(
            f"the dataset has {n} samples, fewer than one global batch of {batch_size} × "
            f"{world} processes; lower batch_size"
        )
    sampler = _EpochBatches(n, batch_size, seed, start, rank, world)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,  # type: ignore[arg-type]
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # leaves the global RNG alone
    )
    yield from loader
