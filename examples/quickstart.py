"""Build every ImageNet DenseNet, run one training step on a small batch and print what came out.

    python examples/quickstart.py
"""

import time

import torch

import densenet_zoo as dz

torch.manual_seed(0)
x = torch.randn(2, 3, 64, 64)
print(f"{'model':14s} {'params':>12s} {'output':>16s} {'normal':>9s} {'memory-efficient':>17s}")
for name in ["densenet121", "densenet161", "densenet169", "densenet201"]:
    times = []
    for mode in (False, True):
        model = dz.create_model(name, memory_efficient=mode).train()
        start = time.perf_counter()
        out = model(x)
        out.logsumexp(1).mean().backward()
        times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    print(f"{name:14s} {params:>12,d} {str(tuple(out.shape)):>16s} {times[0]:>8.2f}s {times[1]:>16.2f}s")
print("memory strategies:", ", ".join(dz.list_memory_strategies()))
