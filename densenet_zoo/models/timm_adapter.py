"""Our builders in timm's model registry, under the names ``dz_<model>``.

After ``import densenet_zoo``::

    timm.create_model("dz_densenet121")                          # our DenseNet-121
    timm.create_model("dz_densenet121", pretrained=True)         # its default published weights
    timm.create_model("dz_densenet121.tv_in1k", pretrained=True) # weights by tag
    timm.create_model("dz_densenet169", features_only=True, out_indices=(1, 2, 3, 4))
    timm.list_models("dz_*")

The ``dz_`` prefix keeps timm's own ``densenet121`` (a different implementation) reachable.
Keyword arguments follow timm: ``drop_rate`` is the dropout before the classifier (our
``head_drop_rate``), ``proj_drop_rate`` the dropout inside dense layers (our ``drop_rate``);
every other keyword goes to :class:`densenet_zoo.DenseNet`. ``model.pretrained_cfg`` carries the
weights' preprocessing, so ``timm.data.resolve_data_config(model=model)`` works.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

from timm.models import register_model

from .densenet import DenseNet
from .factory import create_model, list_models

PREFIX = "dz_"

__all__: List[str] = ["PREFIX", "timm_name"]


def timm_name(name: str) -> str:
    """The timm registry name of one of our models: ``timm_name("densenet121") == "dz_densenet121"``."""
    return PREFIX + name


def _pretrained_cfg(model: DenseNet) -> Dict[str, Any]:
    small = bool(model.model_args.get("small_inputs"))
    size = 32 if small else 224
    cfg: Dict[str, Any] = dict(input_size=(model.in_chans, size, size), interpolation="bilinear", crop_pct=0.875,
                               mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=model.num_classes,
                               first_conv="features.conv0", classifier="classifier")
    entry = getattr(model, "weights_entry", None)
    if entry is not None and entry.preprocessing:
        pre = entry.preprocessing
        crop = int(pre.get("crop_size", size))
        cfg.update(input_size=(model.in_chans, crop, crop), interpolation=pre.get("interpolation", "bilinear"),
                   crop_pct=float(pre.get("crop_pct", crop / pre.get("resize_size", crop))),
                   mean=tuple(pre.get("mean", cfg["mean"])), std=tuple(pre.get("std", cfg["std"])))
        cfg["tag"] = entry.tag
    return cfg


def _make_entrypoint(arch: str) -> Callable[..., DenseNet]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> DenseNet:
        tag = kwargs.pop("pretrained_cfg", None)
        kwargs.pop("pretrained_cfg_overlay", None)
        kwargs.pop("cache_dir", None)
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        if "drop_rate" in kwargs:
            kwargs["head_drop_rate"] = kwargs.pop("drop_rate")
        if "proj_drop_rate" in kwargs:
            kwargs["drop_rate"] = kwargs.pop("proj_drop_rate")
        kwargs.pop("drop_path_rate", None)  # no stochastic depth in DenseNets; timm's trainers pass it anyway
        name = f"{arch}.{tag}" if isinstance(tag, str) and tag else arch
        model = create_model(name, pretrained=pretrained, **kwargs)
        model.pretrained_cfg = _pretrained_cfg(model)
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        return model

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
