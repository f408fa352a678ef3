"""Normalisation layers, chosen per layer by name: the registry and per-layer specs (``resolve_norm``,
``convert_norm``), our BatchNorm (``nn.BatchNorm2d`` semantics), SyncBatchNorm on any backend,
FrozenBatchNorm2d, and Caffe's BatchNorm + Scale. The batch-norm arithmetic they, the fused memory
strategies and BN folding share is :mod:`.bn_math`'s."""

from .batchnorm import BatchNorm2d, FrozenBatchNorm2d, SyncBatchNorm
from .caffe import CaffeBatchNorm2d, caffe_blobs_to_state_dict
from .registry import (
    NormSpec, convert_norm, get_norm_factory, group_norm, is_norm_layer, list_norms, register_norm, resolve_norm,
)

__all__ = [
    "BatchNorm2d", "CaffeBatchNorm2d", "FrozenBatchNorm2d", "NormSpec", "SyncBatchNorm", "caffe_blobs_to_state_dict",
    "convert_norm", "get_norm_factory", "group_norm", "is_norm_layer", "list_norms", "register_norm", "resolve_norm",
]
