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
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Iterator, List, Union

import torch
import torch.nn as nn
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


def any_requires_grad(tensors: Iterable[Tensor]) -> bool:
    return any(t.requires_grad for t in tensors)


class MemoryStrategy:
    """How a dense block runs its layers while training.

    Subclasses override :meth:`layer_forward` (one dense layer, given the list of earlier
    features) and/or :meth:`block_forward` (a whole block). The base class is the normal mode.
    """

    name: str = "none"
    description: str = "store everything for backward (fastest, quadratic memory)"

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
register_memory_strategy(BottleneckCheckpoint())
