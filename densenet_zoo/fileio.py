"""Atomic file writes shared by every module that writes user-visible files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Union

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[Any], None], *, binary: bool = True) -> Path:
    """Write a file through ``write(fileobj)`` into a temporary sibling, fsync, then rename.

    >>> atomic_write("runs/x/metrics.csv", lambda f: f.write("epoch,loss\\n"), binary=False)

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
