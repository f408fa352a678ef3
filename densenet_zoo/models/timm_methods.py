"""The methods timm calls on a model (feature maps, pruning, gradient checkpointing, optimizer groups), on DenseNet
through a mixin."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple, Union

import torch
from torch import Tensor

from .features import Indices, forward_intermediates, prune_intermediate_layers

# timm's MATCH_PREV_GROUP: a parameter group that joins the group before it (layer-wise decay).
JOIN_PREVIOUS_GROUP = (99999,)


class TimmMethodsMixin:
    """What timm calls on a DenseNet: feature maps, pruning, gradient checkpointing, optimizer groups."""

    @torch.jit.ignore
    def forward_intermediates(
        self, x: Tensor, indices: Indices = None, norm: bool = False, stop_early: bool = False,
        output_fmt: str = "NCHW", intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Final features and the feature maps ``indices`` (0 stem, 1..n blocks), with timm's arguments;
        see :func:`densenet_zoo.models.features.forward_intermediates`."""
        return forward_intermediates(self, x, indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
                                     intermediates_only=intermediates_only)

    @torch.jit.ignore
    def prune_intermediate_layers(self, indices: Indices = 1, prune_norm: bool = False, prune_head: bool = True) -> List[int]:
        """Keep only what the taps ``indices`` need (timm's interface); returns their absolute indices.
        ``prune_norm`` has no effect: ``norm5`` belongs to the last tap."""
        return prune_intermediate_layers(self, indices, prune_head=prune_head)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> Any:
        """timm's name for ``set_memory_efficient``: ``"bottleneck"`` checkpointing on or off."""
        return self.set_memory_efficient("bottleneck" if enable else "none")

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for timm's optimizer factory (layer-wise decay): the stem, then each dense layer
        (``coarse``: each block), a transition joining the group before it; ``norm5`` and the classifier last."""
        if coarse:
            blocks: Any = r"^features\.(?:denseblock|transition)(\d+)\."
        else:
            blocks = [(r"^features\.denseblock(\d+)\.denselayer(\d+)\.", None),
                      (r"^features\.transition(\d+)\.", JOIN_PREVIOUS_GROUP)]
        return dict(stem=r"^features\.(?:conv0|norm0)\.", blocks=blocks)
