"""DenseNet: dense layers, blocks, transitions and the network (named configurations: :mod:`densenet_zoo.models.factory`).

Module names and parameter shapes are those of torchvision (``features.denseblock1.denselayer1.norm1``,
``features.transition1.conv``, ``classifier``, ...), so every published checkpoint loads as is.
"""

import math
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import UsageError, UsageTypeError
from ..memory import MemoryStrategy, get_memory_strategy
from ..norms import NormSpec, resolve_norm
from .configs import POOLS, check_config
from .features import Indices, feature_indices
from .inputs import checked_input, min_input_size
from .timm_methods import TimmMethodsMixin
from .torchscript import ScriptCheckMixin
from .tracing import call_norm, is_traced, run_children

__all__ = ["DenseBlock", "DenseLayer", "DenseNet", "Transition"]

MemorySpec = Union[bool, str, MemoryStrategy, None]
NormMaker = Callable[[str, int], nn.Module]


class _DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (bottleneck) then BN-ReLU-3x3 conv, producing ``growth_rate`` new channels."""

    __jit_unused_properties__ = ["memory_efficient"]

    def __init__(
        self,
        num_input_features: int,
        growth_rate: int,
        bn_size: int,
        drop_rate: float,
        memory_efficient: MemorySpec = False,
        *,
        make_norm: Optional[Callable[[str, int], nn.Module]] = None,
        name: str = "",
    ) -> None:
        super().__init__()
        make_norm = make_norm or resolve_norm(None)
        prefix = f"{name}." if name else ""
        self.norm1 = make_norm(prefix + "norm1", num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = make_norm(prefix + "norm2", bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.strategy = get_memory_strategy(memory_efficient)

    @property
    def memory_efficient(self) -> bool:
        return self.strategy.name != "none"

    def bottleneck(self, inputs: List[Tensor]) -> Tensor:
        """concat -> norm1 -> relu1 -> conv1."""
        x = inputs[0] if len(inputs) == 1 else torch.cat(inputs, 1)
        x = self.norm1(x) if torch.jit.is_scripting() else call_norm(self.norm1, x)
        return self.conv1(self.relu1(x))

    def composite(self, bottleneck: Tensor) -> Tensor:
        """norm2 -> relu2 -> conv2 -> dropout."""
        x = self.norm2(bottleneck) if torch.jit.is_scripting() else call_norm(self.norm2, bottleneck)
        out = self.conv2(self.relu2(x))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out

    def forward(self, features: Union[Tensor, List[Tensor]]) -> Tensor:
        if isinstance(features, Tensor):
            inputs = [features]
        else:
            inputs = features
        if not torch.jit.is_scripting():
            # Strategies run custom autograd code: not under torch.fx, whose graph is the plain forward.
            if self.training and torch.is_grad_enabled() and not is_traced(inputs[0]):
                return self.strategy.layer_forward(self, inputs)
        return self.composite(self.bottleneck(inputs))


class _DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; returns the input concatenated with every layer's output."""

    _version = 2

    def __init__(
        self,
        num_layers: int,
        num_input_features: int,
        bn_size: int,
        growth_rate: int,
        drop_rate: float,
        memory_efficient: MemorySpec = False,
        *,
        make_norm: Optional[Callable[[str, int], nn.Module]] = None,
        name: str = "",
    ) -> None:
        super().__init__()
        self.strategy = get_memory_strategy(memory_efficient)
        prefix = f"{name}." if name else ""
        for i in range(num_layers):
            layer = _DenseLayer(
                num_input_features + i * growth_rate,
                growth_rate=growth_rate,
                bn_size=bn_size,
                drop_rate=drop_rate,
                memory_efficient=self.strategy,
                make_norm=make_norm,
                name=f"{prefix}denselayer{i + 1}",
            )
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            if self.training and torch.is_grad_enabled() and not is_traced(init_features):
                return self.strategy.block_forward(self, init_features)
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """BN-ReLU-1x1 conv (compression) then 2x2 average pooling."""

    def __init__(
        self,
        num_input_features: int,
        num_output_features: int,
        *,
        make_norm: Optional[Callable[[str, int], nn.Module]] = None,
        name: str = "",
        memory_efficient: MemorySpec = False,
    ) -> None:
        super().__init__()
        make_norm = make_norm or resolve_norm(None)
        prefix = f"{name}." if name else ""
        self.norm = make_norm(prefix + "norm", num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)
        self.strategy = get_memory_strategy(memory_efficient)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            if self.training and torch.is_grad_enabled() and not is_traced(x):
                return self.strategy.transition_forward(list(self), x)
        x = self.norm(x) if torch.jit.is_scripting() else call_norm(self.norm, x)
        return self.pool(self.conv(self.relu(x)))


#: The building blocks under public names, for packages that inspect a model; the classes keep torchvision's
#: private names because published checkpoints and pickles refer to them (one class, two names).
DenseLayer, DenseBlock, Transition = _DenseLayer, _DenseBlock, _Transition


def _stem(in_chans: int, num_init_features: int, small_inputs: bool, make_norm: NormMaker) -> nn.Sequential:
    """conv0 (3x3/1 for small inputs; else 7x7/2, norm0, relu0, 3x3/2 max-pool0)."""
    if small_inputs:
        return nn.Sequential(OrderedDict(conv0=nn.Conv2d(in_chans, num_init_features, 3, stride=1, padding=1, bias=False)))
    return nn.Sequential(OrderedDict([
        ("conv0", nn.Conv2d(in_chans, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
        ("norm0", make_norm("features.norm0", num_init_features)),
        ("relu0", nn.ReLU(inplace=True)),
        ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
    ]))


def _add_blocks(features: nn.Sequential, block_config: Tuple[int, ...], num_init_features: int, small_inputs: bool,
                compression: float, make_norm: NormMaker, **block_args: Any) -> Tuple[int, List[Dict[str, Any]]]:
    """Append dense blocks, transitions and norm5 to ``features``; returns (final width, feature taps)."""
    stem_tap = "features.conv0" if small_inputs else "features.relu0"
    # Tap 0 is the stem, as in timm: feature indices 1..n are the dense blocks.
    info = [dict(num_chs=num_init_features, reduction=1 if small_inputs else 2, module=stem_tap)]
    num_features, reduction = num_init_features, 1 if small_inputs else 4
    for i, num_layers in enumerate(block_config):
        name = f"denseblock{i + 1}"
        block = _DenseBlock(num_layers, num_features, make_norm=make_norm, name=f"features.{name}", **block_args)
        features.add_module(name, block)
        num_features += num_layers * block_args["growth_rate"]
        info.append(dict(num_chs=num_features, reduction=reduction, module=f"features.{name}"))
        if i != len(block_config) - 1:
            out_features = int(math.floor(num_features * compression))
            trans = _Transition(num_features, out_features, make_norm=make_norm, name=f"features.transition{i + 1}",
                                memory_efficient=block_args["memory_efficient"])
            features.add_module(f"transition{i + 1}", trans)
            num_features, reduction = out_features, reduction * 2
    features.add_module("norm5", make_norm("features.norm5", num_features))
    info[-1]["module"] = "final_act"  # the ReLU after norm5 (DenseNet.final_act)
    return num_features, info


# A leaf of torch.fx graphs (the name is patched in this module): traced models keep the input checks.
torch.fx.wrap("checked_input")


class DenseNet(TimmMethodsMixin, ScriptCheckMixin, nn.Module):
    """DenseNet-BC (Huang et al., "Densely Connected Convolutional Networks", 2017).

    The first six arguments and ``memory_efficient`` follow torchvision's ``DenseNet`` (same module
    names, same state dict); the rest follow timm.

    Args:
        growth_rate: k, the channels each dense layer adds.
        block_config: the number of dense layers of each block.
        num_init_features: channels of the stem's convolution.
        bn_size: the bottleneck width, ``bn_size * growth_rate`` channels out of each layer's 1x1 conv.
        drop_rate: dropout after each dense layer (torchvision's meaning).
        num_classes: outputs of the classifier; 0 for none (``forward`` returns pooled features).
        memory_efficient: ``False``, ``True`` (torchvision's recomputation), a name of
            :func:`densenet_zoo.list_memory_strategies` or a ``MemoryStrategy``; all exact.
        in_chans: channels of the input image.
        small_inputs: a 3x3 stride-1 stem without norm, ReLU and max-pool, for 32x32 images (CIFAR).
        compression: the fraction of channels a transition keeps.
        global_pool: ``"avg"``, ``"max"``, ``"avgmax"`` or ``""`` (no pooling: with
            ``num_classes=0`` the forward returns the feature map).
        head_drop_rate: dropout before the classifier.
        norm_layer: any norm spec of :func:`densenet_zoo.resolve_norm` (a name, a factory, a dict...).
        strict_norm: make a ``norm_layer`` pattern that matches no layer an error.
        features_only: return a list of feature maps instead of logits (no classifier).
        out_indices: with ``features_only``, which maps (0 stem, 1..3 blocks 1-3, 4 final features).

    Raises:
        ValueError: an argument out of range or a norm spec that cannot be built, naming the argument.

    Example:
        >>> model = DenseNet(growth_rate=12, block_config=(16, 16, 16), num_init_features=24, small_inputs=True, num_classes=10)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    # Python-only properties (they walk the modules): TorchScript must not compile them.
    __jit_unused_properties__ = ["memory_strategy", "memory_efficient"]

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        memory_efficient: MemorySpec = False,
        *,
        in_chans: int = 3,
        small_inputs: bool = False,
        compression: float = 0.5,
        global_pool: str = "avg",
        head_drop_rate: float = 0.0,
        norm_layer: NormSpec = None,
        strict_norm: bool = False,
        features_only: bool = False,
        out_indices: Indices = None,
    ) -> None:
        super().__init__()
        block_config = tuple(block_config) if isinstance(block_config, list) else block_config
        check_config(growth_rate, block_config, num_init_features, bn_size, drop_rate, num_classes, in_chans,
                      compression, global_pool, head_drop_rate)
        make_norm = resolve_norm(norm_layer, strict=strict_norm)
        self.growth_rate, self.block_config, self.in_chans = growth_rate, tuple(block_config), in_chans
        self.small_inputs, self.drop_rate, self.head_drop_rate = bool(small_inputs), float(drop_rate), float(head_drop_rate)
        self.global_pool = global_pool
        #: Constructor arguments that rebuild this architecture (saved with checkpoints).
        self.model_args: Dict[str, Any] = dict(
            growth_rate=growth_rate, block_config=list(block_config), num_init_features=num_init_features,
            bn_size=bn_size, drop_rate=float(drop_rate), num_classes=num_classes, in_chans=in_chans,
            small_inputs=bool(small_inputs), compression=float(compression), global_pool=global_pool,
            head_drop_rate=float(head_drop_rate),
        )
        if isinstance(norm_layer, str):
            self.model_args["norm_layer"] = norm_layer
        self.arch: Optional[str] = None

        self.features = _stem(in_chans, num_init_features, small_inputs, make_norm)
        self.num_features, self.feature_info = _add_blocks(
            self.features, self.block_config, num_init_features, self.small_inputs, compression, make_norm,
            growth_rate=growth_rate, bn_size=bn_size, drop_rate=drop_rate, memory_efficient=get_memory_strategy(memory_efficient))
        make_norm.check_unused()  # type: ignore[attr-defined]
        # torchvision applies this ReLU as a function; a module makes it a tap that timm's hook, list and
        # fx feature classes can name (prune_intermediate_layers replaces it when norm5 is pruned away).
        self.final_act: nn.Module = nn.ReLU(inplace=True)
        #: With ``features_only=True`` forward returns the list of feature maps ``out_indices``.
        self.features_only = bool(features_only)
        self.out_indices = feature_indices(len(self.feature_info), out_indices)
        if features_only:
            self.model_args.update(features_only=True, out_indices=list(self.out_indices))

        self.num_classes = num_classes
        self.head_hidden_size = self.num_features  # width after pooling (avgmax averages the two)
        self.classifier: nn.Module = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.min_input_size = min_input_size(len(block_config), small_inputs)
        self._init_weights()

    # -- initialisation ------------------------------------------------------------------------
    def _init_weights(self) -> None:
        """torchvision's scheme: Kaiming-normal convs, unit/zero norm affine, zero classifier bias."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and getattr(m, "weight", None) is not None:
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    # -- memory strategy -----------------------------------------------------------------------
    @property
    def memory_strategy(self) -> MemoryStrategy:
        return next(m.strategy for m in self.modules() if isinstance(m, _DenseBlock))

    @property
    def memory_efficient(self) -> bool:
        return self.memory_strategy.name != "none"

    @torch.jit.ignore
    def set_memory_efficient(self, strategy: MemorySpec = True) -> "DenseNet":
        """Switch every dense block to ``strategy`` (``True``, ``False`` or a strategy name)."""
        strategy = get_memory_strategy(strategy)
        for m in self.modules():
            if isinstance(m, (_DenseBlock, _DenseLayer, _Transition)):
                m.strategy = strategy
        return self

    # -- input checks --------------------------------------------------------------------------
    def check_input(self, x: Tensor) -> Tensor:
        """``x`` if the network can take it, else a one-line error (kept as a node in torch.fx graphs)."""
        if not torch.jit.is_scripting():
            if not isinstance(x, Tensor) and not is_traced(x):
                raise UsageTypeError(f"DenseNet expects a torch.Tensor of shape (N, {self.in_chans}, H, W), got {type(x).__name__}")
        return checked_input(x, self.in_chans, self.min_input_size)

    # -- forward -------------------------------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        """Feature map after ``norm5`` and ReLU, shape (N, num_features, H/32, W/32)."""
        x = self.check_input(x)
        if torch.jit.is_scripting():
            x = self.features(x)
        elif self.training and torch.is_grad_enabled() and not is_traced(x):
            x = self._features_with_strategy(x)
        else:
            x = run_children(self.features, x)
        return self.final_act(x)

    @torch.jit.unused
    def _features_with_strategy(self, x: Tensor) -> Tensor:
        modules, strategy = list(self.features), self.memory_strategy
        if x.dim() == 4 and strategy.prefers_channels_last([m for m in modules if isinstance(m, _DenseBlock)]):
            x = x.contiguous(memory_format=torch.channels_last)
        stem = 1 if self.small_inputs else 4  # conv0 (norm0, relu0, pool0)
        x = strategy.stem_forward(modules[:stem], x)
        for module in modules[stem:]:
            x = module(x)
        return x

    def pool(self, x: Tensor) -> Tensor:
        if self.global_pool == "avg":
            return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        if self.global_pool == "max":
            return torch.flatten(F.adaptive_max_pool2d(x, 1), 1)
        if self.global_pool == "avgmax":
            return 0.5 * torch.flatten(F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1), 1)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global pool, dropout and classifier; ``pre_logits=True`` stops before the classifier."""
        x = self.pool(x)
        if self.head_drop_rate > 0:
            x = F.dropout(x, p=self.head_drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits; a ``features_only`` model (not scriptable) returns its list of feature maps instead."""
        if not torch.jit.is_scripting():
            if self.features_only:
                return self.forward_intermediates(x, self.out_indices, stop_early=True, intermediates_only=True)  # type: ignore[return-value]
        return self.forward_head(self.forward_features(x))

    # -- classifier ----------------------------------------------------------------------------
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    @torch.jit.ignore
    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier by a freshly initialised one (``num_classes=0``: no classifier)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise UsageError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        if global_pool is not None:
            if global_pool not in POOLS:
                raise UsageError(f"global_pool must be one of {POOLS}, got {global_pool!r}")
            self.global_pool = global_pool
            self.model_args["global_pool"] = global_pool
        device = next(self.parameters()).device
        self.num_classes = num_classes
        self.model_args["num_classes"] = num_classes
        if num_classes > 0:
            self.classifier = nn.Linear(self.num_features, num_classes, device=device)
            nn.init.constant_(self.classifier.bias, 0)
        else:
            self.classifier = nn.Identity()
