"""Export a DenseNet for deployment: ONNX (dynamic batch), TorchScript, torch.export.

Every export is checked before it is kept: the exported program runs on a random batch of a
different size than the tracing example and must match the PyTorch model (``check=True``).
Files are written to a temporary name and renamed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn

from .._utils import ExportError, OutputKind, PathLike, UnsupportedError, UsageError, UsageTypeError, atomic_path
from ..hardware import require_native_bf16

__all__ = ["EXPORT_FORMATS", "export", "load_exported"]

EXPORT_FORMATS = ("onnx", "torchscript", "torch.export")


def _input_shape(model: nn.Module, image_size: Optional[int]) -> tuple:
    in_chans = int(getattr(model, "in_chans", 3))
    if image_size is None:
        image_size = 32 if getattr(model, "model_args", {}).get("small_inputs") else 224
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise UsageError(f"image_size must be a positive integer, got {image_size!r}")
    return (in_chans, image_size, image_size)


def _flat_output(out: object) -> torch.Tensor:
    if isinstance(out, (list, tuple)):  # features_only models: compare every map
        return torch.cat([o.reshape(o.shape[0], -1).float() for o in out], 1)
    return out.float()  # type: ignore[union-attr]


def _exportable(model: nn.Module, format: str) -> Tuple[nn.Module, torch.Tensor]:
    """The module to export and its first parameter, or an error naming what to change."""
    if format not in EXPORT_FORMATS:
        raise UsageError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if not isinstance(model, nn.Module):
        raise UsageTypeError(f"export expects an nn.Module, got {type(model).__name__}")
    inner = getattr(model, "_orig_mod", model)  # a torch.compile wrapper exports its module
    if inner.training:
        raise UsageError("export: the model is in training mode (BatchNorm would use batch statistics, dropout "
                         "would be random); call model.eval() before exporting")
    param = next(inner.parameters())
    if format == "onnx" and param.dtype == torch.bfloat16:
        # onnxruntime has no bfloat16 convolution: such a graph is written but cannot be run.
        raise UsageError("export: ONNX of a bfloat16 model cannot run in onnxruntime; export the float32 model "
                         "(optimize_for_inference(model) without dtype) and let the runtime choose its precision")
    if param.dtype == torch.bfloat16:  # export runs the model to trace and check it
        require_native_bf16(param.device, f"export of a bfloat16 model to {format}")
    return inner, param


def export(
    model: nn.Module,
    path: PathLike,
    format: str = "onnx",
    *,
    image_size: Optional[int] = None,
    opset: int = 17,
    check: bool = True,
    atol: float = 1e-4,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` to ``path`` as ``format`` and return the path.

    The file is written to a temporary name and renamed into place only after the check.

    Args:
        model: the model, in eval mode: a model in training mode would bake in batch statistics
            and dropout, so it is refused (call ``model.eval()``).
        path: the file to write.
        format: ``"onnx"`` (symbolic batch axis), ``"torchscript"`` or ``"torch.export"``.
        image_size: side of the traced input; ``None`` for 224, or 32 for ``small_inputs`` models.
            The batch axis stays dynamic.
        opset: the ONNX opset.
        check: run the export on a batch of another size and compare with the model.
        atol: tolerance of that check, relative to the outputs' largest magnitude.
        overwrite: replace an existing ``path`` that is not an exported model (one that is, is always
            replaced; a device, FIFO or folder never).

    Returns:
        ``path``.

    Raises:
        ValueError: a model in training mode, an unknown format, a bfloat16 network to ONNX, or a
            folder as ``path``.
        DataError: ``path`` is not a regular file, or a foreign file without ``overwrite``.
        HardwareError: a bfloat16 network on a CPU without native bf16.
        RuntimeError: an export whose outputs differ from the model's (nothing is left at ``path``).

    Example:
        export(densenet121().eval(), "densenet121.onnx")                 # dynamic batch axis
        export(model.eval(), "model.pt", "torchscript")                  # torch.jit.load(...)
        export(model.eval(), "model.pt2", "torch.export", image_size=64) # torch.export.load(...)
    """
    inner, param = _exportable(model, format)
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"export: {str(path)!r} is a folder; give a file name such as {str(path / ('model' + _suffix(format)))!r}")
    shape = _input_shape(inner, image_size)
    example = torch.randn(2, *shape, device=param.device, dtype=param.dtype)
    # keep the suffix: torch.export insists on ".pt2"
    with atomic_path(path, kind=EXPORTED_MODEL, overwrite=overwrite, suffix=path.suffix or _suffix(format)) as tmp:
        with torch.no_grad(), warnings.catch_warnings():
            # the input checks compare shapes in Python; only the batch axis is dynamic anyway
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # TorchScript is deprecated by PyTorch (documented); users asked for it explicitly
            warnings.simplefilter("ignore", FutureWarning)
            _write(inner, example, tmp, format, opset)
            if check:
                _check(inner, tmp, format, shape, param, atol)
    return path


def _is_exported_model(path: Path) -> bool:
    """An ONNX graph written by PyTorch, a TorchScript archive or a torch.export archive."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        return any("/code/__torch__/" in n or n.endswith("/archive_format") for n in names)
    with open(path, "rb") as f:
        head = f.read(64)
    return head[:1] == b"\x08" and b"pytorch" in head  # ModelProto: ir_version, then producer_name


#: What ``export`` writes: it replaces such a file, and refuses any other without ``overwrite``.
EXPORTED_MODEL = OutputKind("an exported model (ONNX, TorchScript or torch.export)", _is_exported_model)


def _suffix(format: str) -> str:
    return {"onnx": ".onnx", "torchscript": ".pt", "torch.export": ".pt2"}[format]


def _write(model: nn.Module, example: torch.Tensor, tmp: Path, format: str, opset: int) -> None:
    if format == "onnx":
        out = model(example)
        multi = isinstance(out, (list, tuple))
        outputs = [f"features{i}" for i in range(len(out))] if multi else ["logits"]
        axes = {name: {0: "batch"} for name in ["input", *outputs]}
        # TorchScript-based exporter: needs no extra packages, dynamic batch through dynamic_axes
        torch.onnx.export(model, (example,), str(tmp), dynamo=False, input_names=["input"], output_names=outputs,
                          dynamic_axes=axes, opset_version=opset, do_constant_folding=True)
    elif format == "torchscript":
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(tmp))
    else:
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(tmp))


def load_exported(path: PathLike, format: str):
    """The callable stored by :func:`export`: an onnxruntime session runner, a ScriptModule or a module.

    Example::

        run = load_exported("densenet121.onnx", "onnx"); logits = run(x)
    """
    if format not in EXPORT_FORMATS:
        raise UsageError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if format == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise UnsupportedError("running an ONNX file needs onnxruntime: pip install 'densenet_zoo[export]'") from None
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run(x: torch.Tensor):
            outs = session.run(None, {"input": x.detach().cpu().float().numpy()})
            tensors = [torch.from_numpy(o) for o in outs]
            return tensors[0] if len(tensors) == 1 and session.get_outputs()[0].name == "logits" else tensors

        return run
    if format == "torchscript":
        return torch.jit.load(str(path), map_location="cpu")
    return torch.export.load(str(path)).module()


def _check(model: nn.Module, tmp: Path, format: str, shape: tuple, param: torch.Tensor, atol: float) -> None:
    if format == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return  # the ONNX file is written; checking it needs onnxruntime (the [export] extra)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
    with torch.no_grad():
        expected = _flat_output(model(x)).cpu()
        got = load_exported(tmp, format)
        got = got(x.cpu()) if format == "onnx" else got.to(param.device)(x)
    got = _flat_output(got).cpu()
    scale = float(expected.abs().max().clamp_min(1e-12))
    err = float((got - expected).abs().max()) / scale if got.shape == expected.shape else float("inf")
    if not err <= atol:
        raise ExportError(f"export check failed: the {format} program differs from the model by {err:.2e} "
                           f"(relative, tolerance {atol:.0e}) on a batch of 3; the file was not written")
