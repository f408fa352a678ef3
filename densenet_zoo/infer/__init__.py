"""Inference: BN folding and the fast eval network, export (ONNX, TorchScript, torch.export), predict, info."""

from .exporter import EXPORT_FORMATS, export, load_exported
from .fast import FastDenseNet, fold_bn, optimize_for_inference
from .info import count_flops, format_info, model_info
from .predict import Predictor
from .int8 import quantize
from .quantized import QuantizedModel, load_quantized

__all__ = [
    "EXPORT_FORMATS", "FastDenseNet", "Predictor", "count_flops", "export", "fold_bn", "format_info",
    "load_exported", "model_info", "optimize_for_inference",
    "QuantizedModel", "load_quantized", "quantize",
]
