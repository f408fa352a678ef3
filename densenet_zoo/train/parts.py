"""Pieces of the training loop: process group, sampling, freezing, parameter groups, evaluation."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Sampler

from .._utils import UsageError
from ..weights import get_weights, read_safetensors


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


def _stages(model: nn.Module) -> List[List[str]]:
    """Children of ``model.features`` grouped as stem, (block 1 + transition 1), ..., norm5."""
    names = list(getattr(model, "features", nn.Module())._modules)
    stages: List[List[str]] = [[]]
    for name in names:
        if name.startswith("denseblock"):
            stages.append([name])
        elif name == "norm5":
            stages.append([name])
        else:
            stages[-1].append(name)
    return stages


def apply_freeze(model: nn.Module, freeze: str) -> List[nn.Module]:
    """Stop gradients to ``"features"`` or to everything up to and including ``"blockN"``
    (and its transition); returns the frozen modules, whose norm layers stay in eval mode
    (running statistics of a frozen part are not updated). ``"none"`` freezes nothing.

    Example::

        apply_freeze(model, "block2")
    """
    if freeze == "none":
        return []
    features = getattr(model, "features", None)
    if features is None:
        raise UsageError(f"--freeze {freeze} needs a model with a 'features' part")
    names = list(features._modules)
    if freeze == "features":
        chosen = names
    else:
        n = int(freeze[5:])
        blocks = [x for x in names if x.startswith("denseblock")]
        if not 1 <= n <= len(blocks):
            raise UsageError(f"--freeze {freeze}: this model has {len(blocks)} dense blocks; use none, features or block1..block{len(blocks)}")
        end = names.index(f"denseblock{n}") + 1
        if end < len(names) and names[end].startswith("transition"):
            end += 1
        chosen = names[:end]
    frozen = [features._modules[x] for x in chosen]
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)
    return frozen


def set_train_mode(model: nn.Module, frozen: List[nn.Module]) -> None:
    model.train()
    for m in frozen:
        m.eval()


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float = 1.0) -> List[Dict[str, Any]]:
    """Optimizer groups of the trainable parameters.

    Discriminative learning rates: with ``layer_decay`` d < 1 the head (norm5 + classifier) gets
    ``lr``, dense block k of n (with its transition) ``lr * d**(n - k + 1)``, the stem
    ``lr * d**(n + 1)``. Biases and norm parameters (1-D) get no weight decay.

    Example::

        torch.optim.SGD(param_groups(model, 0.1, 1e-4, layer_decay=0.7), lr=0.1)
    """
    stages = _stages(model)
    n_blocks = sum(1 for s in stages if s and s[0].startswith("denseblock"))
    mult: Dict[str, float] = {}
    for i, stage in enumerate(stages):
        is_head = stage == ["norm5"]
        for name in stage:
            mult[f"features.{name}."] = 1.0 if is_head else layer_decay ** (n_blocks + 1 - i)
    groups: Dict[tuple, Dict[str, Any]] = {}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        m = next((v for k, v in mult.items() if pname.startswith(k)), 1.0)
        wd = 0.0 if p.ndim <= 1 else weight_decay
        g = groups.setdefault((m, wd), {"params": [], "lr": lr * m, "weight_decay": wd})
        g["params"].append(p)
    if not groups:
        raise UsageError("no trainable parameters left; use a smaller --freeze")
    return [groups[k] for k in sorted(groups)]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


@torch.no_grad()
def evaluate_loader(model: nn.Module, loader: Any, num_classes: int, d: Optional[Dist] = None, *,
                    amp_dtype: Optional[torch.dtype] = None, confusion: bool = False) -> Dict[str, Any]:
    """Loss, top-1 and top-5 accuracy (%) over ``loader``, summed over ranks; optionally the confusion matrix.

    Example::

        evaluate_loader(model, val_loader, 10)["acc1"]
    """
    d = d or Dist()
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    sums = torch.zeros(4, dtype=torch.float64)
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for x, y in loader:
        x, y = x.to(d.device), y.to(d.device)
        with torch.autocast(d.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        logits = logits.float()
        top = logits.topk(k, 1).indices
        hit = top.eq(y[:, None])
        sums += torch.tensor([F.cross_entropy(logits, y, reduction="sum").item(), hit[:, 0].sum().item(), hit.any(1).sum().item(), len(y)], dtype=torch.float64)
        if confusion:
            matrix += torch.bincount(y.cpu() * num_classes + top[:, 0].cpu(), minlength=num_classes**2).view(num_classes, num_classes)
    model.train(was_training)
    tot = reduce_sum(sums, d).tolist()
    n = max(tot[3], 1)
    out: Dict[str, Any] = {"loss": tot[0] / n, "acc1": 100 * tot[1] / n, "acc5": 100 * tot[2] / n, "count": int(tot[3])}
    if confusion:
        out["confusion"] = reduce_sum(matrix, d).long()
    return out


def make_optimizer(name: str, groups: List[Dict[str, Any]], lr: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    """``"sgd"`` (Nesterov when ``momentum`` > 0) or ``"adamw"`` over ``groups``: ``make_optimizer("sgd", param_groups(model, 0.1, 1e-4), 0.1)``."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)


def weights_preprocessing(model: str, source: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Preprocessing of the weights a run starts from: the registry entry's, or the metadata of a
    safetensors file written by :func:`~densenet_zoo.save_model`; ``None`` when unknown.

    Example::

        weights_preprocessing("densenet121")["crop_size"]  # -> 224
    """
    if source and Path(source).is_file() and source.endswith(".safetensors"):
        pre = read_safetensors(source)[1].get("preprocessing")
        return dict(pre) if pre else None
    try:
        info = get_weights(source if source and "." in source else model)
    except (LookupError, ValueError, RuntimeError):  # e.g. a URL: no registry entry to read
        return None
    pre = getattr(info, "preprocessing", None)
    return dict(pre) if pre else None
