"""Reading checkpoints as people have them, and loading them into a model with a diagnosis.

Handles torchvision's legacy ``norm.1``/``conv.2`` keys, ``module.``/``model.``/``backbone.``
prefixes, wrapper dicts (``state_dict``, ``model``, ``ema``... next to optimizer state), missing or
extra ``num_batches_tracked``, a classifier of another size and a first conv for other input
channels. ``.pth`` files are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from safetensors import safe_open

from .._utils import CheckpointError

PathLike = Union[str, os.PathLike]
StateDict = Dict[str, torch.Tensor]

#: Key of the safetensors metadata entry that holds our JSON metadata.
METADATA_KEY = "densenet_zoo"
FIRST_CONV = "features.conv0.weight"
CLASSIFIER = ("classifier.weight", "classifier.bias")

# torchvision's own regex: "denselayer1.norm.1.weight" (before 0.2) -> "denselayer1.norm1.weight".
_LEGACY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
_PREFIXES = ("module.", "model.", "backbone.", "_orig_mod.", "net.", "encoder.")
_RENAMES = (("head.fc.", "classifier."),)  # timm heads built with ClassifierHead
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
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a valid safetensors file ({_first_line(exc)}); re-download or re-export it") from None
    return state, (parse_metadata(raw.get(METADATA_KEY), path) if metadata else {})


def parse_metadata(text: Optional[str], path: PathLike = "checkpoint") -> Dict[str, Any]:
    """Our JSON metadata entry as a dict (``{}`` for none); damaged metadata raises :class:`CheckpointError`.

    Example::

        parse_metadata('{"arch": "densenet121"}')  # -> {'arch': 'densenet121'}
    """
    if text is None:
        return {}
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: its {METADATA_KEY!r} metadata is not valid JSON ({_first_line(exc)}); the file is "
                              "damaged: re-export it, or build the model yourself and use dz.load_weights (which ignores metadata)") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its {METADATA_KEY!r} metadata is a JSON {type(meta).__name__}, expected an object; "
                              "re-export it, or build the model yourself and use dz.load_weights (which ignores metadata)")
    return meta


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _is_safetensors(path: Path) -> bool:
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
    arbitrary Python objects (and so could run code) is refused with :class:`CheckpointError`;
    so is any file torch cannot read (empty, truncated, damaged). ``metadata=False``: see :func:`read_safetensors`.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a folder; give the path of a .safetensors/.pth file in it")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; check the path")
    if _is_safetensors(path):
        return read_safetensors(path, metadata=metadata)
    with open(path, "rb") as f:
        head = f.read(64).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        raise CheckpointError(f"{path}: is an HTML/XML page, not weights; it was probably saved from an error or login page, download it again")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc).split("WeightsUnpickler error:", 1)[-1].strip()
        first = detail.splitlines()[0][:200] if detail else type(exc).__name__
        if "global" not in str(exc).lower():  # not a refused class: the pickle stream itself is damaged
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (damaged pickle: {first}); "
                                  "it may be truncated, re-download or re-save it") from None
        raise CheckpointError(
            f"{path}: refused to unpickle: the file holds Python objects other than tensors and plain containers, "
            f"and unpickling them could run code ({first}). Load only files you trust; ask for a .safetensors "
            "file, or convert a trusted one with `densenet-zoo convert` after re-saving its state_dict()"
        ) from None
    except Exception as exc:  # torch.load fails with many types (IndexError on an empty file, KeyError, ...)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {_first_line(exc)}); "
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
                except CheckpointError:
                    continue
                return state, f"{key}.{where}".rstrip(".")
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if len(tensors) >= max(1, len(obj) // 2):  # mostly tensors, plus a few scalars such as an epoch
            return tensors, ""
        keys = ", ".join(map(repr, list(obj)[:8]))
        raise CheckpointError(f"no state dict found in this checkpoint: top-level keys are {keys}; expected tensors or one of {_WRAPPERS + _EMA_WRAPPERS}")
    raise CheckpointError(f"a checkpoint must hold a dict of tensors, got {type(obj).__name__}")


def _candidates(key: str) -> List[str]:
    """Names ``key`` could have in our model: itself, then with known prefixes stripped one by one."""
    out = [key]
    while True:
        for p in _PREFIXES:
            if key.startswith(p):
                key = key[len(p):]
                out.append(key)
                break
        else:
            break
    for old, new in _RENAMES:
        out += [k.replace(old, new, 1) for k in out if k.startswith(old)]
    return [_LEGACY.sub(r"\1\2", k) for k in out]


def normalize_keys(state: Mapping[str, torch.Tensor], target_keys: Optional[Any] = None, *,
                   source: str = "checkpoint") -> Tuple[StateDict, int]:
    """Rename checkpoint keys to ours; returns ``(state, number of keys renamed)``.

    Example::

        normalize_keys({"module.features.denseblock1.denselayer1.norm.1.weight": w})[0]  # -> {'features.denseblock1.denselayer1.norm1.weight': w}

    With ``target_keys`` a prefix is stripped only as far as needed to match a key of the model;
    without, every known prefix is stripped. A key that is not a string, or a value that is not a
    dense real tensor, raises :class:`CheckpointError`.
    """
    targets = set(target_keys) if target_keys is not None else None
    out: StateDict = {}
    renamed = 0
    for key, value in state.items():
        _check_entry(key, value, source)
        cands = _candidates(key)
        new = next((c for c in cands if c in targets), cands[-1]) if targets is not None else cands[-1]
        if new in out:
            raise CheckpointError(f"checkpoint keys {key!r} and another one both map to {new!r}; it mixes two models, extract one first")
        renamed += new != key
        out[new] = value
    return out, renamed


def _check_entry(key: Any, value: Any, source: str) -> None:
    if not isinstance(key, str):
        raise CheckpointError(f"{source}: key {key!r} is of type {type(key).__name__}, expected a string; the file is damaged "
                              "or not a state dict")
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
        kind = f"a {value.layout} tensor" if isinstance(value, torch.Tensor) else f"of type {type(value).__name__}"
        raise CheckpointError(f"{source}: entry {key!r} is {kind}, expected a dense tensor; re-save it with .to_dense()")
    if value.is_complex() or value.is_quantized:
        raise CheckpointError(f"{source}: entry {key!r} has dtype {value.dtype}, expected real numbers; "
                              "dequantize or convert it to float and re-save")


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """First-conv weights for ``in_chans`` input channels from RGB weights (timm's rule).

    Example::

        adapt_input_conv(w_rgb, 1)   # == w_rgb.sum(1, keepdim=True)

    ``in_chans=1`` sums over RGB (a grey image x gives the RGB response to (x, x, x)); otherwise the
    RGB filters are repeated and scaled by 3/in_chans so that the activation scale is kept.
    """
    out_c, c, kh, kw = weight.shape
    if in_chans == c:
        return weight
    dtype = weight.dtype
    w = weight.float()
    if c != 3:
        raise CheckpointError(f"can only adapt a 3-channel first conv to in_chans={in_chans}, the checkpoint's has {c} channels")
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        repeat = math.ceil(in_chans / 3)
        w = w.repeat(1, repeat, 1, 1)[:, :in_chans] * (3.0 / in_chans)
    return w.to(dtype)


@dataclass
class LoadReport:
    """What :func:`load_state` did with each key.

    Example::

        report = load_weights(model, "ckpt.pth"); print(report)
    """

    source: str = ""
    loaded: List[str] = field(default_factory=list)
    adapted: List[str] = field(default_factory=list)  # "key: how"
    reinitialized: List[str] = field(default_factory=list)  # kept the model's fresh init (classifier of another size)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)  # key, checkpoint, model
    renamed: int = 0
    wrapper: str = ""

    @property
    def ok(self) -> bool:
        """True when every key of the model was loaded, adapted or deliberately re-initialised."""
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self) -> str:
        """One line listing missing, unexpected and shape-mismatched keys: ``report.problems()``."""
        parts = []
        if self.missing:
            parts.append(f"missing {len(self.missing)}: {_short(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)}: {_short(self.unexpected)}")
        if self.mismatched:
            parts.append("shape mismatch: " + _short([f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched]))
        return "; ".join(parts)

    def __str__(self) -> str:
        lines = [f"{self.source}: loaded {len(self.loaded)} tensors" + (f" from '{self.wrapper}'" if self.wrapper else "")
                 + (f", {self.renamed} keys renamed" if self.renamed else "")]
        lines += [f"  adapted: {a}" for a in self.adapted]
        if self.reinitialized:
            lines.append(f"  freshly initialised (the checkpoint has another shape): {', '.join(self.reinitialized)}")
        if not self.ok:
            lines.append("  " + self.problems())
        return "\n".join(lines)


def _short(items: List[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" ... (+{len(items) - n} more)" if len(items) > n else "")


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = False, source: str = "state dict",
               wrapper: str = "", adapt_classifier: bool = True, adapt_in_chans: bool = True) -> LoadReport:
    """Load a (normalised) state dict into ``model``, adapting what can be adapted.

    Example::

        report = load_state(model, torchvision_model.state_dict(), strict=True)

    A classifier of another size is left freshly initialised (``report.reinitialized``); a 3-channel
    first conv is adapted to ``model``'s input channels. ``strict=True`` raises
    :class:`CheckpointError` listing missing, unexpected and shape-mismatched keys.
    """
    target = model.state_dict()
    state, renamed = normalize_keys(state, target.keys(), source=source)
    report = LoadReport(source=source, renamed=renamed, wrapper=wrapper)
    new: StateDict = {}
    for key, value in state.items():
        if key not in target:
            if not key.endswith("num_batches_tracked"):  # a norm without that counter (frozen BN) simply has none
                report.unexpected.append(key)
            continue
        want = target[key]
        if want.is_floating_point() and not value.is_floating_point():
            raise CheckpointError(f"{source}: {key} holds {value.dtype} values where the model has {want.dtype}; a quantized "
                                  "or damaged checkpoint: convert it to float first")
        if value.shape == want.shape:
            new[key] = value
            report.loaded.append(key)
        elif adapt_in_chans and key == FIRST_CONV and value.dim() == 4 and value.shape[0] == want.shape[0] and value.shape[2:] == want.shape[2:] and value.shape[1] == 3:
            new[key] = adapt_input_conv(value, want.shape[1])
            how = "summed over RGB" if want.shape[1] == 1 else f"RGB filters repeated, scaled by 3/{want.shape[1]}"
            report.adapted.append(f"{key}: in_chans 3 -> {want.shape[1]} ({how})")
        elif adapt_classifier and key in CLASSIFIER and value.shape[1:] == want.shape[1:]:
            report.reinitialized.append(key)
        else:
            report.mismatched.append((key, tuple(value.shape), tuple(want.shape)))
    for key in target:
        if key in new or key in report.reinitialized or any(m[0] == key for m in report.mismatched):
            continue
        if key.endswith("num_batches_tracked"):
            continue  # old checkpoints predate the counter; the model's own value (0) stays
        report.missing.append(key)
    order = {k: i for i, k in enumerate(target)}
    report.reinitialized.sort(key=order.__getitem__)
    if not (report.reinitialized or any(not k.endswith("num_batches_tracked") for k in new)):
        raise CheckpointError(f"{source}: none of its {len(state)} tensors fits the model (first keys: {_short(list(state), 3)}); "
                              "it is not a checkpoint of this architecture: check the file, or the model you built")
    if strict and not report.ok:
        raise CheckpointError(f"{source} does not fit the model (strict): {report.problems()}")
    merged = dict(target)
    merged.update(new)
    model.load_state_dict(merged, strict=True)
    return report


def infer_config(state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """DenseNet constructor arguments that fit a (normalised) state dict.

    Example::

        infer_config(torchvision.models.densenet121().state_dict())["block_config"]  # -> (6, 12, 24, 16)
    """
    if FIRST_CONV not in state:
        raise CheckpointError(f"cannot tell the architecture: no {FIRST_CONV!r} in the checkpoint; is this a DenseNet?")
    conv0 = _conv_weight(state, FIRST_CONV)
    blocks: Dict[int, int] = {}
    growth = bn_size = None
    for key in state:
        m = re.match(r"features\.denseblock(\d+)\.denselayer(\d+)\.conv2\.weight$", key)
        if m:
            b, layer = int(m.group(1)), int(m.group(2))
            blocks[b] = max(blocks.get(b, 0), layer)
            conv2 = _conv_weight(state, key)
            growth, bn_size = conv2.shape[0], conv2.shape[1] // conv2.shape[0]
    if not blocks:
        raise CheckpointError("cannot tell the architecture: no dense layers (features.denseblockN.denselayerM.conv2) in the checkpoint")
    if sorted(blocks) != list(range(1, len(blocks) + 1)):
        raise CheckpointError(f"cannot tell the architecture: dense blocks {sorted(blocks)[:8]} are not numbered 1, 2, ...; "
                              "the checkpoint's key names are damaged")
    block_config = tuple(blocks[i] for i in sorted(blocks))
    small = "features.norm0.weight" not in state and "features.norm0.running_mean" not in state
    cfg: Dict[str, Any] = dict(growth_rate=int(growth), block_config=block_config, num_init_features=int(conv0.shape[0]),
                               bn_size=int(bn_size), in_chans=int(conv0.shape[1]), small_inputs=small)
    if "features.transition1.conv.weight" in state:
        t = _conv_weight(state, "features.transition1.conv.weight")
        cfg["compression"] = t.shape[0] / t.shape[1]
    head = state.get("classifier.weight")
    cfg["num_classes"] = int(head.shape[0]) if isinstance(head, torch.Tensor) and head.dim() == 2 else 0
    return cfg


def _conv_weight(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    """``state[key]`` when it is a 4-D conv weight with no empty dimension; else why the architecture is unknown."""
    t = state[key]
    if not isinstance(t, torch.Tensor) or t.dim() != 4 or 0 in t.shape:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise CheckpointError(f"cannot tell the architecture: {key} has shape {shape}, expected a 4-D conv weight; "
                              "the checkpoint is damaged or not a DenseNet")
    return t
