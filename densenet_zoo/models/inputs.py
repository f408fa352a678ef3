"""What input a DenseNet accepts: an (N, C, H, W) batch of its channels, large enough for its downsampling."""

from __future__ import annotations

from torch import Tensor

from .._utils import UsageError


def checked_input(x: Tensor, in_chans: int, min_size: int) -> Tensor:
    """``x`` after checking that it is an (N, in_chans, H, W) batch of at least min_size x min_size pixels."""
    if x.dim() != 4:
        hint = "; add a batch dimension with x.unsqueeze(0)" if x.dim() == 3 else ""
        raise UsageError(f"DenseNet expects a 4-D input (N, {in_chans}, H, W), got shape {list(x.shape)}{hint}")
    if x.shape[1] != in_chans:
        raise UsageError(f"input has {x.shape[1]} channels but the model was built with in_chans={in_chans}; "
                         f"convert the images or build the model with in_chans={x.shape[1]}")
    h, w = x.shape[-2], x.shape[-1]
    if h < min_size or w < min_size:
        raise UsageError(f"input of {h}x{w} pixels is too small for this DenseNet: it needs at least "
                         f"{min_size}x{min_size}; resize the images")
    return x


def final_map_size(size: int, num_blocks: int, small_inputs: bool) -> int:
    """Side of the final feature map for a square input of side ``size``: ``final_map_size(224, 4, False) == 7``."""
    if not small_inputs:
        size = (size + 2 * 3 - 7) // 2 + 1  # conv0 7x7/2
        size = (size + 2 * 1 - 3) // 2 + 1  # pool0 3x3/2
    for _ in range(num_blocks - 1):
        size //= 2  # transition pooling
    return size


def min_input_size(num_blocks: int, small_inputs: bool) -> int:
    """Smallest square input whose final feature map is at least 1x1."""
    size = 1
    while final_map_size(size, num_blocks, small_inputs) < 1:
        size += 1
    return size
