"""Normalisation registry and per-layer spec resolution.

A *norm spec* says which normalisation every norm layer of a DenseNet gets. It can be

* ``None`` or a registered name (``"bn"``, ...): the same norm everywhere;
* a factory ``f(num_features) -> nn.Module`` (a class such as ``nn.BatchNorm2d`` works too);
* a function ``f(name, num_features)`` returning a module, a registered name or a factory;
* a dict ``{glob pattern: spec}`` on qualified names (``features.denseblock2.denselayer5.norm1``),
  the first matching pattern wins.

Every form resolves to one function ``make(name, num_features) -> nn.Module``, which the model
calls once per norm layer with its state-dict name.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Callable, Dict, Mapping, Optional, Union

import torch.nn as nn

NormFactory = Callable[[int], nn.Module]
NormSpec = Union[None, str, NormFactory, Callable[[str, int], object], Mapping[str, object]]
NormMaker = Callable[[str, int], nn.Module]

_REGISTRY: Dict[str, NormFactory] = {}


def register_norm(name: str, factory: NormFactory, *, overwrite: bool = False) -> None:
    """Register ``factory(num_features) -> nn.Module`` under ``name``.

    >>> register_norm("my_bn", lambda c: nn.BatchNorm2d(c, momentum=0.01))
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"norm name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"norm {name!r}: factory must be callable (num_features) -> nn.Module, got {type(factory).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"norm {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory


def list_norms() -> list:
    """Names of the registered norms, sorted. ``list_norms()`` -> ``['bn', ...]``."""
    return sorted(_REGISTRY)


def get_norm_factory(name: str, *, layer: Optional[str] = None) -> NormFactory:
    """The factory registered under ``name``; the error suggests close names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        where = f" for layer {layer!r}" if layer else ""
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown norm {name!r}{where}; registered norms: {', '.join(list_norms())}{hint}") from None


def _positional_arity(fn: Callable) -> Optional[int]:
    """Number of positional parameters a plain function takes (None for classes/unknown)."""
    if inspect.isclass(fn):
        return None
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]
    return len(required)


def _build(value: object, name: str, num_features: int, *, depth: int = 0) -> nn.Module:
    """Turn what a spec gave for one layer (a module, a name or a factory) into a module."""
    if isinstance(value, nn.Module):
        return value
    if value is None:
        value = "bn"
    if isinstance(value, str):
        value = get_norm_factory(value, layer=name)
    if callable(value) and depth < 2:
        if _positional_arity(value) == 2:
            return _build(value(name, num_features), name, num_features, depth=depth + 1)
        return _build(value(num_features), name, num_features, depth=depth + 1)
    raise TypeError(
        f"norm spec for layer {name!r} gave {type(value).__name__}, expected an nn.Module, "
        "a registered norm name or a factory f(num_features) -> nn.Module"
    )


def resolve_norm(spec: NormSpec = None, *, strict: bool = False) -> NormMaker:
    """Resolve a norm spec into ``make(name, num_features) -> nn.Module``.

    >>> make = resolve_norm({"features.denseblock4.*": "frozen_bn", "*": "bn"})
    >>> make("features.denseblock4.denselayer1.norm1", 512)
    FrozenBatchNorm2d(512, ...)

    With ``strict=True`` a dict pattern that matches no layer is an error; call
    ``make.check_unused()`` once every layer has been built to enforce it.
    """
    if isinstance(spec, Mapping):
        rules = list(spec.items())
        for pattern, _ in rules:
            if not isinstance(pattern, str):
                raise TypeError(f"norm spec dict keys must be glob patterns (str), got {pattern!r}")
        used = set()

        def make(name: str, num_features: int) -> nn.Module:
            for pattern, value in rules:
                if fnmatch.fnmatchcase(name, pattern):
                    used.add(pattern)
                    return _build(value, name, num_features)
            raise ValueError(
                f"no pattern of the norm spec matches layer {name!r}; add a catch-all such as '*': 'bn'"
            )

        def check_unused() -> None:
            unused = [p for p, _ in rules if p not in used]
            if strict and unused:
                raise ValueError(f"norm spec pattern(s) {unused} match no norm layer of this model")

        make.check_unused = check_unused  # type: ignore[attr-defined]
        return make

    if spec is not None and not isinstance(spec, str) and not callable(spec):
        raise TypeError(
            f"norm_layer must be a name, a factory, a function (name, num_features) or a dict of glob patterns, "
            f"got {type(spec).__name__}"
        )
    if isinstance(spec, str):
        get_norm_factory(spec)  # fail early on unknown names

    def make(name: str, num_features: int) -> nn.Module:
        return _build(spec, name, num_features)

    make.check_unused = lambda: None  # type: ignore[attr-defined]
    return make


register_norm("bn", nn.BatchNorm2d)
