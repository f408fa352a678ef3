"""Our BatchNorm, FrozenBatchNorm2d and Caffe BatchNorm+Scale against torch.nn.BatchNorm2d and Caffe's arithmetic."""

import inspect

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import densenet_zoo as dz
from densenet_zoo.norms.batchnorm import BatchNorm2d, FrozenBatchNorm2d
from densenet_zoo.norms.caffe import CaffeBatchNorm2d, caffe_blobs_to_state_dict

pytestmark = pytest.mark.numerics  # run again with kernels capped at AVX2 (Makefile: make test)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _randomise(bn, seed=1):
    """Non-trivial affine and running statistics, the same whatever the class."""
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        if getattr(bn, "weight", None) is not None:
            bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
            if getattr(bn, "bias", None) is not None:
                bn.bias.copy_(torch.randn(c, generator=g))
        if getattr(bn, "running_mean", None) is not None:
            bn.running_mean.copy_(torch.randn(c, generator=g))
            bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn


def _step(bn, x, g):
    x = x.clone().requires_grad_()
    y = bn(x)
    (y.float() * g).sum().backward()
    return y, x.grad


# fp32: the acceptance tolerances; bf16/fp16: a few units in the last place of the format.
TOL = {
    torch.float32: dict(out=1e-5, grad=1e-4, stats=1e-6),
    torch.bfloat16: dict(out=3e-2, grad=2e-2, stats=1e-5),
    torch.float16: dict(out=4e-3, grad=4e-3, stats=1e-5),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["mom0.1", "cumulative"])
def test_custom_bn_equals_torch(momentum, affine, track, channels_last, dtype, device):
    """Three training steps then eval, outputs / input, weight, bias grads / running stats, vs nn.BatchNorm2d."""
    tol = TOL[dtype]
    ref = _randomise(nn.BatchNorm2d(6, momentum=momentum, affine=affine, track_running_stats=track)).to(device)
    ours = BatchNorm2d(6, momentum=momentum, affine=affine, track_running_stats=track).to(device)
    ours.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 6, 5, 5), (1, 6, 3, 4), (3, 6, 7, 2), (2, 6, 4, 4)]  # (1, C, 3, 4): batch of one
    for i, shape in enumerate(shapes):
        training = i < 3
        ref.train(training), ours.train(training)
        x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(device, dtype)
        g = torch.randn(shape, generator=gen).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y_ours, dx_ours = _step(ours, x, g)
        y_ref, dx_ref = _step(ref, x, g)
        assert y_ours.dtype == y_ref.dtype == dtype
        assert y_ours.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert dx_ours.dtype == dtype and dx_ours.stride() == dx_ref.stride()
        scale = y_ref.float().abs().max().item()
        assert (y_ours.float() - y_ref.float()).abs().max().item() <= tol["out"] * max(scale, 1.0), (i, training)
        assert rel(dx_ours, dx_ref) <= tol["grad"], (i, training)
        if affine:
            assert rel(ours.weight.grad, ref.weight.grad) <= tol["grad"]
            assert rel(ours.bias.grad, ref.bias.grad) <= tol["grad"]
            ours.zero_grad(), ref.zero_grad()
        if track:
            assert torch.allclose(ours.running_mean, ref.running_mean, rtol=tol["stats"], atol=tol["stats"])
            assert torch.allclose(ours.running_var, ref.running_var, rtol=tol["stats"], atol=tol["stats"])
            assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == min(i + 1, 3)


def test_fully_bf16_module_equals_torch():
    """Parameters and buffers in bf16 too (model.bfloat16()): statistics still accumulate in fp32."""
    ref = _randomise(nn.BatchNorm2d(5)).bfloat16()
    ours = BatchNorm2d(5).bfloat16()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 5, 6, 6).bfloat16()
    g = torch.randn(4, 5, 6, 6)
    (y1, dx1), (y2, dx2) = _step(ours, x, g), _step(ref, x, g)
    assert y1.dtype == torch.bfloat16 and ours.weight.grad.dtype == torch.bfloat16
    assert torch.allclose(y1.float(), y2.float(), rtol=2e-2, atol=2e-2)
    assert rel(dx1, dx2) < 2e-2 and rel(ours.weight.grad, ref.weight.grad) < 2e-2
    assert torch.allclose(ours.running_var.float(), ref.running_var.float(), rtol=1e-2)


def test_float64_stays_float64():
    """No silent fp32 step for double inputs: agreement to double precision."""
    ref = _randomise(nn.BatchNorm2d(5)).double()
    ours = BatchNorm2d(5).double()
    ours.load_state_dict(ref.state_dict())
    x, g = torch.randn(2, 5, 3, 3, dtype=torch.float64), torch.randn(2, 5, 3, 3)
    for training in (True, False):
        ours.train(training), ref.train(training)
        (y1, dx1), (y2, dx2) = _step(ours, x, g), _step(ref, x, g)
        assert (y1 - y2).abs().max().item() < 1e-12 and rel(dx1, dx2) < 1e-12
        assert rel(ours.weight.grad, ref.weight.grad) < 1e-12
        assert torch.allclose(ours.running_var, ref.running_var, rtol=1e-14, atol=0)


@pytest.mark.skipif("bias" not in inspect.signature(nn.BatchNorm2d).parameters,
                    reason="this torch's nn.BatchNorm2d has no bias argument to compare with")
def test_without_bias_equals_torch():
    ref = _randomise(nn.BatchNorm2d(5, bias=False))
    ours = BatchNorm2d(5, bias=False)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.bias is None and repr(ours) == repr(ref)
    x, g = torch.randn(3, 5, 4, 4), torch.randn(3, 5, 4, 4)
    (y1, dx1), (y2, dx2) = _step(ours, x, g), _step(ref, x, g)
    assert (y1 - y2).abs().max().item() <= 1e-5 and rel(dx1, dx2) <= 1e-4
    assert rel(ours.weight.grad, ref.weight.grad) <= 1e-4


def test_state_dict_is_torch_batchnorm_state_dict():
    ref = _randomise(nn.BatchNorm2d(7))
    ref.num_batches_tracked.fill_(12)
    ours = BatchNorm2d(7)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    back = nn.BatchNorm2d(7)
    back.load_state_dict(ours.state_dict(), strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # Checkpoints from before num_batches_tracked existed (state-dict version 1) load with a zero count.
    old = {k: v for k, v in ref.state_dict().items() if k != "num_batches_tracked"}
    old = type(ref.state_dict())(old)
    old._metadata = {"": {"version": 1}}
    fresh = BatchNorm2d(7)
    fresh.load_state_dict(old)
    assert fresh.num_batches_tracked.item() == 0 and torch.equal(fresh.running_var, ref.running_var)


def test_reset_and_init_like_torch():
    ours, ref = BatchNorm2d(4), nn.BatchNorm2d(4)
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    _randomise(ours)
    ours.num_batches_tracked.fill_(5)
    ours.reset_running_stats()
    assert ours.running_mean.eq(0).all() and ours.running_var.eq(1).all() and ours.num_batches_tracked.item() == 0
    assert not ours.weight.eq(1).all()
    ours.reset_parameters()
    assert ours.weight.eq(1).all() and ours.bias.eq(0).all()
    assert repr(ours) == repr(ref)


def test_bad_inputs_and_edge_batches():
    bn = BatchNorm2d(3)
    with pytest.raises(ValueError, match="4-D input"):
        bn(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="got an input with 5 channels"):
        bn(torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match="momentum"):
        BatchNorm2d(3, momentum=2.0)
    # An empty batch behaves as in torch: empty output, statistics untouched, counter advanced.
    ref = _randomise(nn.BatchNorm2d(3))
    ours = BatchNorm2d(3)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(0, 3, 4, 4)
    (y1, dx1), (y2, dx2) = _step(ours, x, torch.zeros_like(x)), _step(ref, x, torch.zeros_like(x))
    assert y1.shape == y2.shape and dx1.shape == dx2.shape
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


def test_densenet121_with_custom_bn_equals_torch_bn():
    """The whole network: same initial state, outputs, every gradient and running statistic after a step.

    In float64: at 32x32 the last block sees 1x1 maps, so with a batch of 2 every channel is normalised
    from two values; that is so ill-conditioned that fp32 rounding (1e-7) of two correct BNs grows
    to 1e-1 at the logits. The layer tests above check fp32/bf16/fp16 one layer at a time.
    """
    torch.manual_seed(0)
    ref = dz.densenet121(num_classes=10).double()
    torch.manual_seed(0)
    ours = dz.densenet121(num_classes=10, norm_layer="custom_bn").double()
    norms = [m for m in ours.modules() if isinstance(m, BatchNorm2d)]
    assert len(norms) == 121
    for (k, v), w in zip(ref.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(v, w), k
    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 7])
    outs = []
    for model in (ours, ref):
        model.train()
        out = model(x)
        F.cross_entropy(out, y).backward()
        outs.append(out)
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-5
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert rel(p.grad, q.grad) <= 1e-4, name
    for (name, a), b in zip(ours.named_buffers(), ref.buffers()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-6), name
    ours.eval(), ref.eval()
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-5


# -- FrozenBatchNorm2d ------------------------------------------------------------------------------


def test_frozen_bn_is_eval_batchnorm_without_state_changes():
    ref = _randomise(nn.BatchNorm2d(6)).eval()
    ref.num_batches_tracked.fill_(3)
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict(ref.state_dict(), strict=True)
    assert list(frozen.parameters()) == []
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    x, g = torch.randn(3, 6, 5, 5), torch.randn(3, 6, 5, 5)
    for mode in (True, False):  # training mode changes nothing
        frozen.train(mode)
        (y1, dx1), (y2, dx2) = _step(frozen, x, g), _step(ref, x, g)
        assert (y1 - y2).abs().max().item() <= 1e-5 and rel(dx1, dx2) <= 1e-5
    assert all(torch.equal(v, frozen.state_dict()[k]) for k, v in before.items())
    assert all(not b.requires_grad and b.grad is None for b in frozen.buffers())
    # torchvision's FrozenBatchNorm2d state dict (no num_batches_tracked) loads, and the two agree.
    tv = torchvision.ops.FrozenBatchNorm2d(6)
    tv.load_state_dict({k: v for k, v in ref.state_dict().items() if k != "num_batches_tracked"})
    other = FrozenBatchNorm2d(6)
    other.load_state_dict(tv.state_dict(), strict=True)
    xc = x.contiguous(memory_format=torch.channels_last)
    assert torch.allclose(other(xc), tv(x), atol=1e-5) and other(xc).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"expects \(N, 6, H, W\)"):
        frozen(torch.randn(2, 4, 3, 3))


# -- Caffe BatchNorm + Scale ------------------------------------------------------------------------


def test_caffe_bn_trains_like_torch_bn_and_loads_its_state_dict():
    ref = _randomise(nn.BatchNorm2d(5))
    caffe = CaffeBatchNorm2d(5)
    assert list(caffe.state_dict()) == list(ref.state_dict())
    caffe.load_state_dict(ref.state_dict(), strict=True)
    assert isinstance(caffe.bn, BatchNorm2d) and caffe.bn.weight is None and caffe.scale.weight is caffe.weight
    gen = torch.Generator().manual_seed(3)
    for training in (True, True, False):
        caffe.train(training), ref.train(training)
        x, g = torch.randn(4, 5, 3, 3, generator=gen), torch.randn(4, 5, 3, 3, generator=gen)
        (y1, dx1), (y2, dx2) = _step(caffe, x, g), _step(ref, x, g)
        assert (y1 - y2).abs().max().item() <= 1e-5 and rel(dx1, dx2) <= 1e-4
        assert rel(caffe.weight.grad, ref.weight.grad) <= 1e-4 and rel(caffe.bias.grad, ref.bias.grad) <= 1e-4
    for k, v in ref.state_dict().items():
        assert torch.allclose(caffe.state_dict()[k].double(), v.double(), rtol=1e-6, atol=1e-6), k
    back = nn.BatchNorm2d(5)
    back.load_state_dict(caffe.state_dict(), strict=True)


def test_caffe_use_global_stats():
    ref = _randomise(nn.BatchNorm2d(4))
    x, g = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    # True: stored statistics even while training, and they stay as they are (Caffe fine-tuning).
    frozen_stats = CaffeBatchNorm2d(4, use_global_stats=True).train()
    frozen_stats.load_state_dict(ref.state_dict())
    (y1, dx1), (y2, dx2) = _step(frozen_stats, x, g), _step(ref.eval(), x, g)
    assert (y1 - y2).abs().max().item() <= 1e-5 and rel(dx1, dx2) <= 1e-5
    assert rel(frozen_stats.weight.grad, ref.weight.grad) <= 1e-4
    assert torch.equal(frozen_stats.running_mean, ref.running_mean) and frozen_stats.num_batches_tracked.item() == 0
    # False: batch statistics even in eval, with the stored ones untouched there.
    batch_stats = CaffeBatchNorm2d(4, use_global_stats=False).eval()
    batch_stats.load_state_dict(ref.state_dict())
    expected = F.batch_norm(x, None, None, ref.weight, ref.bias, training=True)
    assert torch.allclose(batch_stats(x), expected, atol=1e-5)
    assert torch.equal(batch_stats.running_var, ref.running_var)


def _caffe_train(batches, maf, eps=1e-5):
    """Caffe BatchNormLayer's TRAIN-phase accumulation (blobs: mean*f, var*f, f), written with numpy."""
    c = batches[0].shape[1]
    blobs = [np.zeros(c, np.float32), np.zeros(c, np.float32), np.zeros(1, np.float32)]
    for x in batches:
        m = x.shape[0] * x.shape[2] * x.shape[3]
        mean = x.mean(axis=(0, 2, 3))
        var = ((x - mean[None, :, None, None]) ** 2).mean(axis=(0, 2, 3))
        blobs[2] = blobs[2] * maf + 1
        blobs[0] = maf * blobs[0] + mean
        blobs[1] = maf * blobs[1] + (m / (m - 1) if m > 1 else 1) * var
    return [b.astype(np.float32) for b in blobs]


def _caffe_test_forward(x, bn_blobs, scale_blobs, eps=1e-5):
    """Caffe BatchNorm (use_global_stats) + Scale in the TEST phase, straight from the blobs."""
    f = bn_blobs[2].reshape(-1)[0]
    sf = 0.0 if f == 0 else 1.0 / f
    mean, var = bn_blobs[0].reshape(-1) * sf, bn_blobs[1].reshape(-1) * sf
    y = (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + eps)
    return y * scale_blobs[0].reshape(-1)[None, :, None, None] + scale_blobs[1].reshape(-1)[None, :, None, None]


@pytest.mark.parametrize("legacy_shape", [False, True], ids=["CxN", "legacy_1x1x1xC"])
def test_caffe_blobs_convert(tmp_path, legacy_shape):
    rng = np.random.default_rng(0)
    c = 6
    batches = [(rng.standard_normal((4, c, 3, 3)) * 2 + 1).astype(np.float32) for _ in range(5)]
    bn_blobs = _caffe_train(batches, maf=0.999)
    scale_blobs = [rng.uniform(0.5, 1.5, c).astype(np.float32), rng.standard_normal(c).astype(np.float32)]
    # Written and read back as Caffe lays blobs out: (C,), (C,), (1,) -- or the legacy (1, 1, 1, C).
    for i, blob in enumerate(bn_blobs + scale_blobs):
        np.save(tmp_path / f"blob{i}.npy", blob.reshape(1, 1, 1, -1) if legacy_shape else blob)
    blobs = [np.load(tmp_path / f"blob{i}.npy") for i in range(5)]
    sd = caffe_blobs_to_state_dict(blobs[:3], blobs[3:])
    x = rng.standard_normal((2, c, 4, 4)).astype(np.float32)
    expected = torch.from_numpy(_caffe_test_forward(x.astype(np.float64), blobs[:3], blobs[3:])).float()
    for layer in (CaffeBatchNorm2d(c), nn.BatchNorm2d(c), BatchNorm2d(c)):
        layer.load_state_dict(sd, strict=True)
        assert torch.allclose(layer.eval()(torch.from_numpy(x)), expected, atol=1e-5), type(layer).__name__
    # A zero factor means zero statistics in Caffe.
    zero = caffe_blobs_to_state_dict([blobs[0], blobs[1], np.zeros(1)])
    assert zero["running_mean"].eq(0).all() and zero["running_var"].eq(0).all() and zero["weight"].eq(1).all()


def test_caffe_blobs_bad_input():
    with pytest.raises(ValueError, match="3 blobs"):
        caffe_blobs_to_state_dict([np.zeros(3), np.zeros(3)])
    with pytest.raises(ValueError, match="expected C, C and 1"):
        caffe_blobs_to_state_dict([np.zeros(3), np.zeros(4), np.ones(1)])
    with pytest.raises(ValueError, match="Scale weight has 2 values"):
        caffe_blobs_to_state_dict([np.zeros(3), np.zeros(3), np.ones(1)], [np.ones(2), np.zeros(2)])
