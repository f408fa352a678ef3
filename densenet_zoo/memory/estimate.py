"""How much memory a training step will keep for backward, estimated before anything large is allocated.

A DenseNet's saved activations grow with the pixels of its input and with the batch: measured exactly
(:class:`~densenet_zoo.memory.base.SavedTensorBytes`) for one small image on a copy of the model and
scaled, they tell whether a run can fit at all. A configuration that cannot is refused up front with
the estimate and a way out, instead of being found out by the allocator (or by the machine swapping).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn

from .._utils import DataError
from ..hardware import available_memory
from .base import SavedTensorBytes

__all__ = ["activation_bytes", "check_fits"]

#: Side of the image the saved bytes are measured at (or the model's smallest, if larger).
PROBE_SIZE = 64
GIB = 2 ** 30


def activation_bytes(model: nn.Module, image_size: int, batch_size: int, *, strategy: Optional[str] = None) -> int:
    """Bytes a training forward of ``batch_size`` images of ``image_size`` pixels keeps for backward.

    Args:
        model: the network (left untouched: a copy is measured).
        image_size: side of the training images.
        batch_size: images per step (per process).
        strategy: the memory strategy to measure the copy with; ``None`` keeps the model's own.

    Returns:
        The estimate in bytes: the exact saved bytes per probe image, scaled by pixels and batch.

    Example:
        activation_bytes(densenet121(), 224, 16) / 2**30    # about 1.6 GiB in normal mode
    """
    probe = min(image_size, max(PROBE_SIZE, int(getattr(model, "min_input_size", 1))))
    param = next(model.parameters())
    twin = copy.deepcopy(model).train()
    if strategy is not None:
        twin.set_memory_efficient(strategy)
    # Two images: a norm over a 1x1 map needs more than one value per channel in training mode.
    x = torch.zeros(2, int(getattr(model, "in_chans", 3)), probe, probe, device=param.device, dtype=param.dtype)
    with torch.enable_grad(), SavedTensorBytes(exclude=twin.parameters()) as saved:
        twin(x)
    return int(saved.bytes / 2 * (image_size / probe) ** 2 * batch_size)


def check_fits(model: nn.Module, image_size: int, batch_size: int, device: torch.device, what: str) -> None:
    """Refuse a training configuration whose saved activations alone exceed the memory this process can get.

    Args:
        model: the network as it will train (its memory strategy included).
        image_size: side of the training images.
        batch_size: images per step in this process.
        device: where it trains.
        what: the configuration in the user's words (``"--image-size 100000 --batch-size 32"``).

    Raises:
        DataError: one line with the estimate, the memory available, and smaller settings to try.

    Example:
        check_fits(model, 224, 32, torch.device("cpu"), "--image-size 224 --batch-size 32")
    """
    room = available_memory(device)
    if room is None:
        return
    try:
        need = activation_bytes(model, image_size, batch_size)
    except Exception:  # noqa: BLE001 - the estimate is a guard, not a gate: a model it cannot probe trains as before
        return
    if need <= room:
        return
    hint = "a smaller --image-size or --batch-size"
    if getattr(getattr(model, "memory_strategy", None), "name", "none") != "fused_lean":
        lean = activation_bytes(model, image_size, batch_size, strategy="fused_lean")
        hint += f", or --memory-efficient fused_lean (about {lean / GIB:.1f} GiB)" if lean <= room else ""
    raise DataError(f"{what}: a training step would keep about {need / GIB:.1f} GiB of activations for backward, "
                    f"more than the {room / GIB:.1f} GiB this process can use on {device}; use {hint}")
