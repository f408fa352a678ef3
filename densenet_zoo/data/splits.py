"""Finding a dataset's samples: folders of class folders or a CSV, split into train and val, checked readable.

Layouts accepted by :func:`load_splits`:

* ``DIR/train/<class>/*.png`` and ``DIR/val/<class>/*.png``;
* ``DIR/<class>/*.png`` (or only ``DIR/train/``), split into train/val by ``val_split`` with a fixed seed;
* ``file.csv`` with rows ``path,label`` (paths relative to the CSV), split the same way.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from .._utils import DataError, MissingFileError, PathLike
from .images import UnreadableImageError, probe_image

Sample = Tuple[str, int]

#: File types read as images; any other (non-hidden) file inside a class folder is an error.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class Splits:
    """What :func:`load_splits` found: samples as ``(path, class index)`` and the class names."""

    train: List[Sample]
    val: List[Sample]
    class_names: List[str]
    source: str = ""
    skipped: List[Tuple[str, str]] = field(default_factory=list)


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
            raise MissingFileError(f"{path}: row {i} names {img}, which does not exist; fix the path (relative to the CSV)")
        out.setdefault(row[1].strip(), []).append(str(img))
    if len(out) < 2:
        raise DataError(f"{path}: found {len(out)} label(s); a classifier needs at least 2 distinct labels")
    return {k: sorted(out[k]) for k in sorted(out)}


def split_per_class(by_class: Dict[str, List[str]], val_split: float, seed: int) -> Tuple[Dict[str, List[str]], Dict[str, List[str]]]:
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
        raise MissingFileError(
            f"data {str(root)!r} does not exist; give a folder with train/ and val/ class folders, "
            "a folder of class folders, or a CSV of path,label"
        )
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataError(f"data {str(root)!r} is a file but not a .csv; give a folder or a CSV of path,label")
        train, val = split_per_class(_read_csv(root), val_split, seed)
        source = f"{root} (CSV, val_split={val_split})"
    elif (root / "train").is_dir() and (root / "val").is_dir():
        train, val = _class_folders(root / "train"), _class_folders(root / "val")
        extra = sorted(set(val) - set(train))
        if extra:
            raise DataError(f"{root}/val has class folder(s) {extra} that {root}/train lacks; train and val need the same classes")
        source = f"{root} (train/ and val/)"
    else:
        base = root / "train" if (root / "train").is_dir() else root
        train, val = split_per_class(_class_folders(base), val_split, seed)
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
        raise MissingFileError(f"data folder {str(root)!r} does not exist; give a folder of class folders")
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
