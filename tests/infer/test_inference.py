"""BN folding and optimize_for_inference against the unfused eval model."""

import copy

import pytest
import torch
import torch.nn as nn

import densenet_zoo as dz
from densenet_zoo.infer.fast import FastDenseNet, optimize_for_inference
from densenet_zoo.infer.folding import fold_bn, norm_as_affine
from _marks import needs_native_bf16

pytestmark = pytest.mark.numerics  # run again with kernels capped at AVX2 (Makefile: make test)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Pretrained-like norm state: running statistics far from (0, 1), gammas of both signs and some zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "running_var") and isinstance(m.running_var, torch.Tensor):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
            if isinstance(getattr(m, "weight", None), torch.Tensor) and not isinstance(m, (nn.Conv2d, nn.Linear)):
                w = torch.randn(m.weight.shape, generator=g) * 0.3 + 1.0
                w[::7] *= -1  # negative scales take the min() branch of the folded ReLU
                w[3::11] = 0  # zero scales: the ReLU output is the constant relu(bias)
                m.weight.copy_(w)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
    return model


def _tiny(**kwargs) -> dz.DenseNet:
    args = dict(growth_rate=8, block_config=(2, 3), num_init_features=16, num_classes=7)
    args.update(kwargs)
    return _randomise_norms(dz.DenseNet(**args)).eval()


@pytest.fixture(scope="module")
def densenet121_eval():
    torch.manual_seed(0)
    return _randomise_norms(dz.densenet121()).eval()


def test_fold_bn_is_exact_on_densenet121(densenet121_eval):
    x = torch.randn(2, 3, 64, 64)
    folded = fold_bn(densenet121_eval)
    with torch.no_grad():
        assert _rel(folded(x), densenet121_eval(x)) <= 1e-4
    identities = [n for n, m in folded.named_modules() if isinstance(m, nn.Identity) and "norm" in n]
    assert len(identities) == 1 + 58  # norm0 and every norm2 of DenseNet-121's 58 layers
    assert all(n == "features.norm0" or n.endswith(".norm2") for n in identities)
    assert densenet121_eval.features.conv0.bias is None  # the source model is untouched (copy)


def test_optimize_for_inference_fp32_equals_eval_model(densenet121_eval):
    x = torch.randn(2, 3, 64, 64)
    fast = optimize_for_inference(densenet121_eval)
    assert isinstance(fast, FastDenseNet) and not fast.training
    with torch.no_grad():
        assert _rel(fast(x), densenet121_eval(x)) <= 1e-4
        assert _rel(fast.forward_features(x), densenet121_eval.forward_features(x)) <= 1e-4


def test_contiguous_layout_is_exact_too():
    model = _tiny()
    fast = optimize_for_inference(model, channels_last=False)
    assert all(p.is_contiguous() for p in fast.buffers() if p.dim() == 4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _rel(fast(x), model(x)) <= 1e-4


def test_optimize_keeps_source_and_accepts_training_model():
    model = _tiny().train()
    before = copy.deepcopy(model.state_dict())
    fast = optimize_for_inference(model)
    assert model.training  # not switched to eval behind the user's back
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert _rel(fast(x), model.eval()(x)) <= 1e-4


@pytest.mark.parametrize("norm", ["bn", "custom_bn", "frozen_bn", "caffe_bn", "sync_bn"])
def test_every_bn_flavour_folds_exactly(norm):
    if norm not in dz.list_norms():
        pytest.skip(f"norm {norm!r} is not registered")
    model = _tiny(norm_layer=norm)
    fast = optimize_for_inference(model)
    assert all(m.norm is None for m in fast.modules() if hasattr(m, "lo"))  # every norm1/transition norm folded
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert _rel(fast(x), model(x)) <= 1e-4


def test_norms_that_are_not_affine_are_kept_and_still_exact():
    # GroupNorm normalises with per-sample statistics: it cannot be folded anywhere.
    spec = {"*denselayer1.norm1": "group_norm", "*denselayer2.norm2": "group_norm", "features.transition1.norm": "group_norm",
            "features.norm0": "group_norm", "*": "bn"}
    model = _tiny(norm_layer=lambda name, c: nn.GroupNorm(4, c) if any(
        __import__("fnmatch").fnmatch(name, p) for p, v in spec.items() if v == "group_norm") else nn.BatchNorm2d(c))
    _randomise_norms(model)
    assert norm_as_affine(model.features.norm0, 16) is None
    bn = model.features.denseblock1.denselayer2.norm1  # a BatchNorm: eval is y = scale * x + shift
    scale, shift = norm_as_affine(bn, 24)
    expected = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    torch.testing.assert_close(scale, expected, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(shift, bn.bias.double() - bn.running_mean.double() * expected, rtol=1e-6, atol=1e-8)
    fast = optimize_for_inference(model)
    kept = [m for m in fast.modules() if isinstance(m, nn.GroupNorm)]
    assert len(kept) == 6  # denselayer1.norm1 and denselayer2.norm2 of both blocks, transition1, norm0
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert _rel(fast(x), model(x)) <= 1e-4
        assert _rel(fold_bn(model)(x), model(x)) <= 1e-4


def test_small_inputs_and_other_heads():
    model = _tiny(small_inputs=True, global_pool="avgmax", num_classes=0)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert _rel(optimize_for_inference(model)(x), model(x)) <= 1e-4


@needs_native_bf16
def test_bfloat16_close_to_fp32():
    model = _tiny()
    fast16 = optimize_for_inference(model, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in fast16.parameters())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = fast16(x.bfloat16())
        assert out.dtype == torch.bfloat16
        assert _rel(out, model(x)) <= 5e-2


def test_bad_arguments():
    with pytest.raises(ValueError, match="eval mode"):
        fold_bn(_tiny().train())
    with pytest.raises(ValueError, match="CUDA"):
        optimize_for_inference(_tiny(), dtype=torch.float16)
    with pytest.raises(ValueError, match="dtype"):
        optimize_for_inference(_tiny(), dtype=torch.int8)
    with pytest.raises(TypeError, match="DenseNet"):
        optimize_for_inference(nn.Linear(2, 2))
    fast = optimize_for_inference(_tiny())
    with pytest.raises(ValueError, match="channels"):
        fast(torch.randn(1, 1, 32, 32))


def test_thresholds_beyond_float16_range_are_resolved():
    # gamma tiny and beta large: relu(s x + b) switches at |x| ~ 1e6, beyond fp16's range
    model = _tiny()
    layer = model.features.denseblock1.denselayer1
    with torch.no_grad():
        layer.norm1.weight[:4] = 1e-4
        layer.norm1.bias[:2], layer.norm1.bias[2:4] = 100.0, -100.0  # always on / always off
        layer.norm1.running_mean.zero_()
        layer.norm1.running_var.fill_(1.0)
    fast = FastDenseNet(model, dtype=torch.float16)
    lo, hi = fast.stages[0].layers[0].first.lo.flatten(), fast.stages[0].layers[0].first.hi.flatten()
    assert torch.isinf(lo[:4]).all() and torch.isinf(hi[:4]).all()  # no finite threshold left to overflow
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _rel(fast(x), model(x)) <= 1e-4


@pytest.mark.timeout(600)
def test_compile_option_equals_eval_model():
    """``compile=True``: torch.compile traces the plain conv + ReLU graph (the oneDNN fast path is eager only)."""
    torch._dynamo.reset()
    model = _tiny()
    x = torch.randn(3, 3, 40, 40)
    compiled = optimize_for_inference(model, compile=True)
    with torch.no_grad():
        expected = model(x)
        got = compiled(x)
        again = compiled(torch.randn(3, 3, 40, 40))  # same shape: the compiled graph is reused
    assert _rel(got, expected) <= 1e-4
    assert again.shape == expected.shape
    assert isinstance(getattr(compiled, "_orig_mod", None), FastDenseNet)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_sided_clamps_for_same_sign_scales(sign):
    """All-positive (or all-negative) norm scales run a one-sided clamp; still exact."""
    from densenet_zoo.infer.fast import _NormReluConv

    model = _randomise_norms(dz.DenseNet(growth_rate=8, block_config=(2, 3), num_init_features=16, num_classes=7))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(sign * (m.weight.abs() + 0.1))
    model.eval()
    fast = optimize_for_inference(model)
    sides = {(m.has_lo, m.has_hi) for m in fast.modules() if isinstance(m, _NormReluConv) and m.norm is None}
    assert (sign > 0, sign < 0) in sides
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert _rel(fast(x), model(x)) <= 1e-4
