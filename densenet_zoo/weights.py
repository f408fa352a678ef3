"""Weights: safetensors I/O with metadata, and pretrained-model construction."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .model import DenseNet

PathLike = Union[str, os.PathLike]

#: Key of the safetensors metadata entry that holds our JSON metadata.
METADATA_KEY = "densenet_zoo"


def _atomic_replace(tmp: Path, dest: Path) -> None:
    os.replace(tmp, dest)


def save_model(model: DenseNet, path: PathLike, **metadata: Any) -> Path:
    """Write ``model``'s weights and what rebuilds it to a safetensors file, atomically.

    >>> save_model(model, "best.safetensors", class_names=["cat", "dog"], preprocessing={...})

    ``metadata`` must be JSON-serialisable; ``arch`` and ``model_args`` are added from the model.
    """
    path = Path(path)
    meta: Dict[str, Any] = {"arch": getattr(model, "arch", None), "model_args": dict(getattr(model, "model_args", {}))}
    meta.update(metadata)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
        _atomic_replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_safetensors(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """State dict and our metadata (``{}`` when the file has none) of a safetensors file."""
    state: Dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        raw = f.metadata() or {}
        for key in f.keys():
            state[key] = f.get_tensor(key)
    meta = json.loads(raw[METADATA_KEY]) if METADATA_KEY in raw else {}
    return state, meta


def load_model(path: PathLike, **overrides: Any) -> Tuple[DenseNet, Dict[str, Any]]:
    """Rebuild a model saved by :func:`save_model`; returns ``(model, metadata)``.

    ``overrides`` go to the constructor (``memory_efficient=True``, ``norm_layer="frozen_bn"``...).
    """
    state, meta = read_safetensors(path)
    if "model_args" not in meta:
        raise ValueError(f"{path}: no densenet_zoo metadata in this safetensors file; build the model yourself and use load_weights()")
    args = dict(meta["model_args"])
    args.update(overrides)
    model = DenseNet(**args)
    model.arch = meta.get("arch")
    model.load_state_dict(state, strict=True)
    return model, meta


def build_pretrained(arch: str, config: Dict[str, Any], *, weights: Any = None, progress: bool = True) -> DenseNet:
    """Build ``arch`` with ``config`` and load pretrained weights into it."""
    raise NotImplementedError("pretrained weights are not available yet")
