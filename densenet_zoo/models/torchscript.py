"""TorchScript: one clear error, before compiling, for a DenseNet that ``torch.jit.script`` cannot compile."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .._utils import UnsupportedError


class ScriptCheckMixin:
    """Gives DenseNet the hook ``torch.jit.script`` calls first."""

    def __prepare_scriptable__(self) -> Any:
        """``torch.jit.script`` calls this first: one clear error for what TorchScript cannot compile."""
        problem = unscriptable_reason(self)
        if problem:
            raise UnsupportedError(f"torch.jit.script cannot compile this DenseNet: {problem}")
        return self


def unscriptable_reason(model: Any) -> Optional[str]:
    """Why TorchScript cannot compile ``model`` and what to do instead, or None."""
    if model.features_only:
        return ("it was built with features_only=True, whose forward returns a list from Python code; script the "
                "model without features_only, or use torch.export or torch.jit.trace")
    strategy = model.memory_strategy.name
    if strategy != "none":
        return (f"memory_efficient={strategy!r} is a training strategy TorchScript cannot run; call "
                "model.set_memory_efficient(False) first (outputs are the same)")
    tried = set()
    for name, module in model.named_modules():
        if not name.rsplit(".", 1)[-1].startswith("norm") or type(module) in tried:
            continue
        tried.add(type(module))
        try:
            torch.jit.script(module)
        except Exception as exc:  # TorchScript raises several error types
            return (f"norm layer {name} ({type(module).__name__}) is not scriptable ({str(exc).strip().splitlines()[0]}); "
                    "build the model with norm_layer='bn' or 'group_norm', or use torch.export or torch.jit.trace, "
                    "which take every norm")
    return None
