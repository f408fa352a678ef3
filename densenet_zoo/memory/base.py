"""The base of every memory strategy: :class:`MemoryStrategy` (normal mode), checkpointing that updates
norm statistics once, and the exact count of bytes autograd saves for backward."""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint


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

    The recomputation leaves the buffers of ``norms`` (modules: their submodules' too) untouched, so
    running statistics are those of the one real forward. Under ``torch.compile`` a traced region
    becomes a functional graph whose buffer updates already run once, and custom contexts are not
    traceable; a region the compiler cannot trace (a norm that breaks the graph: a cumulative average,
    a synchronised norm's collectives) runs as an eager checkpoint, which is told apart from a traced
    one at run time: it is recomputed inside backward, outside the compiler.
    """
    norms = list(norms)
    if torch.compiler.is_compiling():
        return checkpoint(_once_when_eager(fn, norms), *inputs, use_reentrant=False)
    return checkpoint(
        fn, *inputs, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), preserved_buffers(norms))
    )


def _once_when_eager(fn: Callable[..., Tensor], norms: List[nn.Module]) -> Callable[..., Tensor]:
    """``fn`` that, run in eager mode inside backward (an eager checkpoint's recomputation), leaves
    the buffers of ``norms`` as they were."""

    def run(*inputs: Tensor) -> Tensor:
        if torch.compiler.is_compiling() or torch._C._current_autograd_node() is None:
            return fn(*inputs)
        with preserved_buffers(norms):
            return fn(*inputs)

    return run


class SavedTensorBytes:
    """Count the bytes autograd keeps for backward: unique storages of saved tensors.

    ``exclude`` (e.g. the model's parameters) is left out. Deterministic, unlike peak memory.

    Example::

        with SavedTensorBytes(exclude=model.parameters()) as saved:
            loss = model(x).sum()
        saved.bytes
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
    """How a dense network runs while training: what it keeps for backward, what it recomputes in
    backward, and which strategy runs where it cannot (``fallback``). This base class is normal mode.

    A strategy is asked to run one dense layer (:meth:`layer_forward`, given the list of earlier
    features), a whole block (:meth:`block_forward`), the stem (:meth:`stem_forward`) and each
    transition (:meth:`transition_forward`); the last two run their modules in order through
    :meth:`sequence_forward` unless a strategy has its own way with them. Subclasses override what
    they change, and register with :func:`register_memory_strategy`.

    Example:
        class Logged(MemoryStrategy):
            name, description = "logged", "normal mode, printing each block's input shape"

            def block_forward(self, block, x):
                print(tuple(x.shape))
                return super().block_forward(block, x)

        register_memory_strategy(Logged())
        model = dz.densenet121(memory_efficient="logged")
    """

    name: str = "none"
    description: str = "store everything for backward (fastest, quadratic memory)"
    #: What the strategy keeps for backward, in words.
    keeps: str = "every activation"
    #: What it runs again in backward, in words.
    recomputes: str = "nothing"
    #: The strategy that runs the blocks (and layers) this one cannot run; None: it runs everything.
    fallback: Optional["MemoryStrategy"] = None

    def prepare(self) -> None:
        """One-time setup before the strategy runs, called when a network takes it
        (:func:`~densenet_zoo.memory.get_memory_strategy`). Normal mode needs none."""

    def prefers_channels_last(self, blocks: List[nn.Module]) -> bool:
        """Whether the network should run on channels-last tensors while training (the strategy's own layout)."""
        return False

    def stem_forward(self, modules: List[nn.Module], x: Tensor) -> Tensor:
        """The stem (conv0, and norm0, relu0, pool0 for large inputs) on ``x``."""
        return self.sequence_forward(modules, x)

    def transition_forward(self, modules: List[nn.Module], x: Tensor) -> Tensor:
        """A transition (norm, relu, conv, pool) on ``x``."""
        return self.sequence_forward(modules, x)

    def sequence_forward(self, modules: List[nn.Module], x: Tensor) -> Tensor:
        """``modules`` applied to ``x`` in order."""
        for m in modules:
            x = m(x)
        return x

    def block_forward(self, block: nn.ModuleDict, x: Tensor) -> Tensor:
        """A dense block on ``x``: its layers in order (each through :meth:`layer_forward`), concatenated."""
        features: List[Tensor] = [x]
        for layer in block.values():
            features.append(layer(features))
        return torch.cat(features, 1)

    def layer_forward(self, layer: nn.Module, features: List[Tensor]) -> Tensor:
        """One dense layer on the earlier ``features``: its ``k`` new channels."""
        return layer.composite(layer.bottleneck(features))

    def __repr__(self) -> str:
        fallback = f", fallback={self.fallback.name!r}" if self.fallback is not None else ""
        return f"{type(self).__name__}(name={self.name!r}, keeps={self.keeps!r}, recomputes={self.recomputes!r}{fallback})"


def needs_graph(tensors: Iterable[Tensor], module: nn.Module) -> bool:
    return any_requires_grad(tensors) or any(p.requires_grad for p in module.parameters())


def custom_functions_unavailable() -> bool:
    """``torch.compile`` does not trace the recompute functions (they replay autocast themselves)."""
    return torch.compiler.is_compiling()

