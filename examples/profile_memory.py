"""Compare the memory strategies of a small DenseNet: saved-for-backward bytes, peak memory and time.

    python examples/profile_memory.py            # DenseNet-BC (3 x 6 layers, k=12) at 32x32, batch 8
"""

import densenet_zoo as dz

print("strategies:", ", ".join(dz.list_memory_strategies()))
report = dz.profile(
    "densenet_bc_100",
    batch_size=8,
    image_size=32,
    modes="none,bottleneck,efficient,shared,norms,layer",
    steps=2,
    model_kwargs=dict(block_config=(6, 6, 6)),  # DenseNet-BC-40: quick to run
)
print(report.table())
report.to_json("prof/profile_memory.json")
report.plot("prof/profile_memory.png")

sweep = dz.depth_sweep([40, 64, 100], growth_rate=12, image_size=32, batch_size=4, modes="none,efficient,layer")
print(sweep.table())
print("fitted exponents (bytes ~ depth**p):", {m: round(p, 2) for m, p in sweep.exponents().items()})
