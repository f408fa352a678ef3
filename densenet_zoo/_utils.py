"""Small pieces every layer shares: the version, the error family, path types, ImageNet constants, atomic
writes, and the lazy attributes of the package ``__init__`` files."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, List, Mapping, Tuple, Union

#: The package's version (pyproject.toml says the same); here so that ``densenet-zoo --version`` reads it cheaply.
__version__ = "0.1.0"

PathLike = Union[str, os.PathLike]

#: ImageNet channel statistics (torchvision's and timm's defaults for every published DenseNet).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ZooError(Exception):
    """Base of the errors raised for bad input; the message names the input, what was expected and the fix.

    The command line prints such an error as one line (exit code 1) instead of a traceback.
    """


class CheckpointError(ZooError, RuntimeError):
    """A checkpoint could not be read or does not fit the model."""


class WeightsError(ZooError, RuntimeError):
    """Weights could not be found, downloaded or verified."""


class DataError(ZooError, ValueError):
    """A dataset, image or CSV cannot be used as given."""


class RunError(ZooError, RuntimeError):
    """A run folder cannot be written, resumed or shared as asked."""


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


def lazy_exports(package: str, exports: Mapping[str, str]) -> Tuple[Callable[[str], Any], Callable[[], List[str]]]:
    """A package's module ``__getattr__`` and ``__dir__`` (PEP 562) that import each name on first use.

    A package ``__init__`` that imported every submodule would make ``import densenet_zoo`` pay for all of
    them (torchvision, timm); with these, ``densenet_zoo.create_model`` imports only what it needs.

    Args:
        package: the package's ``__name__``.
        exports: public name -> the module, relative to ``package``, that defines it (e.g. ``".models"``).

    Returns:
        ``(__getattr__, __dir__)``, to be bound to those names in the package's ``__init__``.

    Example::

        __getattr__, __dir__ = lazy_exports(__name__, {"create_model": ".models"})
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        setattr(sys.modules[package], name, value)  # later look-ups find it without this function
        return value

    def __dir__() -> List[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
