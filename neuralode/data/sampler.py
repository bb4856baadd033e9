"""Shuffling that checkpoints cleanly and shards across DDP ranks.

The permutation of epoch ``e`` depends only on ``(seed, e)``, not on the global
RNG, so a resumed run sees exactly the batches the uninterrupted run would have
seen, including when it resumes in the middle of an epoch (``start``).

Under DDP every rank draws the same permutation and keeps every
``world_size``-th index from its ``rank`` on. Rank ``r``'s ``k``-th batch of
``B / world_size`` samples is then the ``r``-th share of the single-process
``k``-th batch of ``B``: the ranks together see exactly the global batch, which
is what makes a DDP step equal a one-process step.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 equal_shards: bool = True):
        """``equal_shards`` drops the last ``< world_size`` samples so every rank runs the same
        number of batches (DDP needs it for training); evaluation keeps every sample."""
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size, self.equal_shards = rank, world_size, equal_shards
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation and skip its first ``start`` samples (counted globally)."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        order = order[self.start:]
        if self.equal_shards:
            order = order[: len(order) // self.world_size * self.world_size]
        return iter(order[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        m = self.n - self.start
        if self.equal_shards:
            return m // self.world_size
        return len(range(self.rank, m, self.world_size))
