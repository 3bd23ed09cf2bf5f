"""medkernels.ops.hff_attention_tail: HFFBlock's spatial attention, channel attention, concatenation and norm3 as
one op (validation, backend dispatch, torch.library registration and autograd).

Its kernels are three building blocks run in sequence: the spatial gate of l and the channel gate of g (the gate
forms of the HFF attentions' kernels) and the fusion tail, which applies both gates, concatenates and normalises
without any gated or concatenated copy. The backward adds the gates' pooling gradients in place into the tail's
d loss / d l and d loss / d g (instead of autograd summing separate full-size gradients), and the per-call
overhead is paid once. ``_fused_tail`` runs the fusion tail kernels alone (for their tests); it is no op of its
own.
"""
import importlib
from typing import List, Optional

import torch

from .. import _ext
from .._backend import OpTable, resolve
from ._autocast import autocast_dtype, run_cast
from ._common import acc_dtype, eager_plain, empty_batch_to_ref, vjp
from ._hff_common import acc_operand, restore_grad, update_running_stats, validate_channel, validate_spatial, validate_tail
from .hff_attention_ref import channel_pool_ref, hff_channel_gate_ref, hff_spatial_gate_ref, spatial_pool_ref
from .hff_attention_tail_ref import hff_attention_tail_ref, hff_fused_tail_ref

# The forward's outputs after (out, batch_mean, batch_var) are saved for the backward: the spatial pooled
# values (B, 2, H, W) and argmax (B, H, W), the channel pooled values (B, 2, C2) and argmax (B, C2), the gates
# (B, 1, H, W) and (B, C2, 1, 1), and the LayerNorm's mean and rstd (B, H, W); acc dtype, argmax int64.


class _RefImpl:
    @staticmethod
    def forward(l, g, x_f, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, bn_eps,
                fc1_weight, fc2_weight, ln_weight, ln_bias, ln_eps):
        sg, batch_mean, batch_var = hff_spatial_gate_ref(l, conv_weight, bn_weight, bn_bias, running_mean,
                                                         running_var, use_batch_stats, bn_eps)
        cg = hff_channel_gate_ref(g, fc1_weight, fc2_weight)
        out, mean, rstd = hff_fused_tail_ref(l, g, x_f, sg, cg, ln_weight, ln_bias, ln_eps)
        return [out.contiguous(), batch_mean, batch_var, *spatial_pool_ref(l), *channel_pool_ref(g), sg, cg, mean, rstd]

    @staticmethod
    def backward(dout, saved, l, g, x_f, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats,
                 bn_eps, fc1_weight, fc2_weight, ln_weight, ln_bias, ln_eps):
        def fn(l, g, x_f, conv_weight, bn_weight, bn_bias, fc1_weight, fc2_weight, ln_weight, ln_bias):
            return hff_attention_tail_ref(l, g, x_f, conv_weight, bn_weight, bn_bias, running_mean, running_var,
                                          use_batch_stats, bn_eps, fc1_weight, fc2_weight, ln_weight, ln_bias, ln_eps)[0]

        return vjp(fn, (l, g, x_f, conv_weight, bn_weight, bn_bias, fc1_weight, fc2_weight, ln_weight, ln_bias), dout)


class _KernelImpl:
    """The backend's spatial gate, channel gate and fusion tail kernels (contracts in csrc/ops.h) in sequence;
    the backward passes the tail's dl and dg to the gates' backward kernels to accumulate into."""

    def __init__(self, kernels):
        (self.spatial_fwd, self.spatial_bwd, self.channel_fwd, self.channel_bwd, self.tail_fwd,
         self.tail_bwd) = kernels

    @staticmethod
    def _small(l, *tensors):
        return [acc_operand(t, l) for t in tensors]

    def forward(self, l, g, x_f, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, bn_eps,
                fc1_weight, fc2_weight, ln_weight, ln_bias, ln_eps):
        l, g, x_f = l.contiguous(), g.contiguous(), x_f.contiguous()
        sg, batch_mean, batch_var, sp_pooled, sp_argmax = self.spatial_fwd(
            l, *self._small(l, conv_weight, bn_weight, bn_bias, running_mean, running_var), use_batch_stats, bn_eps, True)
        cg, ch_pooled, ch_argmax = self.channel_fwd(g, *self._small(l, fc1_weight, fc2_weight), True)
        out, mean, rstd = self.tail_fwd(l, g, x_f, sg, cg, *self._small(l, ln_weight, ln_bias), ln_eps)
        return [out, batch_mean, batch_var, sp_pooled, sp_argmax, ch_pooled, ch_argmax, sg, cg, mean, rstd]

    def backward(self, dout, saved, l, g, x_f, conv_weight, bn_weight, bn_bias, running_mean, running_var,
                 use_batch_stats, bn_eps, fc1_weight, fc2_weight, ln_weight, ln_bias, ln_eps):
        sp_pooled, sp_argmax, ch_pooled, ch_argmax, sg, cg, mean, rstd = saved
        l, g, x_f = l.contiguous(), g.contiguous(), x_f.contiguous()
        ln = self._small(l, ln_weight, ln_bias)
        dl, dg, dx_f, dsg, dcg, dln_w, dln_b = self.tail_bwd(dout.to(l.dtype).contiguous(), l, g, x_f, sg, cg, *ln,
                                                              mean, rstd)
        spatial = self._small(l, conv_weight, bn_weight, bn_bias, running_mean, running_var)
        dl, dconv, dbn_w, dbn_b = self.spatial_bwd(dsg, sp_pooled, sp_argmax, l, *spatial, use_batch_stats, bn_eps,
                                                   True, dl)
        dg, dfc1, dfc2 = self.channel_bwd(dcg, ch_pooled, ch_argmax, g, *self._small(l, fc1_weight, fc2_weight), True,
                                          dg)
        grads = (dl, dg, dx_f, dconv, dbn_w, dbn_b, dfc1, dfc2, dln_w, dln_b)
        inputs = (l, g, x_f, conv_weight, bn_weight, bn_bias, fc1_weight, fc2_weight, ln_weight, ln_bias)
        return [restore_grad(d, t) for d, t in zip(grads, inputs)]


def _compiled_kernels(device):
    m = _ext.module()
    names = ("hff_spatial_gate_fwd", "hff_spatial_gate_bwd", "hff_channel_gate_fwd", "hff_channel_gate_bwd",
             "hff_fused_tail_fwd", "hff_fused_tail_bwd")
    return _KernelImpl([getattr(m, f"{name}_{device}") for name in names])


def _triton_kernels():
    gates = importlib.import_module("medkernels.kernels.hff_attention")
    tail = importlib.import_module("medkernels.kernels.hff_attention_tail")
    return _KernelImpl([gates.hff_spatial_gate_fwd, gates.hff_spatial_gate_bwd, gates.hff_channel_gate_fwd,
                        gates.hff_channel_gate_bwd, tail.hff_fused_tail_fwd, tail.hff_fused_tail_bwd])


HFF_ATTENTION_TAIL = OpTable("hff_attention_tail", ref=_RefImpl)
HFF_ATTENTION_TAIL.register("cpu", lambda: _compiled_kernels("cpu"))
HFF_ATTENTION_TAIL.register("cuda", lambda: _compiled_kernels("cuda"))
HFF_ATTENTION_TAIL.register("triton", _triton_kernels)


@torch.library.custom_op("medkernels::hff_attention_tail_fwd", mutates_args=())
def _fwd(
    l: torch.Tensor, g: torch.Tensor, x_f: torch.Tensor, conv_weight: torch.Tensor, bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
    use_batch_stats: bool, bn_eps: float, fc1_weight: torch.Tensor, fc2_weight: torch.Tensor, ln_weight: torch.Tensor,
    ln_bias: torch.Tensor, ln_eps: float, backend: str,
) -> List[torch.Tensor]:
    return HFF_ATTENTION_TAIL.impl(backend).forward(l, g, x_f, conv_weight, bn_weight, bn_bias, running_mean,
                                                    running_var, use_batch_stats, bn_eps, fc1_weight, fc2_weight,
                                                    ln_weight, ln_bias, ln_eps)


@_fwd.register_fake
def _(l, g, x_f, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, bn_eps, fc1_weight,
      fc2_weight, ln_weight, ln_bias, ln_eps, backend):
    B, C1, H, W = l.shape
    C2 = g.shape[1]
    acc, stats = acc_dtype(l), (1 if use_batch_stats else 0)
    new = lambda *shape, dtype=acc: l.new_empty(*shape, dtype=dtype)  # noqa: E731
    return [l.new_empty(B, C1 + C2 + x_f.shape[1], H, W), new(stats), new(stats), new(B, 2, H, W),
            new(B, H, W, dtype=torch.int64), new(B, 2, C2), new(B, C2, dtype=torch.int64), new(B, 1, H, W),
            new(B, C2, 1, 1), new(B, H, W), new(B, H, W)]


@torch.library.custom_op("medkernels::hff_attention_tail_bwd", mutates_args=())
def _bwd(
    dout: torch.Tensor, saved: List[torch.Tensor], l: torch.Tensor, g: torch.Tensor, x_f: torch.Tensor,
    conv_weight: torch.Tensor, bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], use_batch_stats: bool, bn_eps: float,
    fc1_weight: torch.Tensor, fc2_weight: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, ln_eps: float,
    backend: str,
) -> List[torch.Tensor]:
    grads = HFF_ATTENTION_TAIL.impl(backend).backward(dout, saved, l, g, x_f, conv_weight, bn_weight, bn_bias,
                                                      running_mean, running_var, use_batch_stats, bn_eps, fc1_weight,
                                                      fc2_weight, ln_weight, ln_bias, ln_eps)
    return [g_ if g_ is not None else l.new_empty(0) for g_ in grads]


@_bwd.register_fake
def _(dout, saved, l, g, x_f, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, bn_eps,
      fc1_weight, fc2_weight, ln_weight, ln_bias, ln_eps, backend):
    inputs = (l, g, x_f, conv_weight, bn_weight, bn_bias, fc1_weight, fc2_weight, ln_weight, ln_bias)
    return [l.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format) for t in inputs]


_DIFFERENTIABLE = (0, 1, 2, 3, 4, 5, 10, 11, 12, 13)  # l, g, x_f, conv and BN weights, fc weights, norm weights


def _setup(ctx, inputs, output):
    inputs = list(inputs)
    if inputs[8]:  # use_batch_stats: the running stats are not used, and the caller updates them in place
        inputs[6] = inputs[7] = None
    tensors = [inputs[i] for i in range(8)] + inputs[10:14]
    ctx.save_for_backward(*tensors, *output[3:])
    ctx.args = (inputs[8], inputs[9], inputs[14], inputs[15])  # use_batch_stats, bn_eps, ln_eps, backend
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the ten non-differentiable outputs


def _backward_through(ctx, grads, run_backward):
    """The gradients of the 16 inputs from the saved context; run_backward(dout, saved, *tensors, *args) computes
    those of the differentiable ones (the custom backward op, or the backend's implementation directly)."""
    saved = ctx.saved_tensors
    l, g, x_f = saved[:3]
    dout = grads[0]
    if dout is None:
        dout = l.new_zeros(l.shape[0], l.shape[1] + g.shape[1] + x_f.shape[1], *l.shape[2:])
    use_batch_stats, bn_eps, ln_eps, backend = ctx.args
    d = run_backward(dout, list(saved[12:]), *saved[:8], use_batch_stats, bn_eps, *saved[8:12], ln_eps, backend)
    result = [None] * 16
    for slot, gi in zip(_DIFFERENTIABLE, d):
        result[slot] = gi if saved[slot if slot < 8 else slot - 2] is not None else None
    return tuple(result)


def _backward(ctx, grads):
    return _backward_through(ctx, grads, _bwd)


_fwd.register_autograd(_backward, setup_context=_setup)

# Backends whose implementation hff_attention_tail calls directly in plain eager mode (see eager_plain): the
# compiled extension's kernels. The custom op's dispatch (argument flattening, schema defaults, the generated
# autograd node) costs about 0.3 ms a forward+backward on a 2-core CPU, a tenth of the whole op at 768@7x7.
_DIRECT_BACKENDS = ("cpu", "cuda")


class _DirectAttentionTail(torch.autograd.Function):
    """The custom op's autograd (_setup, _backward) without its dispatch, for eager calls."""

    @staticmethod
    def forward(ctx, *inputs):
        output = HFF_ATTENTION_TAIL.impl(inputs[15]).forward(*inputs[:15])
        _setup(ctx, inputs, output)
        return tuple(output)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        return _backward_through(ctx, grads, lambda *args: HFF_ATTENTION_TAIL.impl(args[-1]).backward(*args[:-1]))


def hff_attention_tail(l, g, x_f, conv_weight, bn_weight, bn_bias, running_mean, running_var, training, fc1_weight,
                       fc2_weight, ln_weight, ln_bias, momentum=0.1, bn_eps=1e-5, ln_eps=1e-6):
    """HFFBlock's ``norm3(cat[g * channel_gate(g), l * spatial_gate(l), x_f])`` in one op.

    l: ``(B, C1, H, W)`` local feature, g: ``(B, C2, H, W)`` global feature, x_f: ``(B, Ci, H, W)`` fused feature,
    one dtype. The spatial gate of l is :func:`hff_spatial_attention`'s (conv_weight ``(1, 2, k, k)``; bn_weight,
    bn_bias, running_mean, running_var ``(1,)`` or None; BatchNorm as ``F.batch_norm(..., training, momentum,
    bn_eps)``, running statistics updated in place when ``training``), the channel gate of g is
    :func:`hff_channel_attention`'s (fc1_weight ``(C2 // r, C2)``, fc2_weight ``(C2, C2 // r)``, or with 1x1
    dims), and the LayerNorm over the C2 + C1 + Ci channels is HiFuse's channels-first LayerNorm (biased
    variance, ``ln_eps`` inside the square root; ln_weight, ln_bias ``(C2 + C1 + Ci,)``). Returns ``(B, C2 + C1 + Ci, H, W)`` in l's dtype. Differentiable in l, g, x_f
    and every weight. The weights and statistics may be float32 for half features; the gates and the LayerNorm
    statistics are computed in float32 (float64 for float64 features).

    Under ``torch.autocast``: l, g and x_f are cast to the autocast dtype, the weights and running statistics
    are left as they are (the statistics stay float32), and the output is in the dtype ``F.layer_norm`` gives
    there: the autocast dtype on CPU, float32 on CUDA.
    """
    amp = autocast_dtype(l)
    if amp is not None:
        args = (l, g, x_f, conv_weight, bn_weight, bn_bias, running_mean, running_var, training, fc1_weight, fc2_weight,
                ln_weight, ln_bias, momentum, bn_eps, ln_eps)
        return run_cast(hff_attention_tail, amp, args, (0, 1, 2), layer_norm=True)
    use_batch_stats = validate_spatial(l, conv_weight, bn_weight, bn_bias, running_mean, running_var, training,
                                       momentum, name="l")
    w1, w2 = validate_channel(g, fc1_weight, fc2_weight, name="g")
    validate_tail(l, g, x_f, ln_weight, ln_bias)
    backend = empty_batch_to_ref(resolve(HFF_ATTENTION_TAIL, l.device), l)
    args = (l, g, x_f, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, float(bn_eps), w1,
            w2, ln_weight, ln_bias, float(ln_eps), backend)
    if backend in _DIRECT_BACKENDS and eager_plain(l, g, x_f, conv_weight, bn_weight, bn_bias, running_mean,
                                                   running_var, w1, w2, ln_weight, ln_bias):
        out, batch_mean, batch_var, *_ = _DirectAttentionTail.apply(*args)
    else:
        out, batch_mean, batch_var, *_ = _fwd(*args)
    update_running_stats(running_mean, running_var, batch_mean, batch_var, training, momentum)
    return out


def _tail_operands(l, g, x_f, *small):
    """The fusion tail kernels' operands: the features contiguous, the gates and LayerNorm parameters in l's
    accumulation dtype."""
    return [t.contiguous() for t in (l, g, x_f)] + [acc_operand(t, l) for t in small]


class _FusedTail(torch.autograd.Function):
    """The fusion tail kernels of a compiled or Triton backend alone, with the gates given."""

    @staticmethod
    def forward(ctx, kernels, l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias, eps):
        inputs = (l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias)
        out, mean, rstd = kernels.tail_fwd(*_tail_operands(*inputs), eps)
        ctx.kernels = kernels
        ctx.save_for_backward(*inputs, mean, rstd)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        *inputs, mean, rstd = ctx.saved_tensors
        grads = ctx.kernels.tail_bwd(dout.to(inputs[0].dtype).contiguous(), *_tail_operands(*inputs), mean, rstd)
        return (None,) + tuple(restore_grad(d, t) for d, t in zip(grads, inputs)) + (None,)


def _fused_tail(l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias, eps, backend):
    """``LayerNorm_channels(cat[g * channel_gate, l * spatial_gate, x_f])`` on `backend`'s fusion tail kernels:
    hff_attention_tail's last step on its own, for the kernels' tests. spatial_gate: (B, 1, H, W), channel_gate:
    (B, C2, 1, 1), the rest as in hff_attention_tail; differentiable in every tensor. The reference backend has no
    kernels of its own (its fusion tail is hff_fused_tail_ref)."""
    validate_tail(l, g, x_f, ln_weight, ln_bias)
    kernels = HFF_ATTENTION_TAIL.impl(backend)
    if not isinstance(kernels, _KernelImpl):
        raise ValueError(f"backend {backend!r} has no fusion tail kernels: its fusion tail is hff_fused_tail_ref")
    return _FusedTail.apply(kernels, l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias, float(eps))
