"""Sample data: a real image dataset written as class folders, to try fine-tuning without one of your own."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List

import torch
from PIL import Image

from .._utils import DataError, PathLike, UnsupportedError
from .splits import split_per_class


SAMPLE_DATASETS = ("digits",)
_MARKER = ".densenet_zoo_sample"


def write_sample_data(name: str, root: PathLike, *, val_fraction: float = 0.2, seed: int = 0) -> Dict[str, int]:
    """Write a real image dataset as PNG class folders ``root/train`` and ``root/val``.

    Example::

        write_sample_data("digits", "data/digits")  # -> {'train': 1437, 'val': 360}

    ``digits`` is scikit-learn's ``load_digits`` (1,797 8x8 grayscale handwritten digits, 10
    classes), split per class with a fixed seed. The folder is built next to ``root`` and renamed
    into place, so it is either complete or absent; an existing copy is reused as is.
    """
    if name not in SAMPLE_DATASETS:
        raise DataError(f"unknown sample dataset {name!r}; available: {', '.join(SAMPLE_DATASETS)}")
    root = Path(root)
    marker = root / _MARKER
    if marker.is_file():
        counts = dict(line.split("=") for line in marker.read_text().split())
        return {k: int(v) for k, v in counts.items() if k in ("train", "val")}
    if root.exists() and any(root.iterdir()):
        raise DataError(f"{root} exists and is not empty; give a new folder for the sample data")
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is in the [data] and [dev] extras
        raise UnsupportedError("sample data needs scikit-learn: pip install 'densenet_zoo[data]'") from None
    digits = load_digits()
    images = (torch.as_tensor(digits.images) * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8)
    by_class: Dict[str, List[str]] = {}
    for i, t in enumerate(digits.target.tolist()):
        by_class.setdefault(str(t), []).append(f"{i:04d}")
    train, val = split_per_class(by_class, val_fraction, seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.{os.getpid()}.", suffix=".tmp"))
    try:
        counts = {}
        for split, part in (("train", train), ("val", val)):
            counts[split] = 0
            for label, ids in part.items():
                (tmp / split / label).mkdir(parents=True, exist_ok=True)
                for i in ids:
                    Image.fromarray(images[int(i)].numpy()).save(tmp / split / label / f"{i}.png")
                    counts[split] += 1
        (tmp / _MARKER).write_text(f"name={name} train={counts['train']} val={counts['val']}\n")
        if root.exists():
            root.rmdir()  # empty, checked above
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return counts
