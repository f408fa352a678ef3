"""The network (``_DenseLayer``, ``_DenseBlock``, ``_Transition``, ``DenseNet``), its named configurations
and builders, feature taps, loading weights into it, and its names in timm's registry."""

from .configs import list_architectures, model_config
from .densenet import DenseNet
from .factory import (
    create_model, densenet121, densenet161, densenet169, densenet201, densenet264, densenet_bc_100, densenet_bc_190,
    densenet_bc_250, list_models,
)
from .loading import build_pretrained, convert_checkpoint, load_model, load_weights, save_model
from . import timm_adapter  # registers the dz_<model> names in timm's factory

__all__ = [
    "DenseNet", "build_pretrained", "convert_checkpoint", "create_model", "densenet121", "densenet161", "densenet169",
    "densenet201", "densenet264", "densenet_bc_100", "densenet_bc_190", "densenet_bc_250", "list_architectures",
    "list_models", "load_model", "load_weights", "model_config", "save_model",
]
