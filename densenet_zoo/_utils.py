"""Small pieces every layer shares: the error family, path types, ImageNet constants, printable paths, atomic writes."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Union


PathLike = Union[str, os.PathLike]

#: ImageNet channel statistics (torchvision's and timm's defaults for every published DenseNet).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ZooError(Exception):
    """Base of the errors raised for bad input; the message names the input, what was expected and the fix.

    The command line prints such an error as one line (exit code 1) instead of a traceback.
    """


class UsageError(ZooError, ValueError):
    """An argument, option or input has a value, shape or combination that cannot work."""


class UsageTypeError(ZooError, TypeError):
    """An argument or input is of the wrong type."""


class MissingFileError(ZooError, FileNotFoundError):
    """A file or folder named by the caller does not exist."""


class UnsupportedError(ZooError, RuntimeError):
    """What was asked needs something this installation or object lacks (an optional package, gradients of an
    inference-only network, a model TorchScript cannot compile)."""


class ExportError(ZooError, RuntimeError):
    """An exported program does not reproduce the model it was exported from."""


class CheckpointFileError(ZooError, RuntimeError):
    """A checkpoint file could not be read or does not fit the model (not ``torch.utils.checkpoint.CheckpointError``,
    which is about activation checkpointing)."""


class WeightsError(ZooError, RuntimeError):
    """Weights could not be found, downloaded or verified."""


class DataError(ZooError, ValueError):
    """A dataset, image or CSV cannot be used as given."""


class RunError(ZooError, RuntimeError):
    """A run folder cannot be written, resumed or shared as asked."""


#: Old names that still import, with a ``DeprecationWarning`` naming the new one.
DEPRECATED_NAMES = {"CheckpointError": "CheckpointFileError"}


def deprecated_name(module: str, name: str) -> Any:
    """The object a deprecated ``name`` of ``module`` stands for, after a ``DeprecationWarning``; for a module's
    ``__getattr__``.

    Example::

        def __getattr__(name):  # in a package's __init__.py
            return deprecated_name(__name__, name)
    """
    if name not in DEPRECATED_NAMES:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new = DEPRECATED_NAMES[name]
    warnings.warn(f"{module}.{name} is deprecated; use {module}.{new}", DeprecationWarning, stacklevel=3)
    return globals()[new]


def __getattr__(name: str) -> Any:
    return deprecated_name(__name__, name)


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


def atomic_write(path: PathLike, write: Callable[[Any], None], *, binary: bool = True) -> Path:
    """Write a file through ``write(fileobj)`` into a temporary sibling, fsync, then rename.

    Example::

        atomic_write("runs/x/metrics.csv", lambda f: f.write("epoch,loss\\n"), binary=False)

    ``os.replace`` is atomic on POSIX and Windows: a reader (or a process killed mid-write) sees
    the old file or the new one, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
