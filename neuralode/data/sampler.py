"""Shuffling that checkpoints cleanly.

The permutation of epoch ``e`` depends only on ``(seed, e)``, not on the global
RNG, so a resumed run sees exactly the batches the uninterrupted run would have
seen, including when it resumes in the middle of an epoch (``start``).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation and skip its first ``start`` samples."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        return iter(order[self.start:].tolist())

    def __len__(self) -> int:
        return self.n - self.start
