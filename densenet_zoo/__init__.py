"""densenet_zoo: DenseNets for PyTorch, exactly torchvision's network, with pluggable
normalisation, exact memory-efficient training, pretrained weights, fine-tuning and profiling.

>>> import densenet_zoo as dz
>>> model = dz.densenet121(num_classes=10, memory_efficient=True)
"""

from .memory import AutoStrategy, MemoryStrategy, get_memory_strategy, list_memory_strategies, register_memory_strategy
from .model import DenseNet
from .zoo import (
    create_model,
    densenet121,
    densenet161,
    densenet169,
    densenet201,
    densenet264,
    densenet_bc_100,
    densenet_bc_190,
    densenet_bc_250,
    list_models,
    model_config,
)
from .batchnorm import BatchNorm2d, FrozenBatchNorm2d, SyncBatchNorm
from .caffe_bn import CaffeBatchNorm2d, caffe_blobs_to_state_dict
from .train import TrainConfig, Trainer, finetune
from .profile import depth_sweep, max_batch, profile
from .norm import convert_norm, group_norm, is_norm_layer, list_norms, register_norm, resolve_norm
from .weights import (
    CheckpointError,
    LoadReport,
    WeightsEntry,
    WeightsError,
    convert_checkpoint,
    get_weights,
    list_weights,
    load_model,
    load_weights,
    register_weights,
    save_model,
)
from .export import export
from ._utils import DataError, RunError, ZooError
from .inference import FastDenseNet, fold_bn, optimize_for_inference
from . import timm_models as _timm_models  # registers dz_<model> names in timm's factory

__version__ = "0.1.0"

__all__ = [
    "ZooError",
    "DataError",
    "RunError",
    "FastDenseNet",
    "export",
    "fold_bn",
    "optimize_for_inference",
    "AutoStrategy",
    "depth_sweep",
    "max_batch",
    "profile",
    "DenseNet",
    "MemoryStrategy",
    "create_model",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet264",
    "densenet_bc_100",
    "densenet_bc_190",
    "densenet_bc_250",
    "get_memory_strategy",
    "list_memory_strategies",
    "list_models",
    "list_norms",
    "BatchNorm2d",
    "CaffeBatchNorm2d",
    "FrozenBatchNorm2d",
    "SyncBatchNorm",
    "caffe_blobs_to_state_dict",
    "convert_norm",
    "group_norm",
    "is_norm_layer",
    "load_model",
    "model_config",
    "register_memory_strategy",
    "register_norm",
    "resolve_norm",
    "finetune",
    "Trainer",
    "TrainConfig",
    "save_model",
    "CheckpointError",
    "LoadReport",
    "WeightsEntry",
    "WeightsError",
    "convert_checkpoint",
    "get_weights",
    "list_weights",
    "load_weights",
    "register_weights",
]
