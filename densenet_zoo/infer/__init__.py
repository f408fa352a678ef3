"""Inference: BN folding and the fast eval network, export (ONNX, TorchScript, torch.export), predict, info.

Names are imported on first use: prediction reads images (torchvision), folding and export do not."""

from .._utils import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "EXPORT_FORMATS": ".exporter", "export": ".exporter", "load_exported": ".exporter",
    "FastDenseNet": ".fast", "fold_bn": ".folding", "optimize_for_inference": ".fast",
    "count_flops": ".info", "format_info": ".info", "model_info": ".info",
    "Predictor": ".predict",
    "quantize": ".int8", "QuantizedModel": ".quantized", "load_quantized": ".quantized",
})

__all__ = [
    "EXPORT_FORMATS", "FastDenseNet", "Predictor", "count_flops", "export", "fold_bn", "format_info",
    "load_exported", "model_info", "optimize_for_inference",
    "QuantizedModel", "load_quantized", "quantize",
]
