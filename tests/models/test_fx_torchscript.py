"""torch.fx (torchvision's feature extraction), TorchScript, torch.compile and torch.export on our models.

References: the untraced model itself (same weights, fresh copy) and torchvision's densenet121.
"""

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import densenet_zoo as dz

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")]

TINY = dict(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=5)


def _pair(**kwargs):
    """Two models with the same random weights and non-trivial norm statistics."""
    a = dz.DenseNet(**TINY, **kwargs)
    with torch.no_grad():
        for name, t in a.state_dict().items():
            if t.is_floating_point() and t.dim() == 1:
                t.copy_(torch.rand_like(t) + 0.5 if "var" in name or "weight" in name else torch.randn_like(t) * 0.1)
    b = dz.DenseNet(**TINY, **kwargs)
    b.load_state_dict(a.state_dict())
    return a, b


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("norm", dz.list_norms())
@pytest.mark.parametrize("strategy", dz.list_memory_strategies())
def test_create_feature_extractor_every_strategy_and_norm(norm, strategy):
    """Traced graph == eager model, in eval and train (outputs, gradients, running statistics)."""
    x = torch.randn(2, 3, 32, 32)
    for train in (False, True):
        traced_src, eager = _pair(norm_layer=norm, memory_efficient=strategy)
        traced_src.train(train), eager.train(train)
        fx = create_feature_extractor(traced_src, {"features.denseblock1": "block1", "final_act": "feats", "classifier": "out"})
        got, ref = fx(x), eager(x)
        assert torch.allclose(got["out"], ref, atol=1e-5), (norm, strategy, train)
        if not train:
            assert torch.allclose(got["feats"], eager.forward_features(x), atol=1e-5)
            assert torch.allclose(got["block1"], eager.forward_intermediates(x, [1], intermediates_only=True)[0], atol=1e-5)
        else:
            got["out"].square().sum().backward()
            ref.square().sum().backward()
            ref_grads = _grads(eager)
            for name, g in _grads(traced_src).items():
                assert g is not None and torch.allclose(g, ref_grads[name], rtol=1e-4, atol=1e-6), name
            ref_buffers = dict(eager.named_buffers())
            for name, b in traced_src.named_buffers():
                assert torch.allclose(b.double(), ref_buffers[name].double(), atol=1e-6), name


def test_norms_are_single_graph_nodes_named_by_module_path():
    for norm in ("custom_bn", "frozen_bn", "caffe_bn"):
        model = dz.DenseNet(**TINY, norm_layer=norm)
        train_nodes, eval_nodes = get_graph_node_names(model)
        for nodes in (train_nodes, eval_nodes):
            assert "features.norm0" in nodes and "features.denseblock1.denselayer2.norm1" in nodes
            assert "features.transition1.norm" in nodes and "features.norm5" in nodes
            assert not any(n.startswith("features.norm0.") for n in nodes)  # not traced into


def test_fx_matches_torchvision_densenet121_node_for_node():
    """Same weights: every node torchvision's graph has (but the functional final ReLU) gives the same tensor."""
    ref = torchvision.models.densenet121().eval()
    ours = dz.densenet121().eval()
    ours.load_state_dict(ref.state_dict())
    ref_nodes = set(get_graph_node_names(ref)[1])
    our_nodes = set(get_graph_node_names(ours)[1])
    # torchvision concatenates a single input too; its final ReLU is a function, ours the module final_act
    missing = {n for n in ref_nodes - our_nodes if not n.endswith("denselayer1.cat")}
    assert missing == {"relu"}
    wanted = ["features.pool0", "features.denseblock2", "features.transition3.pool", "features.norm5", "features",
              "adaptive_avg_pool2d", "classifier"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = create_feature_extractor(ref, wanted)(x), create_feature_extractor(ours, wanted)(x)
    for name in wanted:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


@pytest.mark.parametrize("arch", dz.list_models())
def test_every_builder_traces_in_eval_and_train(arch):
    size = 8 if dz.model_config(arch).get("small_inputs") else 32
    x = torch.randn(2, 3, size, size)
    for train in (False, True):
        model = dz.create_model(arch, num_classes=3).train(train)
        ref = dz.create_model(arch, num_classes=3).train(train)
        ref.load_state_dict(model.state_dict())
        fx = create_feature_extractor(model, ["classifier"])
        assert torch.allclose(fx(x)["classifier"], ref(x), atol=1e-5), (arch, train)


def test_input_checks_still_guard_real_tensors_of_a_traced_model():
    fx = create_feature_extractor(dz.DenseNet(**TINY).eval(), ["classifier"])
    with pytest.raises(ValueError, match="in_chans=3"):
        fx(torch.randn(1, 1, 32, 32))


# -- TorchScript -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["densenet121", "densenet_bc_100"])
def test_script_matches_eager(arch, tmp_path):
    model = dz.create_model(arch).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-5)
        torch.jit.save(scripted, str(tmp_path / "m.pt"))
        assert torch.allclose(torch.jit.load(str(tmp_path / "m.pt"))(x), model(x), atol=1e-5)
    with pytest.raises(Exception, match="in_chans=3"):  # the input checks are compiled too
        scripted(torch.randn(1, 1, 32, 32))


def test_script_like_torchvision_options():
    """global pools, no classifier, GroupNorm, dropout rates, and a training-mode forward."""
    x = torch.randn(2, 3, 32, 32)
    for kwargs in (dict(global_pool="avgmax"), dict(num_classes=0, global_pool=""), dict(norm_layer="group_norm"),
                   dict(drop_rate=0.2, head_drop_rate=0.1)):
        model = dz.DenseNet(**{**TINY, **kwargs}).eval()
        with torch.no_grad():
            assert torch.allclose(torch.jit.script(model)(x), model(x), atol=1e-5), kwargs
    a, b = _pair()
    scripted = torch.jit.script(a.train())
    assert torch.allclose(scripted(x), b.train()(x), atol=1e-5)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(memory_efficient=True), r"memory_efficient='bottleneck'.*set_memory_efficient\(False\)"),
    (dict(memory_efficient="fused"), r"memory_efficient='fused'"),
    (dict(features_only=True), r"it was built with features_only=True.*torch.export"),
    (dict(norm_layer="frozen_bn"), r"norm layer features.norm0 \(FrozenBatchNorm2d\).*norm_layer='bn'"),
    (dict(norm_layer="custom_bn"), r"norm layer .*BatchNorm2d.*torch.jit.trace"),
    (dict(norm_layer="caffe_bn"), r"norm layer features.norm0 \(CaffeBatchNorm2d\)"),
    (dict(norm_layer="sync_bn"), r"norm layer features.norm0 \(SyncBatchNorm\)"),
])
def test_script_refuses_unscriptable_options_in_one_line(kwargs, pattern):
    model = dz.DenseNet(**TINY, **kwargs).eval()
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile this DenseNet: " + pattern) as err:
        torch.jit.script(model)
    assert "\n" not in str(err.value)


def test_script_after_switching_the_strategy_off():
    model = dz.DenseNet(**TINY, memory_efficient="efficient").eval()
    scripted = torch.jit.script(model.set_memory_efficient(False))
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(scripted(x), model(x), atol=1e-6)


# -- torch.compile and torch.export keep working -----------------------------------------------

@pytest.mark.parametrize("strategy", ["none", "bottleneck", "efficient", "fused", "block"])
def test_compile_fullgraph_train_and_eval(strategy):
    torch._dynamo.reset()
    a, b = _pair(small_inputs=True, memory_efficient=strategy)
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(a, fullgraph=True, backend="aot_eager")
    out, ref = compiled(x), b(x)
    out.square().sum().backward(), ref.square().sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    ref_grads = _grads(b)
    for name, g in _grads(a).items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-4, atol=1e-6), name
    with torch.no_grad():
        assert torch.allclose(compiled.eval()(x), b.eval()(x), atol=1e-5)


def test_export_strict():
    model = dz.DenseNet(**TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (x,), strict=True)
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), atol=1e-5)
