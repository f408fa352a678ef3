"""Pretrained weights, model-agnostic: the registry (``weights/manifest.json``), the verified download
cache, and checkpoint reading with key normalisation. Putting tensors into a DenseNet is
:mod:`densenet_zoo.models.loading`'s job."""

from .checkpoint import read_checkpoint, read_safetensors
from .state_dict import LoadReport
from .cache import cache_dir, download, hf_download, is_offline, sha256_file
from .registry import WeightsEntry, fetch, get_weights, list_weights, read_manifest, register_weights

__all__ = [
    "LoadReport", "WeightsEntry", "cache_dir", "download", "fetch", "get_weights", "hf_download", "is_offline",
    "list_weights", "read_checkpoint", "read_manifest", "read_safetensors", "register_weights", "sha256_file",
]
