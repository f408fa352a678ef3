"""Settings of a fine-tuning run (:class:`TrainConfig`) and what a resume may change."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional, Union

from .._utils import UsageError, UsageTypeError
from ..data.transforms import AUGMENTATIONS

OPTIMIZERS = ("sgd", "adamw")
AMP_MODES = ("none", "bf16", "fp16")
#: Settings that may change when a run is resumed; every other one must stay as saved.
RESUMABLE = ("epochs", "workers", "patience", "device", "progress", "save_every")
_ARCHITECTURE = ("model", "model_args", "norm", "pretrained", "weights")


@dataclass
class TrainConfig:
    """Every setting of a fine-tuning run (the CLI flags of ``densenet-zoo finetune``)."""

    data: str = ""
    out: str = "runs/finetune"
    model: str = "densenet121"
    model_args: Dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    weights: Optional[str] = None  # a weights name, tag, file or URL to start from (implies pretrained)
    norm: Optional[str] = None
    memory_efficient: Union[bool, str] = False
    image_size: Optional[int] = None
    val_split: float = 0.2
    augment: str = "standard"
    strict_data: bool = False
    epochs: int = 10
    batch_size: int = 32  # global: split over the ranks under DDP
    accum_steps: int = 1
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    amp: str = "none"
    freeze: str = "none"
    layer_decay: float = 1.0
    seed: int = 0
    deterministic: bool = False
    workers: Optional[int] = None
    patience: int = 0
    save_every: int = 0
    device: str = "auto"
    progress: Optional[bool] = None

    def __post_init__(self) -> None:
        # JSON-shaped (lists, not tuples) so a saved config compares equal to one given on a command line.
        self.model_args = json.loads(json.dumps(self.model_args))
        # The data path is stored resolved: a run can be resumed from any working directory.
        self.data = str(Path(self.data).resolve()) if str(self.data) else ""
        self.out = str(self.out)

    def check(self, world_size: int = 1) -> None:
        """One-line errors for settings that cannot work, before anything is read or written."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UsageError(msg)

        for name in ("epochs", "batch_size", "accum_steps"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        need(self.batch_size % world_size == 0, f"--batch-size {self.batch_size} is the global batch and must divide by the {world_size} processes")
        need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(self.optimizer in OPTIMIZERS, f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        need(self.amp in AMP_MODES, f"--amp must be one of {AMP_MODES}, got {self.amp!r}")
        need(self.augment in AUGMENTATIONS, f"--augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
        need(0.0 <= self.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        need(0.0 < self.layer_decay <= 1.0, f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        need(self.warmup_epochs >= 0 and self.patience >= 0 and self.save_every >= 0, "--warmup-epochs, --patience and --save-every must be >= 0")
        need(self.workers is None or self.workers >= 0, f"--workers must be >= 0, got {self.workers}")
        need(self.image_size is None or (isinstance(self.image_size, int) and self.image_size >= 1),
             f"--image-size must be a positive integer (e.g. 224), got {self.image_size!r}")
        need(self.freeze == "none" or self.freeze == "features" or (self.freeze.startswith("block") and self.freeze[5:].isdigit()),
             f"--freeze must be none, features or blockN (e.g. block2), got {self.freeze!r}")
        need(bool(self.data), "no training data given; pass --data DIR (a folder of class folders, train/ + val/, or a CSV)")


def config_from(options: Dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from keyword options; unknown names are a one-line ``TypeError``."""
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise UsageTypeError(f"unknown fine-tuning option(s) {unknown}; known: {sorted(names)}")
    return TrainConfig(**options)


def _same(key: str, saved: Any, value: Any) -> bool:
    if key == "data" and saved and value:  # the same folder named relatively or absolutely
        return Path(saved).resolve() == Path(value).resolve()
    return saved == value


def resumed_config(saved: Dict[str, Any], options: Dict[str, Any], out: str) -> TrainConfig:
    """The saved settings of the run in ``out`` with ``options`` applied; only ``RESUMABLE`` ones may differ."""
    saved = dict(saved)
    for key, value in options.items():
        if key in RESUMABLE or value is None or _same(key, saved.get(key), value):
            continue
        if key in _ARCHITECTURE:
            raise UsageError(f"{out} holds a run of model {saved['model']!r} {saved.get('model_args') or ''}; "
                             f"cannot resume it as {key}={value!r}; start a new run with another --out")
        raise UsageError(f"cannot change {key} from {saved.get(key)!r} to {value!r} when resuming {out}; "
                         f"only {', '.join(RESUMABLE)} may change")
    saved.update({k: v for k, v in options.items() if v is not None and k != "data"})
    saved["out"] = str(out)
    return config_from(saved)
