"""SyncBatchNorm on 2 gloo CPU processes equals single-process nn.BatchNorm2d on the whole batch."""


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import densenet_zoo as dz
from _dist import run_distributed
from densenet_zoo.norms.batchnorm import SyncBatchNorm

C = 5
# (per-rank batch sizes, momentum, channels_last, spatial size)
CASES = [
    ((4, 4), 0.1, False, 3),
    ((3, 5), None, True, 3),  # unequal split
    ((0, 4), 0.1, False, 3),  # a rank with an empty batch
    ((1, 2), 0.1, False, 2),  # a batch of one image on a rank
]
STEPS = 2


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _data(case_index, step, total, spatial, channels_last):
    g = torch.Generator().manual_seed(100 * case_index + step)
    x = torch.randn(total, C, spatial, spatial, generator=g) * 2 + 1
    dy = torch.randn(total, C, spatial, spatial, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, dy


def _init(bn):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(C, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(C, generator=g))
    return bn


def _run(bn, case_index, case, rank=None):
    """Training steps then an eval step; what each returned (for ``rank``: its slice of the batch)."""
    sizes, _, channels_last, spatial = case
    total = sum(sizes)
    lo, hi = (0, total) if rank is None else (sum(sizes[:rank]), sum(sizes[: rank + 1]))
    record = []
    for step in range(STEPS + 1):
        bn.train(step < STEPS)
        x, dy = _data(case_index, step, total, spatial, channels_last)
        x = x[lo:hi].clone().requires_grad_()
        y = bn(x)
        (y * dy[lo:hi]).sum().backward()
        record.append({"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad.clone(), "db": bn.bias.grad.clone(),
                       "channels_last": y.is_contiguous(memory_format=torch.channels_last)})
        bn.zero_grad()
    record.append({k: v.clone() for k, v in bn.state_dict().items()})
    return record


def _sync_worker(rank, world_size):
    results = []
    for i, case in enumerate(CASES):
        bn = _init(SyncBatchNorm(C, momentum=case[1]))
        results.append(_run(bn, i, case, rank))
    # Too few values overall: every rank raises the same error, none hangs in a collective.
    try:
        _init(SyncBatchNorm(C))(torch.randn(1 - rank, C, 1, 1))
        results.append("no error")
    except ValueError as e:
        results.append(str(e))
    return results


@pytest.mark.timeout(120)
def test_sync_bn_two_processes_equals_whole_batch_bn():
    per_rank = run_distributed(_sync_worker, 2)
    for i, case in enumerate(CASES):
        sizes = case[0]
        ref = _run(_init(nn.BatchNorm2d(C, momentum=case[1])), i, case)
        for step in range(STEPS + 1):
            r = ref[step]
            lo = 0
            for rank in range(2):
                got = per_rank[rank][i][step]
                hi = lo + sizes[rank]
                assert got["y"].shape == r["y"][lo:hi].shape
                if sizes[rank]:
                    assert (got["y"] - r["y"][lo:hi]).abs().max().item() <= 1e-5, (case, step, rank)
                    assert rel(got["dx"], r["dx"][lo:hi]) <= 1e-4, (case, step, rank)
                    assert got["channels_last"] == case[2]
                lo = hi
            # Each rank holds the gradient of its own part; DDP would sum (average) them.
            dw = per_rank[0][i][step]["dw"] + per_rank[1][i][step]["dw"]
            db = per_rank[0][i][step]["db"] + per_rank[1][i][step]["db"]
            assert rel(dw, r["dw"]) <= 1e-4 and rel(db, r["db"]) <= 1e-4, (case, step)
        for rank in range(2):
            for key, value in ref[-1].items():
                got = per_rank[rank][i][-1][key]
                assert torch.allclose(got.double(), value.double(), rtol=1e-6, atol=1e-6), (case, key, rank)
    for rank in range(2):
        assert "more than 1 value per channel" in per_rank[rank][-1] and "process group" in per_rank[rank][-1]


def test_sync_bn_without_process_group_is_plain_bn():
    ours, ref = _init(SyncBatchNorm(C)), _init(nn.BatchNorm2d(C))
    a, b = _run(ours, 1, CASES[1]), _run(ref, 1, CASES[1])
    for s1, s2 in zip(a[:-1], b[:-1]):
        assert (s1["y"] - s2["y"]).abs().max().item() <= 1e-5 and rel(s1["dx"], s2["dx"]) <= 1e-4
    for k, v in b[-1].items():
        assert torch.allclose(a[-1][k].double(), v.double(), rtol=1e-6, atol=1e-6), k


# -- DDP fine-tuning ----------------------------------------------------------------------------------

PER_RANK = 3


def _tiny(norm_layer, memory_efficient=False):
    torch.manual_seed(0)
    return dz.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, small_inputs=True, num_classes=3,
                       norm_layer=norm_layer, memory_efficient=memory_efficient)


def _batch(step):
    g = torch.Generator().manual_seed(50 + step)
    return torch.randn(2 * PER_RANK, 3, 12, 12, generator=g), torch.randint(0, 3, (2 * PER_RANK,), generator=g)


def _fine_tune(model, rank=None):
    """Two SGD steps; for ``rank``: DDP on its share of each batch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    net = model if rank is None else nn.parallel.DistributedDataParallel(model)
    part = slice(None) if rank is None else slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    outs = []
    for step in range(2):
        x, y = _batch(step)
        opt.zero_grad()
        out = net(x[part])
        F.cross_entropy(out, y[part]).backward()
        opt.step()
        outs.append(out.detach())
    return {"outs": outs, "grads": [p.grad.clone() for p in model.parameters()],
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


# Recomputing strategies run norm layers (and so their collectives) again in backward, on every rank alike.
STRATEGIES = [s for s in dz.list_memory_strategies() if s != "auto"]


def _ddp_worker(rank, world_size):
    return [_fine_tune(_tiny("sync_bn", strategy), rank) for strategy in STRATEGIES]


@pytest.mark.timeout(180)
def test_ddp_fine_tuning_with_sync_bn_equals_one_process():
    ref = _fine_tune(_tiny("bn"))
    per_rank = run_distributed(_ddp_worker, 2)
    for variant in STRATEGIES:
        for rank in range(2):
            got = per_rank[rank][STRATEGIES.index(variant)]
            part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            for o, r in zip(got["outs"], ref["outs"]):
                assert (o - r[part]).abs().max().item() <= 1e-5, (variant, rank)
            for i, (g, r) in enumerate(zip(got["grads"], ref["grads"])):
                assert rel(g, r) <= 1e-4, (variant, rank, i)
            for key, value in ref["state"].items():
                assert torch.allclose(got["state"][key].double(), value.double(), rtol=1e-5, atol=1e-6), (variant, rank, key)
