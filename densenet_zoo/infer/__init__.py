"""Inference: BN folding and the fast eval network, export (ONNX, TorchScript, torch.export), predict, info."""

from .exporter import EXPORT_FORMATS, export, load_exported
from .fast import FastDenseNet, optimize_for_inference
from .folding import fold_bn
from .info import count_flops, format_info, model_info
from .predict import Predictor

__all__ = [
    "EXPORT_FORMATS", "FastDenseNet", "Predictor", "count_flops", "export", "fold_bn", "format_info",
    "load_exported", "model_info", "optimize_for_inference",
]
