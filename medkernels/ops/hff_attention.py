"""medkernels.ops.hff_spatial_attention / hff_channel_attention: HiFuse's HFF attentions as ops."""
from typing import List, Optional

import torch

from .._backend import OpTable, resolve
from ._common import check_same_device, check_tensor, vjp
from .hff_attention_ref import hff_channel_attention_ref, hff_spatial_attention_ref


class _SpatialRefImpl:
    forward = staticmethod(hff_spatial_attention_ref)

    @staticmethod
    def backward(grad, x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps):
        def fn(x, conv_weight, bn_weight, bn_bias):
            return hff_spatial_attention_ref(
                x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps
            )[0]

        return vjp(fn, (x, conv_weight, bn_weight, bn_bias), grad)


class _ChannelRefImpl:
    forward = staticmethod(hff_channel_attention_ref)

    @staticmethod
    def backward(grad, x, fc1_weight, fc2_weight):
        return vjp(hff_channel_attention_ref, (x, fc1_weight, fc2_weight), grad)


HFF_SPATIAL_ATTENTION = OpTable("hff_spatial_attention", ref=_SpatialRefImpl)
HFF_CHANNEL_ATTENTION = OpTable("hff_channel_attention", ref=_ChannelRefImpl)


def _empty_if_none(t, like):
    return t if t is not None else like.new_empty(0)


# ---- spatial attention ---------------------------------------------------------------------------

@torch.library.custom_op("medkernels::hff_spatial_attention_fwd", mutates_args=())
def _spatial_fwd(
    x: torch.Tensor, conv_weight: torch.Tensor, bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], use_batch_stats: bool, eps: float,
    backend: str,
) -> List[torch.Tensor]:
    out, mean, var = HFF_SPATIAL_ATTENTION.impl(backend).forward(
        x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps
    )
    return [out, mean, var]


@_spatial_fwd.register_fake
def _(x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps, backend):
    stats = 1 if use_batch_stats else 0
    return [torch.empty_like(x), x.new_empty(stats), x.new_empty(stats)]


@torch.library.custom_op("medkernels::hff_spatial_attention_bwd", mutates_args=())
def _spatial_bwd(
    grad: torch.Tensor, x: torch.Tensor, conv_weight: torch.Tensor, bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
    use_batch_stats: bool, eps: float, backend: str,
) -> List[torch.Tensor]:
    grads = HFF_SPATIAL_ATTENTION.impl(backend).backward(
        grad, x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps
    )
    return [_empty_if_none(g, x) for g in grads]


@_spatial_bwd.register_fake
def _(grad, x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps, backend):
    return [_empty_if_none(None if t is None else torch.empty_like(t), x) for t in (x, conv_weight, bn_weight, bn_bias)]


def _spatial_setup(ctx, inputs, output):
    x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps, backend = inputs
    if use_batch_stats:  # the running stats are not used, and the caller updates them in place
        running_mean = running_var = None
    ctx.save_for_backward(x, conv_weight, bn_weight, bn_bias, running_mean, running_var)
    ctx.args = (use_batch_stats, eps, backend)
    ctx.mark_non_differentiable(output[1], output[2])


def _spatial_backward(ctx, grads):
    x, conv_weight, bn_weight, bn_bias, running_mean, running_var = ctx.saved_tensors
    g = _spatial_bwd(grads[0], x, conv_weight, bn_weight, bn_bias, running_mean, running_var, *ctx.args)
    present = (x, conv_weight, bn_weight, bn_bias)
    return tuple(gi if t is not None else None for gi, t in zip(g, present)) + (None,) * 5


_spatial_fwd.register_autograd(_spatial_backward, setup_context=_spatial_setup)


def hff_spatial_attention(
    x, conv_weight, bn_weight, bn_bias, running_mean, running_var, training, momentum=0.1, eps=1e-5
):
    """HiFuse HFF spatial attention: ``x * sigmoid(BN(conv(cat[max_c x, mean_c x])))``.

    x: ``(B, C, H, W)``; conv_weight: ``(1, 2, k, k)`` (k odd, no bias, padding k // 2); bn_weight, bn_bias,
    running_mean, running_var: ``(1,)`` or None. The BatchNorm behaves like ``F.batch_norm(..., training,
    momentum, eps)``: with ``training`` (or no running stats) it normalises with the batch statistics of
    the map and, when running stats are given and ``training``, updates them in place (unbiased variance).
    Returns ``(B, C, H, W)``. Differentiable in x, conv_weight, bn_weight and bn_bias.
    """
    check_tensor(x, "x", ndim=4)
    check_tensor(conv_weight, "conv_weight", ndim=4)
    k = conv_weight.shape[-1]
    if tuple(conv_weight.shape) != (1, 2, k, k) or k % 2 == 0:
        raise ValueError(f"conv_weight must have shape (1, 2, k, k) with odd k, got {tuple(conv_weight.shape)}")
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean), ("running_var", running_var)):
        check_tensor(t, name, ndim=1, optional=True)
        if t is not None and t.shape[0] != 1:
            raise ValueError(f"{name} must have shape (1,), got {tuple(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    check_same_device(x=x, conv_weight=conv_weight, bn_weight=bn_weight, bn_bias=bn_bias,
                      running_mean=running_mean, running_var=running_var)
    use_batch_stats = bool(training) or running_mean is None
    if use_batch_stats and x.shape[0] * x.shape[2] * x.shape[3] < 2:
        raise ValueError(f"x of shape {tuple(x.shape)} has a single value per channel: batch statistics need more than one")
    if training and running_mean is not None and not isinstance(momentum, (int, float)):
        raise ValueError(f"momentum must be a number (cumulative averaging is not supported), got {momentum!r}")
    backend = resolve(HFF_SPATIAL_ATTENTION, x.device)
    out, mean, var = _spatial_fwd(
        x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, float(eps), backend
    )
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_(var.to(running_var.dtype), momentum)
    return out


# ---- channel attention ---------------------------------------------------------------------------

@torch.library.custom_op("medkernels::hff_channel_attention_fwd", mutates_args=())
def _channel_fwd(x: torch.Tensor, fc1_weight: torch.Tensor, fc2_weight: torch.Tensor, backend: str) -> torch.Tensor:
    return HFF_CHANNEL_ATTENTION.impl(backend).forward(x, fc1_weight, fc2_weight)


@_channel_fwd.register_fake
def _(x, fc1_weight, fc2_weight, backend):
    return torch.empty_like(x)


@torch.library.custom_op("medkernels::hff_channel_attention_bwd", mutates_args=())
def _channel_bwd(
    grad: torch.Tensor, x: torch.Tensor, fc1_weight: torch.Tensor, fc2_weight: torch.Tensor, backend: str
) -> List[torch.Tensor]:
    return list(HFF_CHANNEL_ATTENTION.impl(backend).backward(grad, x, fc1_weight, fc2_weight))


@_channel_bwd.register_fake
def _(grad, x, fc1_weight, fc2_weight, backend):
    return [torch.empty_like(x), torch.empty_like(fc1_weight), torch.empty_like(fc2_weight)]


def _channel_setup(ctx, inputs, output):
    x, fc1_weight, fc2_weight, backend = inputs
    ctx.save_for_backward(x, fc1_weight, fc2_weight)
    ctx.backend = backend


def _channel_backward(ctx, grad):
    x, fc1_weight, fc2_weight = ctx.saved_tensors
    gx, g1, g2 = _channel_bwd(grad, x, fc1_weight, fc2_weight, ctx.backend)
    return gx, g1, g2, None


_channel_fwd.register_autograd(_channel_backward, setup_context=_channel_setup)


def hff_channel_attention(x, fc1_weight, fc2_weight):
    """HiFuse HFF channel attention: ``x * sigmoid(mlp(maxpool(x)) + mlp(avgpool(x)))``.

    x: ``(B, C, H, W)``; fc1_weight: ``(C // r, C)`` or ``(C // r, C, 1, 1)``; fc2_weight: ``(C, C // r)`` or
    ``(C, C // r, 1, 1)``; mlp(v) = fc2(relu(fc1(v))) without biases; pooling over H and W.
    Returns ``(B, C, H, W)``. Differentiable in x, fc1_weight and fc2_weight.
    """
    check_tensor(x, "x", ndim=4)
    check_tensor(fc1_weight, "fc1_weight", ndim=(2, 4))
    check_tensor(fc2_weight, "fc2_weight", ndim=(2, 4))
    channels = x.shape[1]
    w1 = fc1_weight.flatten(1) if fc1_weight.dim() == 4 else fc1_weight
    w2 = fc2_weight.flatten(1) if fc2_weight.dim() == 4 else fc2_weight
    if (fc1_weight.dim() == 4 and fc1_weight.shape[2:] != (1, 1)) or w1.shape[1] != channels:
        raise ValueError(f"fc1_weight must have shape (C // r, C) or (C // r, C, 1, 1) with C = {channels}, got {tuple(fc1_weight.shape)}")
    hidden = w1.shape[0]
    if (fc2_weight.dim() == 4 and fc2_weight.shape[2:] != (1, 1)) or tuple(w2.shape) != (channels, hidden):
        raise ValueError(f"fc2_weight must have shape (C, C // r) = ({channels}, {hidden}) (or with 1x1 dims), got {tuple(fc2_weight.shape)}")
    if x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"x must have a non-empty spatial size to pool over, got {tuple(x.shape)}")
    check_same_device(x=x, fc1_weight=fc1_weight, fc2_weight=fc2_weight)
    return _channel_fwd(x, w1, w2, resolve(HFF_CHANNEL_ATTENTION, x.device))
