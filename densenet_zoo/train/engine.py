"""Fine-tuning engine: one loop for a single process and for DDP under ``torchrun``.

>>> import densenet_zoo as dz
>>> result = dz.finetune("data/digits", out="runs/digits", model="densenet121", image_size=32, epochs=3)

Exact resume: the data order of epoch ``e`` is a permutation seeded by ``(seed, e)``, every
sample's augmentation is seeded by ``(seed, e, index)`` (see :class:`~densenet_zoo.data.ImageDataset`),
and the state file holds model, optimizer, scheduler, scaler, RNG states and the position inside
the epoch, so a resumed run takes the same steps as one never interrupted.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import data as D
from . import run_files as io
from ..models import create_model, save_model
from .parts import (
    Dist, EpochBatchSampler, apply_freeze, evaluate_loader, lr_factor, make_optimizer, param_groups, reduce_sum,
    set_train_mode, weights_preprocessing,
)

OPTIMIZERS = ("sgd", "adamw")
AMP_MODES = ("none", "bf16", "fp16")
#: Settings that may change when a run is resumed; every other one must stay as saved.
RESUMABLE = ("epochs", "workers", "patience", "device", "progress", "save_every")
_PAUSE_ENV = "DENSENET_ZOO_PAUSE_AFTER_STEP"  # tests: sleep after saving at this step, to be killed there


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
        self.data, self.out = str(self.data), str(self.out)

    def check(self, world_size: int = 1) -> None:
        """One-line errors for settings that cannot work, before anything is read or written."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        for name in ("epochs", "batch_size", "accum_steps"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        need(self.batch_size % world_size == 0, f"--batch-size {self.batch_size} is the global batch and must divide by the {world_size} processes")
        need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(self.optimizer in OPTIMIZERS, f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        need(self.amp in AMP_MODES, f"--amp must be one of {AMP_MODES}, got {self.amp!r}")
        need(self.augment in D.AUGMENTATIONS, f"--augment must be one of {D.AUGMENTATIONS}, got {self.augment!r}")
        need(0.0 <= self.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        need(0.0 < self.layer_decay <= 1.0, f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        need(self.warmup_epochs >= 0 and self.patience >= 0 and self.save_every >= 0, "--warmup-epochs, --patience and --save-every must be >= 0")
        need(self.workers is None or self.workers >= 0, f"--workers must be >= 0, got {self.workers}")
        need(self.freeze == "none" or self.freeze == "features" or (self.freeze.startswith("block") and self.freeze[5:].isdigit()),
             f"--freeze must be none, features or blockN (e.g. block2), got {self.freeze!r}")
        need(bool(self.data), "no training data given; pass --data DIR (a folder of class folders, train/ + val/, or a CSV)")


class Trainer:
    """Runs a fine-tuning job described by a :class:`TrainConfig`.

    >>> Trainer(TrainConfig(data="data/digits", out="runs/d", model="densenet121", image_size=32)).fit()

    ``model`` replaces the model built from the config (any ``nn.Module`` classifier with a
    ``features`` part, e.g. torchvision's DenseNet); ``resume_state`` continues a saved run.
    """

    def __init__(self, config: TrainConfig, *, model: Optional[nn.Module] = None, resume_state: Optional[Dict[str, Any]] = None) -> None:
        self.config = config
        self.dist = Dist.setup(config.device)
        config.check(self.dist.world_size)
        self._model_override = model
        self.resume_state = resume_state
        self.is_main = self.dist.rank == 0
        self.out = Path(config.out)
        tty = sys.stderr.isatty() if config.progress is None else config.progress
        self.show_progress = bool(tty) and self.is_main

    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    # -- setup ---------------------------------------------------------------------------------
    def _build(self) -> None:
        c, d = self.config, self.dist
        if c.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=d.device.type == "cuda")
            torch.backends.cudnn.benchmark = False
        splits = D.load_splits(c.data, val_split=c.val_split, seed=c.seed)
        train_samples, bad = D.check_images(splits.train, strict=c.strict_data)
        val_samples, bad_val = D.check_images(splits.val, strict=c.strict_data)
        self.skipped = bad + bad_val
        if self.skipped and self.is_main:
            path, reason = self.skipped[0]
            print(f"warning: skipped {len(self.skipped)} unreadable image(s), e.g. {path} ({reason}); "
                  "--strict-data makes this an error", file=sys.stderr)
        if not train_samples or not val_samples:
            raise ValueError(f"{c.data}: no readable images left in the train or val split")
        self.class_names = splits.class_names

        torch.manual_seed(c.seed)  # same initial weights on every rank
        if self._model_override is not None:
            model = self._model_override
        else:
            kwargs = dict(c.model_args)
            kwargs["num_classes"] = len(self.class_names)
            if c.norm:
                kwargs["norm_layer"] = c.norm
            if c.memory_efficient:
                kwargs["memory_efficient"] = c.memory_efficient
            if c.weights:
                kwargs["weights"] = c.weights
            model = create_model(c.model, pretrained=c.pretrained or bool(c.weights), **kwargs)
        torch.manual_seed(c.seed + d.rank)  # dropout differs between ranks
        in_chans = getattr(model, "in_chans", 3)
        self.preprocessing = D.resolve_preprocessing(weights_preprocessing(c.model, c.weights) if (c.pretrained or c.weights) else None, c.image_size, in_chans)
        self.frozen = apply_freeze(model, c.freeze)
        self.model = model.to(d.device)
        self.optimizer = make_optimizer(c.optimizer, param_groups(model, c.lr, c.weight_decay, c.layer_decay), c.lr, c.momentum)

        self.train_set = D.ImageDataset(train_samples, D.train_transform(self.preprocessing, c.augment), in_chans=in_chans, seed=c.seed)
        self.val_set = D.ImageDataset(val_samples, D.eval_transform(self.preprocessing), in_chans=in_chans)
        self.rank_batch = c.batch_size // d.world_size
        self.sampler = EpochBatchSampler(len(self.train_set), self.rank_batch, seed=c.seed, rank=d.rank, world_size=d.world_size)
        self.micro_per_epoch = len(self.sampler)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / c.accum_steps)
        total, warmup = c.epochs * self.steps_per_epoch, round(c.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, warmup, total))
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[c.amp]
        if c.amp == "fp16" and d.device.type != "cuda":
            raise ValueError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU")
        self.scaler = torch.amp.GradScaler("cuda") if c.amp == "fp16" else None
        self.ddp = None
        if d.world_size > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[d.device.index] if d.device.type == "cuda" else None
            )
        workers = c.workers if c.workers is not None else (0 if d.device.type == "cpu" else min(8, os.cpu_count() or 1))
        self.workers = workers  # on CPU, loader workers would compete with the model's compute threads

        # Running position, replaced by the saved one on resume.
        self.epoch, self.batches_done, self.global_step = 0, 0, 0
        self.partial = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1, top-5, count of the epoch so far
        self.history: List[Dict[str, Any]] = []
        self.best_acc1, self.best_epoch, self.bad_epochs = -1.0, 0, 0
        if self.resume_state is not None:
            self._load_state(self.resume_state)

    def _load_state(self, s: Dict[str, Any]) -> None:
        if s["class_names"] != self.class_names:
            raise ValueError(f"{self.out}: the saved run has classes {s['class_names'][:5]}..., the data now has {self.class_names[:5]}...; resume with the same data")
        try:
            self.model.load_state_dict(s["model"])
        except RuntimeError:
            raise ValueError(f"{self.out}: the saved weights do not fit this model; resume with the model the run was started with") from None
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        if self.scaler is not None and s.get("scaler"):
            self.scaler.load_state_dict(s["scaler"])
        rngs = s["rng"]
        io.set_rng_state(rngs[self.dist.rank] if self.dist.rank < len(rngs) else rngs[0])
        self.epoch, self.batches_done, self.global_step = s["epoch"], s["batches_done"], s["global_step"]
        # The partial sums were reduced over ranks when saved: one rank carries them on.
        self.partial = s["partial"].clone() if self.dist.rank == 0 else torch.zeros(4, dtype=torch.float64)
        self.history = list(s["history"])
        self.best_acc1, self.best_epoch, self.bad_epochs = s["best_acc1"], s["best_epoch"], s["bad_epochs"]

    # -- files ---------------------------------------------------------------------------------
    def _state(self) -> Dict[str, Any]:
        """The resumable state; collective under DDP (RNG states and partial sums of all ranks)."""
        partial = reduce_sum(self.partial.clone(), self.dist)
        rng = io.rng_state()
        rngs = [rng]
        if self.dist.world_size > 1:
            rngs = [None] * self.dist.world_size
            dist.all_gather_object(rngs, rng)
        return {
            "format": io.STATE_FORMAT, "config": asdict(self.config), "class_names": list(self.class_names),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "rng": rngs, "epoch": self.epoch, "batches_done": self.batches_done, "global_step": self.global_step,
            "partial": partial, "history": list(self.history), "best_acc1": self.best_acc1,
            "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
        }

    def save_state(self) -> None:
        state = self._state()
        if self.is_main:
            io.save_state(state, self.out / io.STATE_FILE)

    def _save_weights(self, name: str, row: Dict[str, Any]) -> None:
        c = self.config
        save_model(self.model, self.out / name, norm=c.norm or "bn", class_names=list(self.class_names),
                   preprocessing=self.preprocessing, num_classes=len(self.class_names),
                   metrics={k: row[k] for k in ("epoch", "val_acc1", "val_acc5", "val_loss")},
                   training={"data": str(c.data), "epochs": c.epochs, "batch_size": c.batch_size, "seed": c.seed})

    # -- loop ----------------------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        """Train until ``epochs`` or early stopping; returns a summary (best accuracy, paths, history)."""
        # Deterministic mode is process-wide: put it back afterwards (notebooks, test sessions).
        determinism = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                       torch.backends.cudnn.benchmark)
        try:
            self._build()
            if self.is_main and self.resume_state is None:
                io.write_json(self.out / "config.json", asdict(self.config))
            self.log(f"data: {self.config.data}: {len(self.train_set)} train / {len(self.val_set)} val images, "
                     f"{len(self.class_names)} classes; {self.dist.world_size} process(es) on {self.dist.device.type}")
            stopped = False
            if self.epoch >= self.config.epochs:
                self.log(f"{self.out}: all {self.config.epochs} epochs are done; pass a larger --epochs to train on")
            while self.epoch < self.config.epochs and not stopped:
                stopped = self._run_epoch()
            return {
                "out": str(self.out), "best_acc1": self.best_acc1, "best_epoch": self.best_epoch,
                "epochs_run": len(self.history), "stopped_early": stopped, "history": list(self.history),
                "skipped_images": len(self.skipped),
            }
        finally:
            torch.use_deterministic_algorithms(determinism[0], warn_only=determinism[1])
            torch.backends.cudnn.benchmark = determinism[2]
            self.dist.close()

    def _run_epoch(self) -> bool:
        c, d = self.config, self.dist
        model = self.ddp or self.model
        epoch = self.epoch
        self.train_set.set_epoch(epoch)
        self.sampler.set_epoch(epoch, skip=self.batches_done)
        loader = DataLoader(self.train_set, batch_sampler=self.sampler, num_workers=self.workers,
                            pin_memory=d.device.type == "cuda", generator=torch.Generator())
        set_train_mode(self.model, self.frozen)
        bar = None
        if self.show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.micro_per_epoch, initial=self.batches_done, desc=f"epoch {epoch + 1}/{c.epochs}", unit="batch", leave=False)
        sums = torch.zeros(4, dtype=torch.float64, device=d.device)
        start, seen = time.perf_counter(), 0
        pause_at = int(os.environ.get(_PAUSE_ENV, "0") or 0)
        autocast = (lambda: torch.autocast(d.device.type, dtype=self.amp_dtype)) if self.amp_dtype else contextlib.nullcontext
        k = min(5, len(self.class_names))
        for micro, (x, y) in enumerate(loader, start=self.batches_done):
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            group_start = micro - micro % c.accum_steps
            group = min(c.accum_steps, self.micro_per_epoch - group_start)
            step_now = micro + 1 == group_start + group
            sync = contextlib.nullcontext() if (self.ddp is None or step_now) else self.ddp.no_sync()
            with sync:
                with autocast():
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=c.label_smoothing)
                scaled = loss / group
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            with torch.no_grad():
                top = logits.detach().float().topk(k, 1).indices
                hit = top.eq(y[:, None])
                sums += torch.stack([loss.detach().double() * len(y), hit[:, 0].sum().double(), hit.any(1).sum().double(),
                                     torch.tensor(float(len(y)), dtype=torch.float64, device=d.device)])
            seen += len(y)
            if step_now:
                if self.scaler:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.global_step += 1
                if c.save_every and self.global_step % c.save_every == 0 and micro + 1 < self.micro_per_epoch:
                    self.batches_done = micro + 1
                    self.partial += sums.cpu()
                    sums.zero_()
                    self.save_state()
                    if pause_at == self.global_step:
                        print(f"paused after step {self.global_step}", file=sys.stderr, flush=True)
                        time.sleep(3600)
            if bar is not None:
                bar.update(1)
                if micro % 5 == 0 or micro + 1 == self.micro_per_epoch:
                    tot = (self.partial + sums.cpu()).tolist()
                    bar.set_postfix(loss=f"{tot[0] / max(tot[3], 1):.3f}", acc=f"{100 * tot[1] / max(tot[3], 1):.1f}%",
                                    img_s=f"{seen * d.world_size / (time.perf_counter() - start):.0f}")
        if bar is not None:
            bar.close()
        train_time = time.perf_counter() - start
        tot = reduce_sum(self.partial + sums.cpu(), d).tolist()
        val = evaluate_loader(self.model, self._val_loader(), len(self.class_names), d, amp_dtype=self.amp_dtype)
        row = {
            "epoch": epoch + 1, "lr": self.optimizer.param_groups[-1]["lr"],
            "train_loss": tot[0] / tot[3], "train_acc1": 100 * tot[1] / tot[3], "train_acc5": 100 * tot[2] / tot[3],
            "val_loss": val["loss"], "val_acc1": val["acc1"], "val_acc5": val["acc5"],
            "train_images_per_s": seen * d.world_size / max(train_time, 1e-9), "epoch_time_s": train_time,
        }
        self.history.append(row)
        improved = row["val_acc1"] > self.best_acc1
        if improved:
            self.best_acc1, self.best_epoch, self.bad_epochs = row["val_acc1"], epoch + 1, 0
        else:
            self.bad_epochs += 1
        self.epoch, self.batches_done, self.partial = epoch + 1, 0, torch.zeros(4, dtype=torch.float64)
        stop = bool(c.patience) and self.bad_epochs >= c.patience
        if self.is_main:
            if improved:
                self._save_weights("best.safetensors", row)
            self._save_weights("last.safetensors", row)
            io.write_metrics(self.out, self.history)
            io.plot_curves(self.history, self.out / "curves.png")
        self.save_state()
        self.log(io.summarize(self.history))
        if stop:
            self.log(f"early stop: val acc@1 has not improved for {c.patience} epoch(s); best {self.best_acc1:.2f}% at epoch {self.best_epoch}")
        return stop

    def _val_loader(self) -> DataLoader:
        d = self.dist
        # Evaluation splits without padding (rank r takes r, r + world, ...): summed metrics are exact.
        idx = list(range(d.rank, len(self.val_set), d.world_size))
        return DataLoader(torch.utils.data.Subset(self.val_set, idx), batch_size=self.rank_batch, num_workers=self.workers)


def _config_from(options: Dict[str, Any]) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"unknown fine-tuning option(s) {unknown}; known: {sorted(names)}")
    return TrainConfig(**options)


def finetune(data: Optional[str] = None, out: Optional[str] = None, *, resume: Union[bool, str] = False,
             model_obj: Optional[nn.Module] = None, **options: Any) -> Dict[str, Any]:
    """Fine-tune a DenseNet on an image dataset; returns the run's summary.

    >>> dz.finetune("data/digits", out="runs/digits", model="densenet121", image_size=32, epochs=3, batch_size=64)
    >>> dz.finetune(resume="runs/digits", epochs=5)        # continue, possibly with more epochs

    ``options`` are the fields of :class:`TrainConfig`. A new run refuses an ``out`` folder that
    already holds one; ``resume`` continues it and accepts changes only to ``RESUMABLE`` settings.
    """
    if data is not None:
        options["data"] = data
    if resume:
        out = str(resume) if isinstance(resume, (str, os.PathLike)) else out
        if not out:
            raise ValueError("resume needs the output folder of the run: resume='runs/x' or --resume runs/x")
        state = io.load_state(Path(out) / io.STATE_FILE)
        saved = dict(state["config"])
        for key, value in options.items():
            if key in RESUMABLE or value is None or saved.get(key) == value:
                continue
            if key in ("model", "model_args", "norm", "pretrained", "weights"):
                raise ValueError(f"{out} holds a run of model {saved['model']!r} {saved.get('model_args') or ''}; "
                                 f"cannot resume it as {key}={value!r}; start a new run with another --out")
            raise ValueError(f"cannot change {key} from {saved.get(key)!r} to {value!r} when resuming {out}; "
                             f"only {', '.join(RESUMABLE)} may change")
        saved.update({k: v for k, v in options.items() if v is not None})
        saved["out"] = str(out)
        config = _config_from(saved)
        return Trainer(config, model=model_obj, resume_state=state).fit()
    options["out"] = out or options.get("out") or TrainConfig.out
    config = _config_from(options)
    existing = [n for n in (io.STATE_FILE, "best.safetensors", "last.safetensors") if (Path(config.out) / n).exists()]
    if existing:
        raise ValueError(f"{config.out} already holds a run ({existing[0]}); pass --resume {config.out} to continue it or choose another --out")
    return Trainer(config, model=model_obj).fit()
