"""The named DenseNet configurations (data): growth rate, layers per block, stem width, options."""

from __future__ import annotations

import difflib
from typing import Any, Dict, List, Tuple

__all__ = ["canonical_name", "list_architectures", "model_config"]

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

    >>> model_config("densenet121")
    {'growth_rate': 32, 'block_config': (6, 12, 24, 16), 'num_init_features': 64}
    >>> model_config("densenet_bc_100.digits")["small_inputs"]   # a weights tag after the dot names the same architecture
    True
    """
    growth, blocks, init, extra = _CONFIGS[canonical_name(name)]
    return dict(growth_rate=growth, block_config=blocks, num_init_features=init, **extra)


def canonical_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    key = name.split(".", 1)[0]  # "densenet121.tv_in1k" names a weight tag, the model is before the dot
    if key in _CONFIGS:
        return key
    close = difflib.get_close_matches(key, list(_CONFIGS), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"unknown model {name!r}{hint} (see densenet_zoo.list_models())")




def list_architectures() -> List[str]:
    """Every configuration name, sorted.

    >>> list_architectures()[:3]
    ['densenet121', 'densenet161', 'densenet169']
    """
    return sorted(_CONFIGS)
