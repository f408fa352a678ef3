"""The fused strategies under ``torch.compile``: one operator per dense block, checked against eager normal mode.

The reference is the uncompiled model in normal mode, on the same weights and inputs: outputs,
every parameter gradient and every buffer after two SGD steps (float64, where both are exact up to
rounding). The operators themselves go through ``torch.library.opcheck`` (schema, autograd
registration, shape functions, and ahead-of-time autograd against eager).
"""

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch._dynamo.testing import CompileCounterWithBackend

import densenet_zoo as dz
from densenet_zoo.memory import SavedTensorBytes
from densenet_zoo.memory.fused_block import layer_parameters
from densenet_zoo.memory.fused_op import fused_block_op_forward, op_supported
from _train_helpers import sgd_steps

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")
FUSED = ("fused", "fused_lean")
OP = "densenet_zoo.fused_dense_block"


@pytest.fixture(autouse=True)
def _fresh_compiler():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(**kwargs):
    torch.manual_seed(0)
    config = dict(growth_rate=8, block_config=(3, 2), num_init_features=16, small_inputs=True, num_classes=5)
    return dz.DenseNet(**{**config, **kwargs}).train()


def _data(steps=2, dtype=torch.float64, size=16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, size, size, generator=g, dtype=dtype), torch.randint(0, 5, (4,), generator=g))
            for _ in range(steps)]


#: The 3x3 stem of small inputs, and the ImageNet stem (7x7 conv0, norm0, relu0, max-pool0) at 32 px.
STEMS = {"small": ({}, 16), "imagenet": ({"small_inputs": False}, 32)}


def _assert_same_training(normal, ours, outs_normal, outs_ours, tol):
    for a, b in zip(outs_normal, outs_ours):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)
    for (name, p), q in zip(normal.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=tol, atol=tol, msg=name)
        torch.testing.assert_close(q, p, rtol=tol, atol=tol, msg=name)
    for (name, a), b in zip(normal.named_buffers(), ours.buffers()):
        if a.dtype == torch.long:
            assert torch.equal(a, b), name  # num_batches_tracked: one update per forward, compiled or not
        else:
            torch.testing.assert_close(b, a, rtol=tol, atol=tol, msg=name)


def _graph_ops(counter):
    return [str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("stem", STEMS)
@pytest.mark.parametrize("strategy", FUSED)
def test_compiled_fused_strategy_trains_like_eager_normal_mode(strategy, stem):
    kwargs, size = STEMS[stem]
    base = _model(**kwargs).double()
    data = _data(size=size)
    normal, ours = copy.deepcopy(base), copy.deepcopy(base).set_memory_efficient(strategy)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(ours, backend=counter, fullgraph=True)  # fullgraph: no graph break around the blocks
    _assert_same_training(normal, ours, sgd_steps(normal, data), sgd_steps(ours, data, compiled), 1e-10)
    assert _graph_ops(counter).count(f"{OP}.default") == 2  # each dense block is one operator in the graph


def test_compiled_fused_keeps_its_savings():
    x = torch.randn(4, 3, 16, 16)
    saved = {}
    for name in ("none", "fused", "fused_lean"):
        model = _model().set_memory_efficient(name)
        compiled = torch.compile(model, backend="aot_eager")
        compiled(x).sum().backward()  # compiles
        with SavedTensorBytes(exclude=model.parameters()) as counted:
            out = compiled(x)
        out.sum().backward()
        saved[name] = counted.bytes
    # the blocks keep one buffer (fused: and conv1's outputs) instead of every layer's concatenation and norm output
    assert saved["fused_lean"] < saved["fused"] < 0.8 * saved["none"]
    assert saved["fused_lean"] < 0.5 * saved["none"]


@pytest.mark.parametrize("strategy", FUSED)
def test_compiled_fused_keeps_exactly_what_eager_fused_keeps(strategy):
    # The stem and transitions cannot be traced as the fused functions; checkpointed, the compiler
    # keeps what those keep: the image (fused: and conv0's output) and each transition's input.
    x = torch.randn(4, 3, 64, 64)
    model = _model(small_inputs=False, block_config=(3, 2, 2)).set_memory_efficient(strategy)
    compiled = torch.compile(model, backend="aot_eager")  # the partitioner that keeps what the graph saves
    saved = {}
    for name, run in (("eager", model), ("compiled", compiled)):
        run(x).sum().backward()
        with SavedTensorBytes(exclude=model.parameters()) as counted:
            out = run(x)
        out.sum().backward()
        saved[name] = counted.bytes
    assert saved["compiled"] == saved["eager"], saved


@pytest.mark.parametrize("frozen", [("features.denseblock1.",), ("features.denseblock2.denselayer1.norm1.",),
                                    ("features.conv0.", "features.norm0.")])
@pytest.mark.parametrize("strategy", ["fused", "auto"])
def test_compiled_strategies_train_models_with_frozen_parts_like_eager_normal_mode(frozen, strategy):
    # A frozen block or norm asks the backward operator for fewer gradients (and a frozen stem, for
    # no input gradient of the first block): each gradient left out is an empty output of its own.
    base = _model().double()
    for name, p in base.named_parameters():
        p.requires_grad_(not name.startswith(frozen))
    data = _data(steps=3)
    normal, ours = copy.deepcopy(base), copy.deepcopy(base).set_memory_efficient(strategy)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=strategy != "auto")
    _assert_same_training(normal, ours, sgd_steps(normal, data), sgd_steps(ours, data, compiled), 1e-10)


#: ``auto``'s candidates: the default set, per-layer recomputation, and checkpointing a block or a bottleneck.
AUTO_CANDIDATES = {"default": None, "per layer": ("efficient", "shared", "layer"), "checkpoints": ("bottleneck", "block")}


@pytest.mark.parametrize("candidates", AUTO_CANDIDATES)
def test_auto_under_compile_trains_like_eager_normal_mode(candidates):
    # The first two steps measure the candidates and fix the plan in eager mode (graph breaks);
    # then the plan is traced, with no further recompilation.
    base = _model().double()
    strategy = dz.AutoStrategy(candidates=AUTO_CANDIDATES[candidates])
    data = _data(steps=3)
    normal, ours = copy.deepcopy(base), copy.deepcopy(base).set_memory_efficient(strategy)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(ours, backend=counter)
    _assert_same_training(normal, ours, sgd_steps(normal, data), sgd_steps(ours, data, compiled), 1e-10)
    allowed = AUTO_CANDIDATES[candidates] or dz.AutoStrategy.default_candidates
    for block in (ours.features.denseblock1, ours.features.denseblock2):
        assert list(strategy.plan(block).values())[0] in allowed
    frames = counter.frame_count
    _assert_same_training(normal, ours, sgd_steps(normal, data), sgd_steps(ours, data, compiled), 1e-10)
    assert counter.frame_count == frames  # the fixed plan: no recompilation


def test_auto_with_a_plan_fixed_in_eager_mode_compiles_to_one_graph():
    base = _model().double()
    data = _data(steps=2)
    normal, ours = copy.deepcopy(base), copy.deepcopy(base).set_memory_efficient("auto")
    _assert_same_training(normal, ours, sgd_steps(normal, data), sgd_steps(ours, data), 1e-10)  # fixes the plan
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    _assert_same_training(normal, ours, sgd_steps(normal, data), sgd_steps(ours, data, compiled), 1e-10)


def test_auto_under_fullgraph_compile_before_its_plan_names_the_remedy():
    # a fresh process: the network is compiled before anything ran in eager mode
    code = textwrap.dedent("""
        import torch, densenet_zoo as dz
        model = dz.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, small_inputs=True, memory_efficient="auto")
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        try:
            compiled(torch.randn(4, 3, 16, 16)).sum().backward()
        except Exception as exc:
            print("refused:", exc)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "run two eager training steps before compiling" in run.stdout, run.stdout + run.stderr[-2000:]


def test_blocks_the_operator_cannot_run_fall_back_under_compile():
    base = _model()
    base.features.denseblock2.denselayer1.norm1 = nn.BatchNorm2d(base.features.denseblock2.denselayer1.norm1.num_features,
                                                                 affine=False)
    base = base.double()
    assert op_supported(base.features.denseblock1) and not op_supported(base.features.denseblock2)
    data = _data()
    normal, ours = copy.deepcopy(base), copy.deepcopy(base).set_memory_efficient("fused")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(ours, backend=counter)
    _assert_same_training(normal, ours, sgd_steps(normal, data), sgd_steps(ours, data, compiled), 1e-10)
    assert _graph_ops(counter).count(f"{OP}.default") == 1  # block 1 as the operator, block 2 per layer


def test_cumulative_average_norms_under_compile():
    base = _model()
    for m in base.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    base = base.double()
    data = _data(steps=3)
    normal, ours = copy.deepcopy(base), copy.deepcopy(base).set_memory_efficient("fused_lean")
    # not fullgraph: torch's own batch norm breaks the graph on 1 / num_batches_tracked (the stem and transitions)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(ours, backend=counter)
    _assert_same_training(normal, ours, sgd_steps(normal, data), sgd_steps(ours, data, compiled), 1e-10)
    assert f"{OP}.default" in _graph_ops(counter)


@pytest.mark.parametrize("keep", [True, False])
def test_operator_eager_equals_the_autograd_function(keep):
    block_a = _model().double().features.denseblock1
    block_b = copy.deepcopy(block_a)
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    from densenet_zoo.memory.fused_block import fused_block_forward

    out_a = fused_block_forward(block_a, xa, keep)
    out_b = fused_block_op_forward(block_b, xb, keep)
    grad = torch.randn_like(out_a)
    out_a.backward(grad)
    out_b.backward(grad)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=0)
    for (name, p), q in zip(block_a.named_parameters(), block_b.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)
    for (name, a), b in zip(block_a.named_buffers(), block_b.buffers()):
        assert torch.equal(a, b), name


#: Which of the first layer's parameters (``LAYER_PARAMETERS`` order) are frozen, and whether the input wants a gradient.
FROZEN = {"conv1": ([2], True), "norm1 and conv2": ([0, 1, 5], True), "everything but conv2": ([0, 1, 2, 3, 4], False)}


@pytest.mark.parametrize("frozen", FROZEN)
@pytest.mark.parametrize("keep", [True, False])
def test_operators_pass_opcheck(keep, frozen):
    block = _model().double().features.denseblock1
    layers = list(block.values())
    norms = [n for layer in layers for n in (layer.norm1, layer.norm2)]
    stats = [t.clone() for n in norms for t in (n.running_mean, n.running_var, n.num_batches_tracked)]
    params = [p.detach().clone().requires_grad_() for layer in layers for p in layer_parameters(layer)]
    indices, input_grad = FROZEN[frozen]
    for i in indices:  # no gradient asked for, none computed
        params[i].requires_grad_(False)
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(input_grad)
    momentum = [0.1, -1.0] * len(layers)  # -1: a cumulative average
    torch.library.opcheck(torch.ops.densenet_zoo.fused_dense_block.default,
                          (x, params, stats, [1e-5] * len(norms), momentum, keep))


class GraphBreakingBatchNorm(nn.BatchNorm2d):
    """A batch norm the compiler cannot trace whole, as a synchronised norm's collectives or a
    host read of a statistic (``.item()``) make it."""

    def forward(self, x):
        torch._dynamo.graph_break()
        return super().forward(x)


RECOMPUTING = [s for s in dz.list_memory_strategies() if s not in ("none", "auto")]


@pytest.mark.parametrize("strategy", RECOMPUTING)
def test_norms_that_break_the_graph_update_once_under_compile(strategy):
    # Such a norm inside a checkpointed region makes the region an eager checkpoint, recomputed in
    # backward outside the compiler: its running statistics must not take the batch a second time.
    base = _model(norm_layer=GraphBreakingBatchNorm).double()
    data = _data()
    normal, ours = copy.deepcopy(base), copy.deepcopy(base).set_memory_efficient(strategy)
    compiled = torch.compile(ours, backend="aot_eager")
    _assert_same_training(normal, ours, sgd_steps(normal, data), sgd_steps(ours, data, compiled), 1e-10)


def test_per_layer_strategies_update_cumulative_norms_once_under_compile():
    # torch's batch norm breaks the graph on 1 / num_batches_tracked; a checkpoint left outside the
    # compiler would recompute it and count the batch twice
    base = _model()
    for m in base.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    data = _data(steps=2, dtype=torch.float32)
    for strategy in ("bottleneck", "block"):
        normal, ours = copy.deepcopy(base), copy.deepcopy(base).set_memory_efficient(strategy)
        sgd_steps(normal, data)
        sgd_steps(ours, data, torch.compile(ours, backend="aot_eager"))
        for (name, a), b in zip(normal.named_buffers(), ours.buffers()):
            if a.dtype == torch.long:
                assert torch.equal(a, b), f"{strategy}: {name}"
            else:
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=f"{strategy}: {name}")
