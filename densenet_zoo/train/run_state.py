"""What a run's ``state.pt`` must hold, field by field, before a resume trusts it.

A damaged or edited state (a negative epoch, a list where a tensor belongs, a history that disagrees
with its epoch count) would otherwise train nonsense or fail deep inside the trainer with an error
that names nothing; here it is refused with one line naming the file and the field.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from .._utils import RunError

__all__ = ["check_run_state"]


def _count(v: Any) -> Optional[str]:
    if isinstance(v, bool) or not isinstance(v, int):
        return f"is {type(v).__name__}, expected a whole number"
    return "is negative" if v < 0 else None


def _names(v: Any) -> Optional[str]:
    if not isinstance(v, list) or not v or not all(isinstance(n, str) and n for n in v):
        return "is not a non-empty list of class names"
    return "names a class twice" if len(set(v)) != len(v) else None


def _tensors(v: Any) -> Optional[str]:
    if not isinstance(v, dict) or not v:
        return "is not a non-empty dict of tensors"
    bad = next((k for k, t in v.items() if not isinstance(k, str) or not isinstance(t, torch.Tensor)), None)
    return None if bad is None else f"holds {bad!r}, which is not a named tensor"


def _optimizer(v: Any) -> Optional[str]:
    if not isinstance(v, dict) or not isinstance(v.get("state"), dict) or not isinstance(v.get("param_groups"), list):
        return "is not an optimizer state (a dict with 'state' and 'param_groups')"
    if not v["param_groups"] or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in v["param_groups"]):
        return "has parameter groups without a 'params' list"
    return None


def _dict(v: Any) -> Optional[str]:
    return None if isinstance(v, dict) else f"is {type(v).__name__}, expected a dict"


def _rng(v: Any) -> Optional[str]:
    if not isinstance(v, list) or not v:
        return "is not a non-empty list of RNG states (one per process)"
    for s in v:
        if not isinstance(s, dict) or not isinstance(s.get("torch"), torch.Tensor) or s["torch"].dtype != torch.uint8:
            return "holds an entry without a torch RNG state (a uint8 tensor)"
        if not isinstance(s.get("python"), list):
            return "holds an entry without a Python RNG state"
    return None


def _partial(v: Any) -> Optional[str]:
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != (4,) or not v.is_floating_point():
        return "is not 4 floating-point sums (loss, top-1, top-5, count)"
    if not bool(torch.isfinite(v).all()) or bool((v[1:] < 0).any()):
        return "holds a non-finite or negative sum"
    return None


def _history(v: Any) -> Optional[str]:
    if not isinstance(v, list) or not all(isinstance(r, dict) for r in v):
        return "is not a list of per-epoch records"
    epochs = [r.get("epoch") for r in v]
    if epochs != list(range(1, len(v) + 1)):
        return "does not number its epochs 1, 2, 3, ..."
    return None


def _accuracy(v: Any) -> Optional[str]:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return f"is {v!r}, expected a number"
    return None if v == -1.0 or 0.0 <= v <= 100.0 else f"is {v!r}, outside 0..100 (or -1 before the first epoch)"


_FIELDS: Dict[str, Callable[[Any], Optional[str]]] = {
    "config": _dict, "class_names": _names, "model": _tensors, "optimizer": _optimizer, "scheduler": _dict,
    "rng": _rng, "epoch": _count, "batches_done": _count, "global_step": _count, "partial": _partial,
    "history": _history, "best_acc1": _accuracy, "best_epoch": _count, "bad_epochs": _count,
}


def _consistency(state: Dict[str, Any]) -> Optional[tuple]:
    """A field whose value contradicts the others, with why."""
    if len(state["history"]) != state["epoch"]:
        return "history", f"has {len(state['history'])} epochs, but 'epoch' says {state['epoch']} are done"
    if state["best_epoch"] > state["epoch"]:
        return "best_epoch", f"is {state['best_epoch']}, after the last finished epoch {state['epoch']}"
    if state["bad_epochs"] > state["epoch"]:
        return "bad_epochs", f"is {state['bad_epochs']}, more than the {state['epoch']} epochs done"
    scaler = state.get("scaler", {})
    if not isinstance(scaler, dict):
        return "scaler", f"is {type(scaler).__name__}, expected a dict"
    return None


def check_run_state(state: Dict[str, Any], path: Path) -> Dict[str, Any]:
    """Refuse a training state whose fields are not what a run saves.

    Args:
        state: what ``torch.load(path, weights_only=True)`` returned (a dict with every field).
        path: the file, named in the message.

    Returns:
        ``state``, unchanged.

    Raises:
        RunError: one line naming ``path``, the field and what is wrong with it.

    Example:
        state = check_run_state(torch.load(path, weights_only=True), path)
    """
    for name, check in _FIELDS.items():
        problem = check(state[name])
        if problem:
            break
    else:
        found = _consistency(state)
        if found is None:
            return state
        name, problem = found
    raise RunError(f"{path}: field {name!r} {problem}; the training state is damaged or edited and cannot be resumed: "
                   "start a new run with another --out")
