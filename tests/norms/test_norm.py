"""Norm registry, per-layer specs, their errors, and convert_norm."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import densenet_zoo as dz
from densenet_zoo.norms.batchnorm import BatchNorm2d, FrozenBatchNorm2d, SyncBatchNorm
from densenet_zoo.norms.caffe import CaffeBatchNorm2d

pytestmark = pytest.mark.numerics  # run again with kernels capped at AVX2 (Makefile: make test)

NORM_TYPES = (nn.BatchNorm2d, nn.GroupNorm, BatchNorm2d, FrozenBatchNorm2d, CaffeBatchNorm2d)


def _norms(model):
    """name -> module for every norm layer, found by the model's own naming (norm0/norm1/norm2/norm/norm5)."""
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ("norm0", "norm1", "norm2", "norm", "norm5")}


def _tiny(**kwargs):
    torch.manual_seed(0)
    return dz.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3, **kwargs)


def test_registry():
    assert {"bn", "custom_bn", "sync_bn", "frozen_bn", "group_norm", "caffe_bn"} <= set(dz.list_norms())
    model = dz.densenet121(norm_layer="sync_bn")
    assert all(type(m) is SyncBatchNorm for m in _norms(model).values()) and len(_norms(model)) == 121
    dz.register_norm("test_bn_eps", lambda c: nn.BatchNorm2d(c, eps=1e-3), overwrite=True)
    assert _tiny(norm_layer="test_bn_eps").features.norm0.eps == 1e-3
    with pytest.raises(ValueError, match="already registered"):
        dz.register_norm("bn", nn.BatchNorm2d)
    with pytest.raises(TypeError, match="must be callable"):
        dz.register_norm("x", 3)


def test_mixed_model_every_layer_by_name():
    spec = {
        "features.denseblock4.*": "sync_bn",
        "features.norm0": "frozen_bn",
        "features.transition*": "caffe_bn",
        "*.norm2": "group_norm",
        "*.denselayer1.norm1": lambda c: nn.GroupNorm(4, c),
        "*": "custom_bn",
    }
    model = dz.densenet121(norm_layer=spec, strict_norm=True)

    def expected(name):  # the same rules, written out (first match wins)
        if name.startswith("features.denseblock4."):
            return SyncBatchNorm
        if name == "features.norm0":
            return FrozenBatchNorm2d
        if name.startswith("features.transition"):
            return CaffeBatchNorm2d
        if name.endswith(".norm2") or name.endswith(".denselayer1.norm1"):
            return nn.GroupNorm
        return BatchNorm2d

    norms = _norms(model)
    assert len(norms) == 121
    for name, module in norms.items():
        assert type(module) is expected(name), name
    assert norms["features.denseblock1.denselayer1.norm1"].num_groups == 4
    assert norms["features.denseblock1.denselayer2.norm2"].num_groups == 32
    # Nothing else in the model is a norm layer (CaffeBatchNorm2d's own sub-layers aside).
    others = [n for n, m in model.named_modules()
              if isinstance(m, NORM_TYPES) and n not in norms and n.rsplit(".", 1)[0] not in norms]
    assert others == []


def test_function_spec_gets_names():
    seen = []

    def spec(name, num_features):
        seen.append((name, num_features))
        return "frozen_bn" if "denseblock1" in name else nn.BatchNorm2d

    model = _tiny(norm_layer=spec)
    assert [n for n, _ in seen] == list(_norms(model))
    assert dict(seen)["features.norm0"] == 8 and dict(seen)["features.denseblock1.denselayer2.norm1"] == 12
    for name, m in _norms(model).items():
        assert type(m) is (FrozenBatchNorm2d if "denseblock1" in name else nn.BatchNorm2d)


def test_group_norm_groups():
    model = dz.densenet_bc_100(norm_layer="group_norm")  # 24 + 12k channels: not all divisible by 32
    for name, m in _norms(model).items():
        c = m.num_channels
        assert c % m.num_groups == 0
        assert m.num_groups == max(g for g in range(1, 33) if c % g == 0), name
    assert all(m.num_groups == 32 for m in _norms(dz.densenet121(norm_layer="group_norm")).values())
    assert all(m.num_groups == 4 for m in _norms(_tiny(norm_layer=dz.group_norm(4))).values())


def test_bad_specs_name_the_layer():
    with pytest.raises(ValueError, match="unknown norm 'custom_nb'; registered norms: .*did you mean 'custom_bn'"):
        _tiny(norm_layer="custom_nb")
    with pytest.raises(ValueError, match=r"unknown norm 'gn' for layer 'features.norm0'"):
        _tiny(norm_layer={"features.norm0": "gn", "*": "bn"})
    with pytest.raises(ValueError, match=r"pattern\(s\) \['features.denseblock9.\*'\] match no norm layer"):
        _tiny(norm_layer={"features.denseblock9.*": "frozen_bn", "*": "bn"}, strict_norm=True)
    _tiny(norm_layer={"features.denseblock9.*": "frozen_bn", "*": "bn"})  # not strict: fine
    with pytest.raises(TypeError, match=r"layer 'features.norm0' gave int"):
        _tiny(norm_layer=lambda c: 3)
    with pytest.raises(ValueError, match=r"layer 'features.norm0' \(8 channels\).*divisible"):
        _tiny(norm_layer=lambda c: nn.GroupNorm(16, c))
    with pytest.raises(ValueError, match=r"layer 'features.norm0' \(8 channels\).*16 groups cannot split 8"):
        _tiny(norm_layer=dz.group_norm(16))
    with pytest.raises(ValueError, match=r"no pattern of the norm spec matches layer 'features.norm0'"):
        _tiny(norm_layer={"*.norm1": "bn"})
    with pytest.raises(TypeError, match=r"layer 'features.norm0' is a module instance \(BatchNorm2d\); give a factory"):
        _tiny(norm_layer={"*": nn.BatchNorm2d(8)})
    with pytest.raises(ValueError, match=r"layer 'features.norm0' has 16 channels but the layer has 8"):
        _tiny(norm_layer=lambda c: nn.BatchNorm2d(16))
    with pytest.raises(TypeError, match="norm_layer must be"):
        _tiny(norm_layer=3.5)
    with pytest.raises(ValueError, match="num_groups must be a positive integer"):
        dz.group_norm(0)


# -- convert_norm ---------------------------------------------------------------------------------


def test_convert_round_trips_pretrained_state():
    """bn -> each norm -> bn on a torchvision densenet121 state dict (random weights and statistics): nothing lost."""
    torch.manual_seed(1)
    tv = torchvision.models.densenet121().eval()
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(), m.running_mean.normal_(), m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(int(torch.randint(1, 100, ())))
    state = {k: v.clone() for k, v in tv.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = tv(x)
    model = dz.densenet121()
    model.load_state_dict(state)
    model.eval()
    for target in ["custom_bn", "sync_bn", "frozen_bn", "caffe_bn"]:
        assert dz.convert_norm(model, target) is model
        cls = dz.norms.get_norm_factory(target)
        assert all(type(m) is cls for m in _norms(model).values()), target
        converted = model.state_dict()
        assert list(converted) == list(state), target
        for k, v in state.items():
            assert torch.equal(converted[k], v), (target, k)
        with torch.no_grad():
            assert (model(x) - expected).abs().max().item() <= 1e-5, target
        dz.convert_norm(model, "bn")
        assert all(type(m) is nn.BatchNorm2d for m in _norms(model).values()), target
        back = model.state_dict()
        for k, v in state.items():
            assert torch.equal(back[k], v), (target, k)
        assert model.model_args["norm_layer"] == "bn"


def test_convert_refuses_to_drop_state():
    model = _tiny()
    with pytest.raises(ValueError, match=r"layer 'features.norm0' from BatchNorm2d to GroupNorm would drop running_mean, running_var, num_batches_tracked; pass allow_lossy=True"):
        dz.convert_norm(model, "group_norm")
    assert all(type(m) is nn.BatchNorm2d for m in _norms(model).values())  # nothing changed
    with torch.no_grad():
        model.features.norm0.weight.fill_(2)
    dz.convert_norm(model, dz.group_norm(4), allow_lossy=True)
    assert type(model.features.norm0) is nn.GroupNorm and model.features.norm0.weight.eq(2).all()
    # GroupNorm -> BN: nothing is lost, the new running statistics start fresh.
    dz.convert_norm(model, "custom_bn")
    assert model.features.norm0.weight.eq(2).all() and model.features.norm0.running_var.eq(1).all()
    with pytest.raises(ValueError, match=r"layer 'features.norm0' from BatchNorm2d to BatchNorm2d would drop weight, bias"):
        dz.convert_norm(model, {"features.norm0": lambda c: nn.BatchNorm2d(c, affine=False)})

    def broadcast_bn(c):
        bn = nn.BatchNorm2d(c)
        bn.weight = nn.Parameter(torch.ones(1, c, 1, 1))
        return bn

    with pytest.raises(ValueError, match=r"layer 'features.norm0': weight has shape \(8,\) in BatchNorm2d but \(1, 8, 1, 1\)"):
        dz.convert_norm(model, {"features.norm0": broadcast_bn})


def test_convert_keeps_mode_dtype_grad_flags_and_numerics():
    model = _tiny(norm_layer=lambda c: nn.BatchNorm2d(c, eps=1e-3, momentum=0.3)).to(torch.float64)
    model.features.denseblock1.requires_grad_(False)
    model.features.denseblock2.eval()
    dz.convert_norm(model, "custom_bn")
    for name, m in _norms(model).items():
        assert type(m) is BatchNorm2d and m.eps == 1e-3 and m.momentum == 0.3, name
        assert m.weight.dtype == m.running_mean.dtype == torch.float64, name
        assert m.training == (not name.startswith("features.denseblock2")), name
        assert m.weight.requires_grad == (not name.startswith("features.denseblock1")), name


def test_convert_with_patterns_leaves_other_layers():
    model = _tiny()
    dz.convert_norm(model, {"features.denseblock2.*": "frozen_bn", "features.norm5": "caffe_bn"}, strict=True)
    for name, m in _norms(model).items():
        want = FrozenBatchNorm2d if name.startswith("features.denseblock2.") else CaffeBatchNorm2d if name == "features.norm5" else nn.BatchNorm2d
        assert type(m) is want, name
    with pytest.raises(ValueError, match=r"\['features.denseblock7.\*'\] match no norm layer"):
        dz.convert_norm(model, {"features.denseblock7.*": "frozen_bn"}, strict=True)
    layer = dz.convert_norm(nn.BatchNorm2d(4, eps=1e-3, momentum=0.2), "caffe_bn")  # a lone norm layer converts too
    assert type(layer) is CaffeBatchNorm2d and layer.bn.eps == 1e-3 and layer.bn.momentum == 0.2


def test_converted_model_trains_like_the_original():
    ref = _tiny()
    ours = dz.convert_norm(copy.deepcopy(ref), "custom_bn")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for model in (ours, ref):
        F.cross_entropy(model(x), y).backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
    for (name, a), b in zip(ours.named_buffers(), ref.buffers()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-6), name


RECOMPUTING = [s for s in dz.list_memory_strategies() if s not in ("none", "auto")]


@pytest.mark.parametrize("norm", ["custom_bn", "caffe_bn", "frozen_bn", "group_norm", "sync_bn"])
def test_memory_strategies_with_each_norm(norm):
    """Every recomputing strategy leaves each norm's gradients and state as normal mode does."""
    x, y = torch.randn(4, 3, 12, 12), torch.tensor([0, 1, 2, 0])
    torch.manual_seed(0)
    normal = dz.DenseNet(growth_rate=4, block_config=(3, 3), num_init_features=8, small_inputs=True, num_classes=3, norm_layer=norm)
    initial = copy.deepcopy(normal)
    for _ in range(2):
        F.cross_entropy(normal(x), y).backward()
    for strategy in RECOMPUTING:
        model = copy.deepcopy(initial).set_memory_efficient(strategy)
        for _ in range(2):
            F.cross_entropy(model(x), y).backward()
        for (name, p), q in zip(model.named_parameters(), normal.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), (strategy, name)
        for (name, a), b in zip(model.state_dict().items(), normal.state_dict().values()):
            assert torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-7), (strategy, name)
