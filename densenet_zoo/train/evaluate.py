"""Evaluation: loss and accuracy of a model over a loader (every rank's share summed), and of a fine-tuned
checkpoint on a folder of class folders, with its confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .._utils import FIGURE, DataError, MissingFileError, UsageError, check_output, json_kind
from ..data.dataset import ImageDataset
from ..data.splits import check_images, folder_samples
from ..data.transforms import eval_transform, resolve_preprocessing
from ..models import load_model
from . import run_files as io
from .distributed import Dist, reduce_sum


#: What ``evaluate`` writes beside ``confusion.png``.
EVALUATION_REPORT = json_kind("an evaluation report", "acc1", "checkpoint")


def evaluate_checkpoint(checkpoint: str, data: str, *, batch_size: int = 64, workers: int = 0,
                        out: Optional[str] = None, device: str = "auto", strict_data: bool = False,
                        overwrite: bool = False) -> Dict[str, Any]:
    """Top-1/top-5 accuracy and loss of ``checkpoint`` on ``data``; writes ``confusion.png`` and
    ``evaluation.json`` into ``out`` (default: the checkpoint's folder).

    Example::

        evaluate_checkpoint("runs/digits/best.safetensors", "data/digits/val")["acc1"]

    ``data`` is a folder of class folders (or one with ``val/``), named like the checkpoint's classes.
    Existing ``confusion.png`` / ``evaluation.json`` in ``out`` are replaced only when this package wrote
    them (or with ``overwrite``); that is checked before anything is computed.
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
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir} is a file; give a folder for confusion.png and evaluation.json")
    check_output(out_dir / "confusion.png", FIGURE, overwrite=overwrite, flag="--out")
    check_output(out_dir / "evaluation.json", EVALUATION_REPORT, overwrite=overwrite, flag="--out")
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
    if result.pop("nonfinite"):
        raise DataError(f"{ckpt} gives non-finite outputs (nan/inf) for some of the {result['count']} images of {data}: "
                        "an accuracy over them would mean nothing; check the checkpoint and the images")
    matrix = result.pop("confusion")
    per_class = {n: (100.0 * matrix[i, i].item() / row if (row := matrix[i].sum().item()) else None) for i, n in enumerate(names)}
    confusion_path = io.plot_confusion(matrix, names, out_dir / "confusion.png", overwrite=overwrite,
                                       title=f"{ckpt.name} on {data}: acc@1 {result['acc1']:.2f}%")
    report = dict(result, checkpoint=str(ckpt), data=str(data), per_class_acc1=per_class,
                  confusion=matrix.tolist(), skipped_images=[p for p, _ in bad])
    io.write_json(out_dir / "evaluation.json", report, kind=EVALUATION_REPORT, overwrite=overwrite)
    report["confusion_png"] = str(confusion_path)
    return report


@torch.no_grad()
def evaluate_loader(model: nn.Module, loader: Any, num_classes: int, d: Optional[Dist] = None, *,
                    amp_dtype: Optional[torch.dtype] = None, confusion: bool = False) -> Dict[str, Any]:
    """Loss, top-1 and top-5 accuracy (%) over ``loader``, summed over ranks; optionally the confusion matrix.

    Example::

        evaluate_loader(model, val_loader, 10)["acc1"]
    """
    d = d or Dist()
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    sums = torch.zeros(5, dtype=torch.float64)  # loss, top-1, top-5, count, images with a non-finite output
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for x, y in loader:
        x, y = x.to(d.device), y.to(d.device)
        with torch.autocast(d.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        logits = logits.float()
        top = logits.topk(k, 1).indices
        hit = top.eq(y[:, None])
        sums += torch.tensor([F.cross_entropy(logits, y, reduction="sum").item(), hit[:, 0].sum().item(), hit.any(1).sum().item(),
                              len(y), (~torch.isfinite(logits).all(1)).sum().item()], dtype=torch.float64)
        if confusion:
            matrix += torch.bincount(y.cpu() * num_classes + top[:, 0].cpu(), minlength=num_classes**2).view(num_classes, num_classes)
    model.train(was_training)
    tot = reduce_sum(sums, d).tolist()
    n = max(tot[3], 1)
    out: Dict[str, Any] = {"loss": tot[0] / n, "acc1": 100 * tot[1] / n, "acc5": 100 * tot[2] / n, "count": int(tot[3]),
                           "nonfinite": int(tot[4])}
    if confusion:
        out["confusion"] = reduce_sum(matrix, d).long()
    return out
