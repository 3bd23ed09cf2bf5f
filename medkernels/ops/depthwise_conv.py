"""medkernels.ops.depthwise_conv2d: validation, backend dispatch, torch.library registration and autograd."""
from typing import List, Optional

import torch

from .._backend import OpTable, resolve
from ._common import check_same_device, check_tensor, vjp
from .depthwise_conv_ref import ACTIVATIONS, depthwise_conv2d_ref, is_channels_last


class _RefImpl:
    forward = staticmethod(depthwise_conv2d_ref)

    @staticmethod
    def backward(grad, x, weight, bias, stride, padding, activation):
        return vjp(depthwise_conv2d_ref, (x, weight, bias, stride, padding, activation), grad)[:3]


DEPTHWISE_CONV2D = OpTable("depthwise_conv2d", ref=_RefImpl)


@torch.library.custom_op("medkernels::depthwise_conv2d_fwd", mutates_args=())
def _depthwise_conv2d_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int, padding: int, activation: str, backend: str
) -> torch.Tensor:
    return DEPTHWISE_CONV2D.impl(backend).forward(x, weight, bias, stride, padding, activation)


def _out_size(size, k, stride, padding):
    return (size + 2 * padding - k) // stride + 1


@_depthwise_conv2d_fwd.register_fake
def _(x, weight, bias, stride, padding, activation, backend):
    b, c, h, w = x.shape
    k = weight.shape[-1]
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    shape = (b, c, _out_size(h, k, stride, padding), _out_size(w, k, stride, padding))
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


@torch.library.custom_op("medkernels::depthwise_conv2d_bwd", mutates_args=())
def _depthwise_conv2d_bwd(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    stride: int, padding: int, activation: str, backend: str,
) -> List[torch.Tensor]:
    gx, gw, gb = DEPTHWISE_CONV2D.impl(backend).backward(grad, x, weight, bias, stride, padding, activation)
    return [gx, gw, gb if gb is not None else x.new_empty(0)]


@_depthwise_conv2d_bwd.register_fake
def _(grad, x, weight, bias, stride, padding, activation, backend):
    return [torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias) if bias is not None else x.new_empty(0)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, activation, backend = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.args = (stride, padding, activation, backend)


def _backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    gx, gw, gb = _depthwise_conv2d_bwd(grad, x, weight, bias, *ctx.args)
    return gx, gw, (gb if bias is not None else None), None, None, None, None


_depthwise_conv2d_fwd.register_autograd(_backward, setup_context=_setup_context)


def depthwise_conv2d(x, weight, bias=None, stride=1, padding=None, activation=None):
    """``act(F.conv2d(x, weight, bias, stride, padding, groups=C))`` with the activation fused.

    x: ``(B, C, H, W)`` (NCHW or channels_last; the output keeps x's memory format); weight ``(C, 1, k, k)``;
    bias ``(C,)`` or None; stride a positive int; padding an int >= 0, default ``k // 2`` (k must then be
    odd); activation None, "silu", "gelu" or "relu".
    """
    check_tensor(x, "x", ndim=4)
    check_tensor(weight, "weight", ndim=4)
    channels = x.shape[1]
    if weight.shape[0] != channels or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must have shape (C, 1, k, k) with C = {channels}, got {tuple(weight.shape)}")
    k = weight.shape[-1]
    check_tensor(bias, "bias", ndim=1, optional=True)
    if bias is not None and bias.shape[0] != channels:
        raise ValueError(f"bias must have shape (C,) = ({channels},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    check_same_device(x=x, weight=weight, bias=bias)
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    if padding is None:
        if k % 2 == 0:
            raise ValueError(f"padding must be given for an even kernel size (k = {k}); the default k // 2 is for odd k")
        padding = k // 2
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    name = "none" if activation is None else activation
    if name not in ACTIVATIONS or name == "none" and activation is not None:
        raise ValueError(f"activation must be None, 'silu', 'gelu' or 'relu', got {activation!r}")
    if x.shape[2] + 2 * padding < k or x.shape[3] + 2 * padding < k:
        raise ValueError(f"x's spatial size {tuple(x.shape[2:])} with padding {padding} is smaller than the kernel {k}")
    return _depthwise_conv2d_fwd(x, weight, bias, stride, padding, name, resolve(DEPTHWISE_CONV2D, x.device))
