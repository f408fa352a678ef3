"""How the named strategies are composed: each says what it keeps, what it recomputes and what runs
where it cannot; the stem and the transitions reach the strategy by their own names."""

import pytest
import torch
import torch.nn as nn

import densenet_zoo as dz
from densenet_zoo.memory import MemoryStrategy, fused_stem, fused_transition


def _tiny(**kwargs):
    return dz.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=5, **kwargs)


def test_names_and_order_are_the_public_ones():
    assert dz.list_memory_strategies() == [
        "none", "bottleneck", "efficient", "shared", "norms", "layer", "fused", "fused_lean", "block", "auto"]
    assert dz.get_memory_strategy(True).name == "bottleneck" and dz.get_memory_strategy(False).name == "none"


@pytest.mark.parametrize("name", [n for n in dz.list_memory_strategies()])
def test_every_strategy_says_what_it_keeps_recomputes_and_falls_back_to(name):
    strategy = dz.get_memory_strategy(name)
    assert strategy.keeps and strategy.recomputes and strategy.description
    seen = [strategy]
    while seen[-1].fallback is not None:  # a chain that ends, without the strategy itself
        assert seen[-1].fallback not in seen
        seen.append(seen[-1].fallback)
    assert f"keeps={strategy.keeps!r}" in repr(strategy)


@pytest.mark.parametrize("name, fallback", [("efficient", "bottleneck"), ("shared", "bottleneck"), ("norms", "bottleneck"),
                                            ("layer", "layer_checkpoint"), ("fused", "norms"), ("fused_lean", "layer")])
def test_fallbacks_are_the_documented_strategies(name, fallback):
    strategy = dz.get_memory_strategy(name)
    assert strategy.fallback.name == fallback
    if fallback in dz.list_memory_strategies():
        assert strategy.fallback is dz.get_memory_strategy(fallback)


def test_fused_lean_checkpoints_a_stem_it_cannot_fuse():
    strategy = dz.get_memory_strategy("fused_lean")
    assert strategy.sequence_fallback.name == "stem_transition_checkpoint"
    assert "sequence_fallback='stem_transition_checkpoint'" in repr(strategy)
    assert dz.get_memory_strategy("fused").sequence_fallback is dz.get_memory_strategy("norms")


def _count(monkeypatch, function):
    calls, real = [], function.apply
    monkeypatch.setattr(function, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("name", ["fused", "fused_lean"])
def test_stem_and_transition_dispatch_by_their_role(name, monkeypatch):
    """The stem's modules given as a transition (and the reverse) run the fallback, not the other's function."""
    stems, transitions = _count(monkeypatch, fused_stem.FusedStem), _count(monkeypatch, fused_transition.FusedTransition)
    model = _tiny(memory_efficient=name).train()
    feats = model.features
    stem, transition = [feats.conv0, feats.norm0, feats.relu0, feats.pool0], list(feats.transition1)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    t = torch.randn(2, transition[0].num_features, 8, 8).contiguous(memory_format=torch.channels_last)
    strategy = dz.get_memory_strategy(name)
    strategy.stem_forward(stem, x).sum().backward()
    strategy.transition_forward(transition, t).sum().backward()
    assert (len(stems), len(transitions)) == (1, 1)
    assert torch.allclose(strategy.stem_forward(transition, t), nn.Sequential(*transition)(t), atol=1e-6)
    assert torch.allclose(strategy.transition_forward(stem, x), nn.Sequential(*stem)(x), atol=1e-6)
    assert (len(stems), len(transitions)) == (1, 1)


def test_a_strategy_overriding_sequence_forward_still_runs_the_stem_and_transitions():
    seen = []

    class Tracing(MemoryStrategy):
        name = "tracing"

        def sequence_forward(self, modules, x):
            seen.append(type(modules[0]).__name__)
            return super().sequence_forward(modules, x)

    model = _tiny(memory_efficient=Tracing()).train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert seen == ["Conv2d", "BatchNorm2d"]


@pytest.mark.parametrize("name, checkpoints", [("fused", 0), ("fused_lean", 2)])
def test_where_blocks_cannot_run_fused_the_stem_and_transition_run_the_sequence_fallback(name, checkpoints, monkeypatch):
    """Dropout: no block runs fused, so neither do the stem and the transition; fused_lean checkpoints both."""
    import densenet_zoo.memory.base as memory_base

    calls, real = [], memory_base.checkpoint
    monkeypatch.setattr(memory_base, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    stems, transitions = _count(monkeypatch, fused_stem.FusedStem), _count(monkeypatch, fused_transition.FusedTransition)
    model = _tiny(memory_efficient=name, drop_rate=0.2).train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert (len(calls), len(stems), len(transitions)) == (checkpoints, 0, 0)
