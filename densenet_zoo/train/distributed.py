"""This process's place in a distributed run (rank, world size, device) and the sum of a tensor over ranks."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .._utils import UsageError


@dataclass
class Dist:
    """Rank, world size and device of this process; ``setup`` joins torchrun's process group."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @classmethod
    def setup(cls, device: str = "auto") -> "Dist":
        """Use an existing process group, or start one when launched by torchrun (``WORLD_SIZE`` > 1).

        Example::

            d = Dist.setup("auto")   # gloo on CPU, nccl on CUDA
        """
        if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
            raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
        cuda = torch.cuda.is_available() and device != "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is available; use --device cpu")
        owns = False
        if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group("nccl" if cuda else "gloo")
            owns = True
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        if cuda:
            index = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else (int(device[5:]) if device.startswith("cuda:") else 0)
            torch.cuda.set_device(index)
            dev = torch.device("cuda", index)
        else:
            dev = torch.device("cpu")
        return cls(rank, world, dev, owns)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum of ``t`` over all ranks (``t`` itself in a single process), on the CPU."""
    if d.world_size == 1:
        return t.cpu()
    backend_dev = d.device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = t.to(backend_dev).clone()
    dist.all_reduce(t)
    return t.cpu()
