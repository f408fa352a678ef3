"""``densenet-zoo profile``: memory and time per memory strategy, max batch per budget, depth sweep."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict

from .._utils import FIGURE, DataError, UsageError, check_output
from ..allocator import ALLOCATORS, describe
from ..hardware import bf16_cost_note
from .common import add_overwrite


def _outputs(args: argparse.Namespace, stem: str) -> Dict[str, Path]:
    """The files ``--out`` will hold, checked before minutes of measuring: a folder, no foreign file replaced."""
    from ..profiling.report import REPORT_CSV, REPORT_JSON

    if not args.out:
        return {}
    folder = Path(args.out)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"--out {folder} is a file; give a folder for {stem}.json, {stem}.csv and {stem}.png")
    kinds = {"json": REPORT_JSON, "csv": REPORT_CSV[stem], "png": FIGURE}
    paths = {suffix: folder / f"{stem}.{suffix}" for suffix in kinds}
    for suffix, path in paths.items():
        check_output(path, kinds[suffix], overwrite=args.overwrite, flag="--out")
    return paths


def _write_all(report: Any, paths: Dict[str, Path]) -> None:
    for suffix, write in (("json", report.to_json), ("csv", report.to_csv), ("png", report.plot)):
        if suffix in paths:
            print(f"wrote {write(paths[suffix])}")


def _ints(text: str) -> list:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 40,100,160,250, got {text!r}") from None


def _cmd_profile(args: argparse.Namespace) -> int:
    from ..profiling import depth_sweep, max_batch, profile

    if args.image_size is not None and args.image_size < 1:
        raise UsageError(f"--image-size must be >= 1 pixel, got {args.image_size}")
    note = bf16_cost_note(args.device) if args.autocast == "bfloat16" and not args.depth_sweep else None
    if note:  # said before the minutes of measuring, not only in the report
        print(f"# note: {note}", flush=True)
    stem = "depth_sweep" if args.depth_sweep else "max_batch" if args.max_batch else "profile"
    paths = _outputs(args, stem)
    if not args.depth_sweep and not args.device.startswith("cuda"):
        print(f"# measured processes run with allocator {describe(args.allocator)}", flush=True)
    if args.depth_sweep:
        report = depth_sweep(args.depth_sweep, growth_rate=args.growth_rate, image_size=args.image_size or 32,
                             batch_size=args.batch_size, modes=args.modes)
        print(report.table())
        _write_all(report, paths)
        return 0
    image_size = args.image_size or 224
    if args.max_batch:
        if not args.budget:
            raise UsageError("--max-batch needs --budget, e.g. --budget 8GiB")
        report = max_batch(args.model, budget=args.budget, image_size=image_size, modes=args.modes,
                           device=args.device, threads=args.threads, allocator=args.allocator, autocast=args.autocast)
        print(report.table())
        _write_all(report, paths)
        return 0
    report = profile(args.model, batch_size=args.batch_size, image_size=image_size, modes=args.modes,
                     device=args.device, reference=args.reference, steps=args.steps, warmup=args.warmup, threads=args.threads,
                     rounds=args.rounds, allocator=args.allocator, autocast=args.autocast)
    print(report.table())
    _write_all(report, paths)
    return 0


def add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="peak memory, saved-for-backward bytes and step time per memory strategy")
    p.add_argument("--model", default="densenet121", help="model name (default densenet121)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=None, help="pixels (default 224; 32 for --depth-sweep)")
    p.add_argument("--modes", default="all", help="'all' or comma-separated strategy names, e.g. none,efficient,layer; "
                   "append ':channels_last' to run a mode on channels-last tensors")
    p.add_argument("--reference", choices=["torchvision"], default=None, help="add torchvision's normal and memory_efficient rows")
    p.add_argument("--device", default="cpu", help="cpu (one fresh process per configuration) or cuda[:N]")
    p.add_argument("--steps", type=int, default=5, help="measured steps after warm-up (time is their median; "
                   "memory is the peak over at least 5)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="CPU: time each mode in this many fresh processes, modes taking turns; "
                   "0: all modes in one process, taking turns step by step")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each worker")
    p.add_argument("--allocator", choices=ALLOCATORS, default="default",
                   help="C allocator of the measured CPU processes (default: none preloaded, as a user runs; "
                        "tcmalloc/jemalloc are preloaded when installed)")
    p.add_argument("--autocast", choices=["bfloat16", "float16"], default=None, help="run the forward under torch.autocast")
    p.add_argument("--max-batch", action="store_true", help="largest batch per mode within --budget")
    p.add_argument("--budget", default=None, help="memory budget for --max-batch, e.g. 8GiB")
    p.add_argument("--depth-sweep", type=_ints, default=None, metavar="DEPTHS", help="DenseNet-BC depths, e.g. 40,100,160,250")
    p.add_argument("--growth-rate", type=int, default=12, help="growth rate for --depth-sweep")
    p.add_argument("--out", default="", help="folder for JSON, CSV and PNG")
    add_overwrite(p, "files in --out that are not this command's reports")
    p.set_defaults(func=_cmd_profile)
