"""densenet_zoo: DenseNets for PyTorch, exactly torchvision's network, with pluggable
normalisation, exact memory-efficient training, pretrained weights, fine-tuning and profiling.

The public face: everything here is re-exported from the subpackages, which import one way,
``_utils -> norms -> memory -> weights -> models -> train / profiling -> infer -> cli``.
"""

from ._utils import CheckpointError, DataError, RunError, WeightsError, ZooError
from .norms import (
    BatchNorm2d, CaffeBatchNorm2d, FrozenBatchNorm2d, SyncBatchNorm, caffe_blobs_to_state_dict, convert_norm,
    group_norm, is_norm_layer, list_norms, register_norm, resolve_norm,
)
from .memory import AutoStrategy, MemoryStrategy, get_memory_strategy, list_memory_strategies, register_memory_strategy
from .weights import LoadReport, WeightsEntry, get_weights, list_weights, register_weights
from .models import (
    DenseNet, convert_checkpoint, create_model, densenet121, densenet161, densenet169, densenet201, densenet264,
    densenet_bc_100, densenet_bc_190, densenet_bc_250, list_models, load_model, load_weights, model_config,
    save_model,
)
from .train import TrainConfig, Trainer, finetune
from .profiling import depth_sweep, max_batch, profile
from .infer import FastDenseNet, export, fold_bn, optimize_for_inference
from .infer import QuantizedModel, load_quantized, quantize

__version__ = "0.1.0"

__all__ = [
    # errors
    "ZooError", "CheckpointError", "DataError", "RunError", "WeightsError",
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
