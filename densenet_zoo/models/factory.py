"""Builders of the named configurations (``densenet121`` ... ``densenet_bc_250``), ``list_models`` and ``create_model``."""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Dict, List

from .configs import canonical_name, model_config
from .densenet import DenseNet
from .loading import build_pretrained

__all__ = [
    "create_model",
    "list_models",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet264",
    "densenet_bc_100",
    "densenet_bc_190",
    "densenet_bc_250",
]

_ENTRYPOINTS: Dict[str, Callable[..., DenseNet]] = {}


def _build(arch: str, pretrained: bool = False, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    config = model_config(arch)
    config.update(kwargs)
    if pretrained or weights is not None:
        return build_pretrained(arch, config, weights=weights, progress=progress)
    model = DenseNet(**config)
    model.arch = arch
    return model


def _register(name: str) -> Callable[..., DenseNet]:
    def builder(pretrained: bool = False, *, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
        return _build(name, pretrained=pretrained, weights=weights, progress=progress, **kwargs)

    cfg = model_config(name)
    growth, blocks, init = cfg["growth_rate"], cfg["block_config"], cfg["num_init_features"]
    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (
        f"{name}: growth rate {growth}, blocks {blocks}, {init} initial features.\n\n"
        "Args:\n"
        "    pretrained: load the architecture's default published weights.\n"
        "    weights: weights to load instead: a registered name or tag, a torchvision Weights member,\n"
        "        a .safetensors/.pth file or a URL.\n"
        "    progress: show a progress bar while downloading.\n"
        "    **kwargs: arguments of :class:`DenseNet` (``num_classes``, ``in_chans``, ``memory_efficient``,\n"
        "        ``norm_layer``...).\n\n"
        "Returns:\n"
        "    The :class:`DenseNet`.\n\n"
        "Example:\n"
        f"    model = {name}(pretrained=True, num_classes=10)   # backbone loaded, classifier fresh\n"
    )
    _ENTRYPOINTS[name] = builder
    return builder


densenet121 = _register("densenet121")
densenet161 = _register("densenet161")
densenet169 = _register("densenet169")
densenet201 = _register("densenet201")
densenet264 = _register("densenet264")
densenet_bc_100 = _register("densenet_bc_100")
densenet_bc_250 = _register("densenet_bc_250")
densenet_bc_190 = _register("densenet_bc_190")


def list_models(pattern: str = "*") -> List[str]:
    """Names accepted by :func:`create_model`, optionally filtered by a glob.

    Args:
        pattern: a glob on the names.

    Returns:
        The matching names, sorted.

    Example:
        >>> list_models("densenet1*")
        ['densenet121', 'densenet161', 'densenet169']
    """
    return sorted(n for n in _ENTRYPOINTS if fnmatch.fnmatchcase(n, pattern))


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """Build a named model.

    Args:
        name: a name of :func:`list_models`, or ``name.tag`` (``"densenet121.tv_in1k"``), which
            selects those weights when ``pretrained=True``.
        pretrained: load the architecture's default (or the tag's) weights.
        **kwargs: the builder's arguments: ``weights``, ``progress``, and :class:`DenseNet`'s
            (``num_classes``, ``in_chans``, ``memory_efficient``, ``norm_layer``...).

    Returns:
        The :class:`DenseNet`.

    Raises:
        ValueError: an unknown name (with close matches).

    Example:
        >>> create_model("densenet_bc_100", num_classes=5).classifier.out_features
        5
    """
    arch = canonical_name(name)
    if pretrained and "." in name and "weights" not in kwargs:
        kwargs["weights"] = name
    return _ENTRYPOINTS[arch](pretrained=pretrained, **kwargs)
