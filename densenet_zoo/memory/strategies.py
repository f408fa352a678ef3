"""The named strategies (``bottleneck``, ``efficient``, ``shared``, ``norms``, ``layer``, ``fused``,
``fused_lean``, ``block``), each built from explicit parts: what it keeps for backward, what it
recomputes, and the strategy that runs where it cannot (its ``fallback``).

Three kinds do the work: checkpointing a part of the network (:class:`BottleneckCheckpoint`,
:class:`LayerCheckpoint`, :class:`BlockCheckpoint`, :class:`StemTransitionCheckpoint`), per-layer
recomputation with the autograd function of :mod:`.recompute` (:class:`PerLayerRecompute`, what it
recomputes named by :class:`Recomputed`), and the fused stem, block and transition functions
(:class:`FusedStrategy`).
"""

from __future__ import annotations

import enum
import threading
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import MemoryStrategy, any_requires_grad, checkpoint_once, custom_functions_unavailable, needs_graph
from .fused_block import fused_block_forward, fused_supported
from .fused_op import fused_block_op_forward, op_supported
from .fused_stem import fused_stem_forward, stem_supported
from .fused_transition import fused_transition_forward, transition_supported
from .recompute import SharedBuffer, SharedConcat, Stage, run_stages

#: The shared feature buffer of the block being run (``shared_buffer`` strategies), per thread.
_LOCAL = threading.local()


class BottleneckCheckpoint(MemoryStrategy):
    """torchvision's ``memory_efficient=True``: recompute concat + norm1 + relu1 + conv1 in backward.

    Only the inputs of the bottleneck (the earlier features, kept anyway) are stored for it.
    """

    name = "bottleneck"
    description = "recompute concat+norm1+relu1+conv1 in backward (torchvision's memory_efficient=True)"
    keeps = "the earlier features, conv1's output and relu2's output"
    recomputes = "concat + norm1 + relu1 + conv1"

    def layer_forward(self, layer: nn.Module, features: List[Tensor]) -> Tensor:
        if not any_requires_grad(features):
            return super().layer_forward(layer, features)
        bottleneck = checkpoint_once(lambda *xs: layer.bottleneck(list(xs)), *features, norms=[layer.norm1])
        return layer.composite(bottleneck)


class LayerCheckpoint(MemoryStrategy):
    """Checkpoint each dense layer whole: keep its inputs, rerun the layer in backward (``"layer"``'s fallback)."""

    name = "layer_checkpoint"
    description = "checkpoint each dense layer: keep its inputs, rerun the layer in backward"
    keeps = "the earlier features"
    recomputes = "the whole layer"

    def layer_forward(self, layer: nn.Module, features: List[Tensor]) -> Tensor:
        if not needs_graph(features, layer):
            return super().layer_forward(layer, features)
        return checkpoint_once(lambda *xs: layer.composite(layer.bottleneck(list(xs))), *features,
                               norms=[layer.norm1, layer.norm2])


class BlockCheckpoint(MemoryStrategy):
    """Segment checkpointing: keep each block's input only; the whole block runs again in backward."""

    name = "block"
    description = "checkpoint each dense block: keep its input, rerun the block (normal mode) in backward"
    keeps = "each block's input"
    recomputes = "every dense block"

    def block_forward(self, block: nn.ModuleDict, x: Tensor) -> Tensor:
        if not needs_graph([x], block):
            return super().block_forward(block, x)
        return checkpoint_once(lambda t: MemoryStrategy.block_forward(self, block, t), x, norms=[block])


class StemTransitionCheckpoint(MemoryStrategy):
    """Keep only the inputs of the stem (conv0 .. pool0) and of each transition; rerun them in backward.
    Dense blocks run as in normal mode (``"fused_lean"``'s fallback for the stem and transitions)."""

    name = "stem_transition_checkpoint"
    description = "checkpoint the stem and each transition: keep their inputs, rerun them in backward"
    keeps = "the inputs of the stem and of each transition"
    recomputes = "the stem and every transition"

    def sequence_forward(self, modules: List[nn.Module], x: Tensor) -> Tensor:
        if not any(needs_graph([x], m) for m in modules):
            return super().sequence_forward(modules, x)
        return checkpoint_once(lambda t: MemoryStrategy.sequence_forward(self, modules, t), x, norms=modules)


class Recomputed(enum.Enum):
    """What :class:`PerLayerRecompute` runs again in backward for each dense layer, and so what it keeps."""

    NORM1 = ("concat + norm1 + relu1", "the earlier features, conv1's output and relu2's output")
    NORMS = ("concat + norm1 + relu1, norm2 + relu2", "the earlier features and conv1's output")
    LAYER = ("concat + norm1 + relu1 + conv1 + norm2 + relu2", "the earlier features")

    @property
    def recomputes(self) -> str:
        return self.value[0]

    @property
    def keeps(self) -> str:
        return self.value[1]


class PerLayerRecompute(MemoryStrategy):
    """Keep the earlier features; recompute ``recompute`` in backward, where the last convolution
    recomputed, if any, is not run again: its backward runs directly on the recomputed activation.

    Checkpointing (``"bottleneck"``) runs conv1 forward again in backward although conv1's backward
    needs only its input. With ``shared_buffer`` every feature is written into one pre-allocated
    buffer per block, which is also the block's output (no separate concatenation copies). Layers
    whose convolutions the recomputing function cannot run, and ``torch.compile``, run ``fallback``.
    """

    def __init__(self, name: str, description: str, *, recompute: Recomputed, shared_buffer: bool,
                 fallback: MemoryStrategy) -> None:
        self.name, self.description, self.recompute, self.shared_buffer = name, description, recompute, shared_buffer
        self.fallback = fallback
        self.recomputes = recompute.recomputes
        self.keeps = recompute.keeps + (", in one buffer per block" if shared_buffer else "")

    def layer_forward(self, layer: nn.Module, features: List[Tensor]) -> Tensor:
        if not needs_graph(features, layer):
            return super().layer_forward(layer, features)
        if custom_functions_unavailable() or not (Stage.supported(layer.conv1) and Stage.supported(layer.conv2)):
            return self.fallback.layer_forward(layer, features)
        holder = getattr(_LOCAL, "buffer", None)
        channels = sum(f.shape[1] for f in features)
        shared = (holder, channels) if holder is not None and holder.filled == channels else None
        first = Stage(layer.norm1, layer.relu1, layer.conv1)
        second = Stage(layer.norm2, layer.relu2, layer.conv2)
        if self.recompute is Recomputed.LAYER:
            out = run_stages([first, second], features, shared)
        else:
            bottleneck = run_stages([first], features, shared)
            if self.recompute is Recomputed.NORM1:
                return layer.composite(bottleneck)
            out = run_stages([second], [bottleneck])
        if layer.drop_rate > 0:
            out = F.dropout(out, p=layer.drop_rate, training=layer.training)
        return out

    def block_forward(self, block: nn.ModuleDict, x: Tensor) -> Tensor:
        if not self.shared_buffer or not needs_graph([x], block) or custom_functions_unavailable():
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


class FusedStrategy(MemoryStrategy):
    """Each dense block as one autograd function (:mod:`.fused_block`); where every block runs fused,
    the ImageNet stem and the standard transitions are one function each as well (:mod:`.fused_stem`,
    :mod:`.fused_transition`).

    ``keep_conv_output``: keep conv1's output in every layer and conv0's in the stem (else they are
    recomputed in backward). Under ``torch.compile`` a block runs as one operator (:mod:`.fused_op`),
    the stem and transitions checkpointed so that the compiler keeps what the fused functions keep. Blocks the fused function
    cannot run exactly (other norms, dropout, an input that is not in the autocast dtype under autocast) run ``fallback``;
    a stem or transition that cannot run fused runs ``sequence_fallback`` (default: ``fallback``).
    """

    def __init__(self, name: str, description: str, *, keep_conv_output: bool, fallback: MemoryStrategy,
                 sequence_fallback: Optional[MemoryStrategy] = None) -> None:
        self.name, self.description, self.keep_conv_output = name, description, keep_conv_output
        self.fallback, self.sequence_fallback = fallback, sequence_fallback or fallback
        convs = "conv1's outputs and conv0's" if keep_conv_output else "nothing else"
        self.keeps = f"each block's output (one channels-last buffer), the input image, batch statistics; {convs}"
        self.recomputes = "every norm and ReLU" + ("" if keep_conv_output else ", conv1 and conv0")

    def prefers_channels_last(self, blocks: List[nn.Module]) -> bool:
        # Only when every block runs fused: elsewhere channels-last would change nothing but the
        # order in which dropout draws its random numbers.
        return all(fused_supported(b) for b in blocks)

    def layer_forward(self, layer: nn.Module, features: List[Tensor]) -> Tensor:
        return self.fallback.layer_forward(layer, features)  # only the fallback's blocks run layer by layer

    def block_forward(self, block: nn.ModuleDict, x: Tensor) -> Tensor:
        if needs_graph([x], block) and fused_supported(block, x):
            if not torch.compiler.is_compiling():
                return fused_block_forward(block, x, self.keep_conv_output)
            if op_supported(block):  # the compiler cannot trace the autograd function: one opaque operator
                return fused_block_op_forward(block, x, self.keep_conv_output)
        return self.fallback.block_forward(block, x)

    def stem_forward(self, modules: List[nn.Module], x: Tensor) -> Tensor:
        if any(needs_graph([x], m) for m in modules) and stem_supported(modules, x):
            if torch.compiler.is_compiling():  # what the fused stem keeps: the image (and conv0's output)
                if self.keep_conv_output:
                    return self._compiled_sequence(modules[1:], modules[0](x))
                return self._compiled_sequence(modules, x)
            return fused_stem_forward(modules, x, self.keep_conv_output)
        return self.sequence_fallback.stem_forward(modules, x)

    def transition_forward(self, modules: List[nn.Module], x: Tensor) -> Tensor:
        if any(needs_graph([x], m) for m in modules) and transition_supported(modules, x):
            if torch.compiler.is_compiling():  # the fused transition keeps its input only
                return self._compiled_sequence(modules, x)
            return fused_transition_forward(modules, x)
        return self.sequence_fallback.transition_forward(modules, x)

    def _compiled_sequence(self, modules: List[nn.Module], x: Tensor) -> Tensor:
        """Under ``torch.compile``, where the fused functions cannot be traced: the sequence checkpointed, so
        the compiler keeps its input, as they do, and recomputes in backward only what backward needs
        (a transition's norm and ReLU, not its convolution)."""
        return checkpoint_once(lambda t: MemoryStrategy.sequence_forward(self, modules, t), x, norms=modules)

    def __repr__(self) -> str:
        if self.sequence_fallback is self.fallback:
            return super().__repr__()
        return f"{super().__repr__()[:-1]}, sequence_fallback={self.sequence_fallback.name!r})"


_BOTTLENECK = BottleneckCheckpoint()
_NORMS = PerLayerRecompute("norms", "'shared' + norm2/relu2 recomputed too: keeps only conv1's output per layer",
                           recompute=Recomputed.NORMS, shared_buffer=True, fallback=_BOTTLENECK)
_LAYER = PerLayerRecompute(
    "layer", "keep only each layer's k new channels (shared buffer); recompute norms, relus and conv1",
    recompute=Recomputed.LAYER, shared_buffer=True, fallback=LayerCheckpoint(),
)

#: The strategies this package registers, in the order ``list_memory_strategies()`` shows them (after ``none``).
BUILTIN = (
    _BOTTLENECK,
    PerLayerRecompute("efficient", "recompute concat+norm1+relu1 in backward; conv1 is not run twice",
                      recompute=Recomputed.NORM1, shared_buffer=False, fallback=_BOTTLENECK),
    PerLayerRecompute("shared", "'efficient' + features written into one shared buffer per block (Pleiss et al. 2017)",
                      recompute=Recomputed.NORM1, shared_buffer=True, fallback=_BOTTLENECK),
    _NORMS,
    _LAYER,
    FusedStrategy(
        "fused", "one function per block, stem and transition: channels-last shared buffer, chunked norm1+conv1, "
        "keeps conv1's outputs", keep_conv_output=True, fallback=_NORMS,
    ),
    FusedStrategy(
        "fused_lean", "'fused' keeping only each block's output and the input image; recomputes conv1 and conv0 in backward",
        keep_conv_output=False, fallback=_LAYER, sequence_fallback=StemTransitionCheckpoint(),
    ),
    BlockCheckpoint(),
)
