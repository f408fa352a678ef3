"""Small real datasets, tiny model settings and the SGD loop that tests train models with."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

#: A DenseNet small enough for CPU tests (two blocks of two layers, 3x3 stem).
TINY = {"growth_rate": 8, "block_config": [2, 2], "num_init_features": 16, "small_inputs": True}


def digits_subset(root: Path, classes: int = 4, train_per_class: int = 12, val_per_class: int = 4) -> Path:
    """``root/train/<digit>/*.png`` and ``root/val/...`` from the first images of scikit-learn's digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in range(classes):
        idx = np.flatnonzero(d.target == c)
        for split, ids in (("train", idx[:train_per_class]), ("val", idx[train_per_class:train_per_class + val_per_class])):
            folder = root / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in ids:
                Image.fromarray((d.images[i] * 255 / 16).round().astype(np.uint8)).save(folder / f"{i}.png")
    return root


def base_options(data: Path, out: Path, **kw) -> dict:
    opts = dict(data=str(data), out=str(out), model="densenet121", model_args=dict(TINY), image_size=16,
                epochs=2, batch_size=8, lr=0.05, augment="light", deterministic=True, progress=False)
    opts.update(kw)
    return opts



def default_sigint() -> None:
    """``Popen(preexec_fn=...)`` for a child that is sent Ctrl-C: SIGINT back to its default action.

    A shell starts background jobs with SIGINT ignored and an ignored signal stays ignored across
    exec, so a suite run in the background would otherwise start children deaf to it.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def sgd_steps(model, batches, run=None, autocast=None):
    """One SGD step (lr 0.1, momentum 0.9, cross-entropy) per ``(x, y)`` of ``batches``; returns each
    step's output, detached.

    ``run`` computes the output (default: ``model``; e.g. its compiled form); ``autocast``: a low
    precision dtype to run it under, on the inputs' device (its outputs are then cast to float32).
    """
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outs = []
    for x, y in batches:
        opt.zero_grad()
        with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            out = (model if run is None else run)(x)
        out = out if autocast is None else out.float()
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
        outs.append(out.detach())
    return outs
