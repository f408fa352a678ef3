"""State dicts as people have them, into a model with a diagnosis: key normalisation (torchvision's
legacy ``norm.1``/``conv.2`` keys, ``module.``/``model.``/``backbone.`` prefixes, timm's head),
missing or extra ``num_batches_tracked``, a classifier of another size, a first conv for other
input channels, and the DenseNet architecture read off the tensors' shapes."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .._utils import CheckpointFileError

StateDict = Dict[str, torch.Tensor]
FIRST_CONV = "features.conv0.weight"
CLASSIFIER = ("classifier.weight", "classifier.bias")

# torchvision's own regex: "denselayer1.norm.1.weight" (before 0.2) -> "denselayer1.norm1.weight".
_LEGACY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
_PREFIXES = ("module.", "model.", "backbone.", "_orig_mod.", "net.", "encoder.")
_RENAMES = (("head.fc.", "classifier."),)  # timm heads built with ClassifierHead


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
    dense real tensor, raises :class:`CheckpointFileError`.
    """
    targets = set(target_keys) if target_keys is not None else None
    out: StateDict = {}
    renamed = 0
    for key, value in state.items():
        _check_entry(key, value, source)
        cands = _candidates(key)
        new = next((c for c in cands if c in targets), cands[-1]) if targets is not None else cands[-1]
        if new in out:
            raise CheckpointFileError(f"checkpoint keys {key!r} and another one both map to {new!r}; it mixes two models, extract one first")
        renamed += new != key
        out[new] = value
    return out, renamed


def _check_entry(key: Any, value: Any, source: str) -> None:
    if not isinstance(key, str):
        raise CheckpointFileError(f"{source}: key {key!r} is of type {type(key).__name__}, expected a string; the file is damaged "
                              "or not a state dict")
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
        kind = f"a {value.layout} tensor" if isinstance(value, torch.Tensor) else f"of type {type(value).__name__}"
        raise CheckpointFileError(f"{source}: entry {key!r} is {kind}, expected a dense tensor; re-save it with .to_dense()")
    if value.is_complex() or value.is_quantized:
        raise CheckpointFileError(f"{source}: entry {key!r} has dtype {value.dtype}, expected real numbers; "
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
        raise CheckpointFileError(f"can only adapt a 3-channel first conv to in_chans={in_chans}, the checkpoint's has {c} channels")
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        repeat = math.ceil(in_chans / 3)
        w = w.repeat(1, repeat, 1, 1)[:, :in_chans] * (3.0 / in_chans)
    return w.to(dtype)


@dataclass
class LoadReport:
    """What loading a checkpoint into a model did with each key (``print`` gives a summary).

    Attributes:
        source: the checkpoint, as given.
        loaded: keys loaded as they are.
        adapted: ``"key: how"`` for tensors changed to fit (a 3-channel first conv summed for ``in_chans=1``).
        reinitialized: keys that kept the model's fresh initialisation (a classifier of another size).
        missing: model keys the checkpoint does not hold.
        unexpected: checkpoint keys the model does not have.
        mismatched: ``(key, checkpoint shape, model shape)`` of tensors that do not fit.
        renamed: how many keys were renamed (legacy names, prefixes, timm's names).
        wrapper: the dict the weights were found in (``"state_dict"``, ``"ema"``...), empty if none.

    Example:
        report = load_weights(model, "ckpt.pth")
        print(report)
        assert report.ok   # every key loaded, adapted or deliberately re-initialised
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
               wrapper: str = "", adapt_classifier: bool = True, adapt_in_chans: bool = True,
               allow_nonfinite: bool = False) -> LoadReport:
    """Load a (normalised) state dict into ``model``, adapting what can be adapted.

    Example::

        report = load_state(model, torchvision_model.state_dict(), strict=True)

    A classifier of another size is left freshly initialised (``report.reinitialized``); a 3-channel
    first conv is adapted to ``model``'s input channels. ``strict=True`` raises
    :class:`CheckpointFileError` listing missing, unexpected and shape-mismatched keys. Tensors holding
    nan or inf (the weights of a diverged run) are refused unless ``allow_nonfinite=True``.
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
            raise CheckpointFileError(f"{source}: {key} holds {value.dtype} values where the model has {want.dtype}; a quantized "
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
        raise CheckpointFileError(f"{source}: none of its {len(state)} tensors fits the model (first keys: {_short(list(state), 3)}); "
                              "it is not a checkpoint of this architecture: check the file, or the model you built")
    if strict and not report.ok:
        raise CheckpointFileError(f"{source} does not fit the model (strict): {report.problems()}")
    if not allow_nonfinite:
        refuse_nonfinite(new, source)
    merged = dict(target)
    merged.update(new)
    model.load_state_dict(merged, strict=True)
    return report


def refuse_nonfinite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """A one-line :class:`CheckpointFileError` when a floating-point tensor of ``state`` holds nan or inf.

    Example::

        refuse_nonfinite(model.state_dict(), "runs/x/last.safetensors")
    """
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointFileError(f"{source}: {len(bad)} tensor(s) hold nan or inf values (e.g. {bad[0]}): the weights of a "
                              "diverged run, which would predict nonsense; use an earlier checkpoint, or pass "
                              "allow_nonfinite=True to load them anyway")


def infer_config(state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """DenseNet constructor arguments that fit a (normalised) state dict.

    Example::

        infer_config(torchvision.models.densenet121().state_dict())["block_config"]  # -> (6, 12, 24, 16)
    """
    if FIRST_CONV not in state:
        raise CheckpointFileError(f"cannot tell the architecture: no {FIRST_CONV!r} in the checkpoint; is this a DenseNet?")
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
        raise CheckpointFileError("cannot tell the architecture: no dense layers (features.denseblockN.denselayerM.conv2) in the checkpoint")
    if sorted(blocks) != list(range(1, len(blocks) + 1)):
        raise CheckpointFileError(f"cannot tell the architecture: dense blocks {sorted(blocks)[:8]} are not numbered 1, 2, ...; "
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
        raise CheckpointFileError(f"cannot tell the architecture: {key} has shape {shape}, expected a 4-D conv weight; "
                              "the checkpoint is damaged or not a DenseNet")
    return t
