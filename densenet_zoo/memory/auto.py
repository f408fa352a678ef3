"""``memory_efficient="auto"``: the fastest strategy whose memory fits a budget, chosen by measuring.

On its first training forward with a given input shape, each dense block measures every candidate
strategy once on the real input: the bytes kept for backward (unique saved storages, exact) and
the time of a forward + backward of the block. These probe runs restore the norm buffers and the
random number generator state and leave no gradients behind. That first forward runs every block
with its smallest candidate. When a block sees a measured shape again (the next step), the plan is
fixed: the per-block choice that minimises the summed time with summed bytes within the budget.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
import warnings
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from .base import MemoryStrategy, SavedTensorBytes, needs_graph, preserved_buffers
from .registry import get_memory_strategy

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_bytes(value: Union[int, float, str]) -> int:
    """``"8GiB"``, ``"512MB"``, ``"1.5g"`` or a number of bytes -> bytes.

    >>> parse_bytes("8GiB"), parse_bytes("512MB"), parse_bytes(1024)
    (8589934592, 512000000, 1024)
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"memory size {value!r} is not understood; write it like '8GiB', '512MB' or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _check_budget(budget: object) -> Union[float, int]:
    """A fraction of normal mode in (0, 1] stays a float; anything else must be a positive number of bytes."""
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:  # also refuses NaN and infinity
            raise ValueError(f"budget as a fraction of normal mode must be in (0, 1], got {budget}; give bytes as '2GiB'")
        return budget
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise ValueError(f"budget must be a fraction in (0, 1], a number of bytes or a size such as '2GiB', got {budget!r}")
    size = parse_bytes(budget)
    if size < 1:
        raise ValueError(f"budget must be at least 1 byte, got {budget!r}; give a fraction such as 0.5 or a size such as '2GiB'")
    return size


Measurement = Dict[str, Tuple[int, float]]  # candidate name -> (bytes kept for backward, seconds)


class AutoStrategy(MemoryStrategy):
    """Fastest candidate per block whose summed saved bytes fit ``budget``.

    On the first training forward every candidate is measured once per block (exact saved bytes and
    forward+backward time, leaving statistics, RNG and gradients untouched) and that step runs with
    the smallest one; the plan is fixed at the next step.

    Args:
        budget: a float in (0, 1] is a fraction of normal mode's bytes; an int or a string such as
            ``"2GiB"`` is an absolute number of bytes for the dense blocks' saved tensors.
        candidates: names of the strategies to choose from; ``None`` for ``none``, ``efficient``,
            ``shared``, ``norms``, ``layer``, ``fused`` and ``fused_lean``.
        name: the name this instance reports; give another one to register a second configuration.

    Example:
        model = dz.densenet121(memory_efficient=dz.AutoStrategy(budget="1GiB"))
        model.memory_strategy.plan(model.features.denseblock1)   # after two training steps
    """

    name = "auto"
    description = "per block, the fastest strategy whose measured bytes fit a budget (default: half of normal mode)"
    keeps = "per block, what the chosen candidate keeps"
    recomputes = "per block, what the chosen candidate recomputes"
    default_candidates = ("none", "efficient", "shared", "norms", "layer", "fused", "fused_lean")

    def __init__(self, budget: Union[float, int, str] = 0.5, candidates: Optional[Sequence[str]] = None, name: str = "auto") -> None:
        self.budget = _check_budget(budget)
        self.candidates = [get_memory_strategy(c) for c in (candidates or self.default_candidates)]
        if any(isinstance(c, AutoStrategy) for c in self.candidates):
            raise ValueError("the candidates of an AutoStrategy cannot include another AutoStrategy")
        self.name = name
        self._reset()

    def _reset(self) -> None:
        # id(block) -> {input signature: chosen strategy}: plain dicts, which the compiler traces with
        # stable guards; a block's plans leave with it (weakref.finalize in _fix)
        self._plans: Dict[int, Dict[tuple, MemoryStrategy]] = {}
        self._pending: List[Tuple["weakref.ref[nn.ModuleDict]", tuple, Measurement]] = []
        self._local = threading.local()

    def __deepcopy__(self, memo: dict) -> "AutoStrategy":
        return self  # a copied model's blocks are new: they get plans of their own from the same strategy

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_plans", "_pending", "_local")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()
        self.prepare()  # a network unpickled in another process may be compiled there first

    def prepare(self) -> None:
        _eager_chooser()  # what a compiled network calls to measure, made before the compiler traces it

    # -- inspection ----------------------------------------------------------------------------
    def plan(self, block: nn.ModuleDict) -> Dict[tuple, str]:
        """The chosen strategy name of ``block`` per input signature (shape, dtype, device)."""
        return {key: s.name for key, s in self._plans.get(id(block), {}).items()}

    def measurements(self) -> List[Measurement]:
        """Measurements not yet turned into a plan (bytes, seconds per candidate)."""
        return [m for _, _, m in self._pending]

    # -- forward -------------------------------------------------------------------------------
    def layer_forward(self, layer: nn.Module, features: List[Tensor]) -> Tensor:
        active = getattr(self._local, "active", None)
        return (active or MemoryStrategy()).layer_forward(layer, features)

    def block_forward(self, block: nn.ModuleDict, x: Tensor) -> Tensor:
        if not needs_graph([x], block):
            return super().block_forward(block, x)
        if torch.compiler.is_compiling():
            # A fixed plan is traced; measuring runs candidates forward and backward, so it runs in
            # eager mode, outside the graph (a graph break until the plan is fixed).
            chosen = self._plans.get(id(block), {}).get(_signature(x))
            return self._run(chosen or _eager_chooser()(self, block, x), block, x)
        return self._run(self._choose(block, x), block, x)

    def _choose(self, block: nn.ModuleDict, x: Tensor) -> MemoryStrategy:
        """The planned strategy for ``block`` on inputs like ``x``; measures the candidates on a new input signature."""
        key = _signature(x)
        chosen = self._plans.get(id(block), {}).get(key)
        if chosen is None:
            if any(ref() is block and k == key for ref, k, _ in self._pending):
                self._solve()
                chosen = self._plans[id(block)][key]
            else:
                measured = self._measure(block, x)
                self._pending.append((weakref.ref(block), key, measured))
                chosen = get_memory_strategy(min(measured, key=lambda n: measured[n][0]))
        return chosen

    def _run(self, strategy: MemoryStrategy, block: nn.ModuleDict, x: Tensor) -> Tensor:
        previous, self._local.active = getattr(self._local, "active", None), strategy
        try:
            return strategy.block_forward(block, x)
        finally:
            self._local.active = previous

    def _measure(self, block: nn.ModuleDict, x: Tensor) -> Measurement:
        params = [p for p in block.parameters() if p.requires_grad]
        devices = [x.device] if x.device.type == "cuda" else []
        result: Measurement = {}
        for strategy in self.candidates:
            with torch.random.fork_rng(devices=devices), preserved_buffers([block]):
                probe = x.detach().requires_grad_(x.requires_grad)
                _synchronize(x)
                start = time.perf_counter()
                with SavedTensorBytes(exclude=list(block.parameters()) + [x]) as saved:
                    out = self._run(strategy, block, probe)
                targets = ([probe] if probe.requires_grad else []) + params
                torch.autograd.grad(out, targets, torch.ones_like(out), allow_unused=True)
                _synchronize(x)
                result[strategy.name] = (saved.bytes, time.perf_counter() - start)
                del out
        return result

    def _solve(self) -> None:
        entries = [(ref(), key, m) for ref, key, m in self._pending if ref() is not None]
        self._pending = []
        if not entries:
            return
        agreed = _agreed([m for _, _, m in entries], entries[0][1][2])
        entries = [(block, key, m) for (block, key, _), m in zip(entries, agreed)]
        budget = self.budget
        if isinstance(budget, float):
            budget = budget * sum(m["none"][0] if "none" in m else max(v[0] for v in m.values()) for _, _, m in entries)
        names = [list(m) for _, _, m in entries]
        best: Optional[Tuple[float, Tuple[str, ...]]] = None
        combos = itertools.product(*names) if _product_size(names) <= 200_000 else [tuple(min(m, key=lambda n: m[n][0]) for _, _, m in entries)]
        for combo in combos:
            used = sum(m[c][0] for (_, _, m), c in zip(entries, combo))
            seconds = sum(m[c][1] for (_, _, m), c in zip(entries, combo))
            if used <= budget and (best is None or seconds < best[0]):
                best = (seconds, combo)
        if best is None:
            smallest = tuple(min(m, key=lambda n: m[n][0]) for _, _, m in entries)
            need = sum(m[c][0] for (_, _, m), c in zip(entries, smallest))
            warnings.warn(
                f"memory strategy {self.name!r}: no choice keeps the dense blocks within {budget / 2**20:.0f} MiB "
                f"(the smallest needs {need / 2**20:.0f} MiB); using the smallest. Lower the batch size or raise the budget"
            )
            best = (0.0, smallest)
        for (block, key, _), choice in zip(entries, best[1]):
            self._fix(block, key, get_memory_strategy(choice))

    def _fix(self, block: nn.ModuleDict, key: tuple, strategy: MemoryStrategy) -> None:
        if id(block) not in self._plans:  # dropped when the block goes, before its id can name another
            self._plans[id(block)] = {}
            weakref.finalize(block, self._plans.pop, id(block), None)
        self._plans[id(block)][key] = strategy


_REASON = ("memory strategy 'auto' measures its candidates in eager mode until its plan is fixed; "
           "under fullgraph=True, run two eager training steps before compiling")
_EAGER_CHOOSER: Optional[Callable[..., MemoryStrategy]] = None


def _eager_chooser() -> Callable[..., MemoryStrategy]:
    """:meth:`AutoStrategy._choose` behind ``torch.compiler.disable``: under ``torch.compile`` a graph break
    whose reason names the remedy for ``fullgraph=True``. Made on first need, because it imports the
    compiler (a second or two at start-up that no other strategy pays), and before tracing reaches it
    (:meth:`AutoStrategy.prepare`): made inside a traced region it would break the graph a second time."""
    global _EAGER_CHOOSER
    if _EAGER_CHOOSER is None:
        try:
            _EAGER_CHOOSER = torch.compiler.disable(_choose_in_eager, reason=_REASON)
        except TypeError:  # torch before 2.8: no reason
            _EAGER_CHOOSER = torch.compiler.disable(_choose_in_eager)
    return _EAGER_CHOOSER


def _choose_in_eager(strategy: AutoStrategy, block: nn.ModuleDict, x: Tensor) -> MemoryStrategy:
    return strategy._choose(block, x)


def _agreed(measurements: List[Measurement], device: torch.device) -> List[Measurement]:
    """What every process of the default process group measured: per candidate the largest bytes and
    the mean seconds, so that all of them fix the same plan (a process recomputing where another does
    not would run a synchronised norm's collectives alone). Every process measures the same blocks and
    candidates in the same order; alone, the measurements are returned as they are."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return measurements
    world = torch.distributed.get_world_size()
    if world == 1:
        return measurements
    names = [(i, name) for i, m in enumerate(measurements) for name in m]
    on = device if device.type == "cuda" else torch.device("cpu")
    sizes = torch.tensor([float(measurements[i][n][0]) for i, n in names], dtype=torch.float64, device=on)
    seconds = torch.tensor([measurements[i][n][1] for i, n in names], dtype=torch.float64, device=on)
    torch.distributed.all_reduce(sizes, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(seconds)
    agreed: List[Measurement] = [{} for _ in measurements]
    for (i, name), size, sec in zip(names, sizes.tolist(), seconds.tolist()):
        agreed[i][name] = (int(size), sec / world)
    return agreed


def _signature(x: Tensor) -> tuple:
    """What a plan is kept per: the input's shape, dtype and device."""
    return tuple(x.shape), x.dtype, x.device


def _product_size(names: List[List[str]]) -> int:
    size = 1
    for n in names:
        size *= len(n)
    return size


def _synchronize(x: Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
