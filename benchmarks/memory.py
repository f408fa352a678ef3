"""Memory and time of one SGD training step per memory strategy, against torchvision, on CPU or CUDA.

    python benchmarks/memory.py                                   # densenet121, batch 16, 224x224, all modes
    python benchmarks/memory.py --device cuda --out benchmarks/results/memory_cuda
    python benchmarks/memory.py --saved-only                      # exact saved-for-backward bytes only (fast, any machine)
    python benchmarks/memory.py --batch-size 2 --image-size 32 --modes none,efficient --steps 1   # smoke run
    python benchmarks/memory.py --autocast bfloat16               # every mode under bf16 autocast
    python benchmarks/memory.py --allocator tcmalloc              # processes started with tcmalloc preloaded
    python benchmarks/memory.py --device cuda --max-batch 80GiB   # also the largest batch per mode
    python benchmarks/memory.py --modes none,fused,fused_lean,compiled   # and under torch.compile

Each CPU configuration runs in its own fresh process, started with the default allocator unless
--allocator says otherwise; see densenet_zoo/profiling/worker.py for what the peak and the baseline are.
Run it on a quiet machine: the times are only meaningful then.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

import densenet_zoo as dz
from densenet_zoo.allocator import ALLOCATORS
from densenet_zoo.hardware import describe_hardware
from densenet_zoo.memory import SavedTensorBytes
from densenet_zoo.profiling.report import ProfileReport
from densenet_zoo.profiling.runner import resolve_modes


def saved_only(args: argparse.Namespace) -> int:
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    rows = []
    for spec in resolve_modes(args.modes):
        mode, _, layout = spec.partition(":")  # "none:channels_last": normal mode on channels-last tensors
        model = dz.create_model(args.model, memory_efficient=mode).train()
        inputs = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
        if layout == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        if mode == "auto":
            model(inputs).sum().backward()  # "auto" measures on its first forward and decides on the second
        with SavedTensorBytes(exclude=model.parameters()) as saved:
            out = model(inputs)
        out.sum().backward()
        rows.append((spec, saved.bytes))
    normal = rows[0][1]
    print(f"# {args.model}, batch {args.batch_size}, {args.image_size}x{args.image_size}: bytes saved for backward "
          f"(unique storages, parameters excluded; exact), torch {torch.__version__}")
    print(f"# hardware: {describe_hardware()}")
    print(f"{'mode':20s} {'saved MB':>9s} {'vs normal':>10s}")
    for mode, n in rows:
        print(f"{mode:20s} {n / 2**20:9.1f} {n / normal:10.3f}")
    return 0


def check_targets(report: ProfileReport, cuda: bool) -> None:
    rows = [r for r in report.rows if "error" not in r and not r["mode"].startswith(("torchvision", "none"))
            and ":compile" not in r["mode"]]
    for mem, time_ in ((0.30, 1.10), (0.20, 1.25)) if cuda else ((0.20, 1.00),):
        hits = [r["mode"] for r in rows if r["mem_ratio"] <= mem and r["time_ratio"] <= time_]
        print(f"target <= {mem:.2f}x memory and <= {time_:.2f}x time: {', '.join(hits) if hits else 'not met'}")
    try:
        ours, tv = report.row("none"), report.row("torchvision")
        print(f"normal mode vs torchvision: {tv['step_s'] / ours['step_s']:.2f}x its speed at "
              f"{ours['peak_bytes'] / tv['peak_bytes']:.2f}x its memory")
    except KeyError:
        pass
    compiled = [r for r in report.rows if ":compile" in r["mode"] and "error" not in r]
    if any(r["mode"] == "none:compile" for r in compiled):
        base = report.row("none:compile")
        print("compiled rows against normal mode compiled (the same baseline method):")
        for r in compiled:
            print(f"  {r['mode']:22s} {r['peak_bytes'] / base['peak_bytes']:5.2f}x its peak memory, "
                  f"{r['step_s'] / base['step_s']:5.2f}x its step time, {r['saved_bytes'] / base['saved_bytes']:5.2f}x "
                  f"its saved bytes; warm-up (compiling) {r['warmup_s']:.0f} s")
    try:
        cl = report.row("none:channels_last")
        for r in rows:
            print(f"{r['mode']} vs normal mode on channels-last tensors: {r['step_s'] / cl['step_s']:.2f}x its time at "
                  f"{r['peak_bytes'] / cl['peak_bytes']:.2f}x its memory")
    except KeyError:
        pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="densenet121")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--modes", default="all,none:channels_last",
                   help="strategy names; ':channels_last' runs a mode on channels-last tensors (the fused strategies' layout)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=0,
                   help="timing processes per mode, modes taking turns; 0 (default): all modes in one process, "
                        "taking turns step by step (best against a drifting machine speed)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-reference", action="store_true", help="leave out the torchvision rows")
    p.add_argument("--saved-only", action="store_true", help="only the exact saved-for-backward bytes, in this process")
    p.add_argument("--allocator", default="default", choices=ALLOCATORS,
                   help="C allocator of the measured CPU processes (default: nothing preloaded, as a user runs)")
    p.add_argument("--autocast", default=None, choices=["bfloat16", "float16"], help="forward under torch.autocast")
    p.add_argument("--max-batch", default=None, metavar="BUDGET",
                   help="also search the largest batch per mode within BUDGET (e.g. 80GiB), up to --max-batch-limit")
    p.add_argument("--max-batch-limit", type=int, default=1024)
    p.add_argument("--max-batch-resolution", type=int, default=8,
                   help="stop searching when a batch that fits and one that does not are this many images apart "
                        "(1: exact, more probes)")
    p.add_argument("--out", default="benchmarks/results/memory", help="folder for profile.json/.csv/.png")
    return p


def main() -> int:
    args = build_parser().parse_args()
    if args.saved_only:
        return saved_only(args)
    out = Path(args.out)
    measured: list = []

    def progress(row: dict) -> None:  # each row as it is measured: a run cut short still leaves the rows it finished
        measured.append(row)
        so_far = ProfileReport(measured, {"partial": True})
        print(so_far.table().splitlines()[-1], flush=True)
        so_far.to_json(out / "profile.json")

    report = dz.profile(args.model, batch_size=args.batch_size, image_size=args.image_size, modes=args.modes,
                        device=args.device, reference=None if args.no_reference else "torchvision",
                        steps=args.steps, warmup=args.warmup, threads=args.threads,
                        rounds=args.rounds, allocator=args.allocator, autocast=args.autocast, on_row=progress)
    print(report.table(), flush=True)
    check_targets(report, args.device.startswith("cuda"))
    for path in (report.to_json(out / "profile.json"), report.to_csv(out / "profile.csv")):
        print(f"wrote {path}")
    try:
        print(f"wrote {report.plot(out / 'profile.png')}")
    except ImportError as exc:  # matplotlib is optional
        print(f"no plot: {exc}")
    if args.max_batch:
        partial: dict = {}

        def save(mode: str, result: dict) -> None:  # a search cut short still leaves the modes it finished
            partial[mode] = {"max_batch": result["max_batch"], "probes": [
                {k: p.get(k) for k in ("batch_size", "absolute_peak_bytes", "step_s", "fits", "error")} for p in result["probes"]]}
            print(f"max batch {mode}: {result['max_batch']}", flush=True)
            (out / "max_batch.json").write_text(json.dumps({"budget": args.max_batch, "results": partial}, indent=2))

        found = dz.max_batch(args.model, budget=args.max_batch, image_size=args.image_size, modes=args.modes,
                             device=args.device, threads=args.threads, allocator=args.allocator,
                             autocast=args.autocast, start=args.batch_size, limit=args.max_batch_limit, on_mode=save,
                             resolution=args.max_batch_resolution)
        print(found.table())
        print(f"wrote {found.to_json(out / 'max_batch.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
