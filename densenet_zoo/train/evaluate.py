"""Evaluate a fine-tuned checkpoint on a folder of class folders: metrics and a confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch.utils.data import DataLoader

from .._utils import DataError, MissingFileError, UsageError
from ..data.dataset import ImageDataset
from ..data.splits import check_images, folder_samples
from ..data.transforms import eval_transform, resolve_preprocessing
from ..models import load_model
from . import run_files as io
from .parts import Dist, evaluate_loader


def evaluate_checkpoint(checkpoint: str, data: str, *, batch_size: int = 64, workers: int = 0,
                        out: Optional[str] = None, device: str = "auto", strict_data: bool = False) -> Dict[str, Any]:
    """Top-1/top-5 accuracy and loss of ``checkpoint`` on ``data``; writes ``confusion.png`` and
    ``evaluation.json`` into ``out`` (default: the checkpoint's folder).

    Example::

        evaluate_checkpoint("runs/digits/best.safetensors", "data/digits/val")["acc1"]

    ``data`` is a folder of class folders (or one with ``val/``), named like the checkpoint's classes.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise MissingFileError(f"checkpoint {str(ckpt)!r} does not exist; give the best.safetensors or last.safetensors of a run")
    out_dir = Path(out) if out else ckpt.parent
    if Path(data).is_dir() and Path(data).resolve() in (out_dir.resolve(), *out_dir.resolve().parents):
        raise DataError(f"--out {out_dir} is inside --data {data}; confusion.png and evaluation.json would become "
                        "part of the dataset: choose an --out outside it")
    model, meta = load_model(ckpt)
    names = meta.get("class_names")
    if not names:
        raise UsageError(f"{ckpt} has no class names in its metadata; evaluate needs a checkpoint written by finetune")
    pre = resolve_preprocessing(meta.get("preprocessing"), None, getattr(model, "in_chans", 3))
    samples, bad = check_images(folder_samples(data, names), strict=strict_data)
    if not samples:
        raise DataError(f"{data}: no readable images to evaluate")
    d = Dist.setup(device) if device != "auto" or torch.cuda.is_available() else Dist()
    model = model.to(d.device)
    loader = DataLoader(ImageDataset(samples, eval_transform(pre), in_chans=getattr(model, "in_chans", 3)),
                        batch_size=batch_size, num_workers=workers)
    result = evaluate_loader(model, loader, len(names), d, confusion=True)
    matrix = result.pop("confusion")
    per_class = {n: (100.0 * matrix[i, i].item() / row if (row := matrix[i].sum().item()) else None) for i, n in enumerate(names)}
    confusion_path = io.plot_confusion(matrix, names, out_dir / "confusion.png", title=f"{ckpt.name} on {data}: acc@1 {result['acc1']:.2f}%")
    report = dict(result, checkpoint=str(ckpt), data=str(data), per_class_acc1=per_class,
                  confusion=matrix.tolist(), skipped_images=[p for p, _ in bad])
    io.write_json(out_dir / "evaluation.json", report)
    report["confusion_png"] = str(confusion_path)
    return report
