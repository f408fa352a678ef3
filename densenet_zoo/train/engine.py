"""Fine-tuning engine: one loop for a single process and for DDP under ``torchrun``.

Example::

    import densenet_zoo as dz
    result = dz.finetune("data/digits", out="runs/digits", model="densenet121", image_size=32, batch_size=64,
                         epochs=3, augment="light")

Exact resume: the data order of epoch ``e`` is a permutation seeded by ``(seed, e)``, every
sample's augmentation is seeded by ``(seed, e, index)`` (see :class:`~densenet_zoo.data.dataset.ImageDataset`),
and the state file holds model, optimizer, scheduler, scaler, RNG states and the position inside
the epoch, so a resumed run takes the same steps as one never interrupted. Ctrl-C finishes the
optimizer step, saves that state and then stops (:mod:`.interrupt`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader

from .._utils import DataError, RunError, UsageError, printable
from ..data.dataset import ImageDataset
from ..data.splits import Sample, check_images, load_splits
from ..data.transforms import eval_transform, resolve_preprocessing, train_transform
from ..hardware import bf16_cost_note
from ..memory.estimate import check_fits
from ..models import create_model, save_model
from . import run_files as io
from . import step
from .compiling import check_compiler, compile_errors
from .config import TrainConfig, config_from, resumed_config
from ..weights.registry import weights_preprocessing
from .distributed import Dist, reduce_sum
from .evaluate import evaluate_loader
from .freezing import apply_freeze, set_train_mode
from .interrupt import StopRequest, ignore_sigint
from .optim import lr_factor, make_optimizer, param_groups
from .sampler import EpochBatchSampler


class Trainer:
    """Runs a fine-tuning job described by a :class:`TrainConfig`.

    Args:
        config: the run's settings.
        model: replaces the model built from the config (any ``nn.Module`` classifier with a
            ``features`` part, e.g. torchvision's DenseNet).
        resume_state: the saved state of a run to continue (as ``finetune(resume=...)`` reads it).
        on_save: ``on_save(path, position)`` is called after each write of the resumable state,
            with ``position = {"epoch", "batches_done", "global_step"}`` (e.g. to copy it elsewhere).

    Example:
        Trainer(TrainConfig(data="data/digits", out="runs/d", model="densenet121", image_size=32)).fit()
    """

    def __init__(self, config: TrainConfig, *, model: Optional[nn.Module] = None, resume_state: Optional[Dict[str, Any]] = None,
                 on_save: Optional[Callable[[Path, Dict[str, int]], None]] = None) -> None:
        self.config = config
        self.on_save = on_save
        self.dist = Dist.setup(config.device)
        config.check(self.dist.world_size)
        self._model_override = model
        self.resume_state = resume_state
        self.is_main = self.dist.rank == 0
        self.out = Path(config.out)
        tty = sys.stderr.isatty() if config.progress is None else config.progress
        self.show_progress = bool(tty) and self.is_main
        self.interrupt = StopRequest(announce=self.is_main)
        self.stopping = False  # a Ctrl-C every rank has agreed on

    def log(self, msg: str) -> None:
        if self.is_main:
            print(printable(msg), flush=True)  # a data path may hold bytes that are not UTF-8

    # -- setup ---------------------------------------------------------------------------------
    def _build(self) -> None:
        c = self.config
        note = bf16_cost_note(self.dist.device) if c.amp == "bf16" else None
        if note:  # the run's first line: what the user asked for costs more than float32 here
            self.log(f"warning: {note}")
        if c.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=self.dist.device.type == "cuda")
            torch.backends.cudnn.benchmark = False
        train_samples, val_samples = self._read_data()
        model = self._make_model()
        in_chans = getattr(model, "in_chans", 3)
        pre = weights_preprocessing(c.model, c.weights) if (c.pretrained or c.weights) else None
        self.preprocessing = resolve_preprocessing(pre, c.image_size, in_chans)
        self.frozen = apply_freeze(model, c.freeze)
        self.model = model.to(self.dist.device)
        size = int(self.preprocessing["size"])
        check_fits(self.model, size, c.batch_size // self.dist.world_size, self.dist.device,
                   f"--image-size {size} with --batch-size {c.batch_size}")  # before the allocator finds out
        self.optimizer = make_optimizer(c.optimizer, param_groups(model, c.lr, c.weight_decay, c.layer_decay), c.lr, c.momentum)
        self.train_set = ImageDataset(train_samples, train_transform(self.preprocessing, c.augment), in_chans=in_chans, seed=c.seed)
        self.val_set = ImageDataset(val_samples, eval_transform(self.preprocessing), in_chans=in_chans)
        self._make_schedule()
        self._make_runtime()
        # Running position, replaced by the saved one on resume.
        self.epoch, self.batches_done, self.global_step = 0, 0, 0
        self.partial = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1, top-5, count of the epoch so far
        self.group_finite, self.skipped_steps = torch.tensor(True), 0
        self.history: List[Dict[str, Any]] = []
        self.best_acc1, self.best_epoch, self.bad_epochs = -1.0, 0, 0
        if self.resume_state is not None:
            self._load_state(self.resume_state)

    def _read_data(self) -> Tuple[List[Sample], List[Sample]]:
        """The readable train and val samples; unreadable images are skipped with a warning (or raise with strict_data)."""
        c = self.config
        splits = load_splits(c.data, val_split=c.val_split, seed=c.seed)
        train_samples, bad = check_images(splits.train, strict=c.strict_data)
        val_samples, bad_val = check_images(splits.val, strict=c.strict_data)
        self.skipped = bad + bad_val
        if self.skipped and self.is_main:
            path, reason = self.skipped[0]
            print(f"warning: skipped {len(self.skipped)} unreadable image(s), e.g. {path} ({reason}); "
                  "--strict-data makes this an error", file=sys.stderr)
        if not train_samples or not val_samples:
            raise DataError(f"{c.data}: no readable images left in the train or val split")
        self.class_names = splits.class_names
        return train_samples, val_samples

    def _make_model(self) -> nn.Module:
        c = self.config
        torch.manual_seed(c.seed)  # same initial weights on every rank
        if self._model_override is not None:
            model = self._model_override
        else:
            kwargs = dict(c.model_args, num_classes=len(self.class_names))
            for key, value in (("norm_layer", c.norm), ("memory_efficient", c.memory_efficient), ("weights", c.weights)):
                if value:
                    kwargs[key] = value
            model = create_model(c.model, pretrained=c.pretrained or bool(c.weights), **kwargs)
        torch.manual_seed(c.seed + self.dist.rank)  # dropout differs between ranks
        return model

    def _make_schedule(self) -> None:
        """Batches per rank and epoch, optimizer steps per epoch, and the warm-up + cosine schedule."""
        c, d = self.config, self.dist
        self.rank_batch = c.batch_size // d.world_size
        self.sampler = EpochBatchSampler(len(self.train_set), self.rank_batch, seed=c.seed, rank=d.rank, world_size=d.world_size)
        self.micro_per_epoch = len(self.sampler)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / c.accum_steps)
        total, warmup = c.epochs * self.steps_per_epoch, round(c.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, warmup, total))

    def _make_runtime(self) -> None:
        """AMP and its scaler, the DDP wrapper and the loader workers."""
        c, d = self.config, self.dist
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[c.amp]
        if c.amp == "fp16" and d.device.type != "cuda":
            raise UsageError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU")
        self.scaler = torch.amp.GradScaler("cuda") if c.amp == "fp16" else None
        self.ddp = None
        if d.world_size > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[d.device.index] if d.device.type == "cuda" else None
            )
        self.train_model = self.ddp or self.model  # what a training step calls
        if c.compile:
            check_compiler(d.device)
            self.train_model = torch.compile(self.train_model)
        # On CPU, loader workers would compete with the model's compute threads.
        self.workers = c.workers if c.workers is not None else (0 if d.device.type == "cpu" else min(8, os.cpu_count() or 1))

    def _load_state(self, s: Dict[str, Any]) -> None:
        if s["class_names"] != self.class_names:
            raise RunError(f"{self.out}: the saved run has classes {s['class_names'][:5]}..., the data now has {self.class_names[:5]}...; resume with the same data")
        try:
            self.model.load_state_dict(s["model"])
        except RuntimeError:
            raise RunError(f"{self.out}: the saved weights do not fit this model; resume with the model the run was started with") from None
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
        """Write the resumable state (collective under DDP; rank 0 writes), then call ``on_save``."""
        state = self._state()
        if self.is_main:
            if self.resume_state is None and not (self.out / "config.json").exists():
                # Written with the first state, not before: a run stopped before any save leaves no files.
                io.write_json(self.out / "config.json", asdict(self.config))
            path = io.save_run_state(state, self.out / io.STATE_FILE)
            if self.on_save is not None:
                self.on_save(path, {"epoch": self.epoch, "batches_done": self.batches_done, "global_step": self.global_step})

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
            self.log(f"data: {self.config.data}: {len(self.train_set)} train / {len(self.val_set)} val images, "
                     f"{len(self.class_names)} classes; {self.dist.world_size} process(es) on {self.dist.device.type}")
            stopped = False
            if self.epoch >= self.config.epochs:
                self.log(f"{self.out}: all {self.config.epochs} epochs are done; pass a larger --epochs to train on")
            with self.interrupt:
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
        epoch = self.epoch
        self.train_set.set_epoch(epoch)
        self.sampler.set_epoch(epoch, skip=self.batches_done)
        loader = DataLoader(self.train_set, batch_sampler=self.sampler, num_workers=self.workers,
                            pin_memory=d.device.type == "cuda", generator=torch.Generator(), worker_init_fn=ignore_sigint)
        set_train_mode(self.model, self.frozen)
        progress = step.EpochProgress(self.show_progress, self.micro_per_epoch, self.batches_done,
                                      f"epoch {epoch + 1}/{c.epochs}", d.world_size)
        sums = torch.zeros(4, dtype=torch.float64, device=d.device)
        try:
            for micro, (x, y) in enumerate(loader, start=self.batches_done):
                x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
                self._train_batch(micro, x, y, sums)
                progress.update(micro, len(y), lambda: self.partial + sums.cpu())
        finally:
            progress.close()
        train_time = progress.elapsed()  # before validation: the row reports training speed
        train = reduce_sum(self.partial + sums.cpu(), d).tolist()
        val = evaluate_loader(self.model, self._val_loader(), len(self.class_names), d, amp_dtype=self.amp_dtype)
        row = step.epoch_row(epoch, self.optimizer.param_groups[-1]["lr"], train, val, progress.seen * d.world_size, train_time)
        return self._end_epoch(row)

    def _train_batch(self, micro: int, x: torch.Tensor, y: torch.Tensor, sums: torch.Tensor) -> None:
        """Forward/backward of micro-batch ``micro``; an optimizer step (and maybe a state save) when it ends a group."""
        c = self.config
        group, step_now = step.accumulation(micro, c.accum_steps, self.micro_per_epoch)
        sync = self.ddp.no_sync() if (self.ddp is not None and not step_now) else contextlib.nullcontext()
        with sync, compile_errors(c.compile):
            loss, logits = step.forward_backward(self.train_model, x, y, group=group, scaler=self.scaler,
                                                 autocast=step.autocast_for(self.dist.device, self.amp_dtype),
                                                 label_smoothing=c.label_smoothing)
        finite = torch.isfinite(loss.detach())
        self.group_finite = self.group_finite.to(finite.device) & finite  # no host sync per micro-batch
        # A non-finite batch adds nothing to the epoch's metrics (nan would poison the whole sum).
        sums += torch.where(finite, step.batch_sums(loss, logits, y, min(5, len(self.class_names))), torch.zeros_like(sums))
        if not step_now:
            return
        if not self._step_is_finite():
            self._nonfinite_step(micro)
        elif c.clip_grad_norm:
            step.clip_gradients(self.optimizer, c.clip_grad_norm, self.scaler)
        step.optimizer_step(self.optimizer, self.scheduler, self.scaler, apply=bool(self.group_finite))
        self.group_finite = torch.tensor(True)
        self.global_step += 1
        if micro + 1 == self.micro_per_epoch:
            return  # the epoch's end saves (and stops, on Ctrl-C)
        if self.stopping or (c.save_every and self.global_step % c.save_every == 0):
            self.batches_done = micro + 1
            self.partial += sums.cpu()
            sums.zero_()
            self.save_state()
        if self.stopping:
            raise self.interrupt.error()

    def _step_is_finite(self) -> bool:
        """Whether the group's losses (and, without the fp16 scaler, which handles its own, its gradients) are
        finite on every rank: all ranks decide alike, and on a Ctrl-C any rank has had."""
        ok = self.group_finite
        if self.scaler is None:
            ok = ok & step.gradients_finite(self.optimizer).to(ok.device)
        ok = self._agree(ok)
        self.group_finite = torch.tensor(ok)
        return ok

    def _agree(self, ok: torch.Tensor) -> bool:
        """Whether ``ok`` holds on every rank; sets :attr:`stopping` if any rank was asked to stop (one reduction)."""
        asked = torch.tensor(float(self.interrupt.requested is not None), dtype=torch.float64, device=ok.device)
        votes = torch.stack([ok.to(torch.float64).reshape(()), asked])
        total = reduce_sum(votes, self.dist).tolist()
        self.stopping = self.stopping or total[1] > 0
        return total[0] == self.dist.world_size

    def _nonfinite_step(self, micro: int) -> None:
        """Stop the run (``on_nonfinite="stop"``) or count the skipped step, naming where it happened."""
        where = f"epoch {self.epoch + 1}, step {self.global_step + 1} (batch {micro + 1} of {self.micro_per_epoch})"
        if self.config.on_nonfinite == "skip":
            self.skipped_steps += 1
            self.log(f"warning: {where}: non-finite loss or gradient, step skipped ({self.skipped_steps} so far)")
            return
        raise self._diverged(where)

    def _diverged(self, where: str) -> RunError:
        last = self.out / "last.safetensors"
        kept = (f"the last finite checkpoint is {last} (epoch {self.epoch}; --resume {self.out} continues from it)"
                if self.epoch and last.is_file() else "no epoch had finished, so no checkpoint was written")
        return RunError(f"{where}: the loss or a gradient is not finite (nan/inf); training stopped and {kept}; "
                        "try a lower --lr, --amp none, --clip-grad-norm 1.0, or --on-nonfinite skip")

    def _model_finite(self) -> bool:
        tensors = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        return self._agree(torch.stack([torch.isfinite(t).all() for t in tensors]).all().cpu())

    def _end_epoch(self, row: Dict[str, Any]) -> bool:
        """Record the epoch, track the best accuracy, write weights, metrics, curves and state; True to stop early."""
        c = self.config
        if not self._model_finite() or not math.isfinite(row["val_loss"]):  # never a non-finite model as best/last
            raise self._diverged(f"epoch {row['epoch']}, after its last step (weights or validation loss)")
        self.history.append(row)
        improved = row["val_acc1"] > self.best_acc1
        if improved:
            self.best_acc1, self.best_epoch, self.bad_epochs = row["val_acc1"], row["epoch"], 0
        else:
            self.bad_epochs += 1
        self.epoch, self.batches_done, self.partial = row["epoch"], 0, torch.zeros(4, dtype=torch.float64)
        stop = bool(c.patience) and self.bad_epochs >= c.patience
        if self.is_main:
            if improved:
                self._save_weights("best.safetensors", row)
            self._save_weights("last.safetensors", row)
            io.write_metrics(self.out, self.history)
            io.plot_curves(self.history, self.out / "curves.png")
        self.save_state()
        self.log(io.summarize(self.history))
        if self.stopping and not stop and self.epoch < c.epochs:
            raise self.interrupt.error()
        if stop:
            self.log(f"early stop: val acc@1 has not improved for {c.patience} epoch(s); best {self.best_acc1:.2f}% at epoch {self.best_epoch}")
        return stop

    def _val_loader(self) -> DataLoader:
        d = self.dist
        # Evaluation splits without padding (rank r takes r, r + world, ...): summed metrics are exact.
        idx = list(range(d.rank, len(self.val_set), d.world_size))
        return DataLoader(torch.utils.data.Subset(self.val_set, idx), batch_size=self.rank_batch, num_workers=self.workers,
                          worker_init_fn=ignore_sigint)


def _is_main_process() -> bool:
    """Rank 0, or a process outside a process group (torchrun sets ``RANK`` before the group exists)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def finetune(data: Optional[str] = None, out: Optional[str] = None, *, resume: Union[bool, str] = False,
             model_obj: Optional[nn.Module] = None, on_save: Optional[Callable[[Path, Dict[str, int]], None]] = None,
             **options: Any) -> Dict[str, Any]:
    """Fine-tune a DenseNet on an image dataset; returns the run's summary.

    A new run needs a new or empty ``out`` folder (nothing of the user's is replaced). The folder is
    locked while the run lasts: a second run into it fails at once.

    Args:
        data: the dataset (see :class:`TrainConfig`); not needed with ``resume``.
        out: the run folder.
        resume: ``True`` to continue the run in ``out``, or the run folder to continue; only the
            resumable settings (``epochs``, ``workers``, ``patience``, ``device``, ``progress``,
            ``save_every``) may change.
        model_obj: a model to train instead of the one the options build (see :class:`Trainer`).
        on_save: called after each write of the resumable state (see :class:`Trainer`).
        **options: the other fields of :class:`TrainConfig`.

    Returns:
        The summary: ``out``, ``best_acc1``, ``best_epoch``, ``epochs_run``, ``stopped_early``,
        ``skipped_images`` and the per-epoch ``history`` (losses, ``val_acc1``, ``val_acc5``...).

    Raises:
        ValueError: a setting out of range (before the folder is touched).
        DataError: data that cannot be trained on (missing folder, one class, an empty class folder).
        RunError: an ``out`` that holds a run (without ``resume``) or is in use, or a resumed run
            given settings it cannot change.

    Example:
        dz.finetune("data/digits", out="runs/digits", model="densenet121", image_size=32, batch_size=64, epochs=3,
                    augment="light")   # light: no flips, digits stay digits
        dz.finetune(resume="runs/digits", epochs=5)        # continue, possibly with more epochs
    """
    if data is not None:
        options["data"] = data
    if resume:
        out = str(resume) if isinstance(resume, (str, os.PathLike)) else out
        if not out:
            raise RunError("resume needs the output folder of the run: resume='runs/x' or --resume runs/x")
    else:
        out = str(out or options.get("out") or TrainConfig.out)
        options["out"] = out
        config = config_from(options)
        config.check()  # bad settings fail before the folder is touched
        io.check_new_run_folder(out)
    with io.RunLock(out) if _is_main_process() else contextlib.nullcontext():
        if resume:
            state = io.load_run_state(Path(out) / io.STATE_FILE)
            config = resumed_config(state["config"], options, out)
            return Trainer(config, model=model_obj, resume_state=state, on_save=on_save).fit()
        io.check_new_run_folder(out)  # again under the lock: another run may have started meanwhile
        return Trainer(config, model=model_obj, on_save=on_save).fit()
