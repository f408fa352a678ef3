"""densenet_zoo: DenseNets for PyTorch, exactly torchvision's network, with pluggable
normalisation, exact memory-efficient training, pretrained weights, fine-tuning and profiling.

The public face: every name here comes from a subpackage, and is imported on first use, so that
``import densenet_zoo`` (and ``densenet-zoo --help``) costs little. The subpackages import one way,
``_utils, hardware, allocator -> norms -> memory -> data -> weights -> models -> train / profiling -> infer -> cli``.
Our models enter timm's registry as ``dz_<model>`` as soon as timm is imported, before or after
this package.
"""

from ._utils import (
    CheckpointFileError, DataError, ExportError, MissingFileError, RunError, UnsupportedError, UsageError, UsageTypeError,
    WeightsError, ZooError, __version__, deprecated_name, lazy_exports,
)
from .models.timm_registration import register_when_timm_is_imported

#: Each public name -> the subpackage that exports it.
_EXPORTS = {
    **dict.fromkeys(["CpuCapabilities", "HardwareError", "cpu_capabilities", "describe_hardware"], ".hardware"),
    **dict.fromkeys([
        "BatchNorm2d", "CaffeBatchNorm2d", "FrozenBatchNorm2d", "SyncBatchNorm", "caffe_blobs_to_state_dict",
        "convert_norm", "group_norm", "is_norm_layer", "list_norms", "register_norm", "resolve_norm",
    ], ".norms"),
    **dict.fromkeys([
        "AutoStrategy", "MemoryStrategy", "get_memory_strategy", "list_memory_strategies", "register_memory_strategy",
    ], ".memory"),
    **dict.fromkeys(["LoadReport", "WeightsEntry", "get_weights", "list_weights", "register_weights"], ".weights"),
    **dict.fromkeys([
        "DenseNet", "convert_checkpoint", "create_model", "densenet121", "densenet161", "densenet169", "densenet201",
        "densenet264", "densenet_bc_100", "densenet_bc_190", "densenet_bc_250", "list_models", "load_model",
        "load_weights", "model_config", "save_model",
    ], ".models"),
    **dict.fromkeys(["TrainConfig", "Trainer", "finetune"], ".train"),
    **dict.fromkeys(["depth_sweep", "max_batch", "profile"], ".profiling"),
    **dict.fromkeys(["FastDenseNet", "QuantizedModel", "export", "fold_bn", "load_quantized", "optimize_for_inference",
                     "quantize"], ".infer"),
}

_lazy_getattr, __dir__ = lazy_exports(__name__, _EXPORTS)


def __getattr__(name: str):  # noqa: ANN201 - PEP 562
    """A public name, imported on first use; a deprecated one (``CheckpointError``) with a warning."""
    return _lazy_getattr(name) if name in _EXPORTS else deprecated_name(__name__, name)


register_when_timm_is_imported()
del lazy_exports, register_when_timm_is_imported  # tools of this file, not names of the package

__all__ = [
    # errors
    "ZooError", "CheckpointFileError", "DataError", "ExportError", "HardwareError", "MissingFileError", "RunError",
    "UnsupportedError", "UsageError", "UsageTypeError", "WeightsError",
    # the machine
    "CpuCapabilities", "cpu_capabilities", "describe_hardware",
    # normalisation
    "BatchNorm2d", "CaffeBatchNorm2d", "FrozenBatchNorm2d", "SyncBatchNorm", "caffe_blobs_to_state_dict",
    "convert_norm", "group_norm", "is_norm_layer", "list_norms", "register_norm", "resolve_norm",
    # memory strategies
    "AutoStrategy", "MemoryStrategy", "get_memory_strategy", "list_memory_strategies", "register_memory_strategy",
    # models and weights
    "DenseNet", "create_model", "list_models", "model_config", "densenet121", "densenet161", "densenet169",
    "densenet201", "densenet264", "densenet_bc_100", "densenet_bc_190", "densenet_bc_250",
    "LoadReport", "WeightsEntry", "convert_checkpoint", "get_weights", "list_weights", "load_model", "load_weights",
    "register_weights", "save_model",
    # applications
    "TrainConfig", "Trainer", "finetune", "depth_sweep", "max_batch", "profile",
    "FastDenseNet", "export", "fold_bn", "optimize_for_inference",
    "QuantizedModel", "load_quantized", "quantize",
]
