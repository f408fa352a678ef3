"""The names accepted by ``memory_efficient=``: registering and looking up strategies."""

from __future__ import annotations

import difflib
from typing import Dict, Union

from .base import MemoryStrategy

_STRATEGIES: Dict[str, MemoryStrategy] = {}

#: What the boolean flag of torchvision's API maps to.
_ALIASES = {False: "none", True: "bottleneck", None: "none"}


def register_memory_strategy(strategy: MemoryStrategy, *, overwrite: bool = False) -> None:
    """Make ``strategy`` available as ``memory_efficient=strategy.name``.

    Args:
        strategy: a :class:`MemoryStrategy` instance.
        overwrite: replace a strategy registered under the same name.

    Raises:
        TypeError: ``strategy`` is not a :class:`MemoryStrategy`.
        ValueError: its name is taken (without ``overwrite``).

    Example:
        register_memory_strategy(AutoStrategy(budget=0.25, name="auto_quarter"))
        model = dz.densenet121(memory_efficient="auto_quarter")
    """
    if not isinstance(strategy, MemoryStrategy):
        raise TypeError(f"expected a MemoryStrategy instance, got {type(strategy).__name__}")
    if strategy.name in _STRATEGIES and not overwrite:
        raise ValueError(f"memory strategy {strategy.name!r} is already registered")
    _STRATEGIES[strategy.name] = strategy


def list_memory_strategies() -> list:
    """Names accepted by ``memory_efficient=``, normal mode first.

    Returns:
        The registered names, in registration order.

    Example:
        >>> list_memory_strategies()[:3]
        ['none', 'bottleneck', 'efficient']
    """
    return list(_STRATEGIES)


def get_memory_strategy(spec: Union[bool, str, MemoryStrategy, None]) -> MemoryStrategy:
    """The strategy a ``memory_efficient=`` value names.

    Args:
        spec: ``False``/``None``/``"none"`` for normal mode, ``True`` for ``"bottleneck"``
            (torchvision's ``memory_efficient=True``), a registered name, or a strategy instance
            (returned as it is).

    Returns:
        The :class:`MemoryStrategy`, prepared to run (:meth:`MemoryStrategy.prepare`).

    Raises:
        ValueError: an unknown name (with close matches).

    Example:
        >>> get_memory_strategy(True).name, get_memory_strategy("fused").description[:12]
        ('bottleneck', 'one function')
    """
    if isinstance(spec, bool) or spec is None:
        spec = _ALIASES[spec]
    if isinstance(spec, str):
        spec = _STRATEGIES.get(spec, spec)
    if isinstance(spec, MemoryStrategy):
        spec.prepare()
        return spec
    close = difflib.get_close_matches(str(spec), list(_STRATEGIES), n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(
        f"unknown memory strategy {spec!r}; expected True/False or one of {', '.join(_STRATEGIES)}{hint}"
    )

