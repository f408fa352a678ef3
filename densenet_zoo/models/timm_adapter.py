"""Our builders in timm's model registry, under the names ``dz_<model>``, built by timm's own machinery.

After ``import densenet_zoo``::

    timm.create_model("dz_densenet121")                          # our DenseNet-121
    timm.create_model("dz_densenet121", pretrained=True)         # its default published weights
    timm.create_model("dz_densenet121.tv_in1k", pretrained=True) # weights by tag
    timm.create_model("dz_densenet169", features_only=True, out_indices=(1, 2, 3, 4))
    timm.list_models("dz_*"), timm.list_pretrained("dz_*")

The ``dz_`` prefix keeps timm's own ``densenet121`` (a different implementation) reachable.
Every weights entry of our registry (``weights/manifest.json``) is a timm pretrained tag whose
``pretrained_cfg`` carries its preprocessing, so ``timm.data.resolve_data_config(model=model)`` and
``create_transform`` give our evaluation transforms. Weights load through our loader (registry,
cache, offline switch, hash checks), not timm's; tags registered later with
:func:`densenet_zoo.register_weights` work too.

Keyword arguments follow timm: ``drop_rate`` is the dropout before the classifier (our
``head_drop_rate``), ``proj_drop_rate`` the dropout inside dense layers (our ``drop_rate``);
``features_only`` / ``out_indices`` / ``feature_cls`` give timm's feature wrappers (default
``"getter"``, through ``forward_intermediates``; ``"list"``, ``"dict"``, ``"hook"`` and ``"fx"`` work
too); every other keyword goes to :class:`densenet_zoo.DenseNet`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, get_arch_pretrained_cfgs, register_model

from .._utils import IMAGENET_MEAN, IMAGENET_STD, UsageError, WeightsError
from ..weights import registry as hub
from ..weights.registry import WeightsEntry
from .configs import model_config
from .densenet import DenseNet
from .factory import create_model, list_models
from .inputs import final_map_size, min_input_size

PREFIX = "dz_"

__all__: List[str] = ["PREFIX", "timm_name", "timm_pretrained_cfg"]


def timm_name(name: str) -> str:
    """The timm registry name of one of our models: ``timm_name("densenet121") == "dz_densenet121"``."""
    return PREFIX + name


def _square(channels: int, side: int) -> Tuple[int, int, int]:
    return (channels, side, side)


def timm_pretrained_cfg(arch: str, entry: Optional[WeightsEntry] = None) -> Dict[str, Any]:
    """timm's ``pretrained_cfg`` for ``arch`` with the weights ``entry`` (None: untrained defaults).

    Example::

        timm_pretrained_cfg("densenet121", dz.get_weights("densenet121"))["crop_pct"]  # -> 0.875
    """
    config = model_config(arch)
    small, blocks = bool(config.get("small_inputs")), len(config["block_config"])
    pre: Mapping[str, Any] = entry.preprocessing if entry is not None else {}
    side = int(pre.get("crop_size", 32 if small else 224))
    crop_pct = pre.get("crop_pct", side / pre["resize_size"] if "resize_size" in pre else (1.0 if small else 0.875))
    cfg: Dict[str, Any] = dict(
        input_size=_square(3, side), min_input_size=_square(3, min_input_size(blocks, small)),
        pool_size=(final_map_size(side, blocks, small),) * 2, crop_pct=float(crop_pct),
        interpolation=pre.get("interpolation", "bilinear"), mean=tuple(pre.get("mean", IMAGENET_MEAN)),
        std=tuple(pre.get("std", IMAGENET_STD)), first_conv="features.conv0", classifier="classifier",
        num_classes=entry.num_classes if entry is not None else config.get("num_classes", 1000),
    )
    if "test_input_size" in pre:
        cfg["test_input_size"] = _square(3, int(pre["test_input_size"]))
        cfg["test_pool_size"] = (final_map_size(int(pre["test_input_size"]), blocks, small),) * 2
    if "test_crop_pct" in pre:
        cfg["test_crop_pct"] = float(pre["test_crop_pct"])
    if entry is not None:
        cfg.update(url=entry.url, hf_hub_id=entry.hf_hub_id, license=entry.license, description=entry.source)
    return cfg


def _packaged_entries() -> List[WeightsEntry]:
    """The entries of the package's own manifest (user manifests are read when a model is built)."""
    try:
        return hub.read_manifest(hub.data_dir() / "manifest.json")
    except WeightsError:
        return []  # a broken installation still registers the architectures, untrained


def _default_cfgs() -> Dict[str, Any]:
    """timm's ``default_cfgs`` for every ``dz_`` name: one tag per weights entry, the default first."""
    entries = _packaged_entries()
    cfgs: Dict[str, Any] = {}
    for arch in list_models():
        mine = sorted((e for e in entries if e.arch == arch), key=lambda e: not e.default)
        for i, entry in enumerate(mine):
            star = "*" if i == 0 and entry.default else ""
            cfgs[f"{timm_name(arch)}.{entry.tag}{star}"] = timm_pretrained_cfg(arch, entry)
        if not mine or not mine[0].default:  # no default weights: the default cfg is untrained, as in our registry
            cfgs[f"{timm_name(arch)}.untrained*"] = timm_pretrained_cfg(arch)
    return cfgs


default_cfgs = generate_default_cfgs(_default_cfgs())


def _weights_to_load(arch: str, tag: Optional[str], overlay: Mapping[str, Any]) -> Any:
    """What our loader should load for ``pretrained=True``: an overlay's source, a tag, or the default."""
    for key in ("state_dict", "file", "url"):
        if overlay.get(key) is not None:
            return overlay[key]
    if overlay.get("hf_hub_id"):
        return overlay["hf_hub_id"]
    if tag and tag != "untrained":
        return hub.get_weights(f"{arch}.{tag}")
    return hub.get_weights(arch)  # the registry's default (a clear error when there is none)


def _timm_kwargs_to_ours(kwargs: Dict[str, Any]) -> None:
    if "drop_rate" in kwargs:
        kwargs["head_drop_rate"] = kwargs.pop("drop_rate")
    if "proj_drop_rate" in kwargs:
        kwargs["drop_rate"] = kwargs.pop("proj_drop_rate")
    if kwargs.pop("drop_path_rate", None):
        raise UsageError("drop_path_rate: DenseNets have no stochastic depth; leave it unset or 0 "
                         "(drop_rate and proj_drop_rate are the dropouts)")


def _resolve_cfg(arch: str, tag: Optional[str], weights: Any) -> Any:
    """The pretrained cfg (or registered tag) for ``build_model_with_cfg``: the loaded entry's own when there
    is one (also for weights registered after import or overridden by a user manifest), else the tag's."""
    variant = timm_name(arch)
    if isinstance(weights, WeightsEntry):
        return dict(timm_pretrained_cfg(arch, weights), architecture=variant, tag=weights.tag)
    if tag is None or f"{variant}.{tag}" in get_arch_pretrained_cfgs(variant):
        return tag
    return dict(timm_pretrained_cfg(arch, hub.get_weights(f"{arch}.{tag}")), architecture=variant, tag=tag)


def _create(arch: str, pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: Any = None,
            cache_dir: Any = None, **kwargs: Any) -> nn.Module:
    """timm's entrypoint protocol: resolve the weights and the cfg, then let timm build (and wrap) our model."""
    if cache_dir is not None:
        raise UsageError(f"cache_dir={cache_dir!r}: densenet_zoo keeps its own weights cache; set DENSENET_ZOO_CACHE instead")
    overlay = dict(pretrained_cfg_overlay or {})
    tag = pretrained_cfg if isinstance(pretrained_cfg, str) else None
    weights = _weights_to_load(arch, tag, overlay) if pretrained else None
    if pretrained_cfg is None or tag is not None:
        pretrained_cfg = _resolve_cfg(arch, tag, weights)
    _timm_kwargs_to_ours(kwargs)
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    num_taps = len(model_config(arch)["block_config"]) + 1
    feature_cfg = dict(out_indices=tuple(range(num_taps)), feature_cls="getter", flatten_sequential=True)

    def build(**model_kwargs: Any) -> DenseNet:
        return create_model(arch, pretrained=weights is not None, weights=weights, progress=False, **model_kwargs)

    # pretrained=False: timm must not load anything itself; build() already loaded our weights.
    model = build_model_with_cfg(build, timm_name(arch), False, pretrained_cfg=pretrained_cfg,
                                 pretrained_cfg_overlay=overlay or None, feature_cfg=feature_cfg, **kwargs)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model


def _make_entrypoint(arch: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _create(arch, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = timm_name(arch)
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"densenet_zoo's {arch} through timm: ``timm.create_model({timm_name(arch)!r})``."
    return entrypoint


def _register_all() -> None:
    for arch in list_models():
        fn = _make_entrypoint(arch)
        globals()[fn.__name__] = fn
        register_model(fn)


_register_all()
