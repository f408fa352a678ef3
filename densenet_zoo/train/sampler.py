"""Which samples each rank trains on, batch by batch: seeded per epoch, resumable mid-epoch."""

from __future__ import annotations

import math
from typing import Iterator, List

import torch
from torch.utils.data import Sampler


class EpochBatchSampler(Sampler[List[int]]):
    """Batches of this rank for one epoch: a permutation seeded by ``(seed, epoch)``, padded to a
    multiple of the world size by repeating its start (as ``DistributedSampler``), then rank ``r``
    takes positions ``r, r + world, ...``.

    Example::

        s = EpochBatchSampler(100, 16, seed=0); s.set_epoch(2, skip=3)   # resume at batch 3 of epoch 2

    With a global batch ``B = world * b``, the ranks' batch ``k`` together hold exactly positions
    ``kB .. (k+1)B - 1`` of the permutation: the same samples as batch ``k`` of one process with
    batch ``B``. ``skip`` drops the batches already trained on.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> List[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        total = math.ceil(self.n / self.world) * self.world
        perm += perm[: total - self.n]
        return perm[self.rank :: self.world]

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.n / self.world) / self.batch_size)

    def __iter__(self) -> Iterator[List[int]]:
        idx = self._indices()
        for k in range(self.skip, len(self)):
            yield idx[k * self.batch_size : (k + 1) * self.batch_size]
