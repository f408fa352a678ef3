"""The one check between "checkpoint read" and "model built": the architecture a file describes
(its metadata, or what its key names imply) must be well-formed and must fit the tensors it holds.

A DenseNet's convolution and classifier weights are all stored in a valid checkpoint, so a model
built from a file can never need more weights than the file has. Checking that bound before
construction keeps a small forged file (``block_config: [100000, 100000]``, a key
``denselayer100000``, ``num_classes: 10000000000``) from allocating without limit.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Collection, Dict, Mapping

import torch

from .._utils import CheckpointFileError
from .densenet import DenseNet

_ARGS = frozenset(inspect.signature(DenseNet.__init__).parameters) - {"self"}
_INTS = ("growth_rate", "num_init_features", "bn_size", "in_chans", "num_classes")
#: Far beyond any real DenseNet, small enough that the size arithmetic below stays exact and fast.
_MAX_INT = 1 << 24
_MAX_BLOCKS = 64
#: The parts of the model whose weights the file must hold: stem conv, dense blocks + transitions, classifier.
ALL_PARTS = ("stem", "body", "head")
_HINT = ("; the file's metadata or key names are damaged or forged: re-export it, or build the model yourself "
         "and load its tensors with dz.load_weights")


def _int_arg(args: Mapping[str, Any], name: str, source: str) -> int:
    value = args.get(name, inspect.signature(DenseNet.__init__).parameters[name].default)
    low = 0 if name == "num_classes" else 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= _MAX_INT:
        raise CheckpointFileError(f"{source}: model argument {name}={value!r} is not an integer in [{low}, {_MAX_INT}]; "
                              "the file's metadata is damaged: re-export it with dz.save_model, or load its tensors "
                              "into a model you build with dz.load_weights")
    return value


def _block_config(args: Mapping[str, Any], source: str) -> tuple:
    blocks = args.get("block_config", (6, 12, 24, 16))
    if (not isinstance(blocks, (list, tuple)) or not 1 <= len(blocks) <= _MAX_BLOCKS
            or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= _MAX_INT for n in blocks)):
        raise CheckpointFileError(f"{source}: block_config={str(blocks)[:80]} is not a list of 1 to {_MAX_BLOCKS} positive "
                              "layer counts; the file's metadata is damaged: re-export it with dz.save_model")
    return tuple(blocks)


def min_weights(args: Mapping[str, Any], parts: Collection[str] = ALL_PARTS, *, source: str = "checkpoint") -> int:
    """Number of convolution and classifier weights of ``DenseNet(**args)``, counting only ``parts``.

    Example::

        min_weights(dz.model_config("densenet121")) <= sum(t.numel() for t in tv121.state_dict().values())  # -> True

    Norm parameters are left out, so this never exceeds what a valid checkpoint of that model holds.
    Computed in closed form: no loop over layers, whatever the layer counts claim.
    """
    g, bn, c = (_int_arg(args, k, source) for k in ("growth_rate", "bn_size", "num_init_features"))
    in_chans, num_classes = _int_arg(args, "in_chans", source), _int_arg(args, "num_classes", source)
    blocks = _block_config(args, source)
    compression = args.get("compression", 0.5)
    if isinstance(compression, bool) or not isinstance(compression, (int, float)) or not 0.0 < compression <= 1.0:
        raise CheckpointFileError(f"{source}: compression={compression!r} is not a number in (0, 1]; the file's metadata is damaged")
    small = args.get("small_inputs", False)
    if not isinstance(small, bool):
        raise CheckpointFileError(f"{source}: small_inputs={small!r} is not true or false; the file's metadata is damaged")
    total = in_chans * c * (9 if small else 49) if "stem" in parts else 0
    for i, n in enumerate(blocks):
        # Layer j sees c + j*g channels: conv1 (c + j*g) * bn*g, conv2 bn*g * g * 3*3.
        layers = n * bn * g * c + bn * g * g * n * (n - 1) // 2 + 9 * n * bn * g * g
        c += n * g
        if i != len(blocks) - 1:
            out = int(math.floor(c * compression))
            layers += c * out
            c = out
        total += layers if "body" in parts else 0
    return total + (num_classes * c if "head" in parts else 0)


def check_model_args(args: Mapping[str, Any], state: Mapping[str, torch.Tensor], *, source: str,
                     parts: Collection[str] = ALL_PARTS, hint: str = _HINT) -> Dict[str, Any]:
    """``args`` as constructor keywords, after checking that they describe a DenseNet ``state`` can fill.

    Example::

        args = check_model_args(meta["model_args"], state, source="best.safetensors")

    Raises :class:`CheckpointFileError` (one line, naming ``source``) for unknown or ill-typed
    arguments, and when the model would need more weights (in ``parts``) than ``state`` holds.
    """
    if not isinstance(args, Mapping):
        raise CheckpointFileError(f"{source}: model_args must be a JSON object of DenseNet arguments, got {type(args).__name__}; "
                              "re-export the file with dz.save_model")
    unknown = sorted(str(k) for k in args if k not in _ARGS)
    if unknown:
        raise CheckpointFileError(f"{source}: unknown model argument(s) {unknown[:5]}; expected some of {sorted(_ARGS)}; "
                              "the file was written by another program or is damaged")
    blocks = _block_config(args, source)
    layers = sum(blocks)
    # Every dense layer stores at least conv1.weight and conv2.weight.
    if "body" in parts and 2 * layers > len(state):
        raise CheckpointFileError(f"{source}: the architecture claims {layers:,} dense layers (block_config "
                              f"{str(list(blocks))[:60]}) but the file holds only {len(state)} tensors{hint}")
    need = min_weights(args, parts, source=source)
    have = sum(t.numel() for t in state.values())
    if need > have:
        raise CheckpointFileError(f"{source}: the architecture it describes needs at least {need:,} weights but the file "
                              f"holds only {have:,}{hint}")
    out = dict(args)
    out["block_config"] = blocks
    return out


def build_checked(args: Mapping[str, Any], state: Mapping[str, torch.Tensor], *, source: str,
                  parts: Collection[str] = ALL_PARTS, hint: str = _HINT) -> DenseNet:
    """``DenseNet(**args)`` once :func:`check_model_args` passed; a constructor refusal becomes :class:`CheckpointFileError`.

    Example::

        model = build_checked(meta["model_args"], state, source="best.safetensors")
    """
    args = check_model_args(args, state, source=source, parts=parts, hint=hint)
    try:
        return DenseNet(**args)
    except (ValueError, TypeError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointFileError(f"{source}: its model arguments do not build a DenseNet ({first}){hint}") from None
