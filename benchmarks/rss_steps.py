"""Resident memory per training step in this plain process (whatever allocator it was started with).

    python benchmarks/rss_steps.py --mode fused_lean --steps 6           # DenseNet-121, batch 16, 224x224
    LD_PRELOAD=libtcmalloc_minimal.so.4 python benchmarks/rss_steps.py --mode fused

Prints, per step, the peak resident memory during the step (VmHWM after a reset) and the resident
memory after it, both above the baseline (model, SGD with momentum state, input and targets
allocated, before the first step). Growth from step to step is memory the allocator keeps.
"""

import argparse
import gc
import sys
import time

import torch
import torch.nn as nn

import densenet_zoo as dz
from densenet_zoo.hardware import describe_hardware
from densenet_zoo.profiling.rss import PeakRss, rss_kib


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="densenet121")
    p.add_argument("--mode", default="fused_lean")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--bf16", action="store_true", help="CPU autocast to bfloat16")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = dz.create_model(args.model, memory_efficient=args.mode).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for q in model.parameters():  # the momentum state exists before the first step, as in the baseline
        opt.state[q]["momentum_buffer"] = torch.zeros_like(q)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, 1000, (args.batch_size,))
    gc.collect()
    base = rss_kib("VmRSS")
    print(f"# hardware: {describe_hardware()}")
    print(f"# {args.model} {args.mode} batch {args.batch_size} {args.image_size}px bf16={args.bf16}: baseline {base / 1024:.0f} MB")
    for i in range(args.steps):
        start = time.perf_counter()
        with PeakRss() as peak:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                out = model(x)
            nn.functional.cross_entropy(out.float(), y).backward()
            del out
            opt.step()
            opt.zero_grad(set_to_none=True)
        after = rss_kib("VmRSS")
        print(f"step {i}: peak {(peak.peak - base) / 1024:7.0f} MB  after {(after - base) / 1024:7.0f} MB  "
              f"{time.perf_counter() - start:6.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
