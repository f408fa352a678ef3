"""Small pieces every layer shares: the version, the error family, path types, ImageNet constants, printable
paths, the one writer of output files, and the lazy attributes of the package ``__init__`` files."""

from __future__ import annotations

import contextlib
import glob
import importlib
import os
import stat
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, List, Mapping, NamedTuple, Optional, Tuple, Union

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


class OutputKind(NamedTuple):
    """What a command writes, and how to tell an existing file of that kind (which it may replace).

    Attributes:
        what: the kind in words, for messages (``"a predictions CSV"``).
        recognise: ``recognise(path)`` is True for an existing file this kind of output wrote.
    """

    what: str
    recognise: Callable[[Path], bool]


def check_output(path: PathLike, kind: Optional[OutputKind] = None, *, overwrite: bool = False, flag: str = "output") -> Path:
    """Refuse an output target that must not be replaced: not a regular file, or (with ``kind``) an existing
    file that is not that kind of output, unless ``overwrite``.

    Args:
        path: the file about to be written.
        kind: the command's kind of output; ``None`` replaces any regular file (files inside a run folder).
        overwrite: the user's ``--overwrite``.
        flag: the option that named ``path``, for the message.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        DataError: one line naming the path, what is there and what to do.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise DataError(f"{flag} {path} cannot be checked ({exc.strerror or exc}); choose another path") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"{flag} {path} is a folder; give a file name in it")
    if not stat.S_ISREG(st.st_mode):
        what = ("a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else
                "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise DataError(f"{flag} {path} is {what}, not a regular file: nothing was written; give a file path "
                        "(to discard the output, leave the option out)")
    if kind is not None and not overwrite and not _recognised(kind, path):
        raise DataError(f"{flag} {path} exists and is not {kind.what} written by densenet-zoo; pass --overwrite to "
                        "replace it, or choose another path")
    return path


def _recognised(kind: OutputKind, path: Path) -> bool:
    try:
        return bool(kind.recognise(path))
    except Exception:  # noqa: BLE001 - unreadable or foreign content: not ours
        return False


@contextlib.contextmanager
def atomic_path(path: PathLike, *, kind: Optional[OutputKind] = None, overwrite: bool = False,
                suffix: str = "") -> Iterator[Path]:
    """A fresh temporary sibling of ``path`` to write (by name), renamed onto ``path`` when the block ends well.

    Args:
        path: the target; checked by :func:`check_output` with ``kind`` and ``overwrite``.
        suffix: kept at the end of the temporary name (writers that insist on an extension).

    Yields:
        The temporary path: created empty and exclusively, under an unpredictable name, so a link
        planted in the folder is never followed. Temporaries of killed writes of ``path`` are removed first.

    Example::

        with atomic_path("model.onnx", suffix=".onnx") as tmp:
            torch.onnx.export(model, x, tmp)
    """
    path = check_output(path, kind, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp" + suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()


def atomic_write(path: PathLike, write: Callable[[Any], None], *, binary: bool = True,
                 kind: Optional[OutputKind] = None, overwrite: bool = False) -> Path:
    """Write a file through ``write(fileobj)`` into a temporary sibling, fsync, then rename.

    Example::

        atomic_write("runs/x/metrics.csv", lambda f: f.write("epoch,loss\\n"), binary=False)

    ``os.replace`` is atomic on POSIX and Windows: a reader (or a process killed mid-write) sees
    the old file or the new one, never a half-written one. The target and the temporary file follow
    :func:`atomic_path`: never a device, FIFO or folder; with ``kind``, never a foreign file unless
    ``overwrite``; no link followed.
    """
    with atomic_path(path, kind=kind, overwrite=overwrite) as tmp:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"newline": "", "encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(path: PathLike) -> None:
    """Delete ``.NAME.PID.*.tmp*`` siblings of ``path`` whose writing process is gone (a killed write), and links.

    Example::

        remove_stale_temporaries("runs/x/best.safetensors")
    """
    path = Path(path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp*"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        try:
            if tmp.is_symlink() or not (pid.isdigit() and _alive(int(pid))):
                tmp.unlink()
        except OSError:  # another process's to clean
            pass


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process writes one temporary per target at a time: an older one is a leftover
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: The PNG ``Software`` text chunk of every figure this package writes (how an existing figure is recognised).
FIGURE_SOFTWARE = "densenet_zoo"


def _is_our_figure(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as im:
        return im.format == "PNG" and im.info.get("Software") == FIGURE_SOFTWARE


#: A figure written by :func:`save_figure` (a PNG tagged with :data:`FIGURE_SOFTWARE`).
FIGURE = OutputKind("a figure written by densenet-zoo", _is_our_figure)


def save_figure(fig: Any, path: PathLike, *, overwrite: bool = False, dpi: int = 110) -> Path:
    """Write a matplotlib figure through :func:`atomic_write` (a PNG tagged as this package's), then close it.

    Args:
        fig: the figure.
        path: the file to write, in the format its suffix names (PNG without one); an existing file is
            replaced only when it is one of this package's figures, or with ``overwrite``.
        dpi: resolution.

    Returns:
        ``path``.
    """
    import io

    import matplotlib.pyplot as plt

    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight",
                    metadata={"Software": FIGURE_SOFTWARE} if fmt == "png" else None)
    finally:
        plt.close(fig)
    return atomic_write(path, lambda f: f.write(buf.getvalue()), kind=FIGURE, overwrite=overwrite)


def json_kind(what: str, *keys: str) -> OutputKind:
    """The kind of a JSON report: an object holding every one of ``keys``.

    Example::

        EVALUATION = json_kind("an evaluation report", "acc1", "checkpoint")
    """
    def recognise(path: Path) -> bool:
        import json

        with open(path, "rb") as f:
            obj = json.loads(f.read(64 << 20))
        return isinstance(obj, dict) and all(k in obj for k in keys)

    return OutputKind(what, recognise)


def csv_kind(what: str, first_column: str) -> OutputKind:
    """The kind of a CSV table whose header starts with ``first_column``: ``csv_kind("a profile table", "mode")``."""
    def recognise(path: Path) -> bool:
        with open(path, "rb") as f:
            return f.readline().startswith(first_column.encode() + b",")

    return OutputKind(what, recognise)


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
