"""medkernels.ops.hff_fused_tail: HFFBlock's ``norm3(cat[g * channel_gate, l * spatial_gate, x_f])`` as one op
(validation, backend dispatch, torch.library registration and autograd).

With the gates of :func:`hff_spatial_gate` and :func:`hff_channel_gate`, this is the spatial and channel
attention, the concatenation and the channels-first LayerNorm without any gated or concatenated copy: the
kernels read l, g and x_f once and write the normalised tensor. The forward saves the per-pixel mean and
1 / std for the backward.
"""
import importlib
from typing import List

import torch

from .. import _ext
from .._backend import OpTable, resolve
from ._autocast import autocast_dtype, run_cast
from ._common import acc_dtype, check_same_device, check_size, check_tensor, empty_batch_to_ref, vjp
from .hff_attention import acc_operand, restore_grad
from .hff_fused_tail_ref import hff_fused_tail_ref


class _RefImpl:
    @staticmethod
    def forward(l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias, eps):
        out, mean, rstd = hff_fused_tail_ref(l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias, eps)
        return [out.contiguous(), mean, rstd]

    @staticmethod
    def backward(dout, l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias, mean, rstd, eps):
        def fn(*tensors):
            return hff_fused_tail_ref(*tensors, eps)[0]

        return vjp(fn, (l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias), dout)


class _KernelImpl:
    """Adapts a backend's hff_fused_tail_fwd/bwd (contracts in csrc/ops.h) to the op."""

    def __init__(self, fwd, bwd):
        self.fwd, self.bwd = fwd, bwd

    @staticmethod
    def _operands(l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias):
        small = tuple(acc_operand(t, l) for t in (spatial_gate, channel_gate, ln_weight, ln_bias))
        return (l.contiguous(), g.contiguous(), x_f.contiguous()) + small

    def forward(self, l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias, eps):
        return list(self.fwd(*self._operands(l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias), eps))

    def backward(self, dout, l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias, mean, rstd, eps):
        inputs = (l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias)
        grads = self.bwd(dout.to(l.dtype).contiguous(), *self._operands(*inputs), mean.contiguous(), rstd.contiguous())
        return [restore_grad(d, t) for d, t in zip(grads, inputs)]


HFF_FUSED_TAIL = OpTable("hff_fused_tail", ref=_RefImpl)
HFF_FUSED_TAIL.register("cpu", lambda: _KernelImpl(_ext.module().hff_fused_tail_fwd_cpu, _ext.module().hff_fused_tail_bwd_cpu))
HFF_FUSED_TAIL.register("cuda", lambda: _KernelImpl(_ext.module().hff_fused_tail_fwd_cuda, _ext.module().hff_fused_tail_bwd_cuda))


def _triton_impl():
    module = importlib.import_module("medkernels.kernels.hff_fused_tail")
    return _KernelImpl(module.hff_fused_tail_fwd, module.hff_fused_tail_bwd)


HFF_FUSED_TAIL.register("triton", _triton_impl)


@torch.library.custom_op("medkernels::hff_fused_tail_fwd", mutates_args=())
def _tail_fwd(
    l: torch.Tensor, g: torch.Tensor, x_f: torch.Tensor, spatial_gate: torch.Tensor, channel_gate: torch.Tensor,
    ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, backend: str,
) -> List[torch.Tensor]:
    return HFF_FUSED_TAIL.impl(backend).forward(l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias, eps)


@_tail_fwd.register_fake
def _(l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias, eps, backend):
    B, C1, H, W = l.shape
    acc = acc_dtype(l)
    out = l.new_empty(B, C1 + g.shape[1] + x_f.shape[1], H, W)
    return [out, l.new_empty(B, H, W, dtype=acc), l.new_empty(B, H, W, dtype=acc)]


@torch.library.custom_op("medkernels::hff_fused_tail_bwd", mutates_args=())
def _tail_bwd(
    dout: torch.Tensor, l: torch.Tensor, g: torch.Tensor, x_f: torch.Tensor, spatial_gate: torch.Tensor,
    channel_gate: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor, eps: float, backend: str,
) -> List[torch.Tensor]:
    return list(HFF_FUSED_TAIL.impl(backend).backward(
        dout, l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias, mean, rstd, eps
    ))


@_tail_bwd.register_fake
def _(dout, l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias, mean, rstd, eps, backend):
    inputs = (l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in inputs]


def _setup(ctx, inputs, output):
    l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias, eps, backend = inputs
    ctx.save_for_backward(l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias, output[1], output[2])
    ctx.args = (eps, backend)
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grads):
    saved = ctx.saved_tensors
    dout = grads[0]
    if dout is None:
        l, g, x_f = saved[:3]
        dout = l.new_zeros(l.shape[0], l.shape[1] + g.shape[1] + x_f.shape[1], *l.shape[2:])
    return tuple(_tail_bwd(dout, *saved, *ctx.args)) + (None, None)


_tail_fwd.register_autograd(_backward, setup_context=_setup)


def validate_tail(l, g, x_f, ln_weight, ln_bias, spatial_gate=None, channel_gate=None):
    """Checks the fusion tail's operands; the gates when given: shapes (B, 1, H, W) and (B, C2, 1, 1)."""
    check_tensor(l, "l", ndim=4)
    B, C1, H, W = l.shape
    for name, t in (("g", g), ("x_f", x_f)):
        check_tensor(t, name, ndim=4)
        if t.dtype != l.dtype:
            raise TypeError(f"{name} must have l's dtype {l.dtype}, got {t.dtype}")
        if (t.shape[0], *t.shape[2:]) != (B, H, W):
            raise ValueError(f"{name} must have shape (B, C, H, W) with (B, H, W) = {(B, H, W)} as l, got {tuple(t.shape)}")
    if H * W == 0:
        raise ValueError(f"l must have at least one pixel, got shape {tuple(l.shape)}")
    C2 = g.shape[1]
    total = C1 + C2 + x_f.shape[1]
    check_size(B * total * H * W, "the output (cat[g, l, x_f])", (B, total, H, W))
    checks = [("ln_weight", ln_weight, (total,), "(C1 + C2 + Ci,)"), ("ln_bias", ln_bias, (total,), "(C1 + C2 + Ci,)")]
    if spatial_gate is not None or channel_gate is not None:
        checks += [("spatial_gate", spatial_gate, (B, 1, H, W), "(B, 1, H, W)"),
                   ("channel_gate", channel_gate, (B, C2, 1, 1), "(B, C2, 1, 1)")]
    for name, t, shape, contract in checks:
        check_tensor(t, name, ndim=len(shape))
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {contract} = {shape}, got {tuple(t.shape)}")
    check_same_device(l=l, g=g, x_f=x_f, spatial_gate=spatial_gate, channel_gate=channel_gate, ln_weight=ln_weight,
                      ln_bias=ln_bias)


def hff_fused_tail(l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias, eps=1e-6):
    """``LayerNorm_channels(cat[g * channel_gate, l * spatial_gate, x_f])``: the end of HiFuse's HFF block.

    l: ``(B, C1, H, W)`` local feature, g: ``(B, C2, H, W)`` global feature, x_f: ``(B, Ci, H, W)`` fused
    feature, all of one dtype; spatial_gate: ``(B, 1, H, W)`` (:func:`hff_spatial_gate` of l); channel_gate:
    ``(B, C2, 1, 1)`` (:func:`hff_channel_gate` of g); ln_weight, ln_bias: ``(C2 + C1 + Ci,)``. The LayerNorm
    normalises each pixel over all channels with the biased variance and ``eps`` inside the square root
    (HiFuse's channels-first LayerNorm), in float32 (float64 for float64 inputs).
    Returns ``(B, C2 + C1 + Ci, H, W)`` in l's dtype. Differentiable in every tensor argument.

    Under ``torch.autocast``: l, g and x_f are cast to the autocast dtype, the gates and LayerNorm parameters
    are left as they are, the statistics stay float32, and the output is in the dtype ``F.layer_norm`` gives
    there (the autocast dtype on CPU, float32 on CUDA).
    """
    amp = autocast_dtype(l)
    if amp is not None:
        args = (l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias, eps)
        return run_cast(hff_fused_tail, amp, args, (0, 1, 2), layer_norm=True)
    validate_tail(l, g, x_f, ln_weight, ln_bias, spatial_gate, channel_gate)
    backend = empty_batch_to_ref(resolve(HFF_FUSED_TAIL, l.device), l)
    return _tail_fwd(l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias, float(eps), backend)[0]
