"""Reading checkpoint files as people have them: safetensors (with our metadata), ``.pth`` read with
``torch.load(weights_only=True)`` only, and the state dict inside wrapper dicts (``state_dict``,
``model``, ``ema``... next to optimizer state). What the keys mean is :mod:`.state_dict`'s job."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from safetensors import safe_open

from .._utils import CheckpointFileError, MissingFileError, PathLike

StateDict = Dict[str, torch.Tensor]

#: Key of the safetensors metadata entry that holds our JSON metadata.
METADATA_KEY = "densenet_zoo"

_WRAPPERS = ("state_dict", "model", "model_state", "model_state_dict", "net", "network", "weights", "params")
_EMA_WRAPPERS = ("state_dict_ema", "model_ema", "ema", "ema_state_dict", "ema_model")




def read_safetensors(path: PathLike, *, metadata: bool = True) -> Tuple[StateDict, Dict[str, Any]]:
    """State dict and our metadata (``{}`` when the file has none) of a safetensors file.

    Example::

        state, meta = read_safetensors("best.safetensors")

    ``metadata=False`` skips (and so never fails on) the metadata: what loading tensors into a
    model one built needs.
    """
    state: StateDict = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            for key in f.keys():
                state[key] = f.get_tensor(key)
    except FileNotFoundError:
        raise MissingFileError(f"checkpoint {str(path)!r} does not exist; check the path") from None
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointFileError(f"{path}: not a valid safetensors file ({_first_line(exc)}); re-download or re-export it") from None
    return state, (parse_metadata(raw.get(METADATA_KEY), path) if metadata else {})


def check_safetensors(path: PathLike) -> None:
    """Raise unless ``path`` is a complete safetensors file (its header must describe data that fills it)."""
    with safe_open(str(path), framework="pt") as f:
        f.keys()


def parse_metadata(text: Optional[str], path: PathLike = "checkpoint") -> Dict[str, Any]:
    """Our JSON metadata entry as a dict (``{}`` for none); damaged metadata raises :class:`CheckpointFileError`.

    Example::

        parse_metadata('{"arch": "densenet121"}')  # -> {'arch': 'densenet121'}
    """
    if text is None:
        return {}
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CheckpointFileError(f"{path}: its {METADATA_KEY!r} metadata is not valid JSON ({_first_line(exc)}); the file is "
                              "damaged: re-export it, or build the model yourself and use dz.load_weights (which ignores metadata)") from None
    if not isinstance(meta, dict):
        raise CheckpointFileError(f"{path}: its {METADATA_KEY!r} metadata is a JSON {type(meta).__name__}, expected an object; "
                              "re-export it, or build the model yourself and use dz.load_weights (which ignores metadata)")
    return meta


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def is_safetensors(path: Path) -> bool:
    """A ``.safetensors`` name, or the format's start: an 8-byte header length, then a JSON object."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    # 8-byte little-endian header length, then a JSON object.
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def read_checkpoint(path: PathLike, *, metadata: bool = True) -> Tuple[Any, Dict[str, Any]]:
    """The raw object of a ``.safetensors``/``.pth``/``.pt``/``.bin`` file and our metadata.

    Example::

        obj, meta = read_checkpoint("densenet121-a639ec97.pth")

    ``.pth`` files are read with ``torch.load(weights_only=True)``: a pickle that would build
    arbitrary Python objects (and so could run code) is refused with :class:`CheckpointFileError`;
    so is any file torch cannot read (empty, truncated, damaged). ``metadata=False``: see :func:`read_safetensors`.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointFileError(f"checkpoint {str(path)!r} is a folder; give the path of a .safetensors/.pth file in it")
    if not path.is_file():
        raise MissingFileError(f"checkpoint {str(path)!r} does not exist; check the path")
    if is_safetensors(path):
        return read_safetensors(path, metadata=metadata)
    with open(path, "rb") as f:
        head = f.read(64).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        raise CheckpointFileError(f"{path}: is an HTML/XML page, not weights; it was probably saved from an error or login page, download it again")
    try:
        with warnings.catch_warnings():
            # A plain pickle.dump of tensors (protocol > 2) makes torch warn on two lines; the weights-only
            # reader refuses what it cannot read anyway, with the one-line error below.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc).split("WeightsUnpickler error:", 1)[-1].strip()
        first = detail.splitlines()[0][:200] if detail else type(exc).__name__
        if "global" not in str(exc).lower():  # not a refused class: the pickle stream itself is damaged
            raise CheckpointFileError(f"{path}: not a readable PyTorch checkpoint (damaged pickle: {first}); "
                                  "it may be truncated, re-download or re-save it") from None
        raise CheckpointFileError(
            f"{path}: refused to unpickle: the file holds Python objects other than tensors and plain containers, "
            f"and unpickling them could run code ({first}). Load only files you trust; ask for a .safetensors "
            "file, or convert a trusted one with `densenet-zoo convert` after re-saving its state_dict()"
        ) from None
    except Exception as exc:  # torch.load fails with many types (IndexError on an empty file, KeyError, ...)
        raise CheckpointFileError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {_first_line(exc)}); "
                              "it may be empty or truncated, re-download or re-save it") from None
    return obj, {}


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def extract_state_dict(obj: Any, *, use_ema: bool = False) -> Tuple[StateDict, str]:
    """The tensors of a checkpoint object and where they were found (``""`` for the top level).

    Example::

        state, where = extract_state_dict({"epoch": 3, "state_dict": sd, "optimizer": opt_sd})   # where == "state_dict"

    Wrappers searched, in order: ``state_dict``, ``model``, ``model_state``, ... and, with
    ``use_ema=True`` first, ``state_dict_ema``, ``model_ema``, ``ema``. Optimizer state beside them is ignored.
    """
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict()), ""
    if _is_state_dict(obj):
        # AveragedModel keeps its step counter next to the averaged weights.
        return {k: v for k, v in obj.items() if k != "n_averaged"}, ""
    if isinstance(obj, Mapping):
        order = (_EMA_WRAPPERS + _WRAPPERS) if use_ema else (_WRAPPERS + _EMA_WRAPPERS)
        for key in order:
            if key in obj and isinstance(obj[key], (Mapping, nn.Module)):
                try:
                    state, where = extract_state_dict(obj[key], use_ema=use_ema)
                except CheckpointFileError:
                    continue
                return state, f"{key}.{where}".rstrip(".")
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if len(tensors) >= max(1, len(obj) // 2):  # mostly tensors, plus a few scalars such as an epoch
            return tensors, ""
        keys = ", ".join(map(repr, list(obj)[:8]))
        raise CheckpointFileError(f"no state dict found in this checkpoint: top-level keys are {keys}; expected tensors or one of {_WRAPPERS + _EMA_WRAPPERS}")
    raise CheckpointFileError(f"a checkpoint must hold a dict of tensors, got {type(obj).__name__}")
