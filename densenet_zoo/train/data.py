"""Datasets for fine-tuning: folders of class folders or a CSV, preprocessing, sample data.

Layouts accepted by :func:`load_splits`:

* ``DIR/train/<class>/*.png`` and ``DIR/val/<class>/*.png``;
* ``DIR/<class>/*.png`` (or only ``DIR/train/``), split into train/val by ``val_split`` with a fixed seed;
* ``file.csv`` with rows ``path,label`` (paths relative to the CSV), split the same way.

Augmentation uses ``torchvision.transforms.v2`` rather than timm's factory: v2 draws all its
randomness from torch's generator, which :class:`ImageDataset` seeds per (seed, epoch, index), so a
sample's augmentation does not depend on worker count, rank or where a resumed run restarts
(timm's ``RandomResizedCropAndInterpolation`` draws from Python's ``random`` as well).
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .._utils import IMAGENET_MEAN, IMAGENET_STD, DataError, PathLike
from ..weights.registry import eval_pipeline
from .images import UnreadableImageError, open_image, probe_image  # noqa: F401 (open_image: public here too)

Sample = Tuple[str, int]

#: File types read as images; any other (non-hidden) file inside a class folder is an error.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_INTERPOLATIONS = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "nearest": v2.InterpolationMode.NEAREST,
}
AUGMENTATIONS = ("standard", "light", "none")


@dataclass
class Splits:
    """What :func:`load_splits` found: samples as ``(path, class index)`` and the class names."""

    train: List[Sample]
    val: List[Sample]
    class_names: List[str]
    source: str = ""
    skipped: List[Tuple[str, str]] = field(default_factory=list)


def printable(text: PathLike) -> str:
    """``text`` (a path, a class name) as valid UTF-8: bytes of a file name that are not UTF-8 become ``\\xNN``.

    Example::

        printable(os.fsdecode(b"caf\\xe9"))  # -> 'caf\\\\xe9'
    """
    try:
        raw = os.fsencode(text)
    except UnicodeEncodeError:  # a lone surrogate that no file name decoded to
        raw = str(text).encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------------------------------------
# Discovering samples
# ---------------------------------------------------------------------------------------------


def _check_image_file(path: Path) -> None:
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise DataError(
            f"{path}: unsupported image type {path.suffix or '(no extension)'!r}; expected one of "
            f"{' '.join(IMAGE_EXTENSIONS)}; convert the file or move it out of the data folder"
        )


def _class_folders(root: Path) -> Dict[str, List[str]]:
    """``{class name: sorted image paths}`` for the class folders of ``root``."""
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    out: Dict[str, List[str]] = {}
    for folder in classes:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        for f in files:
            _check_image_file(f)
        if not files:
            raise DataError(f"class folder {folder} holds no images; add images to it or remove the folder")
        out[folder.name] = [str(f) for f in files]
    if len(out) < 2:
        found = f"only class {next(iter(out))!r}" if out else "no class folders"
        raise DataError(
            f"{root}: found {found}; a classifier needs at least 2 class folders (e.g. {root}/cat/, {root}/dog/)"
        )
    return out


def _read_csv(path: Path) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    try:  # utf-8-sig: Excel writes UTF-8 CSVs with a byte-order mark
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}); "
                        "save the CSV as UTF-8") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    for i, row in enumerate(rows, 1):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path}: row {i} is {row!r}; expected 'path,label'")
        img = Path(row[0].strip())
        img = img if img.is_absolute() else path.parent / img
        _check_image_file(img)
        if not img.is_file():
            raise FileNotFoundError(f"{path}: row {i} names {img}, which does not exist; fix the path (relative to the CSV)")
        out.setdefault(row[1].strip(), []).append(str(img))
    if len(out) < 2:
        raise DataError(f"{path}: found {len(out)} label(s); a classifier needs at least 2 distinct labels")
    return {k: sorted(out[k]) for k in sorted(out)}


def _split(by_class: Dict[str, List[str]], val_split: float, seed: int) -> Tuple[Dict[str, List[str]], Dict[str, List[str]]]:
    """Per-class (stratified) split with a fixed seed: every class appears in both parts."""
    if not 0.0 < val_split < 1.0:
        raise DataError(f"val_split must be in (0, 1) to split one folder into train and val, got {val_split}")
    g = torch.Generator().manual_seed(seed)
    train, val = {}, {}
    for name, files in by_class.items():
        if len(files) < 2:
            raise DataError(f"class {name!r} has {len(files)} image; need at least 2 to split it into train and val")
        order = torch.randperm(len(files), generator=g).tolist()
        n_val = min(len(files) - 1, max(1, round(len(files) * val_split)))
        val[name] = sorted(files[i] for i in order[:n_val])
        train[name] = sorted(files[i] for i in order[n_val:])
    return train, val


def load_splits(data: PathLike, *, val_split: float = 0.2, seed: int = 0) -> Splits:
    """Find the train and val samples of a dataset: ``load_splits("data/digits")``.

    See the module docstring for the layouts. Class indices follow the sorted class names.
    """
    root = Path(data)
    if not root.exists():
        raise FileNotFoundError(
            f"data {str(root)!r} does not exist; give a folder with train/ and val/ class folders, "
            "a folder of class folders, or a CSV of path,label"
        )
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataError(f"data {str(root)!r} is a file but not a .csv; give a folder or a CSV of path,label")
        train, val = _split(_read_csv(root), val_split, seed)
        source = f"{root} (CSV, val_split={val_split})"
    elif (root / "train").is_dir() and (root / "val").is_dir():
        train, val = _class_folders(root / "train"), _class_folders(root / "val")
        extra = sorted(set(val) - set(train))
        if extra:
            raise DataError(f"{root}/val has class folder(s) {extra} that {root}/train lacks; train and val need the same classes")
        source = f"{root} (train/ and val/)"
    else:
        base = root / "train" if (root / "train").is_dir() else root
        train, val = _split(_class_folders(base), val_split, seed)
        source = f"{base} (split with val_split={val_split}, seed={seed})"
    names = sorted(train)
    index = {n: i for i, n in enumerate(names)}
    as_samples = lambda d: [(p, index[n]) for n in sorted(d) for p in d[n]]  # noqa: E731
    return Splits(as_samples(train), as_samples(val), names, source)


def folder_samples(data: PathLike, class_names: Sequence[str]) -> List[Sample]:
    """Samples of a folder of class folders (or of its ``val/``), indexed by ``class_names``.

    Example::

        folder_samples("data/digits/val", ["0", "1", ...])
    """
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist; give a folder of class folders")
    if (root / "val").is_dir():
        root = root / "val"
    found = _class_folders(root)
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise DataError(f"{root} has class folder(s) {unknown} that the model does not know (it knows {list(class_names)})")
    return [(p, list(class_names).index(n)) for n in sorted(found) for p in found[n]]


# ---------------------------------------------------------------------------------------------
# Reading images
# ---------------------------------------------------------------------------------------------


def check_images(samples: Sequence[Sample], *, strict: bool = False) -> Tuple[List[Sample], List[Tuple[str, str]]]:
    """Decode every image once; return the readable samples and ``(path, reason)`` of the others.

    Example::

        good, bad = check_images(splits.train)

    ``strict=True`` raises on the first unreadable image instead. JPEGs decode at reduced size
    (``draft``) so the check stays fast on large photos.
    """
    good, bad = [], []
    for path, label in samples:
        try:
            probe_image(path)
        except UnreadableImageError as exc:
            if strict:
                raise DataError(f"{exc}; fix or remove it, or drop --strict-data to skip such files") from None
            bad.append((path, exc.reason))
            continue
        good.append((path, label))
    return good, bad


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


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
    (the weights' own :func:`~densenet_zoo.weights.registry.eval_pipeline`)."""
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


class ImageDataset(Dataset):
    """``(image tensor, label)`` pairs from ``(path, label)`` samples.

    Example::

        ds = ImageDataset(splits.train, train_transform(pre), seed=0); ds.set_epoch(3)

    With ``seed`` set, the random transform of sample ``i`` in epoch ``e`` is seeded from
    ``(seed, e, i)`` inside a forked RNG: the same in any worker, on any rank, after any resume,
    and the caller's RNG stream is untouched.
    """

    def __init__(self, samples: Sequence[Sample], transform: Any, *, in_chans: int = 3, seed: Optional[int] = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.in_chans = in_chans
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            img = open_image(path, self.in_chans)
        except UnreadableImageError as exc:  # changed after the check at start: say which file
            raise DataError(f"{exc}; fix or remove it") from None
        if self.seed is None:
            return self.transform(img), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch * 100_003 + index) % (2**63))
            return self.transform(img), label


# ---------------------------------------------------------------------------------------------
# Sample data
# ---------------------------------------------------------------------------------------------

SAMPLE_DATASETS = ("digits",)
_MARKER = ".densenet_zoo_sample"


def write_sample_data(name: str, root: PathLike, *, val_fraction: float = 0.2, seed: int = 0) -> Dict[str, int]:
    """Write a real image dataset as PNG class folders ``root/train`` and ``root/val``.

    Example::

        write_sample_data("digits", "data/digits")  # -> {'train': 1438, 'val': 359}

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
        raise RuntimeError("sample data needs scikit-learn: pip install 'densenet_zoo[data]'") from None
    digits = load_digits()
    images = (torch.as_tensor(digits.images) * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8)
    by_class: Dict[str, List[str]] = {}
    for i, t in enumerate(digits.target.tolist()):
        by_class.setdefault(str(t), []).append(f"{i:04d}")
    train, val = _split(by_class, val_fraction, seed)
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
