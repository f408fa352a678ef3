"""Normalisation registry and per-layer spec resolution.

A *norm spec* says which normalisation every norm layer of a DenseNet gets. It can be

* ``None`` or a registered name (``"bn"``, ...): the same norm everywhere;
* a factory ``f(num_features) -> nn.Module`` (a class such as ``nn.BatchNorm2d`` works too);
* a function ``f(name, num_features)`` returning a module, a registered name or a factory;
* a dict ``{glob pattern: spec}`` on qualified names (``features.denseblock2.denselayer5.norm1``),
  the first matching pattern wins.

Every form resolves to one function ``make(name, num_features) -> nn.Module``, which the model
calls once per norm layer with its state-dict name. :func:`convert_norm` applies a spec to the
norm layers of a model that is already built, keeping its weights and running statistics.

Registered norms: ``bn`` (``nn.BatchNorm2d``), ``custom_bn`` (:class:`~densenet_zoo.norms.batchnorm.BatchNorm2d`,
written from tensor operations), ``sync_bn`` (:class:`~densenet_zoo.norms.batchnorm.SyncBatchNorm`, any
``torch.distributed`` backend), ``frozen_bn`` (:class:`~densenet_zoo.norms.batchnorm.FrozenBatchNorm2d`),
``group_norm`` (``nn.GroupNorm``, groups chosen per layer by :func:`group_norm`) and ``caffe_bn``
(:class:`~densenet_zoo.norms.caffe.CaffeBatchNorm2d`, Caffe's BatchNorm + Scale).
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Callable, Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn

from .batchnorm import BatchNorm2d, FrozenBatchNorm2d, SyncBatchNorm, _NormBase
from .caffe import CaffeBatchNorm2d

NormFactory = Callable[[int], nn.Module]
NormSpec = Union[None, str, NormFactory, Callable[[str, int], object], Mapping[str, object]]
NormMaker = Callable[[str, int], nn.Module]

_REGISTRY: Dict[str, NormFactory] = {}


def register_norm(name: str, factory: NormFactory, *, overwrite: bool = False) -> None:
    """Register ``factory(num_features) -> nn.Module`` under ``name``.

    Args:
        name: the name ``norm_layer=`` and ``--norm`` will accept.
        factory: called with the number of channels, returns the norm layer.
        overwrite: replace an existing registration of ``name``.

    Raises:
        ValueError: ``name`` is empty or already registered (without ``overwrite``).
        TypeError: ``factory`` is not callable.

    Example:
        register_norm("my_bn", lambda c: nn.BatchNorm2d(c, momentum=0.01))
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"norm name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"norm {name!r}: factory must be callable (num_features) -> nn.Module, got {type(factory).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"norm {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory


def list_norms() -> list:
    """Names of the registered norms, sorted.

    Returns:
        The names ``norm_layer=`` accepts.

    Example:
        >>> list_norms()[:3]
        ['bn', 'caffe_bn', 'custom_bn']
    """
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
        if depth == 0:  # one instance in the spec itself would be shared by every layer it matches
            raise TypeError(
                f"norm spec for layer {name!r} is a module instance ({type(value).__name__}); give a factory "
                f"instead, e.g. lambda c: {type(value).__name__}(c), so that each layer gets its own"
            )
        channels = getattr(value, "num_features", getattr(value, "num_channels", num_features))
        if isinstance(channels, int) and channels != num_features:
            raise ValueError(
                f"norm for layer {name!r} has {channels} channels but the layer has {num_features}; "
                "build it from the num_features the factory receives"
            )
        return value
    if value is None:
        value = "bn"
    if isinstance(value, str):
        value = get_norm_factory(value, layer=name)
    if callable(value) and depth < 2:
        try:
            made = value(name, num_features) if _positional_arity(value) == 2 else value(num_features)
        except (ValueError, TypeError) as e:
            if repr(name) in str(e):
                raise
            raise type(e)(f"norm for layer {name!r} ({num_features} channels) could not be built: {e}") from e
        return _build(made, name, num_features, depth=depth + 1)
    raise TypeError(
        f"norm spec for layer {name!r} gave {type(value).__name__}, expected an nn.Module, "
        "a registered norm name or a factory f(num_features) -> nn.Module"
    )


def resolve_norm(spec: NormSpec = None, *, strict: bool = False) -> NormMaker:
    """Resolve a norm spec into ``make(name, num_features) -> nn.Module``.

    Args:
        spec: ``None`` (``nn.BatchNorm2d``), a registered name, a factory ``f(num_features)``, a
            function ``f(name, num_features)`` returning a module or a name, or a dict of glob
            patterns on layer names to any of these (first match wins).
        strict: make a dict pattern that matches no layer an error; call ``make.check_unused()``
            once every layer has been built to enforce it.

    Returns:
        ``make(layer_name, num_features)``, building the norm layer of that name.

    Raises:
        ValueError: an unknown norm name (with close matches).
        TypeError: a spec of another kind, or a dict key that is not a glob pattern.

    Example:
        >>> make = resolve_norm({"features.denseblock4.*": "frozen_bn", "*": "bn"})
        >>> type(make("features.denseblock4.denselayer1.norm1", 512)).__name__
        'FrozenBatchNorm2d'
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


def group_norm(num_groups: Optional[int] = None, *, eps: float = 1e-5, affine: bool = True) -> NormFactory:
    """A factory of ``nn.GroupNorm`` layers.

    With ``None`` (the registered ``"group_norm"``) the groups are chosen per layer: 32 (Wu & He's
    default) when 32 divides the channels, as in every layer of densenet121/161/169/201/264,
    otherwise the largest divisor of the channels not above 32 (e.g. 24 channels -> 24 groups,
    36 -> 18, 60 -> 30).

    Args:
        num_groups: groups of every layer; a layer whose channels it does not divide is an error
            naming the layer. ``None`` chooses per layer, as above.
        eps: GroupNorm's ``eps``.
        affine: GroupNorm's ``affine``.

    Returns:
        A norm factory for ``norm_layer=``.

    Example:
        model = densenet121(norm_layer=group_norm(16))
    """
    if num_groups is not None and (isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1):
        raise ValueError(f"num_groups must be a positive integer or None (choose per layer), got {num_groups!r}")

    def make(num_channels: int) -> nn.Module:
        if num_groups is None:
            groups = max(g for g in range(1, 33) if num_channels % g == 0)
        elif num_channels % num_groups:
            raise ValueError(
                f"GroupNorm with {num_groups} groups cannot split {num_channels} channels; "
                f"pick a divisor of {num_channels} or use group_norm() to choose the groups per layer"
            )
        else:
            groups = num_groups
        return nn.GroupNorm(groups, num_channels, eps=eps, affine=affine)

    return make


# ---------------------------------------------------------------------------------------------
# Converting the norm layers of a built model
# ---------------------------------------------------------------------------------------------

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, _NormBase, FrozenBatchNorm2d, CaffeBatchNorm2d)


def is_norm_layer(module: nn.Module) -> bool:
    """Whether :func:`convert_norm` treats ``module`` as a norm layer (BatchNorm, GroupNorm, ours, registered classes).

    Args:
        module: any module.

    Returns:
        ``True`` for a norm layer.

    Example:
        >>> is_norm_layer(nn.GroupNorm(4, 8)), is_norm_layer(nn.ReLU())
        (True, False)
    """
    registered = tuple(f for f in _REGISTRY.values() if isinstance(f, type))
    return isinstance(module, _NORM_TYPES + registered)


def _num_channels(module: nn.Module) -> int:
    for attr in ("num_features", "num_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    raise TypeError(f"cannot tell the number of channels of {type(module).__name__}: it has no num_features/num_channels")


def _norm_layers(module: nn.Module, prefix: str = ""):
    """(qualified name, parent, attribute, layer) of every outermost norm layer, in module order."""
    for name, child in module.named_children():
        qualified = f"{prefix}{name}"
        if is_norm_layer(child):
            yield qualified, module, name, child
        else:
            yield from _norm_layers(child, qualified + ".")


def _transfer(old: nn.Module, new: nn.Module, name: str, allow_lossy: bool) -> nn.Module:
    """Put ``old``'s shared state into ``new`` on old's device/dtype and mode; refuse silent loss."""
    floats = [t for t in old.state_dict().values() if t.is_floating_point()]
    if floats:
        new.to(device=floats[0].device, dtype=floats[0].dtype)
    old_sd, new_sd = old.state_dict(), new.state_dict()
    dropped = [k for k in old_sd if k not in new_sd]
    if dropped and not allow_lossy:
        raise ValueError(
            f"converting layer {name!r} from {type(old).__name__} to {type(new).__name__} would drop "
            f"{', '.join(dropped)}; pass allow_lossy=True to convert anyway"
        )
    for key in (k for k in old_sd if k in new_sd):
        if old_sd[key].shape != new_sd[key].shape:
            raise ValueError(
                f"layer {name!r}: {key} has shape {tuple(old_sd[key].shape)} in {type(old).__name__} but "
                f"{tuple(new_sd[key].shape)} in {type(new).__name__}; build the new norm with matching options"
            )
    for attr in ("eps", "momentum"):  # keep the numerics of the layer, not the defaults of the new class
        if hasattr(old, attr) and hasattr(new, attr):
            setattr(new, attr, getattr(old, attr))
    with torch.no_grad():
        for key, value in old_sd.items():
            if key in new_sd:
                new_sd[key].copy_(value)
    for attr in ("weight", "bias"):
        p_old, p_new = getattr(old, attr, None), getattr(new, attr, None)
        if isinstance(p_old, nn.Parameter) and isinstance(p_new, nn.Parameter):
            p_new.requires_grad_(p_old.requires_grad)
    return new.train(old.training)


def convert_norm(model: nn.Module, spec: NormSpec, *, strict: bool = False, allow_lossy: bool = False) -> nn.Module:
    """Replace the norm layers of ``model`` (in place) by those a norm spec gives, keeping their state.

    Parameters and buffers the old and new layer share (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``) are copied, as are ``eps`` and ``momentum``; the new
    layer gets the old one's device, dtype, train/eval mode and ``requires_grad``.

    Args:
        model: a model, or a single norm layer.
        spec: any norm spec of :func:`resolve_norm`; with a dict, layers no pattern matches are left
            as they are.
        strict: make a dict pattern that matches no layer an error.
        allow_lossy: allow a conversion that drops state (BatchNorm -> GroupNorm loses the running
            statistics), an error otherwise.

    Returns:
        ``model`` (converted in place), or the new layer when ``model`` was a norm layer.

    Raises:
        ValueError: a lossy conversion without ``allow_lossy``, or a spec :func:`resolve_norm` refuses.

    Example:
        model = convert_norm(densenet121(pretrained=True), "sync_bn")
        model = convert_norm(model, {"features.denseblock4.*": "frozen_bn"})
    """
    make = resolve_norm(spec, strict=strict)
    patterns: Optional[List[str]] = list(spec) if isinstance(spec, Mapping) else None
    if is_norm_layer(model):
        if patterns is not None and not any(fnmatch.fnmatchcase("", p) for p in patterns):
            return model
        return _transfer(model, make("", _num_channels(model)), "", allow_lossy)
    for name, parent, attr, old in list(_norm_layers(model)):
        if patterns is not None and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        new = make(name, _num_channels(old))
        setattr(parent, attr, _transfer(old, new, name, allow_lossy))
    make.check_unused()  # type: ignore[attr-defined]
    model_args = getattr(model, "model_args", None)
    if isinstance(model_args, dict):
        # A checkpoint of the converted model rebuilds with the new norm when it has one name.
        if isinstance(spec, str):
            model_args["norm_layer"] = spec
        else:
            model_args.pop("norm_layer", None)
    return model


register_norm("bn", nn.BatchNorm2d)
register_norm("custom_bn", BatchNorm2d)
register_norm("sync_bn", SyncBatchNorm)
register_norm("frozen_bn", FrozenBatchNorm2d)
register_norm("group_norm", group_norm())
register_norm("caffe_bn", CaffeBatchNorm2d)
