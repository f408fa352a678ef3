"""Fixtures shared by the command-line tests."""

import pytest
import torch

import densenet_zoo as dz
from _train_helpers import TINY


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny 3-class DenseNet saved as finetune saves one (class names, 16 px preprocessing)."""
    torch.manual_seed(0)
    model = dz.DenseNet(**TINY, num_classes=3).eval()
    pre = {"size": 16, "crop_pct": 1.0, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3}
    return dz.save_model(model, tmp_path_factory.mktemp("ckpt") / "best.safetensors", class_names=["0", "1", "2"],
                         preprocessing=pre)
