"""The network (``_DenseLayer``, ``_DenseBlock``, ``_Transition``, ``DenseNet``), its named configurations
and builders, feature taps, loading weights into it, and its names in timm's registry
(:mod:`~densenet_zoo.models.timm_adapter`, imported with timm: see :mod:`~densenet_zoo.models.timm_registration`).

Names are imported on first use."""

from .._utils import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "list_architectures": ".configs", "model_config": ".configs",
    "DenseNet": ".densenet",
    **dict.fromkeys([
        "create_model", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264", "densenet_bc_100",
        "densenet_bc_190", "densenet_bc_250", "list_models",
    ], ".factory"),
    **dict.fromkeys(["build_pretrained", "convert_checkpoint", "load_model", "load_weights", "save_model"], ".loading"),
})

__all__ = [
    "DenseNet", "build_pretrained", "convert_checkpoint", "create_model", "densenet121", "densenet161", "densenet169",
    "densenet201", "densenet264", "densenet_bc_100", "densenet_bc_190", "densenet_bc_250", "list_architectures",
    "list_models", "load_model", "load_weights", "model_config", "save_model",
]
