"""A torch ``Dataset`` of ``(image tensor, label)`` read from ``(path, label)`` samples, seeded per sample."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from .._utils import DataError
from .images import UnreadableImageError, open_image
from .splits import Sample


class ImageDataset(Dataset):
    """``(image tensor, label)`` pairs from ``(path, label)`` samples.

    Example::

        ds = ImageDataset(splits.train, train_transform(pre), seed=0); ds.set_epoch(3)

    With ``seed`` set, the random transform of sample ``i`` in epoch ``e`` is seeded from
    ``(seed, e, i)`` inside a forked RNG: the same in any worker, on any rank, after any resume,
    and the caller's RNG stream is untouched.
    """

    def __init__(self, samples: Sequence[Sample], transform: Any, *, in_chans: int = 3, seed: Optional[int] = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.in_chans = in_chans
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            img = open_image(path, self.in_chans)
        except UnreadableImageError as exc:  # changed after the check at start: say which file
            raise DataError(f"{exc}; fix or remove it") from None
        if self.seed is None:
            return self.transform(img), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch * 100_003 + index) % (2**63))
            return self.transform(img), label
