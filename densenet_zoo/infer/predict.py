"""Predict classes of image files and folders with a pretrained or fine-tuned DenseNet.

Class names come from the weights: the categories of a registered weights entry (ImageNet names
for the published weights) or the ``class_names`` saved with a fine-tuned checkpoint. An image
that cannot be read is reported with its path and the reason; the others are still predicted.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from tqdm import tqdm

from .._utils import DataError, MissingFileError, OutputKind, PathLike, UsageError, atomic_write, printable
from ..data.images import UnreadableImageError, open_image
from ..data.splits import IMAGE_EXTENSIONS
from ..data.transforms import eval_transform, resolve_preprocessing
from ..hardware import require_native_bf16
from ..models import DenseNet, create_model, load_model
from ..weights.registry import class_names
from .fast import optimize_for_inference

__all__ = ["Prediction", "Predictor", "collect_images", "write_csv"]


@dataclass
class Prediction:
    """Top-k classes of one image (``labels``/``probs`` best first), or ``error`` when it could not be read."""

    path: str
    labels: List[str] = field(default_factory=list)
    indices: List[int] = field(default_factory=list)
    probs: List[float] = field(default_factory=list)
    error: Optional[str] = None


def collect_images(inputs: Iterable[PathLike]) -> List[Path]:
    """Image files named in ``inputs`` plus those found (recursively, sorted) in folders among them.

    Example::

        collect_images(["cat.jpg", "photos/"])
    """
    found: List[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not files:
                raise DataError(f"folder {str(path)!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
            found.extend(files)
        elif path.is_file():
            found.append(path)  # named explicitly: tried whatever its suffix, reported if unreadable
        elif path.exists():  # reading a pipe or a device could block or never end
            raise DataError(f"input {printable(path)!r} is not a regular file or folder (a pipe or device?); give image files or folders")
        else:
            raise MissingFileError(f"input {str(path)!r} does not exist; give image files or folders of images")
    if not found:
        raise UsageError("no inputs given; name image files and/or folders")
    return found


def _imagenet_categories(num_classes: int) -> Optional[List[str]]:
    return list(class_names("imagenet1k")) if num_classes == 1000 else None


class Predictor:
    """A model with its preprocessing and class names.

    Example::

        p = Predictor.from_checkpoint("runs/digits/best.safetensors")
        p = Predictor.from_pretrained("densenet121")
        results = p.predict(collect_images(["photos/"]), batch_size=32, top_k=5)

    ``optimize=True`` runs :func:`densenet_zoo.optimize_for_inference` (same outputs up to float
    rounding, faster on CPU).
    """

    def __init__(self, model: nn.Module, transform: Callable[[Any], torch.Tensor], class_names: Optional[Sequence[str]] = None,
                 *, in_chans: int = 3, optimize: bool = True, device: Union[str, torch.device] = "cpu") -> None:
        model = model.eval().to(device)
        if any(p.dtype == torch.bfloat16 for p in model.parameters()):
            require_native_bf16(device, "prediction with a bfloat16 model")
        if optimize and isinstance(model, DenseNet) and not model.features_only:

            model = optimize_for_inference(model, channels_last=torch.device(device).type == "cpu")
        self.model, self.transform, self.in_chans, self.device = model, transform, in_chans, torch.device(device)
        self.class_names = list(class_names) if class_names else None

    @classmethod
    def from_checkpoint(cls, path: PathLike, **kwargs: Any) -> "Predictor":
        """From a file written by :func:`densenet_zoo.save_model` (``finetune``'s best.safetensors)."""
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"checkpoint {str(path)!r} does not exist; give a .safetensors file written by finetune or save_model")
        model, meta = load_model(path)
        pre = resolve_preprocessing(meta.get("preprocessing"), None, model.in_chans)
        names = meta.get("class_names") or _imagenet_categories(model.num_classes)
        return cls(model, eval_transform(pre), names, in_chans=model.in_chans, **kwargs)

    @classmethod
    def from_quantized(cls, path: PathLike, **kwargs: Any) -> "Predictor":
        """From an int8 file written by :func:`densenet_zoo.quantize` (``densenet-zoo quantize``)."""
        from .quantized import load_quantized

        model = load_quantized(path)
        pre = resolve_preprocessing(model.meta.get("preprocessing"), model.image_size, model.in_chans)
        names = model.meta.get("class_names") or _imagenet_categories(model.num_classes)
        kwargs.pop("optimize", None)  # already the fast path
        return cls(model, eval_transform(pre), names, in_chans=model.in_chans, optimize=False, **kwargs)

    @classmethod
    def from_pretrained(cls, name: str, **kwargs: Any) -> "Predictor":
        """From published weights: ``"densenet121"``, ``"densenet121.tv_in1k"``..."""
        model = create_model(name, pretrained=True)
        entry = getattr(model, "weights_entry", None)
        names = (entry.categories if entry is not None else None) or _imagenet_categories(model.num_classes)
        transform = entry.transforms() if entry is not None else eval_transform(resolve_preprocessing(None, None, model.in_chans))
        return cls(model, transform, names, in_chans=model.in_chans, **kwargs)

    def label(self, index: int) -> str:
        if self.class_names and index < len(self.class_names):
            return str(self.class_names[index])
        return f"class_{index}"

    def _load(self, path: Path) -> Tuple[Optional[torch.Tensor], Optional[str]]:
        try:
            return self.transform(open_image(path, self.in_chans)), None
        except UnreadableImageError as exc:
            return None, exc.reason

    @torch.no_grad()
    def predict(self, paths: Sequence[PathLike], *, batch_size: int = 32, top_k: int = 5, progress: Optional[bool] = None) -> List[Prediction]:
        """One :class:`Prediction` per path, in order; unreadable images carry ``error``.

        ``progress=None`` shows a bar only on a terminal.
        """
        for flag, value in (("batch_size", batch_size), ("top_k", top_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{flag} must be an integer >= 1, got {value!r}")
        paths = [Path(p) for p in paths]
        results: List[Prediction] = []
        bar = tqdm(total=len(paths), unit="img", disable=(None if progress is None else not progress), desc="predict")
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            loaded = [self._load(p) for p in chunk]
            good = [t for t, err in loaded if t is not None]
            top: List[Tuple[List[float], List[int], bool]] = []
            if good:
                logits = self.model(torch.stack(good).to(self.device)).float()
                values, indices = logits.softmax(dim=1).topk(min(top_k, logits.shape[1]), dim=1)
                top = list(zip(values.tolist(), indices.tolist(), torch.isfinite(logits).all(1).tolist()))
            it = iter(top)
            for p, (t, err) in zip(chunk, loaded):
                if t is None:
                    results.append(Prediction(str(p), error=err))
                    continue
                vals, idx, finite = next(it)
                results.append(Prediction(str(p), [self.label(i) for i in idx], idx, vals) if finite else
                               Prediction(str(p), error="the model's output is not finite (nan/inf): no prediction"))
            bar.update(len(chunk))
        bar.close()
        return results


def _is_predictions_csv(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(64).startswith(b"path,top1,top1_prob")


#: What ``predict --csv`` writes: it replaces such a file, and refuses any other without ``--overwrite``.
PREDICTIONS_CSV = OutputKind("a predictions CSV", _is_predictions_csv)


def write_csv(results: Sequence[Prediction], path: PathLike, top_k: int, *, overwrite: bool = False) -> Path:
    """``path,top1,top1_prob,...,topK,topK_prob,error`` (one row per input, unreadable ones included).

    Written as UTF-8 whatever the locale; file and class names that are not valid UTF-8 are
    written with ``\\xNN`` escapes (:func:`~densenet_zoo._utils.printable`) rather than failing the file.
    An existing file is replaced only when it is a predictions CSV, or with ``overwrite=True``.
    """
    header = ["path"] + [c for k in range(1, top_k + 1) for c in (f"top{k}", f"top{k}_prob")] + ["error"]
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(header)
    for r in results:
        cells: List[Any] = [printable(r.path)]
        for k in range(top_k):
            cells += [printable(r.labels[k]), f"{r.probs[k]:.6f}"] if k < len(r.labels) else ["", ""]
        w.writerow(cells + [printable(r.error) if r.error else ""])
    data = text.getvalue().encode("utf-8")
    return atomic_write(path, lambda f: f.write(data), kind=PREDICTIONS_CSV, overwrite=overwrite)


def predict_summary(results: Sequence[Prediction]) -> Dict[str, int]:
    """``{"predicted": n, "unreadable": m}``."""
    bad = sum(r.error is not None for r in results)
    return {"predicted": len(results) - bad, "unreadable": bad}
