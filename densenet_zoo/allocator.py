"""Which C memory allocator a process runs with, and starting processes with another one.

Freed tensors go back to the C allocator, not to the system. glibc's default malloc keeps most of
them in fragmented heaps, so a training process stays at (and creeps above) its highest resident
memory; tcmalloc and jemalloc, preloaded with ``LD_PRELOAD``, keep much less. Choices:

* ``default``: the process as started (glibc's malloc unless something was preloaded);
* ``tcmalloc`` / ``jemalloc``: the installed library preloaded (Debian packages
  ``libtcmalloc-minimal4`` / ``libjemalloc2``);
* ``mmap-threshold``: glibc with every block of 64 KiB or more mapped on its own and returned at
  once (``MALLOC_MMAP_THRESHOLD_``): resident memory follows the live tensors, at a cost in time.

Library code never changes the allocator of the process it runs in; the command line re-executes
itself once with tcmalloc (or jemalloc) when installed, unless ``DENSENET_ZOO_ALLOCATOR=default``.

Example::

    env = allocator_env("tcmalloc")          # {'LD_PRELOAD': '/usr/lib/.../libtcmalloc_minimal.so.4'}
    subprocess.run(cmd, env=dict(os.environ, **env))
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

from ._utils import UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch

ALLOCATORS = ("default", "tcmalloc", "jemalloc", "mmap-threshold")
#: Environment variable read by the command line: auto (default), default, tcmalloc or jemalloc.
ENV_VAR = "DENSENET_ZOO_ALLOCATOR"
_REEXEC_MARK = "DENSENET_ZOO_ALLOCATOR_PRELOADED"
_LIBRARIES = {"tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"), "jemalloc": ("libjemalloc.so.2",)}
_PACKAGES = {"tcmalloc": "libtcmalloc-minimal4", "jemalloc": "libjemalloc2"}
_MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                 "/usr/local/lib", "/lib/x86_64-linux-gnu", "/lib64")


def _check_name(name: str) -> str:
    if name not in ALLOCATORS:
        raise UsageError(f"unknown allocator {name!r}; expected one of {', '.join(ALLOCATORS)}")
    return name


def find_library(name: str) -> Optional[str]:
    """Path of the installed shared library of ``tcmalloc`` or ``jemalloc``, or ``None``."""
    for filename in _LIBRARIES.get(_check_name(name), ()):
        for folder in _LIBRARY_DIRS:
            path = Path(folder) / filename
            if path.is_file():
                return str(path)
    return None


def allocator_env(name: str) -> Dict[str, str]:
    """Environment variables that start a process with allocator ``name`` (``{}`` for ``default``).

    Raises ``ValueError`` naming the Debian package to install when the library is absent.
    """
    if _check_name(name) == "default":
        return {}
    if name == "mmap-threshold":
        return dict(_MMAP_ENV)
    path = find_library(name)
    if path is None:
        raise UsageError(f"allocator {name!r} is not installed (no {' or '.join(_LIBRARIES[name])}); "
                         f"install it with 'apt-get install {_PACKAGES[name]}' or use --allocator default")
    preload = os.environ.get("LD_PRELOAD", "")
    return {"LD_PRELOAD": " ".join(filter(None, [path, preload])), _REEXEC_MARK: name}


def active_allocator() -> str:
    """The allocator this process runs with: tcmalloc/jemalloc when loaded, mmap-threshold, or default."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = os.environ.get("LD_PRELOAD", "")
    for name, files in _LIBRARIES.items():
        if any(f.split(".so")[0] + ".so" in maps for f in files):
            return name
    return "mmap-threshold" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else "default"


def describe(name: str) -> str:
    """One phrase for reports: ``"tcmalloc (/usr/lib/.../libtcmalloc_minimal.so.4)"``, ``"default (glibc malloc)"``."""
    if name in _LIBRARIES:
        return f"{name} ({find_library(name) or 'not installed'})"
    if name == "mmap-threshold":
        return "mmap-threshold (glibc, MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0)"
    return "default (glibc malloc, no settings)"


def allocator_note(active: str) -> str:
    """The first line of a run about its allocator: what runs, and how to change it (or get tcmalloc).

    Example::

        allocator_note("default")   # "memory allocator default (glibc malloc, no settings): tcmalloc is not ..."
    """
    wanted = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if active != "default":
        return f"memory allocator {describe(active)}; {ENV_VAR}=default runs without it"
    if wanted == "default":
        return f"memory allocator {describe(active)}, as {ENV_VAR}=default asks"
    return (f"memory allocator {describe(active)}: tcmalloc is not installed (it keeps training memory lower: "
            f"apt-get install {_PACKAGES['tcmalloc']})")


def preferred_allocator() -> str:
    """What the command line runs with: ``$DENSENET_ZOO_ALLOCATOR``, else tcmalloc if installed, else default."""
    wanted = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if wanted == "auto":
        return "tcmalloc" if find_library("tcmalloc") else "default"
    if wanted not in ("default", "tcmalloc", "jemalloc"):
        raise UsageError(f"{ENV_VAR}={wanted!r} is not understood; expected auto, default, tcmalloc or jemalloc")
    return wanted


def reexec_with_preferred(command: Optional[str], argv: Optional[List[str]], commands: tuple = ("finetune",)) -> None:
    """Command line hook: re-execute ``python -m densenet_zoo ARGV`` once with the preferred allocator.

    Only for a real command line (``argv`` is ``None``) running one of ``commands``; says which
    allocator runs in the first line of stdout. Returns when nothing is to be done or the library is absent.
    """
    if argv is not None or command not in commands:
        return
    wanted = preferred_allocator()
    active = active_allocator()
    if wanted != "default" and active == "default" and not os.environ.get(_REEXEC_MARK):
        try:
            env = dict(os.environ, **allocator_env(wanted))
        except ValueError as exc:
            print(f"densenet-zoo {command}: {exc}", file=sys.stderr)
            return
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "densenet_zoo", *sys.argv[1:]], env)
    # stdout: stderr stays for errors (bad input gives exactly one line there)
    print(f"densenet-zoo {command}: {allocator_note(active)}", flush=True)


def run_script(argv: List[str]) -> int:
    """Run ``python SCRIPT [ARGS]`` in place of this process, with the preferred allocator (``make run``)."""
    if not argv:
        print("run_script needs a script path, e.g. ['examples/main_job.py']", file=sys.stderr)
        return 2
    try:
        wanted = preferred_allocator()
        env = dict(os.environ, **allocator_env(wanted))
    except ValueError as exc:
        print(f"densenet_zoo.allocator: {exc}", file=sys.stderr)
        wanted, env = "default", dict(os.environ)
    print(f"{argv[0]}: {allocator_note(wanted)}", file=sys.stderr)
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)
    return 0  # pragma: no cover  (execve does not return)


def _find_malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's ``malloc_trim``, or ``None`` where the C library has none (musl, macOS, Windows)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


def release_freed_memory(x: "torch.Tensor") -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``), for tensors in host memory.

    glibc keeps freed blocks below its mmap threshold (raised up to 32 MiB as tensors are freed) in
    its heaps, fragmented, so a block's many per-layer temporaries would leave the process resident
    memory the strategy saved. Called at block boundaries; the allocator's settings stay as they are.
    """
    if _MALLOC_TRIM is not None and x.device.type == "cpu":
        _MALLOC_TRIM(0)
