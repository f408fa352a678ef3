"""Weights joined to models: save and rebuild a model, load weights into one, build a pretrained one.

Reading checkpoint files is :mod:`densenet_zoo.weights.checkpoint`'s job, key normalisation
:mod:`densenet_zoo.weights.state_dict`'s, the registry :mod:`densenet_zoo.weights.registry`'s and the download
cache :mod:`densenet_zoo.weights.cache`'s; this module only hands their results to a :class:`DenseNet`.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.parse
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from safetensors.torch import save as safetensors_bytes

from .._utils import CheckpointFileError, MissingFileError, OutputKind, PathLike, WeightsError, atomic_write, check_output
from ..weights.checkpoint import METADATA_KEY, extract_state_dict, read_checkpoint, read_safetensors
from ..weights.cache import download
from ..weights.registry import WeightsEntry, fetch, get_weights
from ..weights.state_dict import FIRST_CONV, LoadReport, infer_config, load_state, normalize_keys
from .arch_check import build_checked
from .densenet import DenseNet
from .configs import list_architectures, model_config

__all__ = ["build_pretrained", "convert_checkpoint", "load_model", "load_weights", "resolve_weights", "save_model"]

WeightsSource = Union[str, os.PathLike, WeightsEntry, Mapping[str, torch.Tensor], nn.Module, Any]
_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".pth.tar")


def _is_saved_model(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:  # the header only
        return METADATA_KEY in (f.metadata() or {})


#: What ``save_model`` / ``convert`` write: a safetensors file with this package's metadata.
SAVED_MODEL = OutputKind("a model file (.safetensors with densenet_zoo metadata)", _is_saved_model)


def save_model(model: DenseNet, path: PathLike, *, overwrite: bool = True, **metadata: Any) -> Path:
    """Write ``model``'s weights and what rebuilds it to a safetensors file, atomically.

    ``arch`` and ``model_args`` are added from the model, and for a model built with pretrained
    weights, their ``preprocessing`` and (same number of classes) ``class_names`` unless given. A
    DenseNet whose ``model_args`` do not rebuild its layers (a norm given as a function) is saved
    with ``rebuildable: false``: :func:`load_model` then says to build the model and use
    :func:`load_weights`.

    Args:
        model: a densenet_zoo :class:`DenseNet`.
        path: the ``.safetensors`` file to write.
        overwrite: replace any regular file at ``path``; ``False`` replaces only a model file.
        **metadata: JSON-serialisable metadata to store with it (``class_names``, ``preprocessing``...).

    Returns:
        The path written.

    Raises:
        CheckpointFileError: a model of another class (torchvision's, a ``FastDenseNet``), refused
            before anything is written, or a folder as ``path``.

    Example:
        save_model(model, "best.safetensors", class_names=["cat", "dog"])
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointFileError(f"cannot save to {path}: it is a folder; give a file name such as {path / 'model.safetensors'}")
    rebuildable = _rebuildable(model)
    meta: Dict[str, Any] = {"arch": getattr(model, "arch", None), "model_args": dict(getattr(model, "model_args", {}))}
    entry = getattr(model, "weights_entry", None)
    if isinstance(entry, WeightsEntry):
        meta["weights"] = entry.name
        if entry.preprocessing:
            meta["preprocessing"] = dict(entry.preprocessing)
        if entry.categories_ref and getattr(model, "num_classes", None) == entry.num_classes:
            meta["class_names"] = entry.categories
    meta.update(metadata)
    if not rebuildable:
        meta["rebuildable"] = False
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    try:
        blob = safetensors_bytes(state, metadata={METADATA_KEY: json.dumps(meta)})
    except TypeError as exc:
        raise CheckpointFileError(f"cannot save to {path}: metadata must be JSON-serialisable ({exc})") from None
    try:
        return atomic_write(path, lambda f: f.write(blob), kind=SAVED_MODEL, overwrite=overwrite)
    except OSError as exc:
        raise CheckpointFileError(f"cannot write {path} ({type(exc).__name__}: {exc.strerror or exc}); choose a writable path") from None


def _rebuildable(model: Any) -> bool:
    """Whether ``DenseNet(**model.model_args)`` has ``model``'s tensors (built on the meta device: no memory).

    Anything but a DenseNet is refused: :func:`load_model` could never read its file.
    """
    if not isinstance(model, DenseNet):
        fix = ("save the DenseNet it was made from and call optimize_for_inference() after load_model()"
               if type(model).__name__ == "FastDenseNet" else
               "copy its weights into a densenet_zoo model first (dz.convert_checkpoint(model.state_dict(), path) does both)")
        raise CheckpointFileError(f"save_model writes densenet_zoo DenseNet models, got {type(model).__module__}.{type(model).__name__}; {fix}")
    try:
        with torch.device("meta"):
            twin = DenseNet(**model.model_args)
    except (ValueError, TypeError):
        return False
    return {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in twin.state_dict().items()}


def load_model(path: PathLike, *, allow_nonfinite: bool = False, **overrides: Any) -> Tuple[DenseNet, Dict[str, Any]]:
    """Rebuild a model saved by :func:`save_model` (or written by :func:`convert_checkpoint`).

    The metadata is checked against the tensors before the model is built: a damaged or forged
    file raises :class:`CheckpointFileError`, whatever architecture it claims.

    Args:
        path: the ``.safetensors`` file.
        allow_nonfinite: load weights holding nan or inf (refused otherwise: a diverged run's).
        **overrides: constructor arguments that replace the saved ones (``memory_efficient=True``,
            ``norm_layer="frozen_bn"``...).

    Returns:
        ``(model, metadata)``: the :class:`DenseNet` with its weights, and the file's metadata
        (``arch``, ``model_args``, ``class_names``, ``preprocessing``, ``metrics``...).

    Raises:
        CheckpointFileError: a missing, damaged or forged file, a file without densenet_zoo metadata, or
            one saved with ``rebuildable: false`` (build that model and use :func:`load_weights`).

    Example:
        model, meta = load_model("best.safetensors", memory_efficient=True)
    """
    state, meta = read_safetensors(path)
    if "model_args" not in meta:
        raise CheckpointFileError(f"{path}: no densenet_zoo metadata in this safetensors file; build the model yourself and use load_weights()")
    if meta.get("rebuildable") is False and not overrides:
        raise CheckpointFileError(f"{path}: holds a DenseNet whose layers its model_args do not rebuild (a norm given as a "
                              "function, or layers replaced after construction); build that model yourself and use "
                              "dz.load_weights(model, path)")
    args = meta["model_args"]
    if isinstance(args, dict):
        args = {**args, **overrides}
    model = build_checked(args, state, source=str(path))
    model.arch = meta.get("arch") if isinstance(meta.get("arch"), str) else None
    load_state(model, state, strict=True, source=str(path), allow_nonfinite=allow_nonfinite)
    return model, meta


def _is_url(s: str) -> bool:
    return urllib.parse.urlparse(s).scheme in ("http", "https", "file")


def resolve_weights(weights: Any, arch: Optional[str] = None, *, progress: bool = True) -> Tuple[Any, Optional[WeightsEntry], str]:
    """``(path or in-memory state, registry entry or None, description)`` for anything ``weights=`` accepts.

    Example::

        path, entry, _ = resolve_weights("IMAGENET1K_V1", "densenet121")
    """
    if isinstance(weights, (Mapping, nn.Module)):
        return weights, None, "state dict"
    if isinstance(weights, os.PathLike) or (isinstance(weights, str) and not _is_url(weights) and (
            os.path.exists(weights) or weights.lower().endswith(_SUFFIXES))):
        path = Path(weights)
        if path.is_dir():
            raise CheckpointFileError(f"weights file {str(path)!r} is a folder; give the path of a .safetensors/.pth file in it")
        if not path.is_file():
            raise MissingFileError(f"weights file {str(path)!r} does not exist; check the path")
        return path, None, str(path)
    if isinstance(weights, str) and _is_url(weights):
        return download(weights, progress=progress), None, weights
    entry = get_weights(weights, arch)
    if arch is not None and entry.arch != arch:
        raise WeightsError(f"weights {entry.name!r} are for {entry.arch}, not {arch}; build {entry.arch} instead")
    return fetch(entry, progress=progress), entry, entry.name


def load_weights(model: nn.Module, weights: WeightsSource, *, strict: bool = False, use_ema: bool = False,
                 progress: bool = True, allow_nonfinite: bool = False) -> LoadReport:
    """Load a checkpoint into ``model``; returns what happened to each key.

    Keys are normalised (torchvision legacy names, ``module.``/``model.``/``backbone.`` prefixes,
    wrapper dicts); a classifier of another size stays freshly initialised and a 3-channel first
    conv is adapted to ``model.in_chans``.

    Args:
        model: the model to load into (ours, or torchvision's / timm's densenet).
        weights: a path (``.safetensors``, ``.pth``), URL, registered weights name, or state dict.
        strict: raise if anything but the above does not fit (missing, unexpected, mismatched keys).
        use_ema: prefer EMA weights when the checkpoint holds both.
        progress: show a progress bar while downloading.
        allow_nonfinite: load tensors holding nan or inf (refused otherwise: a diverged run's weights).

    Returns:
        A :class:`LoadReport`.

    Raises:
        CheckpointFileError: an unreadable file, not one tensor that fits, or (``strict``) any misfit.
        WeightsError: a download or cache failure.

    Example:
        report = dz.load_weights(model, "someone_elses_checkpoint.pth")
        print(report)          # loaded / adapted / freshly initialised / missing / unexpected / shape mismatches
    """
    source, entry, desc = resolve_weights(weights, getattr(model, "arch", None), progress=progress)
    return _load_resolved(model, source, entry, desc, strict=strict, use_ema=use_ema, allow_nonfinite=allow_nonfinite)


def _read_state(source: Any, *, use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], str]:
    if isinstance(source, (Mapping, nn.Module)):
        return extract_state_dict(source, use_ema=use_ema)
    obj, _ = read_checkpoint(source, metadata=False)  # tensors only: damaged metadata does not matter here
    with _about(str(source)):
        return extract_state_dict(obj, use_ema=use_ema)


@contextlib.contextmanager
def _about(desc: str) -> Iterator[None]:
    """Prefix a :class:`CheckpointFileError` raised inside with the file it is about, when it does not name it yet."""
    try:
        yield
    except CheckpointFileError as exc:
        if str(exc).startswith(desc):
            raise
        raise CheckpointFileError(f"{desc}: {exc}") from None


def _load_resolved(model: nn.Module, source: Any, entry: Optional[WeightsEntry], desc: str, *, strict: bool = False,
                   use_ema: bool = False, state: Optional[Tuple[Dict[str, torch.Tensor], str]] = None,
                   allow_nonfinite: bool = False) -> LoadReport:
    state_dict, where = state if state is not None else _read_state(source, use_ema=use_ema)
    report = load_state(model, state_dict, strict=strict, source=desc, wrapper=where, allow_nonfinite=allow_nonfinite)
    if entry is not None:
        model.weights_entry = entry
    return report


def build_pretrained(arch: str, config: Dict[str, Any], *, weights: Any = None, progress: bool = True) -> DenseNet:
    """Build ``arch`` with ``config`` and load pretrained weights into it (what ``densenet121(pretrained=True)`` calls).

    Example::

        model = build_pretrained("densenet121", model_config("densenet121"), weights="DEFAULT")

    ``weights``: ``None``/``"DEFAULT"`` (the architecture's default), a tag (``"IMAGENET1K_V1"``,
    ``"tv_in1k"``), a full name (``"densenet121.ra_in1k"``), a hub id (``"timm/densenet121.ra_in1k"``),
    a torchvision Weights member, a :class:`WeightsEntry`, a local file or an http(s)/file URL.
    Every backbone tensor must load; only the classifier (other ``num_classes``) and the first conv
    (other ``in_chans``) may differ. When ``config`` sets neither, the checkpoint's are used, so a
    fine-tuned 10-class file comes back with its own classifier.
    """
    if weights is None or weights is True:
        weights = "DEFAULT"
    # Resolve (and download) first: an unknown name or a failed download costs no model construction.
    source, entry, desc = resolve_weights(weights, arch, progress=progress)
    state = _read_state(source)
    # A fine-tuned checkpoint brings its own head and input channels unless the caller chose others.
    normalised, _ = normalize_keys(state[0], source=desc)
    config = dict(config)
    from_file = []  # the parts whose size the file decides; the rest is the caller's
    if "num_classes" not in config and "classifier.weight" in normalised and normalised["classifier.weight"].dim() == 2:
        config["num_classes"] = int(normalised["classifier.weight"].shape[0])
        from_file.append("head")
    if "in_chans" not in config and FIRST_CONV in normalised and normalised[FIRST_CONV].dim() == 4:
        config["in_chans"] = int(normalised[FIRST_CONV].shape[1])
        from_file.append("stem")
    model = build_checked(config, normalised, source=desc, parts=from_file,
                          hint=f"; these are not weights for {arch}: check the file, or the weights name")
    model.arch = arch
    report = _load_resolved(model, source, entry, desc, state=state)
    if not report.ok:
        raise WeightsError(f"{report.source} do not fit {arch} with these arguments: {report.problems()}")
    model.load_report = report
    return model


def _match_arch(cfg: Mapping[str, Any]) -> Optional[str]:
    for name in list_architectures():
        ref = model_config(name)
        if (ref["growth_rate"], tuple(ref["block_config"]), ref["num_init_features"], ref.get("small_inputs", False)) == (
                cfg["growth_rate"], tuple(cfg["block_config"]), cfg["num_init_features"], cfg["small_inputs"]):
            return name
    return None


def convert_checkpoint(src: WeightsSource, dest: PathLike, *, use_ema: bool = False, overwrite: bool = False,
                       **metadata: Any) -> Path:
    """Any supported DenseNet checkpoint -> a safetensors file that :func:`load_model` rebuilds.

    The architecture is read off the tensor shapes; the result is checked by loading it strictly.

    Args:
        src: a path, URL, registered weights name or state dict.
        dest: the ``.safetensors`` file to write (atomically; not a folder, not ``src`` itself).
        use_ema: take the EMA weights of a checkpoint that holds both.
        overwrite: replace an existing ``dest`` that is not a model file (one that is, is always replaced).
        **metadata: JSON-serialisable metadata to store (``class_names``, ``preprocessing``...).

    Returns:
        The path written.

    Raises:
        CheckpointFileError: an unreadable or damaged file, one that is not a DenseNet, or a bad ``dest``.

    Example:
        convert_checkpoint("densenet121-a639ec97.pth", "densenet121.safetensors")
    """
    if not Path(dest).is_dir():  # a folder gets save_model's own answer, as before
        check_output(dest, SAVED_MODEL, overwrite=overwrite, flag="output")
    source, entry, desc = resolve_weights(src)
    if isinstance(source, (Mapping, nn.Module)):
        obj, meta = source, {}
    else:
        obj, meta = read_checkpoint(source)
    with _about(desc):
        state, _ = extract_state_dict(obj, use_ema=use_ema)
        state, _ = normalize_keys(state, source=desc)
        cfg = infer_config(state)
    model = build_checked(cfg, state, source=desc)
    arch = meta.get("arch")
    model.arch = arch if isinstance(arch, str) and arch else _match_arch(cfg)
    if entry is not None:
        model.weights_entry = entry
    load_state(model, state, strict=True, source=desc)
    extra = {k: v for k, v in meta.items() if k not in ("arch", "model_args")}
    extra.update(metadata)
    extra.setdefault("converted_from", desc)
    return save_model(model, dest, overwrite=overwrite, **extra)
