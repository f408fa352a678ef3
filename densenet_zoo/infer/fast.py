"""Inference: BN folding and a fast evaluation-only DenseNet.

Which norms fold, and why the others do not
-------------------------------------------
In eval mode a BatchNorm with running statistics is a per-channel affine map ``y = s * x + b``.

* ``conv0 -> norm0`` and ``conv1 -> norm2``: the norm directly follows a convolution, so
  ``norm(conv(x)) = conv'(x)`` with ``W' = s * W`` and bias ``b`` (exact, :func:`fold_bn`).
* ``norm1`` (dense layers), ``transition.norm`` and ``norm5`` follow a concatenation and precede
  ReLU. They cannot go into the following convolution (the ReLU sits in between) nor into the
  producers of their input: every channel of a concatenation comes from one earlier convolution
  but is read by all later layers, each with its own ``norm1`` statistics.

:func:`optimize_for_inference` still removes their cost. For ``s > 0``,
``relu(s * x + b) = s * max(x, t) + b`` with ``t = -b / s`` (``min`` for ``s < 0``), so
``conv(relu(norm(x))) = conv''(clamp(x, lo, hi))`` where ``conv''`` has weights ``W * s`` and bias
``W @ b``: one clamp pass instead of normalise + ReLU. Dense blocks write every layer's output
into one preallocated buffer instead of concatenating again at every layer (quadratic copying),
transitions average-pool before their 1x1 convolution (both linear, 4x fewer FLOPs) and the stem
max-pools before its ReLU (both monotone). Norms that are not a per-channel affine in eval
(GroupNorm, BN without running statistics) are kept and run as they are.
"""

from __future__ import annotations

import copy
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import UsageError, UsageTypeError
from ..hardware import require_native_bf16
from ..models.densenet import DenseNet, DenseBlock, DenseLayer, Transition
from .folding import _fold_into_conv, norm_as_affine
from .inputs import prepare_input, refuse_training, require_eval as _require_eval

__all__ = ["FastDenseNet", "optimize_for_inference"]

_CONV_POINTWISE = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)


def _conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, relu: bool = False) -> Tensor:
    """``conv2d`` (+ ReLU); on CPU one oneDNN primitive that takes channels_last as it is and fuses the ReLU."""
    if _can_fuse_relu(x):
        return _CONV_POINTWISE(x, weight, bias, list(padding), list(stride), [1, 1], 1, "relu" if relu else "none", [], "")
    x = F.conv2d(x, weight, bias, stride, padding)
    return F.relu_(x) if relu else x


def _can_fuse_relu(x: Tensor) -> bool:
    """Eager CPU only: tracing, export and torch.compile see plain conv2d + ReLU."""
    if _CONV_POINTWISE is None or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
        return False
    if getattr(torch.compiler, "is_exporting", lambda: False)():
        return False
    return torch.backends.mkldnn.is_available() and x.is_contiguous(memory_format=torch.channels_last)


class _NormReluConv(nn.Module):
    """``conv(relu(norm(x)))`` with an optional average pool between ReLU and a 1x1 conv.

    When ``norm`` is a per-channel affine map this runs as ``conv''(clamp(x, lo, hi))`` (one
    elementwise pass, norm folded into the conv weights); otherwise the norm module is kept.
    ``out_norm`` (a norm right after the conv) is folded into the conv when it is affine.
    """

    def __init__(
        self, norm: nn.Module, conv: nn.Conv2d, pool: bool = False, out_norm: Optional[nn.Module] = None, relu: bool = False,
        out_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.pool, self.relu = pool, relu
        self.post_norm: Optional[nn.Module] = None
        if out_norm is not None:
            fused = _fold_into_conv(conv, out_norm)
            conv, self.post_norm = (fused, None) if fused is not None else (conv, out_norm)
        self.stride, self.padding = conv.stride, conv.padding
        affine = norm_as_affine(norm, conv.in_channels)
        w = conv.weight.detach().double()
        bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64, device=w.device)
        self.norm: Optional[nn.Module] = None
        if affine is None:
            self.norm = norm
            lo = hi = torch.zeros(1)
        else:
            if conv.padding != (0, 0):
                raise UsageError("folding a norm before a padded convolution is not exact at the borders")
            s, b = (t.to(w.device) for t in affine)
            inf = torch.full_like(s, float("inf"))
            t = -b / torch.where(s == 0, torch.ones_like(s), s)
            # A threshold beyond the dtype's range (fp16): the ReLU is always on or always off there.
            far = t.abs() > torch.finfo(out_dtype or conv.weight.dtype).max / 2
            off = far & (t * s > 0)  # s x + b < 0 for every representable x: the output is 0
            s, b = torch.where(off, torch.zeros_like(s), s), torch.where(off, torch.zeros_like(b), b)
            zero = s == 0
            t = torch.where(zero | far, torch.zeros_like(s), t)
            s_sign = torch.where(far, torch.zeros_like(s), s)  # far & on: no clamp at all
            lo = torch.where(s_sign > 0, t, -inf)  # relu(s x + b) = s * max(x, t) + b      for s > 0
            hi = torch.where(s_sign < 0, t, inf)   #                = s * min(x, t) + b      for s < 0
            b_eff = torch.where(zero, b.clamp_min(0), b)  # s == 0: the constant relu(b)
            wsum = w.sum(dim=(2, 3))  # a constant input channel reaches each output via the sum of its taps
            bias = bias + wsum @ b_eff
            w = w * s[None, :, None, None]
        dtype = conv.weight.dtype
        self.register_buffer("weight", w.to(dtype).contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", bias.to(dtype))
        self.register_buffer("lo", lo.to(dtype).reshape(1, -1, 1, 1))
        self.register_buffer("hi", hi.to(dtype).reshape(1, -1, 1, 1))
        # One-sided bounds run a one-sided clamp, about twice as fast as the two-sided one.
        self.has_lo, self.has_hi = bool(torch.isfinite(lo).any()), bool(torch.isfinite(hi).any())

    def activation(self, x: Tensor) -> Tensor:
        if self.norm is not None:
            return F.relu(self.norm(x))
        if self.has_lo and not self.has_hi:
            return torch.clamp(x, min=self.lo)
        if self.has_hi and not self.has_lo:
            return torch.clamp(x, max=self.hi)
        return torch.clamp(x, self.lo, self.hi)

    def forward(self, x: Tensor) -> Tensor:
        x = self.activation(x)
        if self.pool:
            x = F.avg_pool2d(x, 2, 2)
        if self.post_norm is None:
            return _conv(x, self.weight, self.bias, self.stride, self.padding, relu=self.relu)
        x = self.post_norm(F.conv2d(x, self.weight, self.bias, self.stride, self.padding))
        return F.relu_(x) if self.relu else x


class _FastLayer(nn.Module):
    def __init__(self, layer: DenseLayer, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.first = _NormReluConv(layer.norm1, layer.conv1, out_norm=layer.norm2, relu=True, out_dtype=dtype)
        self.conv2 = layer.conv2

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv2
        return _conv(self.first(x), c.weight, c.bias, c.stride, c.padding)


class _FastBlock(nn.Module):
    """A dense block writing every layer's output into one preallocated buffer."""

    def __init__(self, block: DenseBlock, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        layers = list(block.values())
        self.in_channels = layers[0].conv1.in_channels
        self.growth = [layer.conv2.out_channels for layer in layers]
        self.memory_format = torch.channels_last
        self.layers = nn.ModuleList(_FastLayer(layer, dtype) for layer in layers)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        total = c + sum(self.growth)
        buf = torch.empty((n, total, h, w), dtype=x.dtype, device=x.device, memory_format=self.memory_format)
        buf[:, :c].copy_(x)
        for layer, g in zip(self.layers, self.growth):
            buf[:, c:c + g].copy_(layer(buf[:, :c]))
            c = c + g
        return buf


class FastDenseNet(nn.Module):
    """Evaluation-only DenseNet with the same outputs as the :class:`DenseNet` it was built from.

    Holds its own folded weights (a snapshot: later changes to the source model are not seen).
    ``forward``, ``forward_features`` and ``forward_head`` mean what they mean on DenseNet.
    Inference only: ``train()`` and inputs or weights that require grad raise a clear error.

    Args:
        model: the DenseNet to take the weights from (any mode; it is not modified).
        dtype: the dtype the network will be cast to (thresholds outside its range are resolved).

    Example:
        fast = FastDenseNet(densenet121().eval())   # usually through optimize_for_inference()
    """

    def __init__(self, model: DenseNet, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        _require_eval(model, "FastDenseNet")
        feats = model.features
        self.in_chans, self.min_input_size = model.in_chans, model.min_input_size
        self.num_features, self.num_classes = model.num_features, model.num_classes
        self.feature_info = copy.deepcopy(model.feature_info)
        self.arch, self.model_args = model.arch, dict(model.model_args)
        self.memory_format = torch.channels_last
        self.stem_relu = hasattr(feats, "norm0")
        conv0 = feats.conv0
        self.stem_norm: Optional[nn.Module] = None
        if self.stem_relu:
            fused = _fold_into_conv(conv0, feats.norm0)
            conv0, self.stem_norm = (fused, None) if fused is not None else (copy.deepcopy(conv0), feats.norm0)
        self.conv0 = conv0
        stages: List[nn.Module] = []
        for name, module in feats.named_children():
            if isinstance(module, DenseBlock):
                stages.append(_FastBlock(module, dtype))
            elif isinstance(module, Transition):
                stages.append(_NormReluConv(module.norm, module.conv, pool=True, out_dtype=dtype))
        self.stages = nn.ModuleList(stages)
        self.norm5 = feats.norm5
        affine = norm_as_affine(feats.norm5, model.num_features)
        self.fold5 = affine is not None
        if affine is not None:
            pdtype = next(model.parameters()).dtype
            self.register_buffer("scale5", affine[0].to(pdtype).reshape(1, -1, 1, 1))
            self.register_buffer("shift5", affine[1].to(pdtype).reshape(1, -1, 1, 1))
        self.global_pool = model.global_pool
        self.classifier = model.classifier
        self.eval()

    check_input = DenseNet.check_input
    pool = DenseNet.pool

    def train(self, mode: bool = True) -> "FastDenseNet":
        refuse_training(mode)
        return super().train(False)

    def forward_features(self, x: Tensor) -> Tensor:
        """Feature map after ``norm5`` and ReLU, as :meth:`DenseNet.forward_features`; ``x`` is cast to the network's dtype."""
        x = prepare_input(self, x, self.conv0.weight.dtype)
        self.check_input(x)
        x, c = x.contiguous(memory_format=self.memory_format), self.conv0
        if not self.stem_relu:  # small_inputs stem: a bare conv
            x = _conv(x, c.weight, c.bias, c.stride, c.padding)
        elif self.stem_norm is None:
            # ReLU and max-pool commute (both monotone); the ReLU rides along in the conv primitive
            x = F.max_pool2d(_conv(x, c.weight, c.bias, c.stride, c.padding, relu=True), 3, 2, 1)
        else:
            x = F.max_pool2d(F.relu_(self.stem_norm(c(x))), 3, 2, 1)
        for stage in self.stages:
            x = stage(x)
        if self.fold5:
            return F.relu_(torch.addcmul(self.shift5, x, self.scale5))
        return F.relu(self.norm5(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.pool(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def optimize_for_inference(
    model: DenseNet,
    dtype: Optional[torch.dtype] = None,
    channels_last: bool = True,
    compile: bool = False,
) -> nn.Module:
    """An evaluation-only copy of ``model`` that computes the same outputs faster.

    Folds every norm into the convolutions where that is exact (see the module docstring) and
    writes dense blocks into one buffer. Float inputs are cast to ``dtype`` (``fast16(x)`` with an
    fp32 ``x``); integer images are refused. The source model is not modified; it may be in
    training mode (a copy is put in eval mode).

    Args:
        model: a densenet_zoo :class:`DenseNet`.
        dtype: ``torch.bfloat16`` (``torch.float16`` on CUDA only) for weights and activations;
            ``None`` keeps the model's.
        channels_last: run on channels_last tensors; ``False`` keeps the folding but not the layout.
        compile: wrap the result in ``torch.compile``.

    Returns:
        A :class:`FastDenseNet` (or its compiled wrapper).

    Raises:
        ValueError: an unsupported dtype, or fp16 on CPU.
        TypeError: a model that is not a densenet_zoo DenseNet.

    Example:
        fast = optimize_for_inference(densenet121(pretrained=True))
        fast16 = optimize_for_inference(model, dtype=torch.bfloat16)   # bf16 weights and activations
    """
    if not isinstance(model, DenseNet):
        raise UsageTypeError(f"optimize_for_inference expects a densenet_zoo DenseNet, got {type(model).__name__}")
    allowed = (None, torch.float32, torch.bfloat16, torch.float16)
    if dtype not in allowed:
        raise UsageError(f"dtype must be one of None, torch.float32, torch.bfloat16, torch.float16; got {dtype!r}")
    device = next(model.parameters()).device
    if dtype == torch.float16 and device.type != "cuda":
        raise UsageError("dtype=torch.float16 is for CUDA models; on CPU use dtype=torch.bfloat16")
    if torch.bfloat16 in (dtype, next(model.parameters()).dtype):
        require_native_bf16(device, "optimize_for_inference(dtype=torch.bfloat16)")
    source = copy.deepcopy(model).eval()
    if dtype is not None and dtype != torch.float32:
        # Fold in fp32 (float64 inside), then cast: rounding happens once, on the folded weights.
        fast = FastDenseNet(source.float(), dtype=dtype).to(dtype)
    else:
        fast = FastDenseNet(source)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    fast = fast.to(memory_format=fmt) if channels_last else _to_contiguous(fast)
    for m in fast.modules():
        if hasattr(m, "memory_format"):
            m.memory_format = fmt
    fast.eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    return torch.compile(fast) if compile else fast


def _to_contiguous(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            t.data = t.data.contiguous()
    return module
