"""``--compile``: whether ``torch.compile`` can build here, checked before a run starts, and its build
failures as one line."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from .._utils import UnsupportedError, printable


def check_compiler(device: torch.device) -> None:
    """Refuse ``--compile`` in one line where the default backend cannot build for ``device``:
    on the CPU it compiles C++, on CUDA it needs Triton."""
    missing = _missing(device)
    if missing:
        raise UnsupportedError(f"--compile: torch.compile cannot build here: {missing}; or run without --compile")


def _missing(device: torch.device) -> Optional[str]:
    try:
        if device.type == "cuda":
            from torch.utils._triton import has_triton

            return None if has_triton() else "its CUDA backend needs Triton (pip install triton)"
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # a torch laid out otherwise: the build itself will tell (see compile_errors)
        return None
    try:
        get_cpp_compiler()
    except Exception as exc:  # inductor's InvalidCxxCompiler
        return f"its CPU backend needs a C++ compiler ({printable(str(exc).strip().splitlines()[0])}); install one (e.g. g++)"
    return None


@contextlib.contextmanager
def compile_errors(compiling: bool) -> Iterator[None]:
    """A build that fails inside the first compiled step anyway, as one line."""
    if not compiling:
        yield
        return
    from torch._dynamo.exc import BackendCompilerFailed

    try:
        yield
    except BackendCompilerFailed as exc:
        cause = getattr(exc, "inner_exception", None) or exc  # the backend's own error, not dynamo's wrapper
        text = str(cause).strip()
        reason = printable(f"{type(cause).__name__}: {text.splitlines()[0]}" if text else type(cause).__name__)
        raise UnsupportedError(f"--compile: torch.compile could not build the model here ({reason}); "
                               "run without --compile") from exc
