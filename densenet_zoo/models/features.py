"""Multi-scale features of a DenseNet: ``features_only`` models, ``forward_intermediates``, pruning,
and what lets ``torch.fx`` (torchvision's ``create_feature_extractor``, timm's ``feature_cls="fx"``)
trace the network.

Feature taps follow timm's DenseNet: index 0 is the stem (after ``norm0`` + ReLU, before the
max-pool; ``conv0`` for ``small_inputs`` models), indices 1..n-1 the outputs of the dense blocks
before their transitions, and the last index the final features after ``norm5`` + ReLU (module
``final_act``; what ``forward_features`` returns). ``model.feature_info[i]`` gives ``num_chs``,
``reduction`` and ``module`` (the module whose output it is) of tap ``i``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor
from torch.fx import Proxy

from .._utils import UnsupportedError, UsageError, UsageTypeError

Indices = Union[None, int, Sequence[int]]
OUTPUT_FORMATS = ("NCHW", "NHWC")


def symbolic(x: Any) -> bool:
    """Whether ``x`` is a ``torch.fx`` proxy: the model is being traced, values and shapes are unknown."""
    return isinstance(x, Proxy)


def call_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(x)``; under ``torch.fx`` tracing, one ``call_module`` node, as ``torch.nn``'s norms give.

    The norms of this package check shapes and branch on batch statistics in Python, which symbolic
    tracing cannot follow. Recorded as a call of the module (through the tracer, so node names are
    the module paths), the traced graph runs each norm exactly as the model does.
    """
    if not symbolic(x):
        return norm(x)
    tracer = x.tracer

    def as_node(*args: Any, **kwargs: Any) -> Proxy:
        return tracer.create_proxy("call_module", tracer.path_of_module(norm), args, kwargs)

    return tracer.call_module(norm, as_node, (x,), {})


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


def run_children(container: nn.Module, x: Tensor) -> Tensor:
    """Apply the children of ``container`` in order, the norms through :func:`call_norm`."""
    for name, module in container.named_children():
        x = call_norm(module, x) if name.startswith("norm") else module(x)
    return x


def take_indices(num_taps: int, indices: Indices) -> List[int]:
    """Sorted tap indices: ``None`` all, an int ``n`` the last ``n``, or a sequence (negatives count from the end).

    >>> take_indices(5, (1, 2, 3, 4)), take_indices(5, 2)
    ([1, 2, 3, 4], [3, 4])
    """
    if indices is None:
        return list(range(num_taps))
    if isinstance(indices, bool):
        raise UsageTypeError(f"feature indices must be None, an int or a sequence of ints, got {indices!r}")
    if isinstance(indices, int):
        if not 1 <= indices <= num_taps:
            raise UsageError(f"asked for the last {indices} feature maps; this model has {num_taps} (indices 0..{num_taps - 1})")
        return list(range(num_taps - indices, num_taps))
    picked = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not -num_taps <= i < num_taps:
            raise UsageError(f"feature index {i!r} is out of range; this model has {num_taps} feature maps (indices 0..{num_taps - 1})")
        picked.append(i % num_taps)
    if not picked:
        raise UsageError("out_indices is empty; give at least one feature index, e.g. (1, 2, 3, 4)")
    if len(set(picked)) != len(picked):
        raise UsageError(f"feature indices {tuple(indices)} repeat an index")
    return sorted(picked)


def forward_intermediates(
    model: nn.Module,
    x: Tensor,
    indices: Indices = None,
    norm: bool = False,
    stop_early: bool = False,
    output_fmt: str = "NCHW",
    intermediates_only: bool = False,
) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
    """Run ``model.features`` and collect the feature maps of ``indices`` (see the module docstring).

    Example::

        final, maps = model.forward_intermediates(x, indices=(1, 2, 3, 4))

    Returns ``(final_features, maps)``, or only ``maps`` when ``intermediates_only``;
    ``stop_early`` stops after the last requested tap (``final_features`` is then that tap).
    ``output_fmt`` ``"NHWC"`` returns the maps channels-last (``final_features`` stays NCHW, as in
    timm). ``norm`` is accepted for timm's interface: the final norm (``norm5``) belongs to the last
    tap, and the other taps have other widths, so there is nothing to apply.
    """
    if output_fmt not in OUTPUT_FORMATS:
        raise UsageError(f"output_fmt must be one of {OUTPUT_FORMATS}, got {output_fmt!r}")
    x = model.check_input(x)
    info = model.feature_info
    take = take_indices(len(info), indices)
    tap_of = {entry["module"]: i for i, entry in enumerate(info)}
    last = take[-1] if stop_early else len(info) - 1
    modules = [(f"features.{name}", m) for name, m in model.features.named_children()] + [("final_act", model.final_act)]
    maps: List[Tensor] = []
    for name, module in modules:
        x = call_norm(module, x) if name.startswith("features.norm") else module(x)
        i = tap_of.get(name)
        if i is None:
            continue
        if i in take:
            maps.append(x.permute(0, 2, 3, 1) if output_fmt == "NHWC" else x)
        if i == last:
            break
    return maps if intermediates_only else (x, maps)


def prune_intermediate_layers(model: nn.Module, indices: Indices = 1, prune_head: bool = True) -> List[int]:
    """Drop the modules after the last tap of ``indices``; returns the kept tap indices (absolute).

    ``model.feature_info`` then lists only the taps that remain. The classifier and pooling are
    removed when ``prune_head`` is set or when the final features were pruned away (the head
    was sized for them).
    """
    take = take_indices(len(model.feature_info), indices)
    last = take[-1]
    if last < len(model.feature_info) - 1:
        keep = model.feature_info[last]["module"].split(".", 1)[1]
        names = list(model.features._modules)
        for name in names[names.index(keep) + 1:]:
            delattr(model.features, name)
        model.feature_info = model.feature_info[: last + 1]
        model.final_act = nn.Identity()
        model.num_features = model.head_hidden_size = model.feature_info[last]["num_chs"]
        model.out_indices = [i for i in model.out_indices if i <= last] or [last]
        prune_head = True
    if prune_head:
        model.reset_classifier(0, "")
    return take


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


# timm's MATCH_PREV_GROUP: a parameter group that joins the group before it (layer-wise decay).
JOIN_PREVIOUS_GROUP = (99999,)


class InteropMixin:
    """What timm (features, optimizer groups, checkpointing) and TorchScript call on a DenseNet."""

    @torch.jit.ignore
    def forward_intermediates(
        self, x: Tensor, indices: Indices = None, norm: bool = False, stop_early: bool = False,
        output_fmt: str = "NCHW", intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Final features and the feature maps ``indices`` (0 stem, 1..n blocks), with timm's arguments;
        see :func:`densenet_zoo.features.forward_intermediates`."""
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

    def __prepare_scriptable__(self) -> Any:
        """``torch.jit.script`` calls this first: one clear error for what TorchScript cannot compile."""
        problem = unscriptable_reason(self)
        if problem:
            raise UnsupportedError(f"torch.jit.script cannot compile this DenseNet: {problem}")
        return self


def unscriptable_reason(model: Any) -> Optional[str]:
    """Why TorchScript cannot compile ``model`` and what to do instead, or None."""
    if model.features_only:
        return ("it was built with features_only=True, whose forward returns a list from Python code; script the "
                "model without features_only, or use torch.export or torch.jit.trace")
    strategy = model.memory_strategy.name
    if strategy != "none":
        return (f"memory_efficient={strategy!r} is a training strategy TorchScript cannot run; call "
                "model.set_memory_efficient(False) first (outputs are the same)")
    tried = set()
    for name, module in model.named_modules():
        if not name.rsplit(".", 1)[-1].startswith("norm") or type(module) in tried:
            continue
        tried.add(type(module))
        try:
            torch.jit.script(module)
        except Exception as exc:  # TorchScript raises several error types
            return (f"norm layer {name} ({type(module).__name__}) is not scriptable ({str(exc).strip().splitlines()[0]}); "
                    "build the model with norm_layer='bn' or 'group_norm', or use torch.export or torch.jit.trace, "
                    "which take every norm")
    return None
