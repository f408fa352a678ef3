"""Settings of a fine-tuning run (:class:`TrainConfig`) and what a resume may change."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional, Union

from .._utils import UsageError, UsageTypeError
from ..data.transforms import AUGMENTATIONS

OPTIMIZERS = ("sgd", "adamw")
AMP_MODES = ("none", "bf16", "fp16")
#: What a step with a non-finite loss or gradient does: stop the run, or skip the step (as AMP's scaler does).
NONFINITE_POLICIES = ("stop", "skip")
#: Settings that may change when a run is resumed; every other one must stay as saved.
RESUMABLE = ("epochs", "workers", "patience", "device", "progress", "save_every", "on_nonfinite", "clip_grad_norm",
             "compile")
_ARCHITECTURE = ("model", "model_args", "norm", "pretrained", "weights")


@dataclass
class TrainConfig:
    """Every setting of a fine-tuning run (the CLI flags of ``densenet-zoo finetune``).

    A resumed run may change only ``epochs``, ``workers``, ``patience``, ``device``, ``progress``,
    ``save_every``, ``on_nonfinite``, ``clip_grad_norm`` and ``compile``.

    Attributes:
        data: a folder with ``train/`` and ``val/`` class folders, a folder of class folders, or a
            CSV of ``path,label``; stored resolved (absolute).
        out: the run folder; must be new or empty.
        model: architecture name (:func:`densenet_zoo.list_models`).
        model_args: extra :class:`DenseNet` arguments (``{"growth_rate": 12, "small_inputs": True}``).
        pretrained: start from the architecture's pretrained weights.
        weights: start from these weights: a registered name or tag, a file or a URL.
        norm: norm layer name (:func:`densenet_zoo.list_norms`).
        memory_efficient: ``True`` or a strategy name (:func:`densenet_zoo.list_memory_strategies`).
        image_size: training and eval image size; ``None`` for the pretrained weights' or 224.
        val_split: fraction held out per class when the data has no ``val/``.
        augment: ``"standard"`` (crop and flip), ``"light"`` (mild crop, no flip) or ``"none"``.
        strict_data: stop at the first unreadable image instead of skipping it.
        epochs: epochs to train.
        batch_size: the global batch per step, split over the processes under torchrun.
        accum_steps: batches per optimizer step (gradient accumulation).
        optimizer: ``"sgd"`` (Nesterov) or ``"adamw"``.
        lr: peak learning rate of the head.
        momentum: SGD momentum.
        weight_decay: not applied to biases and norm parameters.
        warmup_epochs: linear warm-up before the cosine decay.
        label_smoothing: of the cross-entropy loss.
        amp: ``"none"``, ``"bf16"`` (CPU or CUDA) or ``"fp16"`` (CUDA, with a gradient scaler).
        freeze: ``"none"``, ``"features"``, or ``"blockN"`` (up to and including dense block N);
            frozen parts keep their weights and BN statistics.
        layer_decay: each block towards the input gets the learning rate times this factor.
        seed: seed of the split, augmentation and initialisation.
        deterministic: deterministic algorithms (exact re-runs and resumes).
        workers: DataLoader workers; ``None`` for 0 on CPU, up to 8 on CUDA.
        patience: stop after this many epochs without val improvement; 0 never stops early.
        save_every: also save the resumable state every N optimizer steps; 0 after each epoch only.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        progress: progress bars; ``None`` shows them on a terminal.
        on_nonfinite: a step whose loss or gradients are not finite ``"stop"`` s the run (exit code 1,
            the last finite checkpoint kept) or is ``"skip"`` ped, its gradients dropped.
        clip_grad_norm: clip the gradients' global norm to this before each step; 0 does not clip.
        compile: run the training steps through ``torch.compile`` (the memory strategies keep their
            savings there); validation runs the model in eager mode.

    Example:
        >>> TrainConfig(data="", epochs=3, augment="light").batch_size
        32
    """

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
    on_nonfinite: str = "stop"
    clip_grad_norm: float = 0.0
    compile: bool = False

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
        need(isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0,
             f"--lr must be a finite number > 0 (e.g. 0.01), got {self.lr!r}")
        need(self.on_nonfinite in NONFINITE_POLICIES,
             f"--on-nonfinite must be one of {NONFINITE_POLICIES}, got {self.on_nonfinite!r}")
        need(isinstance(self.clip_grad_norm, (int, float)) and math.isfinite(self.clip_grad_norm) and self.clip_grad_norm >= 0,
             f"--clip-grad-norm must be a finite number >= 0 (0: no clipping), got {self.clip_grad_norm!r}")
        need(isinstance(self.compile, bool), f"compile must be True or False, got {self.compile!r}")
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
