"""Memory strategies: what a dense block keeps for backward and what it recomputes.

A naive DenseNet stores, for every layer, the concatenation of all earlier features and its
normalised copy: memory grows quadratically with depth. A :class:`MemoryStrategy` decides how a
dense block runs its layers during training so that less is stored and more is recomputed.

Every strategy here updates BatchNorm running statistics (and ``num_batches_tracked``) exactly
once per forward. Recomputation in backward runs the norm layers again in training mode; their
buffers are restored right after, so the statistics are those of the one real forward.
(torchvision's and timm's checkpointed mode update them twice.)

Strategies only take effect while training with autograd recording; in eval mode, under
``torch.no_grad()`` or when nothing requires grad, every strategy runs the plain forward.
"""

from __future__ import annotations

import contextlib
import difflib
import threading
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Iterator, List, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:  # pragma: no cover
    from .model import _DenseBlock, _DenseLayer


@contextlib.contextmanager
def preserved_buffers(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Run a block of code and then put every buffer of ``modules`` back as it was.

    Used around recomputation so that norm layers do not update running statistics twice.
    """
    buffers = [b for m in modules for b in m.buffers() if b is not None]
    saved = [b.detach().clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in zip(buffers, saved):
                buf.copy_(value)


def checkpoint_once(fn: Callable[..., Tensor], *inputs: Tensor, norms: Iterable[nn.Module]) -> Tensor:
    """``fn(*inputs)`` without storing its intermediates: they are recomputed in backward.

    The recomputation leaves the buffers of ``norms`` untouched, so running statistics are those
    of the one real forward. Under ``torch.compile`` the checkpointed region becomes a functional
    graph whose buffer updates already run once, and custom contexts are not traceable.
    """
    if torch.compiler.is_compiling():
        return checkpoint(fn, *inputs, use_reentrant=False)
    norms = list(norms)
    return checkpoint(
        fn, *inputs, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), preserved_buffers(norms))
    )


class SavedTensorBytes:
    """Count the bytes autograd keeps for backward: unique storages of saved tensors.

    ``exclude`` (e.g. the model's parameters) is left out. Deterministic, unlike peak memory.

    >>> with SavedTensorBytes(exclude=model.parameters()) as saved:
    ...     loss = model(x).sum()
    >>> saved.bytes
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._excluded = {self._key(t) for t in exclude}
        self._storages: Dict[tuple, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @staticmethod
    def _key(t: Tensor) -> tuple:
        return (t.device, t.untyped_storage().data_ptr())

    def _pack(self, t: Tensor) -> Tensor:
        try:
            key, size = self._key(t), t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, fake)
            return t
        if key not in self._excluded:
            self._storages[key] = max(size, self._storages.get(key, 0))
        return t

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def any_requires_grad(tensors: Iterable[Tensor]) -> bool:
    return any(t.requires_grad for t in tensors)


class MemoryStrategy:
    """How a dense block runs its layers while training.

    Subclasses override :meth:`layer_forward` (one dense layer, given the list of earlier
    features) and/or :meth:`block_forward` (a whole block). The base class is the normal mode.
    """

    name: str = "none"
    description: str = "store everything for backward (fastest, quadratic memory)"
    #: Also keep only the inputs of the stem (conv0 .. pool0) and of each transition; rerun them in backward.
    recompute_stem_and_transitions: bool = False

    def prefers_channels_last(self, blocks: List["_DenseBlock"]) -> bool:
        """Whether the network should run on channels-last tensors while training (the strategy's own layout)."""
        return False

    def sequence_forward(self, modules: List[nn.Module], x: Tensor) -> Tensor:
        """The stem or a transition: ``modules`` applied in order (checkpointed if the strategy says so)."""

        def run(t: Tensor) -> Tensor:
            for m in modules:
                t = m(t)
            return t

        if not self.recompute_stem_and_transitions or not any(_needs_graph([x], m) for m in modules):
            return run(x)
        return checkpoint_once(run, x, norms=modules)

    def block_forward(self, block: "_DenseBlock", x: Tensor) -> Tensor:
        features: List[Tensor] = [x]
        for layer in block.values():
            features.append(layer(features))
        return torch.cat(features, 1)

    def layer_forward(self, layer: "_DenseLayer", features: List[Tensor]) -> Tensor:
        return layer.composite(layer.bottleneck(features))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


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


def _needs_graph(tensors: Iterable[Tensor], module: nn.Module) -> bool:
    return any_requires_grad(tensors) or any(p.requires_grad for p in module.parameters())


def _custom_functions_unavailable() -> bool:
    """``torch.compile`` does not trace the recompute functions (they replay autocast themselves)."""
    return torch.compiler.is_compiling()


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
        from .recompute import Stage, run_stages

        if not _needs_graph(features, layer):
            return super().layer_forward(layer, features)
        if _custom_functions_unavailable() or not (Stage.supported(layer.conv1) and Stage.supported(layer.conv2)):
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
        from .recompute import SharedBuffer, SharedConcat

        if not self.shared or not _needs_graph([x], block) or _custom_functions_unavailable():
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
        holder.version = holder.buffer._version
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
    """The whole block as one autograd function (see :mod:`densenet_zoo.fused`), keeping conv1's outputs.

    Blocks it cannot run exactly (other norms, dropout, ``torch.compile``, an input that is not in the
    autocast dtype under autocast) run ``"norms"``.
    """

    name = "fused"
    description = "one function per block: channels-last shared buffer, 1x1 convs as matrix products, keeps conv1's outputs"
    keep_bottleneck = True

    def prefers_channels_last(self, blocks: List["_DenseBlock"]) -> bool:
        # Only when every block runs fused: elsewhere channels-last would change nothing but the
        # order in which dropout draws its random numbers.
        from .fused import fused_supported

        return all(fused_supported(b) for b in blocks)

    def block_forward(self, block: "_DenseBlock", x: Tensor) -> Tensor:
        from .fused import fused_block_forward, fused_supported

        if _needs_graph([x], block) and fused_supported(block, x):
            return fused_block_forward(block, x, self.keep_bottleneck)
        return super().block_forward(block, x)


class FusedBlockLean(FusedBlock):
    """``"fused"`` that keeps only the block buffers and recomputes conv1 in backward; falls back to ``"layer"``."""

    name = "fused_lean"
    description = "'fused' keeping only each block's output; recomputes conv1, the stem and the transitions in backward"
    recompute_stem_and_transitions = True
    keep_bottleneck = False
    second_stage = False
    whole_layer = True


class BlockCheckpoint(MemoryStrategy):
    """Segment checkpointing: keep each block's input only; the whole block runs again in backward."""

    name = "block"
    description = "checkpoint each dense block: keep its input, rerun the block (normal mode) in backward"

    def block_forward(self, block: "_DenseBlock", x: Tensor) -> Tensor:
        if not _needs_graph([x], block):
            return super().block_forward(block, x)
        return checkpoint_once(lambda t: MemoryStrategy.block_forward(self, block, t), x, norms=[block])


_LOCAL = threading.local()
_BOTTLENECK = BottleneckCheckpoint()
_STRATEGIES: Dict[str, MemoryStrategy] = {}

#: What the boolean flag of torchvision's API maps to.
_ALIASES = {False: "none", True: "bottleneck", None: "none"}


def register_memory_strategy(strategy: MemoryStrategy, *, overwrite: bool = False) -> None:
    """Make ``strategy`` available as ``memory_efficient=strategy.name``."""
    if not isinstance(strategy, MemoryStrategy):
        raise TypeError(f"expected a MemoryStrategy instance, got {type(strategy).__name__}")
    if strategy.name in _STRATEGIES and not overwrite:
        raise ValueError(f"memory strategy {strategy.name!r} is already registered")
    _STRATEGIES[strategy.name] = strategy


def list_memory_strategies() -> list:
    """Names accepted by ``memory_efficient=``, normal mode first."""
    return list(_STRATEGIES)


def get_memory_strategy(spec: Union[bool, str, MemoryStrategy, None]) -> MemoryStrategy:
    """``False``/``"none"`` -> normal mode, ``True`` -> ``"bottleneck"``, a name or an instance."""
    if isinstance(spec, MemoryStrategy):
        return spec
    if isinstance(spec, bool) or spec is None:
        spec = _ALIASES[spec]
    if isinstance(spec, str) and spec in _STRATEGIES:
        return _STRATEGIES[spec]
    close = difflib.get_close_matches(str(spec), list(_STRATEGIES), n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(
        f"unknown memory strategy {spec!r}; expected True/False or one of {', '.join(_STRATEGIES)}{hint}"
    )


register_memory_strategy(MemoryStrategy())
register_memory_strategy(_BOTTLENECK)
for _strategy in (RecomputedNorms(), SharedRecomputedNorms(), RecomputedBothNorms(), RecomputedLayer(), FusedBlock(),
                  FusedBlockLean(), BlockCheckpoint()):
    register_memory_strategy(_strategy)

from .memory_auto import AutoStrategy, parse_bytes  # noqa: E402  (it builds on the strategies above)

register_memory_strategy(AutoStrategy())
