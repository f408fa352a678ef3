"""Preprocessing: the evaluation pipeline every published DenseNet was measured with, and training augmentation.

Augmentation uses ``torchvision.transforms.v2`` rather than timm's factory: v2 draws all its
randomness from torch's generator, which :class:`~densenet_zoo.data.dataset.ImageDataset` seeds per
(seed, epoch, index), so a sample's augmentation does not depend on worker count, rank or where a resumed
run restarts (timm's ``RandomResizedCropAndInterpolation`` draws from Python's ``random`` as well).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torchvision.transforms import v2

from .._utils import IMAGENET_MEAN, IMAGENET_STD, DataError

_INTERPOLATIONS = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "nearest": v2.InterpolationMode.NEAREST,
}
AUGMENTATIONS = ("standard", "light", "none")


def eval_pipeline(resize_size: int, crop_size: int, interpolation: str = "bilinear",
                  mean: Tuple[float, ...] = IMAGENET_MEAN, std: Tuple[float, ...] = IMAGENET_STD) -> Callable[[Any], Any]:
    """The evaluation preprocessing of every published DenseNet, and the only one in this package.

    Resize the short side to ``resize_size``, centre-crop ``crop_size``, scale to [0, 1], normalise:
    torchvision's ImageClassification preset. A PIL image is resized by PIL, as torchvision's and
    timm's presets do, so pretrained weights see the pixels they were evaluated with.

    Example::

        x = eval_pipeline(256, 224)(Image.open("cat.jpg")).unsqueeze(0)
    """
    return v2.Compose([
        v2.Resize(int(resize_size), interpolation=v2.InterpolationMode(interpolation), antialias=True),
        v2.CenterCrop(int(crop_size)),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
        v2.ToPureTensor(),
    ])


def resolve_preprocessing(preprocessing: Optional[Dict[str, Any]] = None, image_size: Optional[int] = None, in_chans: int = 3) -> Dict[str, Any]:
    """A complete preprocessing dict (size, crop_pct, interpolation, mean, std).

    Example::

        resolve_preprocessing({"size": 224, "crop_pct": 0.875, "interpolation": "bilinear"}, image_size=160)  # -> {'size': 160, 'crop_pct': 0.875, 'interpolation': 'bilinear', 'mean': [...], 'std': [...]}

    Keys missing from ``preprocessing`` (e.g. weights without metadata) default to ImageNet's
    mean/std, bilinear, crop_pct 1.0 (whole image, nothing cut) and ``image_size``; timm's
    ``input_size`` (C, H, W) and torchvision's ``crop_size``/``resize_size`` are accepted.
    An explicit ``image_size`` wins.
    """
    pre = dict(preprocessing or {})
    size = image_size if image_size is not None else pre.get("size") or pre.get("crop_size") or (pre.get("input_size") or [None, None, 224])[-1]
    if isinstance(size, (list, tuple)):
        size = size[-1]
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise DataError(f"image size must be a positive integer, got {size!r}")
    if not pre.get("crop_pct") and pre.get("crop_size") and pre.get("resize_size"):  # torchvision's form
        pre["crop_pct"] = pre["crop_size"] / pre["resize_size"]
    crop_pct = float(pre.get("crop_pct") or 1.0)
    if not 0.0 < crop_pct <= 1.0:
        raise DataError(f"crop_pct must be in (0, 1], got {crop_pct}")
    interpolation = str(pre.get("interpolation") or "bilinear")
    if interpolation not in _INTERPOLATIONS:
        raise DataError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}")
    mean = [float(v) for v in pre.get("mean") or IMAGENET_MEAN]
    std = [float(v) for v in pre.get("std") or IMAGENET_STD]
    if len(mean) != in_chans:  # e.g. RGB statistics for a grayscale model: average them
        mean, std = [sum(mean) / len(mean)] * in_chans, [sum(std) / len(std)] * in_chans
    return {"size": int(size), "crop_pct": crop_pct, "interpolation": interpolation, "mean": mean, "std": std}


def eval_transform(pre: Dict[str, Any]) -> Callable[[Any], torch.Tensor]:
    """Resize the short side to ``size / crop_pct``, centre-crop ``size``, scale to [0, 1], normalise
    (:func:`eval_pipeline`, the weights' own)."""
    size = pre["size"]
    return eval_pipeline(int(math.floor(size / pre["crop_pct"])), size, pre["interpolation"], pre["mean"], pre["std"])


def train_transform(pre: Dict[str, Any], augment: str = "standard") -> v2.Compose:
    """Training transform: ``"standard"`` (random resized crop 8-100 % + horizontal flip, the
    ImageNet recipe), ``"light"`` (crop 60-100 %, near-square, no flip: safe for digits and text),
    or ``"none"`` (the eval transform)."""
    if augment not in AUGMENTATIONS:
        raise DataError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    if augment == "none":
        return eval_transform(pre)
    size, interp = pre["size"], _INTERPOLATIONS[pre["interpolation"]]
    if augment == "standard":
        ops = [v2.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=interp, antialias=True), v2.RandomHorizontalFlip()]
    else:
        ops = [v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.9, 1.1), interpolation=interp, antialias=True)]
    return v2.Compose([v2.PILToTensor(), *ops, v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre["mean"], pre["std"])])
