"""What every ``densenet-zoo`` command shares: one-line error text and output-path guards."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Iterable, Optional, Tuple

from .._utils import DataError, PathLike, ZooError

#: Errors whose message is written for the user (bad input, missing file, full disk...): printed as they are.
USER_ERRORS = (ZooError, OSError, ValueError, TypeError, LookupError)


def one_line(exc: BaseException) -> str:
    """The error as one line: its lines joined, unexpected errors prefixed with their type and a hint."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):
        lines = lines[-1:]  # re-raised from a DataLoader worker: its last line is the error itself
    text = " ".join(lines) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    if not isinstance(exc, USER_ERRORS):
        text = f"{type(exc).__name__}: {text} (unexpected; rerun with --debug for the traceback)"
    return text


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` name one file (links and relative paths included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet): compare the resolved names
        return Path(a).resolve() == Path(b).resolve()


def refuse_overwriting_inputs(out_flag: str, out: Optional[PathLike], inputs: Iterable[Tuple[str, Optional[PathLike]]]) -> None:
    """A :class:`DataError` when the output ``out`` is the same file as one of ``inputs`` ``(flag, path)``."""
    if not out:
        return
    for flag, path in inputs:
        if path and Path(path).is_file() and same_file(out, path):
            raise DataError(f"{out_flag} {out} is the same file as {flag} {path}; writing it would destroy that input: "
                            f"choose another {out_flag}")


def add_overwrite(parser: argparse.ArgumentParser, what: str) -> None:
    """The ``--overwrite`` flag of a command that writes files: without it, ``what`` is refused."""
    parser.add_argument("--overwrite", action="store_true", help=f"replace {what} (refused otherwise)")
