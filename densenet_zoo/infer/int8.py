"""int8 inference: post-training static quantization with ONNX Runtime, per-layer float fallback.

The model is exported to ONNX (:func:`~densenet_zoo.infer.exporter.export`), quantized with
``onnxruntime.quantization.quantize_static`` in QDQ form (int8 weights per output channel, uint8
activations with ranges calibrated on images) and judged against the float model on the
calibration images: top-1 agreement and relative logit error. Where the target is missed, each
quantized tensor's own rounding error is measured (the float model's activations and weights
through the calibrated quantize/dequantize pair, per channel) and the nodes writing or reading the
worst tensors stay in float, a few at a time, until the target is met. The result is one ONNX file (protobuf data,
nothing executed on load) with the float model's input contract and metadata in its properties
(:mod:`densenet_zoo.infer.quantized`).
"""

from __future__ import annotations

import logging

import math
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .._utils import DataError, PathLike, UsageError, UsageTypeError
from .quantized import _FORMAT, QuantizedModel, _ort, _with_meta

__all__ = ["calibration_batches", "layer_errors", "quantize"]

Calibration = Union[PathLike, torch.Tensor, Iterable[torch.Tensor]]


# ------------------------------------------------------------------------------------------------
# Calibration images
# ------------------------------------------------------------------------------------------------


def _model_preprocessing(model: nn.Module, preprocessing: Optional[Dict[str, Any]], in_chans: int) -> Dict[str, Any]:
    from ..data.transforms import resolve_preprocessing

    entry = getattr(model, "weights_entry", None)
    pre = preprocessing or (dict(entry.preprocessing) if entry is not None and entry.preprocessing else None)
    size = None if pre else (32 if getattr(model, "model_args", {}).get("small_inputs") else 224)
    return resolve_preprocessing(pre, size, in_chans)


def _folder_batches(folder: Path, pre: Dict[str, Any], in_chans: int, limit: int, batch: int) -> List[torch.Tensor]:
    from ..data.images import UnreadableImageError, open_image
    from ..data.splits import IMAGE_EXTENSIONS
    from ..data.transforms import eval_transform

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise DataError(f"calibration folder {str(folder)!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    if len(files) > limit:  # spread over the classes of an ImageFolder tree, not the first class only
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    transform, images = eval_transform(pre), []
    for path in files:
        try:
            images.append(transform(open_image(path, in_chans)))
        except UnreadableImageError:
            continue  # one broken file does not spoil calibration; none readable is refused below
    if not images:
        raise DataError(f"calibration folder {str(folder)!r} holds no readable image")
    return [torch.stack(images[i:i + batch]) for i in range(0, len(images), batch)]


def calibration_batches(calibration: Calibration, model: nn.Module, *, num_images: int = 256, batch_size: int = 16,
                        preprocessing: Optional[Dict[str, Any]] = None) -> List[torch.Tensor]:
    """Float image batches ``(N, C, S, S)`` from a folder, one tensor or an iterable of tensors.

    Example::

        batches = calibration_batches("data/val", model, num_images=128)

    A folder (flat or one sub-folder per class) is read with the model's preprocessing (its
    weights' or ``preprocessing``); tensors must already be normalised like the model's input.
    At most ``num_images`` images are kept.
    """
    in_chans = int(getattr(model, "in_chans", 3))
    if isinstance(calibration, (str, Path)):
        folder = Path(calibration)
        if not folder.is_dir():
            raise DataError(f"calibration {str(folder)!r} is not a folder; give a folder of images or a list of image batches")
        pre = _model_preprocessing(model, preprocessing, in_chans)
        return _folder_batches(folder, pre, in_chans, num_images, batch_size)
    items = [calibration] if isinstance(calibration, torch.Tensor) else calibration
    batches, count = [], 0
    for i, x in enumerate(items):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != in_chans or x.shape[2] != x.shape[3] or not x.is_floating_point():
            desc = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(f"calibration batch {i} is {desc}; expected float tensors (N, {in_chans}, S, S), normalised like the model's input")
        if batches and x.shape[2:] != batches[0].shape[2:]:
            raise DataError(f"calibration batch {i} has size {tuple(x.shape[2:])}, batch 0 {tuple(batches[0].shape[2:])}; use one image size")
        batches.append(x.detach().to("cpu", torch.float32)[: num_images - count])
        count += batches[-1].shape[0]
        if count >= num_images:
            break
    if not count:
        raise DataError("calibration holds no images; give image batches or a folder of images")
    return batches


# ------------------------------------------------------------------------------------------------
# Quantization and fallback
# ------------------------------------------------------------------------------------------------


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of batches (re-iterable)."""

    def __init__(self, batches: Sequence[np.ndarray]) -> None:
        self.batches, self.it = batches, iter(batches)

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        x = next(self.it, None)
        return None if x is None else {"input": x}

    def rewind(self) -> None:
        self.it = iter(self.batches)

    def __iter__(self):  # qdq_loss_debug iterates the reader
        return iter(self.get_next, None)


def _quantize_once(float_path: Path, out: Path, batches: Sequence[np.ndarray], exclude: Sequence[str], reduce_range: bool) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quiet = _DropPerChannelNotes()  # one "Axis 1 is out-of-range" line per norm weight: quantized per tensor, as meant
    logging.getLogger().addFilter(quiet)
    try:
        quantize_static(str(float_path), str(out), _Reader(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range,
                        nodes_to_exclude=list(exclude), calibrate_method=CalibrationMethod.MinMax)
    finally:
        logging.getLogger().removeFilter(quiet)


class _DropPerChannelNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Axis ") or "out-of-range for weight" not in str(record.msg)


def _compare(ref: Sequence[np.ndarray], path: Path, batches: Sequence[np.ndarray]) -> Tuple[float, float]:
    """Top-1 agreement and relative L2 error of the logits of ``path`` against the float ``ref``."""
    ort = _ort()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    agree = total = 0
    num = den = 0.0
    for x, r in zip(batches, ref):
        q = session.run(None, {"input": x})[0]
        agree += int((q.argmax(1) == r.argmax(1)).sum())
        total += len(x)
        num += float(((q - r) ** 2).sum())
        den += float((r ** 2).sum())
    return agree / total, math.sqrt(num / max(den, 1e-30))


def layer_errors(float_path: PathLike, qdq_path: PathLike, batches: Sequence[np.ndarray]) -> Dict[str, float]:
    """Rounding error of each quantized activation: ``||x - qdq(x)|| / ||x||`` on ``batches``.

    Example::

        errors = layer_errors("float.onnx", "int8.onnx", batches); worst = max(errors, key=errors.get)

    ``x`` is the float model's own activation and ``qdq`` the quantize/dequantize pair with the
    calibrated scale and zero point of ``qdq_path``, so each tensor's error is its own, not the
    sum of the errors upstream of it.
    """
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization.qdq_loss_debug import collect_activations, modify_model_output_intermediate_tensors

    graph = onnx.load(str(qdq_path)).graph
    float_consts = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(float_path)).graph.initializer}
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    pairs = {n.input[0]: (consts[n.input[1]], consts[n.input[2]]) for n in graph.node
             if n.op_type == "QuantizeLinear" and n.input[0] not in consts and n.input[1] in consts and n.input[2] in consts}
    with tempfile.TemporaryDirectory() as tmp:
        debug = Path(tmp) / "debug.onnx"
        modify_model_output_intermediate_tensors(str(float_path), str(debug))
        acts = collect_activations(str(debug), _Reader(batches))
    errors = {name: _qdq_error(np.concatenate(acts[name]), scale, zero, None) for name, (scale, zero) in pairs.items() if name in acts}
    for n in graph.node:  # weights: dequantized back and compared with the float values
        if n.op_type == "DequantizeLinear" and n.input[0] in consts and n.input[0].endswith("_quantized"):
            name, axis = n.input[0][: -len("_quantized")], next((a.i for a in n.attribute if a.name == "axis"), 1)
            w = float_consts.get(name)
            if w is not None and w.dtype.kind == "f":
                errors[name] = _qdq_error(w, consts[n.input[1]], consts[n.input[2]], axis)
    return errors


def _qdq_error(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: Optional[int]) -> float:
    """Mean over channels of ``||x_c - qdq(x_c)|| / ||x_c||``: a channel drowned by another's range counts fully."""
    x = x.astype(np.float64)
    if axis is not None and scale.ndim == 1 and x.ndim > 1:  # per-channel weights: broadcast along ``axis``
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    info = np.iinfo(zero.dtype)
    q = np.clip(np.rint(x / scale) + zero.astype(np.float64), info.min, info.max)
    diff = x - (q - zero.astype(np.float64)) * scale
    if x.ndim < 2:
        return float(np.linalg.norm(diff) / max(float(np.linalg.norm(x)), 1e-30))
    dims = tuple(i for i in range(x.ndim) if i != 1)
    num, den = np.sqrt((diff ** 2).sum(dims)), np.sqrt((x ** 2).sum(dims))
    keep = den > 0
    return float((num[keep] / den[keep]).mean()) if keep.any() else 0.0


def _nodes_touching(model_path: Path, tensors: Sequence[str]) -> List[str]:
    """Names of the nodes of the float graph that write or read any of ``tensors``: with all of them in
    float, nothing quantizes those tensors."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    wanted = set(tensors)
    return [n.name for n in graph.node if wanted.intersection(n.input) or wanted.intersection(n.output)]


def _fallback(float_path: Path, out: Path, batches: List[np.ndarray], ref: List[np.ndarray], target: float,
              max_error: float, max_float_nodes: int, step: int, reduce_range: bool) -> Tuple[List[str], float, float]:
    """Quantize, then keep the nodes around the worst tensors in float until the target is met."""
    exclude: List[str] = []
    _quantize_once(float_path, out, batches, exclude, reduce_range)
    agree, err = _compare(ref, out, batches)
    while (agree < target or err > max_error) and len(exclude) < max_float_nodes:
        errors = layer_errors(float_path, out, batches[:2])
        ranked = sorted(errors, key=errors.get, reverse=True)
        added = [n for n in _nodes_touching(float_path, ranked[:step]) if n not in exclude]
        for tensor in ranked[step:]:  # the worst tensors' nodes are in float already: go further down
            if added:
                break
            added = [n for n in _nodes_touching(float_path, [tensor]) if n not in exclude]
        if not added:
            break
        exclude += added[: max(1, max_float_nodes - len(exclude))]
        _quantize_once(float_path, out, batches, exclude, reduce_range)
        agree, err = _compare(ref, out, batches)
    return exclude, agree, err


def quantize(model: nn.Module, calibration: Calibration, *, num_images: int = 256, batch_size: int = 16,
             preprocessing: Optional[Dict[str, Any]] = None, target_agreement: float = 0.99, max_error: float = 0.1,
             max_float_nodes: int = 16, step: int = 2, reduce_range: bool = False,
             class_names: Optional[Sequence[str]] = None, threads: Optional[int] = None) -> QuantizedModel:
    """An int8 copy of ``model`` calibrated on ``calibration``; see :class:`QuantizedModel`.

    Args:
        model: a DenseNet (or any single-input classifier) in eval mode.
        calibration: a folder of images (flat or one sub-folder per class, read with the model's
            preprocessing), or float tensors ``(N, C, S, S)`` normalised like the model's input.
        num_images: calibration images used at most.
        batch_size: images per calibration batch when read from a folder.
        preprocessing: resize/crop/normalisation for a folder (default: the model's weights' own).
        target_agreement: top-1 agreement with the float model on the calibration images that the
            fallback works towards.
        max_error: relative L2 error of the logits that the fallback works towards.
        max_float_nodes: at most this many ONNX nodes are kept in float (0: no fallback).
        step: the nodes around this many of the worst tensors go to float per round.
        reduce_range: 7-bit weights, for CPUs without VNNI whose u8s8 kernels can saturate.
        class_names: stored in the file for ``predict`` (default: the model's weights' categories).
        threads: ONNX Runtime threads (default: its own choice).

    Returns:
        A :class:`QuantizedModel` taking ``(N, C, S, S)`` float32 images at the calibration size.

    Example:
        q = densenet_zoo.quantize(model.eval(), "data/val", num_images=128)   # a folder of images
        q = densenet_zoo.quantize(model.eval(), [torch.randn(8, 3, 224, 224)])  # normalised batches
        q.save("model.int8.onnx"); q = densenet_zoo.load_quantized("model.int8.onnx")
    """
    from .exporter import export
    from onnxruntime.quantization import quant_pre_process

    _ort()
    if not isinstance(model, nn.Module):
        raise UsageTypeError(f"quantize expects an nn.Module, got {type(model).__name__}")
    if model.training:  # calibration would update BatchNorm's running statistics
        raise UsageError("quantize: the model is in training mode; call model.eval() first")
    batches = calibration_batches(calibration, model, num_images=num_images, batch_size=batch_size, preprocessing=preprocessing)
    size = int(batches[0].shape[-1])
    with torch.no_grad():
        ref = [model(x).float().numpy() for x in batches]
    if ref[0].ndim != 2:
        raise DataError(f"quantize expects a classifier returning (N, classes) logits, got shape {ref[0].shape}")
    arrays = [x.numpy() for x in batches]
    with tempfile.TemporaryDirectory() as tmp:
        raw, float_path, out = Path(tmp) / "raw.onnx", Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        export(model, raw, "onnx", image_size=size, check=False)
        quant_pre_process(str(raw), str(float_path), skip_optimization=False)
        exclude, agree, err = _fallback(float_path, out, arrays, ref, target_agreement, max_error, max_float_nodes, step, reduce_range)
        data = out.read_bytes()
    entry = getattr(model, "weights_entry", None)
    names = class_names or (entry.categories if entry is not None else None)
    meta = dict(format=_FORMAT, in_chans=int(batches[0].shape[1]), image_size=size, num_classes=int(ref[0].shape[1]),
                float_nodes=exclude, calibration_images=int(sum(len(a) for a in arrays)), agreement=agree, error=err,
                class_names=list(names) if names else None, preprocessing=_stated_preprocessing(model, preprocessing, batches[0]))
    return QuantizedModel(*_with_meta(data, meta), threads=threads)


def _stated_preprocessing(model: nn.Module, preprocessing: Optional[Dict[str, Any]], x: torch.Tensor) -> Optional[Dict[str, Any]]:
    """The preprocessing that makes images of the calibrated size, when the model or caller states one."""
    if not preprocessing and getattr(getattr(model, "weights_entry", None), "preprocessing", None) is None:
        return None
    pre = _model_preprocessing(model, preprocessing, int(x.shape[1]))
    return pre if pre["size"] == x.shape[-1] else None
