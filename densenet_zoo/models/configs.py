"""The named DenseNet configurations (data): growth rate, layers per block, stem width, options."""

from __future__ import annotations

import difflib
from typing import Any, Dict, List, Tuple

from .._utils import UsageError, UsageTypeError

__all__ = ["POOLS", "canonical_name", "check_config", "list_architectures", "model_config"]

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

def model_config(name: str) -> Dict[str, Any]:
    """Constructor arguments of a named architecture.

    Args:
        name: a name of :func:`list_models`; a weights tag after a dot names the same architecture.

    Returns:
        The arguments of :class:`DenseNet` that make it.

    Raises:
        ValueError: an unknown name (with close matches).

    Example:
        >>> model_config("densenet121")
        {'growth_rate': 32, 'block_config': (6, 12, 24, 16), 'num_init_features': 64}
        >>> model_config("densenet_bc_100.digits")["small_inputs"]
        True
    """
    growth, blocks, init, extra = _CONFIGS[canonical_name(name)]
    return dict(growth_rate=growth, block_config=blocks, num_init_features=init, **extra)


def canonical_name(name: str) -> str:
    if not isinstance(name, str):
        raise UsageTypeError(f"model name must be a string, got {type(name).__name__}")
    key = name.split(".", 1)[0]  # "densenet121.tv_in1k" names a weight tag, the model is before the dot
    if key in _CONFIGS:
        return key
    close = difflib.get_close_matches(key, list(_CONFIGS), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise UsageError(f"unknown model {name!r}{hint} (see densenet_zoo.list_models())")




def list_architectures() -> List[str]:
    """Every configuration name, sorted.

    >>> list_architectures()[:3]
    ['densenet121', 'densenet161', 'densenet169']
    """
    return sorted(_CONFIGS)


#: Global pooling choices of the head (timm's names; "" keeps the feature map).
POOLS = ("avg", "max", "avgmax", "")


def check_config(growth_rate, block_config, num_init_features, bn_size, drop_rate, num_classes, in_chans, compression,
                 global_pool, head_drop_rate) -> None:
    """One-line errors for constructor arguments no DenseNet can have."""

    def positive_int(name: str, value: Any, minimum: int = 1) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")

    positive_int("growth_rate", growth_rate)
    positive_int("num_init_features", num_init_features)
    positive_int("bn_size", bn_size)
    positive_int("in_chans", in_chans)
    positive_int("num_classes", num_classes, minimum=0)
    if not isinstance(block_config, (tuple, list)) or not block_config:
        raise UsageError(f"block_config must be a non-empty sequence of layer counts, e.g. (6, 12, 24, 16), got {block_config!r}")
    for n in block_config:
        positive_int("every entry of block_config", n)
    for name, rate in (("drop_rate", drop_rate), ("head_drop_rate", head_drop_rate)):
        if not (isinstance(rate, (int, float)) and 0.0 <= rate < 1.0):
            raise UsageError(f"{name} must be a probability in [0, 1), got {rate!r}")
    if not (isinstance(compression, (int, float)) and 0.0 < compression <= 1.0):
        raise UsageError(f"compression must be in (0, 1], got {compression!r}")
    if global_pool not in POOLS:
        raise UsageError(f"global_pool must be one of {POOLS}, got {global_pool!r}")
