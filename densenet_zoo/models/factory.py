"""The named configurations (densenet121 ... densenet_bc_250), their builders, ``list_models`` and ``create_model``."""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable, Dict, List, Tuple

from .model import DenseNet

__all__ = [
    "create_model",
    "list_models",
    "model_config",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet264",
    "densenet_bc_100",
    "densenet_bc_190",
    "densenet_bc_250",
]

#: name -> (growth_rate, block_config, num_init_features, extra kwargs)
_CONFIGS: Dict[str, Tuple[int, Tuple[int, ...], int, Dict[str, Any]]] = {
    "densenet121": (32, (6, 12, 24, 16), 64, {}),
    "densenet161": (48, (6, 12, 36, 24), 96, {}),
    "densenet169": (32, (6, 12, 32, 32), 64, {}),
    "densenet201": (32, (6, 12, 48, 32), 64, {}),
    "densenet264": (32, (6, 12, 64, 48), 64, {}),
    # CIFAR DenseNet-BC (3x3 stem, no max-pool, compression 0.5): depth L -> (L - 4) / 6 layers per block.
    "densenet_bc_100": (12, (16, 16, 16), 24, {"small_inputs": True, "num_classes": 10}),
    "densenet_bc_250": (24, (41, 41, 41), 48, {"small_inputs": True, "num_classes": 10}),
    "densenet_bc_190": (40, (31, 31, 31), 80, {"small_inputs": True, "num_classes": 10}),
}

_ENTRYPOINTS: Dict[str, Callable[..., DenseNet]] = {}


def model_config(name: str) -> Dict[str, Any]:
    """Constructor arguments of a named architecture: ``model_config("densenet121")``."""
    growth, blocks, init, extra = _CONFIGS[_canonical_name(name)]
    return dict(growth_rate=growth, block_config=blocks, num_init_features=init, **extra)


def _canonical_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    key = name.split(".", 1)[0]  # "densenet121.tv_in1k" names a weight tag, the model is before the dot
    if key in _CONFIGS:
        return key
    close = difflib.get_close_matches(key, list(_CONFIGS), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"unknown model {name!r}{hint} (see densenet_zoo.list_models())")


def _build(arch: str, pretrained: bool = False, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    config = model_config(arch)
    config.update(kwargs)
    if pretrained or weights is not None:
        from .weights import build_pretrained  # weights imports model, not the other way round

        return build_pretrained(arch, config, weights=weights, progress=progress)
    model = DenseNet(**config)
    model.arch = arch
    return model


def _register(name: str) -> Callable[..., DenseNet]:
    def builder(pretrained: bool = False, *, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
        return _build(name, pretrained=pretrained, weights=weights, progress=progress, **kwargs)

    growth, blocks, init, _ = _CONFIGS[name]
    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (
        f"{name}: growth rate {growth}, blocks {blocks}, {init} initial features.\n\n"
        f"``{name}(pretrained=True)`` or ``weights=...`` loads published weights; other keyword\n"
        "arguments go to :class:`DenseNet` (``num_classes``, ``in_chans``, ``memory_efficient``, ``norm_layer``...)."
    )
    _ENTRYPOINTS[name] = builder
    return builder


densenet121 = _register("densenet121")
densenet161 = _register("densenet161")
densenet169 = _register("densenet169")
densenet201 = _register("densenet201")
densenet264 = _register("densenet264")
densenet_bc_100 = _register("densenet_bc_100")
densenet_bc_250 = _register("densenet_bc_250")
densenet_bc_190 = _register("densenet_bc_190")


def list_models(pattern: str = "*") -> List[str]:
    """Names accepted by :func:`create_model`, optionally filtered by a glob: ``list_models("densenet1*")``."""
    return sorted(n for n in _ENTRYPOINTS if fnmatch.fnmatchcase(n, pattern))


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """Build a named model: ``create_model("densenet169", num_classes=5)``.

    A ``name.tag`` form (``"densenet121.tv_in1k"``) selects those weights when ``pretrained=True``.
    """
    arch = _canonical_name(name)
    if pretrained and "." in name and "weights" not in kwargs:
        kwargs["weights"] = name
    return _ENTRYPOINTS[arch](pretrained=pretrained, **kwargs)
