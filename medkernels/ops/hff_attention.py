"""medkernels.ops.hff_spatial_attention / hff_channel_attention (HiFuse's HFF attentions): validation, backend
dispatch, torch.library registration and autograd.

One custom op per attention computes either ``x * gate`` or, with ``gate_only``, just the gate (in the
accumulation dtype: float32, or float64 for float64 inputs). The gate forms are private building blocks
(``_spatial_gate``, ``_channel_gate``): :func:`medkernels.ops.hff_attention_tail` runs the same gate kernels and
applies the gates inside its fusion tail, and the kernel tests check the gates on their own. The forward also
returns the pooled values and their argmax, which the kernels' backward reuses instead of reading x again.
"""
import importlib
from typing import List, Optional

import torch

from .. import _ext
from .._backend import OpTable, resolve
from ._autocast import autocast_dtype, run_cast
from ._common import acc_dtype, empty_batch_to_ref, vjp
from ._hff_common import acc_operand, restore_grad, update_running_stats, validate_channel, validate_spatial
from .hff_attention_ref import (
    channel_pool_ref,
    hff_channel_attention_ref,
    hff_channel_gate_ref,
    hff_spatial_attention_ref,
    hff_spatial_gate_ref,
    spatial_pool_ref,
)


# ---- implementations -----------------------------------------------------------------------------

class _SpatialRefImpl:
    @staticmethod
    def _fn(gate_only):
        return hff_spatial_gate_ref if gate_only else hff_spatial_attention_ref

    @classmethod
    def forward(cls, x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps, gate_only):
        y, mean, var = cls._fn(gate_only)(
            x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps
        )
        pooled, argmax = spatial_pool_ref(x)
        return [y.contiguous(), mean, var, pooled, argmax]

    @classmethod
    def backward(cls, grad, pooled, argmax, x, conv_weight, bn_weight, bn_bias, running_mean, running_var,
                 use_batch_stats, eps, gate_only):
        ref = cls._fn(gate_only)

        def fn(x, conv_weight, bn_weight, bn_bias):
            return ref(x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps)[0]

        return vjp(fn, (x, conv_weight, bn_weight, bn_bias), grad)


class _SpatialKernelImpl:
    """Adapts a backend's hff_spatial_gate_fwd/bwd (contracts in csrc/ops.h) to the op."""

    def __init__(self, fwd, bwd):
        self.fwd, self.bwd = fwd, bwd

    @staticmethod
    def _operands(x, conv_weight, bn_weight, bn_bias, running_mean, running_var):
        return (x.contiguous(),) + tuple(acc_operand(t, x) for t in (conv_weight, bn_weight, bn_bias, running_mean, running_var))

    def forward(self, x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps, gate_only):
        operands = self._operands(x, conv_weight, bn_weight, bn_bias, running_mean, running_var)
        return list(self.fwd(*operands, use_batch_stats, eps, gate_only))

    def backward(self, grad, pooled, argmax, x, conv_weight, bn_weight, bn_bias, running_mean, running_var,
                 use_batch_stats, eps, gate_only):
        grad = grad.to(acc_dtype(x) if gate_only else x.dtype).contiguous()
        operands = self._operands(x, conv_weight, bn_weight, bn_bias, running_mean, running_var)
        grads = self.bwd(grad, pooled.contiguous(), argmax.contiguous(), *operands, use_batch_stats, eps, gate_only,
                         None)
        return [restore_grad(g, t) for g, t in zip(grads, (x, conv_weight, bn_weight, bn_bias))]


class _ChannelRefImpl:
    @staticmethod
    def _fn(gate_only):
        return hff_channel_gate_ref if gate_only else hff_channel_attention_ref

    @classmethod
    def forward(cls, x, fc1_weight, fc2_weight, gate_only):
        pooled, argmax = channel_pool_ref(x)
        return [cls._fn(gate_only)(x, fc1_weight, fc2_weight).contiguous(), pooled, argmax]

    @classmethod
    def backward(cls, grad, pooled, argmax, x, fc1_weight, fc2_weight, gate_only):
        return vjp(cls._fn(gate_only), (x, fc1_weight, fc2_weight), grad)


class _ChannelKernelImpl:
    """Adapts a backend's hff_channel_gate_fwd/bwd (contracts in csrc/ops.h) to the op."""

    def __init__(self, fwd, bwd):
        self.fwd, self.bwd = fwd, bwd

    def forward(self, x, fc1_weight, fc2_weight, gate_only):
        return list(self.fwd(x.contiguous(), acc_operand(fc1_weight, x), acc_operand(fc2_weight, x), gate_only))

    def backward(self, grad, pooled, argmax, x, fc1_weight, fc2_weight, gate_only):
        grad = grad.to(acc_dtype(x) if gate_only else x.dtype).contiguous()
        grads = self.bwd(grad, pooled.contiguous(), argmax.contiguous(), x.contiguous(), acc_operand(fc1_weight, x),
                         acc_operand(fc2_weight, x), gate_only, None)
        return [restore_grad(g, t) for g, t in zip(grads, (x, fc1_weight, fc2_weight))]


HFF_SPATIAL_ATTENTION = OpTable("hff_spatial_attention", ref=_SpatialRefImpl)
HFF_CHANNEL_ATTENTION = OpTable("hff_channel_attention", ref=_ChannelRefImpl)
for _device in ("cpu", "cuda"):
    HFF_SPATIAL_ATTENTION.register(_device, lambda d=_device: _SpatialKernelImpl(
        getattr(_ext.module(), f"hff_spatial_gate_fwd_{d}"), getattr(_ext.module(), f"hff_spatial_gate_bwd_{d}")))
    HFF_CHANNEL_ATTENTION.register(_device, lambda d=_device: _ChannelKernelImpl(
        getattr(_ext.module(), f"hff_channel_gate_fwd_{d}"), getattr(_ext.module(), f"hff_channel_gate_bwd_{d}")))


def _triton_module():
    return importlib.import_module("medkernels.kernels.hff_attention")


HFF_SPATIAL_ATTENTION.register("triton", lambda: _SpatialKernelImpl(
    _triton_module().hff_spatial_gate_fwd, _triton_module().hff_spatial_gate_bwd))
HFF_CHANNEL_ATTENTION.register("triton", lambda: _ChannelKernelImpl(
    _triton_module().hff_channel_gate_fwd, _triton_module().hff_channel_gate_bwd))


def _empty_if_none(t, like):
    return t if t is not None else like.new_empty(0)


def _contiguous_like(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ---- spatial attention ---------------------------------------------------------------------------

# No defaults in the custom ops' schemas: the dispatcher drops arguments equal to their default, and torch 2.11's
# autograd wrapper then expects one gradient fewer than register_autograd's backward returns.
@torch.library.custom_op("medkernels::hff_spatial_attention_fwd", mutates_args=())
def _spatial_fwd(
    x: torch.Tensor, conv_weight: torch.Tensor, bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], use_batch_stats: bool, eps: float,
    backend: str, gate_only: bool,
) -> List[torch.Tensor]:
    return HFF_SPATIAL_ATTENTION.impl(backend).forward(
        x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps, gate_only
    )


@_spatial_fwd.register_fake
def _(x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps, backend, gate_only):
    B, _, H, W = x.shape
    acc = acc_dtype(x)
    y = x.new_empty(B, 1, H, W, dtype=acc) if gate_only else _contiguous_like(x)
    stats = 1 if use_batch_stats else 0
    return [y, x.new_empty(stats, dtype=acc), x.new_empty(stats, dtype=acc), x.new_empty(B, 2, H, W, dtype=acc),
            x.new_empty(B, H, W, dtype=torch.int64)]


@torch.library.custom_op("medkernels::hff_spatial_attention_bwd", mutates_args=())
def _spatial_bwd(
    grad: torch.Tensor, pooled: torch.Tensor, argmax: torch.Tensor, x: torch.Tensor, conv_weight: torch.Tensor,
    bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor], use_batch_stats: bool, eps: float, backend: str, gate_only: bool,
) -> List[torch.Tensor]:
    grads = HFF_SPATIAL_ATTENTION.impl(backend).backward(
        grad, pooled, argmax, x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps,
        gate_only,
    )
    return [_empty_if_none(g, x) for g in grads]


@_spatial_bwd.register_fake
def _(grad, pooled, argmax, x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps,
      backend, gate_only):
    like = (_contiguous_like(x),) + tuple(None if t is None else torch.empty_like(t) for t in (conv_weight, bn_weight, bn_bias))
    return [_empty_if_none(t, x) for t in like]


def _spatial_setup(ctx, inputs, output):
    x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps, backend, gate_only = inputs
    if use_batch_stats:  # the running stats are not used, and the caller updates them in place
        running_mean = running_var = None
    ctx.save_for_backward(x, conv_weight, bn_weight, bn_bias, running_mean, running_var, output[3], output[4])
    ctx.args = (use_batch_stats, eps, backend, gate_only)
    ctx.mark_non_differentiable(*output[1:])


def _spatial_backward(ctx, grads):
    x, conv_weight, bn_weight, bn_bias, running_mean, running_var, pooled, argmax = ctx.saved_tensors
    use_batch_stats, eps, backend, gate_only = ctx.args
    grad = grads[0]
    if grad is None:
        B, _, H, W = x.shape
        grad = x.new_zeros(B, 1, H, W, dtype=acc_dtype(x)) if gate_only else torch.zeros_like(x)
    g = _spatial_bwd(grad, pooled, argmax, x, conv_weight, bn_weight, bn_bias, running_mean, running_var,
                     use_batch_stats, eps, backend, gate_only)
    present = (x, conv_weight, bn_weight, bn_bias)
    return tuple(gi if t is not None else None for gi, t in zip(g, present)) + (None,) * 6


_spatial_fwd.register_autograd(_spatial_backward, setup_context=_spatial_setup)


def _spatial(x, conv_weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, gate_only):
    amp = autocast_dtype(x)
    if amp is not None:  # nothing is cast (see hff_spatial_attention), and the reference must not cast either
        args = (x, conv_weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, gate_only)
        return run_cast(_spatial, amp, args, ())
    use_batch_stats = validate_spatial(x, conv_weight, bn_weight, bn_bias, running_mean, running_var, training, momentum)
    backend = empty_batch_to_ref(resolve(HFF_SPATIAL_ATTENTION, x.device), x)
    y, mean, var, _, _ = _spatial_fwd(
        x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, float(eps), backend, gate_only
    )
    update_running_stats(running_mean, running_var, mean, var, training, momentum)
    return y


def hff_spatial_attention(
    x, conv_weight, bn_weight, bn_bias, running_mean, running_var, training, momentum=0.1, eps=1e-5
):
    """HiFuse HFF spatial attention: ``x * sigmoid(BN(conv(cat[max_c x, mean_c x])))``.

    x: ``(B, C, H, W)``; conv_weight: ``(1, 2, k, k)`` (k odd, no bias, padding k // 2); bn_weight, bn_bias,
    running_mean, running_var: ``(1,)`` or None. The BatchNorm behaves like ``F.batch_norm(..., training,
    momentum, eps)``: with ``training`` (or no running stats) it normalises with the batch statistics of
    the map and, when running stats are given and ``training``, updates them in place (unbiased variance).
    Returns ``(B, C, H, W)`` in x's dtype (the gate in float32, float64 for float64 x). Differentiable in x,
    conv_weight, bn_weight and bn_bias. The weights and statistics may be float32 for a half x.

    Under ``torch.autocast`` nothing is cast: the output keeps x's dtype, as ``x * gate`` does in PyTorch, and
    the gate (a 2-channel convolution and a BatchNorm of one map) stays in float32.
    """
    return _spatial(x, conv_weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, False)


def _spatial_gate(x, conv_weight, bn_weight, bn_bias, running_mean, running_var, training, momentum=0.1, eps=1e-5):
    """The gate of :func:`hff_spatial_attention`: ``sigmoid(BN(conv(cat[max_c x, mean_c x])))``.

    Same arguments and BatchNorm semantics (running statistics updated in place when ``training``).
    Returns ``(B, 1, H, W)`` in float32 (float64 for float64 x); ``x * gate`` is the attention's output.
    Under ``torch.autocast`` nothing is cast and the gate stays float32.
    """
    return _spatial(x, conv_weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, True)


# ---- channel attention ---------------------------------------------------------------------------

@torch.library.custom_op("medkernels::hff_channel_attention_fwd", mutates_args=())
def _channel_fwd(x: torch.Tensor, fc1_weight: torch.Tensor, fc2_weight: torch.Tensor, backend: str,
                 gate_only: bool) -> List[torch.Tensor]:
    return HFF_CHANNEL_ATTENTION.impl(backend).forward(x, fc1_weight, fc2_weight, gate_only)


@_channel_fwd.register_fake
def _(x, fc1_weight, fc2_weight, backend, gate_only):
    B, C = x.shape[:2]
    acc = acc_dtype(x)
    y = x.new_empty(B, C, 1, 1, dtype=acc) if gate_only else _contiguous_like(x)
    return [y, x.new_empty(B, 2, C, dtype=acc), x.new_empty(B, C, dtype=torch.int64)]


@torch.library.custom_op("medkernels::hff_channel_attention_bwd", mutates_args=())
def _channel_bwd(
    grad: torch.Tensor, pooled: torch.Tensor, argmax: torch.Tensor, x: torch.Tensor, fc1_weight: torch.Tensor,
    fc2_weight: torch.Tensor, backend: str, gate_only: bool,
) -> List[torch.Tensor]:
    return list(HFF_CHANNEL_ATTENTION.impl(backend).backward(grad, pooled, argmax, x, fc1_weight, fc2_weight, gate_only))


@_channel_bwd.register_fake
def _(grad, pooled, argmax, x, fc1_weight, fc2_weight, backend, gate_only):
    return [_contiguous_like(x), torch.empty_like(fc1_weight), torch.empty_like(fc2_weight)]


def _channel_setup(ctx, inputs, output):
    x, fc1_weight, fc2_weight, backend, gate_only = inputs
    ctx.save_for_backward(x, fc1_weight, fc2_weight, output[1], output[2])
    ctx.args = (backend, gate_only)
    ctx.mark_non_differentiable(output[1], output[2])


def _channel_backward(ctx, grads):
    x, fc1_weight, fc2_weight, pooled, argmax = ctx.saved_tensors
    backend, gate_only = ctx.args
    grad = grads[0]
    if grad is None:
        grad = x.new_zeros(*x.shape[:2], 1, 1, dtype=acc_dtype(x)) if gate_only else torch.zeros_like(x)
    gx, g1, g2 = _channel_bwd(grad, pooled, argmax, x, fc1_weight, fc2_weight, backend, gate_only)
    return gx, g1, g2, None, None


_channel_fwd.register_autograd(_channel_backward, setup_context=_channel_setup)


def _channel(x, fc1_weight, fc2_weight, gate_only):
    amp = autocast_dtype(x)
    if amp is not None:
        return run_cast(_channel, amp, (x, fc1_weight, fc2_weight, gate_only), ())
    w1, w2 = validate_channel(x, fc1_weight, fc2_weight)
    return _channel_fwd(x, w1, w2, empty_batch_to_ref(resolve(HFF_CHANNEL_ATTENTION, x.device), x), gate_only)[0]


def hff_channel_attention(x, fc1_weight, fc2_weight):
    """HiFuse HFF channel attention: ``x * sigmoid(mlp(maxpool(x)) + mlp(avgpool(x)))``.

    x: ``(B, C, H, W)``; fc1_weight: ``(C // r, C)`` or ``(C // r, C, 1, 1)``; fc2_weight: ``(C, C // r)`` or
    ``(C, C // r, 1, 1)``; mlp(v) = fc2(relu(fc1(v))) without biases; pooling over H and W.
    Returns ``(B, C, H, W)`` in x's dtype. Differentiable in x, fc1_weight and fc2_weight. The weights may be
    float32 for a half x; the gate is computed in float32 (float64 for float64 x).

    Under ``torch.autocast`` nothing is cast: the output keeps x's dtype and the gate stays in float32.
    """
    return _channel(x, fc1_weight, fc2_weight, False)


def _channel_gate(x, fc1_weight, fc2_weight):
    """The gate of :func:`hff_channel_attention`: ``sigmoid(mlp(maxpool(x)) + mlp(avgpool(x)))``.

    Same arguments. Returns ``(B, C, 1, 1)`` in float32 (float64 for float64 x); ``x * gate`` is the
    attention's output. Under ``torch.autocast`` nothing is cast and the gate stays float32.
    """
    return _channel(x, fc1_weight, fc2_weight, True)
