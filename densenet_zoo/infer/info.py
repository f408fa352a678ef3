"""What a named model is: parameters, FLOPs (torch's flop counter), layers, preprocessing, weights."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .._utils import IMAGENET_MEAN, IMAGENET_STD, UsageError
from ..hardware import describe_hardware
from ..models import create_model
from ..weights import get_weights, list_weights
from ..models.densenet import DenseNet, DenseLayer, Transition

__all__ = ["count_flops", "model_info", "format_info"]


def count_flops(model: nn.Module, image_size: int = 224, in_chans: Optional[int] = None) -> int:
    """FLOPs of one forward on one image, counted by ``torch.utils.flop_counter`` (2 per multiply-add).

    Example::

        count_flops(densenet121()) / 1e9    # about 5.7
    """
    in_chans = in_chans or int(getattr(model, "in_chans", 3))
    param = next(model.parameters())
    x = torch.zeros(1, in_chans, image_size, image_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def model_info(name: str, image_size: Optional[int] = None) -> Dict[str, Any]:
    """Facts about a named architecture (no download): ``model_info("densenet121")["gflops"]``."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise UsageError(f"--image-size must be a positive integer (e.g. 224), got {image_size!r}")
    model: DenseNet = create_model(name)
    small = bool(model.model_args.get("small_inputs"))
    image_size = image_size or (32 if small else 224)
    flops = count_flops(model, image_size)
    mods = list(model.modules())
    weights = []
    preprocessing: Dict[str, Any] = {"size": image_size, "crop_pct": 1.0 if small else 0.875, "interpolation": "bilinear",
                                     "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    try:
        for wname in list_weights(f"{model.arch}.*"):
            e = get_weights(wname)
            weights.append({"name": wname, "default": e.default, "acc@1": (e.metrics or {}).get("acc@1"),
                            "source": e.url or f"hf-hub:{e.hf_hub_id}"})
            if e.default and e.preprocessing:
                preprocessing = dict(e.preprocessing)
    except Exception as exc:  # a broken user manifest must not hide the architecture facts
        weights.append({"name": f"(weights registry unavailable: {exc})"})
    return {
        "name": model.arch,
        "params": sum(p.numel() for p in model.parameters()),
        "image_size": image_size,
        "gflops": flops / 1e9,
        "gmacs": flops / 2e9,
        "growth_rate": model.growth_rate,
        "block_config": list(model.block_config),
        "num_features": model.num_features,
        "num_classes": model.num_classes,
        "layers": {
            "dense_layers": sum(isinstance(m, DenseLayer) for m in mods),
            "transitions": sum(isinstance(m, Transition) for m in mods),
            "conv": sum(isinstance(m, nn.Conv2d) for m in mods),
            "norm": sum(isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) for m in mods),
            "linear": sum(isinstance(m, nn.Linear) for m in mods),
        },
        "feature_info": [dict(f) for f in model.feature_info],
        "preprocessing": preprocessing,
        "weights": weights,
        "hardware": describe_hardware(),
    }


def format_info(info: Dict[str, Any]) -> str:
    """Human-readable lines for ``densenet-zoo info``."""
    lay = info["layers"]
    lines = [
        f"{info['name']}: {info['params']:,} parameters, {info['gflops']:.3f} GFLOPs ({info['gmacs']:.3f} GMACs) "
        f"at {info['image_size']}x{info['image_size']} (torch.utils.flop_counter)",
        f"  growth rate {info['growth_rate']}, blocks {tuple(info['block_config'])}, {info['num_features']} final features, "
        f"{info['num_classes']} classes",
        f"  layers: {lay['dense_layers']} dense layers, {lay['transitions']} transitions, {lay['conv']} conv, "
        f"{lay['norm']} norm, {lay['linear']} linear",
        "  feature maps: " + ", ".join(f"{i}: {f['num_chs']} ch /{f['reduction']}" for i, f in enumerate(info["feature_info"])),
        "  preprocessing: " + ", ".join(f"{k}={v}" for k, v in info["preprocessing"].items()),
        f"  this machine: {info['hardware']}",
    ]
    if info["weights"]:
        lines.append("  weights:")
        for w in info["weights"]:
            acc = f"acc@1 {w['acc@1']:.2f}" if w.get("acc@1") is not None else ""
            lines.append(f"    {w['name']:28s} {'default ' if w.get('default') else '        '}{acc:12s} {w.get('source', '')}")
    else:
        lines.append("  weights: none published (train your own with `densenet-zoo finetune`)")
    return "\n".join(lines)
