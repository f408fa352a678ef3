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

A strategy says what it keeps, what it recomputes and which strategy runs where it cannot
(``fallback``): ``get_memory_strategy("fused")`` shows all three.

Modules, bottom to top: ``base`` (normal mode, once-only checkpointing, saved-bytes counter),
``recompute`` (the per-layer recomputing autograd function), ``workspace`` (the fused functions'
scratch buffer), ``triton_kernels`` (their element-wise passes for CUDA), ``kernels`` (their chunked
matrix kernels), ``fusion`` (what the fused functions
share: fusability checks, dtype and autocast rules, batch statistics, gradient order), ``fused_block``,
``fused_stem`` and ``fused_transition`` (a dense block, the ImageNet stem and a transition as one
function each), ``fused_op`` (the fused block as an operator, for ``torch.compile``),
``strategies`` (the named strategies), ``registry`` (names), ``auto`` (measured choice
under a budget). The batch-norm arithmetic is :mod:`densenet_zoo.norms.bn_math`'s.
"""

from .base import MemoryStrategy, SavedTensorBytes, checkpoint_once, preserved_buffers
from .registry import get_memory_strategy, list_memory_strategies, register_memory_strategy
from .strategies import BUILTIN
from .auto import AutoStrategy, parse_bytes
from .workspace import release_workspaces, workspace_bytes

for _strategy in (MemoryStrategy(),) + BUILTIN:
    register_memory_strategy(_strategy)
register_memory_strategy(AutoStrategy())  # after the others: it resolves its candidates by name

__all__ = [
    "AutoStrategy", "MemoryStrategy", "SavedTensorBytes", "checkpoint_once", "get_memory_strategy",
    "list_memory_strategies", "parse_bytes", "preserved_buffers", "register_memory_strategy", "release_workspaces",
    "workspace_bytes",
]
