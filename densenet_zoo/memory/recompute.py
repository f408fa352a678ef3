"""Autograd functions for dense layers that recompute the cheap parts of a layer in backward.

A dense layer is two *stages*, each ``conv(act(norm(x)))``: (norm1, relu1, conv1) on the
concatenated earlier features and (norm2, relu2, conv2) on the bottleneck. Checkpointing a stage
recomputes its convolution forward in backward although only the convolution's *input* is needed
for its backward. :class:`RecomputedStages` keeps the input of the first stage only, recomputes the
normalised, activated tensor (and, for later stages, the convolutions in between) and then runs the
convolution backward directly (``aten.convolution_backward``), so the last convolution of the chain
is never run twice.

Norm layers are called as modules (any norm works, frozen or not); their buffers are restored
after the recomputation, so running statistics are updated once, by the real forward.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..allocator import release_freed_memory
from .base import preserved_buffers
from .fusion import autocast_dtype, autocast_state, plain_conv


class Stage:
    """``conv(act(norm(x)))`` taken from a layer's modules; ``params`` are what autograd sees."""

    __slots__ = ("norm", "act", "conv", "norm_params", "conv_params")

    def __init__(self, norm: nn.Module, act: nn.Module, conv: nn.Conv2d) -> None:
        self.norm, self.act, self.conv = norm, act, conv
        self.norm_params: List[Tensor] = list(norm.parameters())
        self.conv_params: List[Tensor] = [conv.weight] + ([conv.bias] if conv.bias is not None else [])

    @staticmethod
    def supported(conv: nn.Module) -> bool:
        """Plain 2-d convolutions whose backward ``aten.convolution_backward`` computes directly."""
        return plain_conv(conv, allow_bias=True)

    def activation(self, x: Tensor) -> Tensor:
        y = self.norm(x)
        if y.data_ptr() == x.data_ptr():  # identity-like norm: keep the in-place activation off the input
            y = y.clone()
        return self.act(y)

    def conv_backward(self, grad: Tensor, a: Tensor, mask: Sequence[bool]) -> Tuple[Optional[Tensor], ...]:
        """Gradients of input, weight and bias; under autocast the weight is cast as the forward cast it."""
        c = self.conv
        bias_sizes = [c.out_channels] if c.bias is not None else None
        cast = autocast_dtype(a.device.type)
        dtype = cast if cast is not None and a.dtype != torch.float64 else a.dtype
        grad_a, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad.to(dtype), a.to(dtype), c.weight.to(dtype), bias_sizes, list(c.stride), list(c.padding),
            list(c.dilation), False, [0, 0], c.groups, list(mask),
        )
        return (None if grad_a is None else grad_a.to(a.dtype), None if grad_w is None else grad_w.to(c.weight.dtype),
                None if grad_b is None else grad_b.to(c.bias.dtype))


def storage_alias(t: Tensor) -> Tensor:
    """A tensor on ``t``'s memory with its own version counter.

    Features written into a shared block buffer are saved as aliases of a slice of that buffer;
    later layers write *other* slices, which would otherwise count as in-place changes of the
    saved slice. Whether the slice itself changed is checked separately (see ``SharedBuffer``).
    """
    alias = t.new_empty(0)
    alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    return alias


class BufferGuard:
    """What a layer's backward needs of its block's buffer, without holding the buffer itself.

    A backward context that held the buffer (the block's output, whose autograd node leads back to
    that context) would close a reference cycle through the autograd graph, which Python's garbage
    collector cannot free: every training step would leak the block's features.
    """

    __slots__ = ("_ref", "numel", "version")

    def __init__(self, buffer: Tensor) -> None:
        self._ref = weakref.ref(buffer)
        self.numel = buffer.numel()
        self.version: Optional[int] = None  # set when the block's forward is done

    def dense_copy(self, part: Tensor) -> Tensor:
        """A contiguous copy of ``part`` (the first channels of the buffer) in an allocation as large as the buffer.

        The copies grow layer by layer; allocated at one size, each reuses the block glibc freed
        before instead of leaving it behind (pages past ``part``'s size are never touched).
        """
        flat = part.new_empty(self.numel)
        return flat[: part.numel()].view(part.shape).copy_(part)

    def check(self) -> None:
        buffer = self._ref()  # gone: nobody can have changed it since
        if buffer is not None and self.version is not None and buffer._version != self.version:
            raise RuntimeError(
                "the output of a dense block was modified in place after the forward; the memory strategy "
                "reads it in backward. Apply the in-place operation to a copy, or use memory_efficient='efficient'"
            )


class SharedBuffer:
    """The pre-allocated output of one dense block; layers read slices of it instead of concatenating."""

    def __init__(self, buffer: Tensor) -> None:
        self.buffer = buffer
        self.filled = 0  # channels written so far
        self.guard = BufferGuard(buffer)


class RecomputedStages(torch.autograd.Function):
    """Chain of stages on the concatenated ``inputs``, storing only those inputs.

    ``apply(stages, n_inputs, shared, *inputs, *params)``: ``shared`` is ``None`` (the inputs are
    concatenated) or ``(SharedBuffer, channels)`` (the concatenation already lies in the buffer).
    """

    @staticmethod
    def forward(ctx: Any, stages: List[Stage], n_inputs: int, shared: Optional[Tuple[SharedBuffer, int]], *tensors: Tensor) -> Tensor:
        inputs = tensors[:n_inputs]
        ctx.stages, ctx.n_inputs = stages, n_inputs
        ctx.guard = shared[0].guard if shared is not None else None
        ctx.autocast = autocast_state(inputs[0].device.type)
        ctx.sizes = [t.shape[1] for t in inputs]
        if shared is not None:
            holder, channels = shared
            saved = storage_alias(holder.buffer[:, :channels])
            ctx.save_for_backward(saved)
            # Same kernels on the same memory layout as normal mode: results match it bit for bit.
            x = holder.guard.dense_copy(saved)
        else:
            x = inputs[0] if n_inputs == 1 else torch.cat(inputs, 1)
            ctx.save_for_backward(*inputs)
        for stage in stages:  # the one real forward: norms update their running statistics here
            x = stage.conv(stage.activation(x))
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        stages: List[Stage] = ctx.stages
        saved = ctx.saved_tensors
        if ctx.guard is not None:
            ctx.guard.check()
            x = ctx.guard.dense_copy(saved[0])
        else:
            x = saved[0] if len(saved) == 1 else torch.cat(saved, 1)
        inputs_need_grad = any(ctx.needs_input_grad[3 : 3 + ctx.n_inputs])
        param_grads: Dict[int, Optional[Tensor]] = {}
        # Recompute every stage's activation (with a graph where something needs a gradient) and the
        # convolutions between stages; the last convolution is not run again.
        leaves: List[Tensor] = []
        acts: List[Tensor] = []
        # The recomputation runs under the forward's autocast state, so it recomputes the same values.
        with preserved_buffers([s.norm for s in stages]), torch.autocast(**ctx.autocast):
            for j, stage in enumerate(stages):
                need = (inputs_need_grad if j == 0 else True) or any(p.requires_grad for p in stage.norm_params)
                leaf = x.detach().requires_grad_(need and (j > 0 or inputs_need_grad))
                with torch.set_grad_enabled(need):
                    a = stage.activation(leaf)
                leaves.append(leaf)
                acts.append(a)
                if j + 1 < len(stages):
                    with torch.no_grad():
                        x = stage.conv(a)

            # Backward inside the context: BatchNorm's backward also reads the running buffers it saved.
            grad_x: Optional[Tensor] = None
            for j in reversed(range(len(stages))):
                stage, a, leaf = stages[j], acts[j], leaves[j]
                wants = [a.requires_grad] + [p.requires_grad for p in stage.conv_params]
                mask = [wants[0], wants[1], len(wants) > 2 and wants[2]]
                grad_a, grad_w, grad_b = stage.conv_backward(grad, a.detach(), mask)
                param_grads[id(stage.conv.weight)] = grad_w
                if stage.conv.bias is not None:
                    param_grads[id(stage.conv.bias)] = grad_b
                if not a.requires_grad:
                    break
                targets = ([leaf] if leaf.requires_grad else []) + [p for p in stage.norm_params if p.requires_grad]
                grads = torch.autograd.grad(a, targets, grad_a)
                if leaf.requires_grad:
                    grad_leaf, grads = grads[0], grads[1:]
                    if j == 0:
                        grad_x = grad_leaf
                    else:
                        grad = grad_leaf
                for p, g in zip([p for p in stage.norm_params if p.requires_grad], grads):
                    param_grads[id(p)] = g
                del acts[j]

        input_grads: List[Optional[Tensor]] = [None] * ctx.n_inputs
        if grad_x is not None and inputs_need_grad:
            input_grads = list(grad_x.split(ctx.sizes, 1))
        params = [p for s in stages for p in s.norm_params + s.conv_params]
        return (None, None, None, *input_grads, *[param_grads.get(id(p)) for p in params])


def run_stages(stages: List[Stage], inputs: List[Tensor], shared: Optional[Tuple[SharedBuffer, int]] = None) -> Tensor:
    """``stages`` applied to ``torch.cat(inputs, 1)``, keeping only ``inputs`` for backward."""
    params = [p for s in stages for p in s.norm_params + s.conv_params]
    return RecomputedStages.apply(stages, len(inputs), shared, *inputs, *params)


class SharedConcat(torch.autograd.Function):
    """Returns the block buffer as the concatenation of ``features`` (whose values it already holds)."""

    @staticmethod
    def forward(ctx: Any, holder: SharedBuffer, *features: Tensor) -> Tensor:
        ctx.sizes = [f.shape[1] for f in features]
        release_freed_memory(holder.buffer)  # the block's per-layer temporaries, kept by glibc otherwise
        return holder.buffer

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        release_freed_memory(grad)  # what the backward of the later blocks freed
        return (None, *grad.split(ctx.sizes, 1))
