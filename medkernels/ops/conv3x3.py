"""medkernels.ops.conv3x3: the dense 3x3 "same" convolution (stride 1, padding 1, no bias) of HiFuse's IRMLP;
validation, autocast, backend dispatch, torch.library registration and autograd.

Backends: ``ref`` is ``F.conv2d``; ``cpu`` is Winograd F(4x4, 3x3) on channels-last maps for float32
(conv3x3_winograd.py), with oneDNN's direct convolution where Winograd does not pay.
"""
from typing import List

import torch

from .._backend import OpTable, resolve
from ._autocast import autocast_dtype, run_cast
from ._common import check_same_device, check_size, check_tensor, eager_plain
from .conv3x3_ref import conv3x3_ref


class _RefImpl:
    forward = staticmethod(conv3x3_ref)

    @staticmethod
    def backward(grad, x, weight, needs_x, needs_weight):
        # F.conv2d's own backward (what autograd runs for the reference)
        dx, dw, _ = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0],
                                                        1, [needs_x, needs_weight, False])
        return dx, dw


def _cpu_impl():
    from . import conv3x3_winograd as w

    class _CpuImpl:
        forward = staticmethod(w.conv3x3_cpu_forward)
        backward = staticmethod(w.conv3x3_cpu_backward)

    return _CpuImpl


CONV3X3 = OpTable("conv3x3", ref=_RefImpl)
CONV3X3.register("cpu", _cpu_impl)


def _layout(backend):
    """The memory format of the custom ops' maps (the output, the input gradient): channels-last on the cpu
    backend (Winograd's layout), contiguous on the reference (F.conv2d's own layout follows its input's)."""
    return torch.channels_last if backend == "cpu" else torch.contiguous_format


@torch.library.custom_op("medkernels::conv3x3_fwd", mutates_args=())
def _conv3x3_fwd(x: torch.Tensor, weight: torch.Tensor, backend: str) -> torch.Tensor:
    return CONV3X3.impl(backend).forward(x, weight).contiguous(memory_format=_layout(backend))


@_conv3x3_fwd.register_fake
def _(x, weight, backend):
    b, _, h, w = x.shape
    return x.new_empty(b, weight.shape[0], h, w).contiguous(memory_format=_layout(backend))


@torch.library.custom_op("medkernels::conv3x3_bwd", mutates_args=())
def _conv3x3_bwd(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, backend: str, needs_x: bool,
                 needs_weight: bool) -> List[torch.Tensor]:
    dx, dw = CONV3X3.impl(backend).backward(grad, x, weight, needs_x, needs_weight)
    return [dx.contiguous(memory_format=_layout(backend)) if dx is not None else x.new_empty(0),
            dw.contiguous() if dw is not None else weight.new_empty(0)]


@_conv3x3_bwd.register_fake
def _(grad, x, weight, backend, needs_x, needs_weight):
    return [x.new_empty(x.shape).contiguous(memory_format=_layout(backend)) if needs_x else x.new_empty(0),
            weight.new_empty(weight.shape) if needs_weight else weight.new_empty(0)]


def _setup_context(ctx, inputs, output):
    x, weight, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.backend = backend


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    needs_x, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = _conv3x3_bwd(grad, x, weight, ctx.backend, needs_x, needs_weight)
    return (dx if needs_x else None), (dw if needs_weight else None), None


_conv3x3_fwd.register_autograd(_backward, setup_context=_setup_context)


class _DirectConv3x3(torch.autograd.Function):
    """The autograd of the custom op above without its dispatch, for eager calls that need gradients; it keeps
    x (and the weight), as F.conv2d's autograd does."""

    @staticmethod
    def forward(ctx, x, weight, backend):
        ctx.save_for_backward(x, weight)
        ctx.backend = backend
        return CONV3X3.impl(backend).forward(x, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        dx, dw = CONV3X3.impl(ctx.backend).backward(grad, x, weight, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dx, dw, None


def conv3x3(x, weight):
    """``F.conv2d(x, weight, None, stride=1, padding=1)`` for a 3x3 filter: HiFuse's IRMLP convolution.

    x: ``(batch, in, H, W)`` in any strides; weight: ``(out, in, 3, 3)``. Returns ``(batch, out, H, W)``:
    channels-last memory where the ``cpu`` backend runs Winograd, ``F.conv2d``'s layout elsewhere. Differentiable in x and
    weight.

    dtypes: float32, float64, bfloat16, float16 (where the device has them), one for x and weight. The ``cpu``
    backend computes float32 with Winograd F(4x4, 3x3) (4x fewer multiply-adds; about 10x the direct
    convolution's rounding error, 2e-5 of the largest output at 3 x 96 channels) and every other dtype, and maps
    or filters where Winograd does not pay, with oneDNN's direct convolution. Under ``torch.autocast``, as
    ``F.conv2d``: x and weight are cast to the autocast dtype (float64 stays) and the result is in it; a float32
    weight's gradient comes back in float32.
    """
    amp = autocast_dtype(x)
    if amp is not None:
        return run_cast(conv3x3, amp, (x, weight), (0, 1))
    check_tensor(x, "x", ndim=4)
    check_tensor(weight, "weight", ndim=4)
    if weight.shape[1:] != (x.shape[1], 3, 3):
        raise ValueError(f"weight must have shape (out, {x.shape[1]}, 3, 3) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    check_same_device(x=x, weight=weight)
    out_shape = (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    check_size(out_shape[0] * out_shape[1] * out_shape[2] * out_shape[3], "the output", out_shape)
    backend = resolve(CONV3X3, x.device)
    if x.numel() == 0 or weight.numel() == 0:
        backend = "ref"
    if backend == "ref" and eager_plain(x, weight):
        return conv3x3_ref(x, weight)
    if eager_plain(x, weight):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _DirectConv3x3.apply(x, weight, backend)
        return CONV3X3.impl(backend).forward(x, weight)
    return _conv3x3_fwd(x, weight, backend)
