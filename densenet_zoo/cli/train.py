"""``densenet-zoo sample-data | finetune | evaluate``: parse, call the library (imported when a command runs), print."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Dict

from .._utils import UsageError
from .common import add_overwrite


def _cmd_sample_data(args: argparse.Namespace) -> int:
    from ..data.sample_data import write_sample_data

    counts = write_sample_data(args.name, args.dir, seed=args.seed)
    print(f"{args.name}: {counts['train']} train / {counts['val']} val images in {args.dir}/train and {args.dir}/val")
    return 0


#: finetune flags -> TrainConfig fields; defaults are None so that --resume sees what was given.
_FLAGS = {
    "data": str, "out": str, "model": str, "weights": str, "norm": str, "image_size": int, "val_split": float, "augment": str,
    "epochs": int, "batch_size": int, "accum_steps": int, "optimizer": str, "lr": float, "momentum": float,
    "weight_decay": float, "warmup_epochs": float, "label_smoothing": float, "amp": str, "freeze": str,
    "layer_decay": float, "seed": int, "workers": int, "patience": int, "save_every": int, "device": str,
    "on_nonfinite": str, "clip_grad_norm": float,
}


def _cmd_finetune(args: argparse.Namespace) -> int:
    from ..train import finetune

    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    options: Dict[str, Any] = {k: getattr(args, k) for k in _FLAGS if getattr(args, k) is not None}
    if args.model_args is not None:
        try:
            options["model_args"] = json.loads(args.model_args)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--model-args must be a JSON object such as '{{\"growth_rate\": 12}}' ({exc})") from None
        if not isinstance(options["model_args"], dict):
            raise UsageError("--model-args must be a JSON object such as '{\"growth_rate\": 12}'")
    for flag in ("pretrained", "strict_data", "deterministic"):
        if getattr(args, flag):
            options[flag] = True
    if args.memory_efficient is not None:
        options["memory_efficient"] = True if args.memory_efficient == "" else args.memory_efficient
    for flag in ("progress", "compile"):
        if getattr(args, flag) is not None:
            options[flag] = getattr(args, flag)
    if args.resume:
        result = finetune(resume=args.resume, **options)
    else:
        result = finetune(**options)
    if int(os.environ.get("RANK", "0") or 0) == 0:  # under torchrun, one line for the run, not one per process
        print(f"best val acc@1 {result['best_acc1']:.2f}% at epoch {result['best_epoch']}; "
              f"outputs in {result['out']} (best.safetensors, last.safetensors, metrics.csv, curves.png)")
    return 0


def _finetune_interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C during finetune leaves behind, and how to go on."""
    from ..train.run_files import STATE_FILE

    out = args.resume or args.out or "runs/finetune"
    if (Path(out) / STATE_FILE).is_file():
        return f"{out} keeps the last saved state; continue with: densenet-zoo finetune --resume {out}"
    return f"nothing was saved in {out} yet (state is saved each epoch, or every N steps with --save-every N)"


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ..train import evaluate_checkpoint

    r = evaluate_checkpoint(args.checkpoint, args.data, batch_size=args.batch_size, workers=args.workers,
                            out=args.out, device=args.device, strict_data=args.strict_data, overwrite=args.overwrite)
    print(f"{args.checkpoint} on {args.data}: {r['count']} images, acc@1 {r['acc1']:.2f}%, acc@5 {r['acc5']:.2f}%, loss {r['loss']:.4f}")
    print(f"confusion matrix: {r['confusion_png']}")
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    """Register ``sample-data``, ``finetune`` and ``evaluate``."""
    p = sub.add_parser("sample-data", help="write a real sample image dataset (class folders train/ and val/)")
    p.add_argument("name", choices=["digits"], help="digits: scikit-learn's 1,797 handwritten digits, 10 classes")
    p.add_argument("dir", help="output folder, e.g. data/digits")
    p.add_argument("--seed", type=int, default=0, help="seed of the fixed train/val split")
    p.set_defaults(func=_cmd_sample_data)

    p = sub.add_parser("finetune", help="fine-tune a DenseNet on an image dataset (single process or torchrun DDP)")
    a = p.add_argument
    a("--data", help="folder with train/ and val/ class folders, a folder of class folders, or a CSV of path,label")
    a("--out", help="output folder (default runs/finetune); must not hold a run unless --resume")
    a("--resume", metavar="OUT", help="continue the run saved in OUT exactly where it stopped")
    a("--model", help="architecture name (densenet121, densenet_bc_100, ...; default densenet121)")
    a("--model-args", help="JSON of extra DenseNet arguments, e.g. '{\"growth_rate\": 12, \"small_inputs\": true}'")
    a("--pretrained", action="store_true", help="start from the architecture's pretrained weights")
    a("--weights", help="start from these weights: a registered name or tag, a .safetensors/.pth file or a URL")
    a("--norm", help="norm layer name (bn, frozen_bn, sync_bn, ...; see dz.list_norms())")
    a("--memory-efficient", nargs="?", const="", default=None, metavar="STRATEGY",
      help="recompute activations in backward (optionally a strategy name; see dz.list_memory_strategies())")
    a("--image-size", type=int, help="training/eval image size (default: the pretrained weights' or 224)")
    a("--val-split", type=float, help="fraction held out for val when the data has no val/ (default 0.2)")
    a("--augment", help="standard (crop+flip), light (mild crop, no flip) or none (default standard)")
    a("--strict-data", action="store_true", help="stop at the first unreadable image instead of skipping it")
    a("--epochs", type=int, help="default 10")
    a("--batch-size", type=int, help="global batch per step, split over the processes (default 32)")
    a("--accum-steps", type=int, help="gradient accumulation: batches per optimizer step (default 1)")
    a("--optimizer", help="sgd or adamw (default sgd)")
    a("--lr", type=float, help="peak learning rate of the head (default 0.01)")
    a("--momentum", type=float, help="SGD momentum, Nesterov (default 0.9)")
    a("--weight-decay", type=float, help="default 1e-4; not applied to biases and norm parameters")
    a("--warmup-epochs", type=float, help="linear warm-up before the cosine decay (default 0)")
    a("--label-smoothing", type=float, help="default 0")
    a("--amp", help="none, bf16 (CPU or CUDA) or fp16 (CUDA, with a gradient scaler); default none")
    a("--freeze", help="none, features, or blockN: freeze up to and including dense block N (default none)")
    a("--layer-decay", type=float, help="discriminative lr: each block towards the input gets lr x this (default 1)")
    a("--seed", type=int, help="default 0")
    a("--deterministic", action="store_true", help="deterministic algorithms (exact re-runs and resumes)")
    a("--workers", type=int, help="DataLoader workers (default 0 on CPU, up to 8 on CUDA)")
    a("--threads", type=int, help="torch CPU threads for this process")
    a("--patience", type=int, help="early stopping after this many epochs without val improvement (default 0: off)")
    a("--save-every", type=int, help="also save the resumable state every N optimizer steps (default 0: each epoch)")
    a("--on-nonfinite", choices=["stop", "skip"], help="a step with a non-finite loss or gradient stops the run "
      "(default; exit code 1, the last finite checkpoint kept) or is skipped, as AMP's gradient scaler does")
    a("--clip-grad-norm", type=float, help="clip the global gradient norm to this before each step (default 0: off)")
    a("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    a("--compile", action=argparse.BooleanOptionalAction, help="training steps through torch.compile (default off)")
    a("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars (default: when a terminal)")
    p.set_defaults(func=_cmd_finetune, interrupted=_finetune_interrupted)

    p = sub.add_parser("evaluate", help="accuracy and confusion matrix of a fine-tuned checkpoint on a folder")
    p.add_argument("--checkpoint", required=True, help="best.safetensors or last.safetensors of a run")
    p.add_argument("--data", required=True, help="folder of class folders (or with a val/ subfolder)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--out", help="where confusion.png and evaluation.json go (default: the checkpoint's folder)")
    p.add_argument("--device", default="auto")
    p.add_argument("--strict-data", action="store_true")
    add_overwrite(p, "confusion.png / evaluation.json in --out that densenet-zoo did not write")
    p.set_defaults(func=_cmd_evaluate)
