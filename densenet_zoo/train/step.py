"""One training step's pieces: forward/backward with AMP and accumulation, metric sums, the
optimizer step, the progress bar and the per-epoch row."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, ContextManager, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def accumulation(micro: int, accum_steps: int, micro_per_epoch: int) -> Tuple[int, bool]:
    """``(size of the accumulation group of micro-batch micro, whether it ends that group)``.

    The last group of an epoch may be shorter; its loss is divided by its own size.
    """
    group_start = micro - micro % accum_steps
    group = min(accum_steps, micro_per_epoch - group_start)
    return group, micro + 1 == group_start + group


def autocast_for(device: torch.device, dtype: Optional[torch.dtype]) -> Callable[[], ContextManager[Any]]:
    """A factory of autocast contexts for ``dtype`` (``None``: full precision)."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, group: int, autocast: Callable[[], ContextManager[Any]],
                     label_smoothing: float, scaler: Optional[Any]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward under ``autocast``, backward of the loss divided by the accumulation ``group``; returns (loss, logits)."""
    with autocast():
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    scaled = loss / group
    (scaler.scale(scaled) if scaler else scaled).backward()
    return loss, logits


@torch.no_grad()
def batch_sums(loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """``[loss sum, top-1 hits, top-k hits, count]`` of one batch (float64, on the batch's device)."""
    top = logits.detach().float().topk(k, 1).indices
    hit = top.eq(y[:, None])
    return torch.stack([loss.detach().double() * len(y), hit[:, 0].sum().double(), hit.any(1).sum().double(),
                        torch.tensor(float(len(y)), dtype=torch.float64, device=y.device)])


def gradients_finite(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """Whether every accumulated gradient is finite, as a 0-dim bool tensor (one reduction, no host sync)."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return torch.tensor(True)
    return torch.stack([torch.isfinite(g).all() for g in grads]).all()


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float, scaler: Optional[Any]) -> None:
    """Clip the accumulated gradients' global norm to ``max_norm`` (unscaled first under the fp16 scaler)."""
    if scaler:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, max_norm)


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Optional[Any], apply: bool = True) -> None:
    """Apply the accumulated gradients (through the fp16 scaler when there is one), then advance the schedule.

    ``apply=False`` drops them instead (a step skipped for a non-finite loss or gradient); the schedule
    still advances, as it does when the fp16 scaler skips a step.
    """
    if apply and scaler:
        scaler.step(optimizer)
        scaler.update()
    elif apply:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


class EpochProgress:
    """A tqdm bar over an epoch's micro-batches showing loss, accuracy and images/s (or nothing)."""

    def __init__(self, show: bool, total: int, initial: int, desc: str, world_size: int = 1) -> None:
        self.bar = None
        if show:
            from tqdm.auto import tqdm  # optional: only imported when a bar is shown

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="batch", leave=False)
        self.total, self.world_size = total, world_size
        self.start, self.seen = time.perf_counter(), 0

    def update(self, micro: int, batch: int, totals: Callable[[], torch.Tensor]) -> None:
        """Count a micro-batch of ``batch`` images; ``totals()`` gives the epoch's metric sums for the bar."""
        self.seen += batch
        if self.bar is None:
            return
        self.bar.update(1)
        if micro % 5 == 0 or micro + 1 == self.total:
            tot = totals().tolist()
            self.bar.set_postfix(loss=f"{tot[0] / max(tot[3], 1):.3f}", acc=f"{100 * tot[1] / max(tot[3], 1):.1f}%",
                                 img_s=f"{self.seen * self.world_size / self.elapsed():.0f}")

    def elapsed(self) -> float:
        """Seconds since the epoch started."""
        return max(time.perf_counter() - self.start, 1e-9)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def epoch_row(epoch: int, lr: float, train: Sequence[float], val: Dict[str, Any], images: int, seconds: float) -> Dict[str, Any]:
    """The ``metrics.csv`` row of an epoch from the summed train metrics and the val result."""
    return {
        "epoch": epoch + 1, "lr": lr,
        # max(count, 1): an epoch whose every step was skipped as non-finite reports zeros, not a division by zero
        "train_loss": train[0] / max(train[3], 1), "train_acc1": 100 * train[1] / max(train[3], 1),
        "train_acc5": 100 * train[2] / max(train[3], 1),
        "val_loss": val["loss"], "val_acc1": val["acc1"], "val_acc5": val["acc5"],
        "train_images_per_s": images / seconds, "epoch_time_s": seconds,
    }
