"""The named strategies (``bottleneck``, ``efficient``, ``shared``, ``norms``, ``layer``, ``fused``,
``fused_lean``, ``block``): what each keeps for backward and what it recomputes, built on
:mod:`.base`, the recomputing function of :mod:`.recompute` and the fused block of :mod:`.fused`."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import MemoryStrategy, any_requires_grad, checkpoint_once, custom_functions_unavailable, needs_graph
from .fused import fused_block_forward, fused_supported
from .stem import fused_stem_forward, stem_supported
from .transition import fused_transition_forward, transition_supported
from .recompute import SharedBuffer, SharedConcat, Stage, run_stages

if TYPE_CHECKING:  # pragma: no cover
    from ..models.densenet import _DenseBlock, _DenseLayer

#: The shared feature buffer of the block being run ("shared" strategies), per thread.
_LOCAL = threading.local()


class BottleneckCheckpoint(MemoryStrategy):
    """torchvision's ``memory_efficient=True``: recompute concat + norm1 + relu1 + conv1 in backward.

    Only the inputs of the bottleneck (the earlier features, kept anyway) are stored for it.
    """

    name = "bottleneck"
    description = "recompute concat+norm1+relu1+conv1 in backward (torchvision's memory_efficient=True)"

    def layer_forward(self, layer: "_DenseLayer", features: List[Tensor]) -> Tensor:
        if not any_requires_grad(features):
            return super().layer_forward(layer, features)
        bottleneck = checkpoint_once(lambda *xs: layer.bottleneck(list(xs)), *features, norms=[layer.norm1])
        return layer.composite(bottleneck)


def _layer_checkpoint(layer: "_DenseLayer", features: List[Tensor]) -> Tensor:
    return checkpoint_once(lambda *xs: layer.composite(layer.bottleneck(list(xs))), *features, norms=[layer.norm1, layer.norm2])


class RecomputedNorms(MemoryStrategy):
    """Keep the earlier features; recompute concat + norm1 + relu1 in backward, not conv1.

    Checkpointing (``"bottleneck"``) runs conv1 forward again in backward although conv1's backward
    needs only its input; here conv1's backward runs directly on the recomputed activation. Options
    (used by the registered subclasses): ``shared`` writes every feature into one pre-allocated
    buffer per block, which is also the block's output (no separate concatenation copies);
    ``second_stage`` also recomputes norm2 + relu2 (keeping only conv1's output);
    ``whole_layer`` keeps only the layer's input and recomputes conv1 as well (not conv2).
    """

    name = "efficient"
    description = "recompute concat+norm1+relu1 in backward; conv1 is not run twice"
    shared = False
    second_stage = False
    whole_layer = False

    def _fallback(self, layer: "_DenseLayer", features: List[Tensor]) -> Tensor:
        if self.whole_layer:
            return _layer_checkpoint(layer, features)
        return _BOTTLENECK.layer_forward(layer, features)

    def layer_forward(self, layer: "_DenseLayer", features: List[Tensor]) -> Tensor:
        if not needs_graph(features, layer):
            return super().layer_forward(layer, features)
        if custom_functions_unavailable() or not (Stage.supported(layer.conv1) and Stage.supported(layer.conv2)):
            return self._fallback(layer, features)
        holder = getattr(_LOCAL, "buffer", None)
        channels = sum(f.shape[1] for f in features)
        shared = (holder, channels) if holder is not None and holder.filled == channels else None
        first = Stage(layer.norm1, layer.relu1, layer.conv1)
        second = Stage(layer.norm2, layer.relu2, layer.conv2)
        if self.whole_layer:
            out = run_stages([first, second], features, shared)
        else:
            bottleneck = run_stages([first], features, shared)
            if not self.second_stage:
                return layer.composite(bottleneck)
            out = run_stages([second], [bottleneck])
        if layer.drop_rate > 0:
            out = F.dropout(out, p=layer.drop_rate, training=layer.training)
        return out

    def block_forward(self, block: "_DenseBlock", x: Tensor) -> Tensor:
        if not self.shared or not needs_graph([x], block) or custom_functions_unavailable():
            return super().block_forward(block, x)
        layers = list(block.values())
        total = x.shape[1] + sum(layer.conv2.out_channels for layer in layers)
        holder = SharedBuffer(x.new_empty((x.shape[0], total) + tuple(x.shape[2:])))
        with torch.no_grad():
            holder.buffer[:, : x.shape[1]].copy_(x)
        holder.filled = x.shape[1]
        features = [x]
        previous, _LOCAL.buffer = getattr(_LOCAL, "buffer", None), holder
        try:
            for layer in layers:
                out = layer(features)
                with torch.no_grad():
                    holder.buffer[:, holder.filled : holder.filled + out.shape[1]].copy_(out)
                holder.filled += out.shape[1]
                features.append(out)
        finally:
            _LOCAL.buffer = previous
        holder.guard.version = holder.buffer._version
        return SharedConcat.apply(holder, *features)


class SharedRecomputedNorms(RecomputedNorms):
    name = "shared"
    description = "'efficient' + features written into one shared buffer per block (Pleiss et al. 2017)"
    shared = True


class RecomputedBothNorms(RecomputedNorms):
    name = "norms"
    description = "'shared' + norm2/relu2 recomputed too: keeps only conv1's output per layer"
    shared = True
    second_stage = True


class RecomputedLayer(RecomputedNorms):
    name = "layer"
    description = "keep only each layer's k new channels (shared buffer); recompute norms, relus and conv1"
    shared = True
    whole_layer = True


class FusedBlock(RecomputedBothNorms):
    """The whole block as one autograd function (see :mod:`densenet_zoo.memory.fused`), keeping conv1's outputs.

    Where every block runs fused, the ImageNet stem and the standard transitions are one function
    each as well (:mod:`.stem`, :mod:`.transition`). Blocks it cannot run exactly (other norms,
    dropout, ``torch.compile``, an input that is not in the autocast dtype under autocast) run
    ``"norms"``, and the stem and transitions then run as in normal mode.
    """

    name = "fused"
    description = "one function per block, stem and transition: channels-last shared buffer, chunked norm1+conv1, keeps conv1's outputs"
    keep_bottleneck = True

    def prefers_channels_last(self, blocks: List["_DenseBlock"]) -> bool:
        # Only when every block runs fused: elsewhere channels-last would change nothing but the
        # order in which dropout draws its random numbers.
        return all(fused_supported(b) for b in blocks)

    def block_forward(self, block: "_DenseBlock", x: Tensor) -> Tensor:
        if needs_graph([x], block) and fused_supported(block, x):
            return fused_block_forward(block, x, self.keep_bottleneck)
        return super().block_forward(block, x)

    def sequence_forward(self, modules: List[nn.Module], x: Tensor) -> Tensor:
        # the ImageNet stem and standard transitions as one function each too (memory/stem.py, memory/transition.py)
        if any(needs_graph([x], m) for m in modules):
            if transition_supported(modules, x):
                return fused_transition_forward(modules, x)
            if stem_supported(modules, x):
                return fused_stem_forward(modules, x, keep_conv=self.keep_bottleneck)
        return super().sequence_forward(modules, x)


class FusedBlockLean(FusedBlock):
    """``"fused"`` that keeps only the block buffers and the input image, recomputing conv1 and conv0 in backward.

    Falls back to ``"layer"``, with the stem and transitions checkpointed.
    """

    name = "fused_lean"
    description = "'fused' keeping only each block's output and the input image; recomputes conv1 and conv0 in backward"
    recompute_stem_and_transitions = True
    keep_bottleneck = False
    second_stage = False
    whole_layer = True


class BlockCheckpoint(MemoryStrategy):
    """Segment checkpointing: keep each block's input only; the whole block runs again in backward."""

    name = "block"
    description = "checkpoint each dense block: keep its input, rerun the block (normal mode) in backward"

    def block_forward(self, block: "_DenseBlock", x: Tensor) -> Tensor:
        if not needs_graph([x], block):
            return super().block_forward(block, x)
        return checkpoint_once(lambda t: MemoryStrategy.block_forward(self, block, t), x, norms=[block])



_BOTTLENECK = BottleneckCheckpoint()

#: The strategies this package registers, in the order ``list_memory_strategies()`` shows them (after ``none``).
BUILTIN = (_BOTTLENECK, RecomputedNorms(), SharedRecomputedNorms(), RecomputedBothNorms(), RecomputedLayer(),
           FusedBlock(), FusedBlockLean(), BlockCheckpoint())
