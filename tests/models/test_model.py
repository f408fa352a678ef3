"""The model against independent references: torchvision's and timm's DenseNets on the same weights."""

import copy

import pytest
import timm
import torch
import torch.nn as nn
import torchvision

import densenet_zoo as dz

ARCHS = ["densenet121", "densenet161", "densenet169", "densenet201"]
PUBLISHED_PARAMS = {"densenet121": 7_978_856, "densenet161": 28_681_000, "densenet169": 14_149_480, "densenet201": 20_013_928}


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial affine parameters and running statistics, so that a wrong mapping shows."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _assert_same_training_step(ours: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    """One train-mode forward/backward: outputs, every gradient and every buffer agree."""
    ours.train(), ref.train()
    out, ref_out = ours(x), ref(x)
    assert (out - ref_out).abs().max().item() <= 1e-5
    loss_w = torch.randn_like(ref_out)
    (out * loss_w).sum().backward()
    (ref_out * loss_w).sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert _rel(p.grad, ref_params[name].grad) <= 1e-4, name
    ref_buffers = dict(ref.named_buffers())
    for name, b in ours.named_buffers():
        assert (b.double() - ref_buffers[name].double()).abs().max().item() <= 1e-6, name


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_torchvision(arch):
    ref = getattr(torchvision.models, arch)()
    _randomize_bn(ref)
    ours = dz.create_model(arch)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)  # and the other way round
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours.eval()(x) - ref.eval()(x)).abs().max().item() <= 1e-5
    _assert_same_training_step(ours, ref, x)


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_timm(arch):
    ref = timm.create_model(arch, pretrained=False)
    _randomize_bn(ref)
    ours = dz.create_model(arch)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours.eval()(x) - ref.eval()(x)).abs().max().item() <= 1e-5
        assert torch.allclose(ours.forward_features(x), ref.forward_features(x), atol=1e-5)
        assert torch.allclose(ours.forward_head(ours.forward_features(x), pre_logits=True),
                              ref.forward_head(ref.forward_features(x), pre_logits=True), atol=1e-5)
    _assert_same_training_step(ours, ref, x)


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_counts_are_the_published_ones(arch):
    model = dz.create_model(arch)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[arch]
    ref = getattr(torchvision.models, arch)()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_module_names_are_torchvisions():
    names = set(dict(dz.densenet121().named_modules()))
    for name in ["features.conv0", "features.norm0", "features.denseblock1.denselayer1.norm1",
                 "features.denseblock4.denselayer16.conv2", "features.transition3.norm", "features.transition1.conv",
                 "features.norm5", "classifier"]:
        assert name in names


def test_initialisation_follows_torchvision():
    torch.manual_seed(0)
    model = dz.densenet121()
    conv = model.features.denseblock2.denselayer3.conv1
    fan_in = conv.weight[0].numel()
    assert abs(conv.weight.std().item() - (2.0 / fan_in) ** 0.5) < 0.1 * (2.0 / fan_in) ** 0.5  # kaiming normal
    assert torch.all(model.features.norm0.weight == 1) and torch.all(model.features.norm0.bias == 0)
    assert torch.all(model.classifier.bias == 0)


def test_densenet_bc_100_for_cifar():
    model = dz.DenseNet(growth_rate=12, block_config=(16, 16, 16), num_init_features=24, small_inputs=True, num_classes=10)
    assert "norm0" not in dict(model.features.named_children()) and "pool0" not in dict(model.features.named_children())
    assert model.features.conv0.kernel_size == (3, 3) and model.features.conv0.stride == (1, 1)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # Compression 0.5: 24 + 16*12 = 216 -> 108 -> 300 -> 150 -> 342 channels at the end.
    assert model.features.transition1.conv.out_channels == 108
    assert model.num_features == 342
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in dz.densenet_bc_100().parameters())
    assert model.min_input_size == 4


def test_named_builders_and_registry():
    assert dz.list_models() == sorted(dz.list_models())
    assert {"densenet121", "densenet161", "densenet169", "densenet201", "densenet264", "densenet_bc_100"} <= set(dz.list_models())
    assert dz.list_models("densenet1*") == ["densenet121", "densenet161", "densenet169"]
    model = dz.create_model("densenet169", num_classes=5)
    assert model.get_classifier().out_features == 5 and model.arch == "densenet169"
    assert dz.densenet264().block_config == (6, 12, 64, 48)


def test_in_chans_num_classes_drop_rate():
    model = dz.densenet121(num_classes=10, in_chans=1, drop_rate=0.2)
    assert model.features.conv0.in_channels == 1
    assert model.features.denseblock3.denselayer2.drop_rate == 0.2
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_forward_features_head_and_classifier_reset():
    model = dz.densenet121().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (1, 1024, 2, 2)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (1, 1024)
        assert torch.allclose(model.classifier(pre), model(x))
    model.reset_classifier(7)
    assert model(x).shape == (1, 7)
    model.reset_classifier(0, global_pool="max")
    with torch.no_grad():
        assert torch.allclose(model(x), feats.amax(dim=(2, 3)))


def test_torchvision_memory_efficient_flag():
    model = dz.densenet121(memory_efficient=True)
    assert model.memory_efficient and model.memory_strategy.name == "bottleneck"
    assert not dz.densenet121().memory_efficient
    model.set_grad_checkpointing(False)
    assert model.memory_strategy.name == "none"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda m: m(torch.randn(2, 1, 64, 64)), "3 channels|in_chans=3"),
        (lambda m: m(torch.randn(3, 64, 64)), "4-D input.*unsqueeze"),
        (lambda m: m(torch.randn(1, 1, 3, 64, 64)), "4-D input"),
        (lambda m: m(torch.randn(1, 3, 28, 64)), "at least 29x29"),
    ],
)
def test_bad_input_gives_one_line_error(make, message):
    model = dz.densenet121().eval()
    with pytest.raises(ValueError, match=message) as info:
        make(model)
    assert "\n" not in str(info.value)


def test_smallest_input_runs_as_torchvision():
    # 29x29 is the smallest input every pooling of densenet121 accepts; 28x28 is refused (above).
    ours = dz.densenet121().eval()
    reference = torchvision.models.densenet121().eval()
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 29, 29)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(growth_rate=0), "growth_rate"),
        (dict(block_config=()), "block_config"),
        (dict(block_config=(6, -1)), "block_config"),
        (dict(drop_rate=1.5), "drop_rate"),
        (dict(num_classes=-1), "num_classes"),
        (dict(compression=0.0), "compression"),
        (dict(global_pool="median"), "global_pool"),
        (dict(memory_efficient="bottlenek"), "did you mean 'bottleneck'"),
    ],
)
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dz.DenseNet(**kwargs)


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean 'densenet121'"):
        dz.create_model("densenet12")
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        dz.create_model("resnet50")


def test_cli_lists_models(capsys):
    from densenet_zoo.cli import main

    assert main(["models", "densenet12*"]) == 0
    out = capsys.readouterr().out
    assert "densenet121" in out and "7,978,856" in out
