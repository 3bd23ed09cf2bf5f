"""The ``cpu`` backend of :func:`medkernels.ops.irmlp`: the same chain written for oneDNN and the BLAS through
PyTorch's own kernels, no code of medkernels' C++ extension.

* The 1x1 convolutions are matrix products over channels-last pixel rows (``F.linear``), which on a CPU run
  1.2-2.7x faster than ``F.conv2d`` on NCHW maps at HiFuse's shapes, forward and backward
  (benchmarks/NOTES.md, issue 20).
* The 3x3 convolution is :func:`medkernels.ops.conv3x3` (Winograd F(4x4, 3x3) for float32: 4x fewer multiply-adds,
  1.7-2.6x faster than oneDNN's direct convolution at HiFuse's stages 1-2, forward and backward), except on maps of
  64 pixels or fewer (HiFuse's last stage, 7 x 7 with thousands of channels), where an im2col matrix product beats
  oneDNN's direct convolution (1.65x forward + backward at 2304 channels); other kernel sizes run oneDNN's direct
  convolution on channels-last maps.
* In training the BatchNorms normalise the pixel rows with their own statistics (``_RowBatchNorm``): PyTorch's
  channels-last BatchNorm kernel accumulates its sums in a way that is 7-20x less accurate than its NCHW one in
  float32 (benchmarks/NOTES.md), which the gradients of HiFuse's attention BatchNorms amplify; the two-pass
  statistics here cost about as much.
* In eval mode each BatchNorm is an affine map folded into the neighbouring matrix product, on the side that
  costs less to scale (the weight or the activations), recomputed every call (so it always follows the
  current weights and statistics).
* Without autograd (inference) the 1x1 expansion and its GELU run as one oneDNN matrix product with a GELU
  post-op; the other float32 products go through oneDNN too (``ops.linear``'s ``cpu`` backend), which on AMD
  processors is about twice as fast as ATen's BLAS call.

Everything is differentiable ATen work, so autograd and ``torch.autocast`` treat it as they treat the
reference.
"""
import torch
import torch.nn.functional as F

from torch.autograd.function import once_differentiable

from .conv3x3 import conv3x3
from .linear_onednn import HAS_ONEDNN, linear_onednn as _linear, onednn_rows

# Maps of at most this many pixels take the im2col path for the 3x3 convolution.
IM2COL_MAX_PIXELS = 64


def _conv_rows(x, weight):
    """The stride-1 'same' convolution of x (batch, C, H, W) as (batch, H, W, out) channels-last rows."""
    b, _, h, w = x.shape
    k = weight.shape[-1]
    if h * w <= IM2COL_MAX_PIXELS:
        # one contiguous (batch * H*W, C*k*k) matrix: a strided batched product in bfloat16 takes a path 50x slower
        cols = F.unfold(x, k, padding=(k - 1) // 2).transpose(1, 2).reshape(b * h * w, -1)
        return _linear(cols, weight.reshape(weight.shape[0], -1)).view(b, h, w, -1)
    if k == 3:  # Winograd on float32 (ops.conv3x3's cpu backend), the direct convolution otherwise
        return conv3x3(x, weight).permute(0, 2, 3, 1)
    cl = torch.channels_last
    y = F.conv2d(x.contiguous(memory_format=cl), weight.contiguous(memory_format=cl), None, 1, (k - 1) // 2)
    return y.permute(0, 2, 3, 1)


class _RowBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm of rows (M, C) over M, statistics in two passes in float32 (float64 for float64).
    Returns (out, batch mean, biased batch variance); only out is differentiable."""

    @staticmethod
    def forward(ctx, rows, weight, bias, eps):
        acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
        mean = rows.mean(0, dtype=acc)
        centered = rows.to(acc) - mean
        var = centered.square().mean(0)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight.to(acc)
        out = centered.mul_(scale)
        if bias is not None:
            out.add_(bias.to(acc))
        ctx.save_for_backward(rows, weight, mean, invstd)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, var)
        return out.to(rows.dtype), mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dmean, _dvar):
        rows, weight, mean, invstd = ctx.saved_tensors
        acc = mean.dtype
        dout = dout.to(acc)
        xhat = (rows.to(acc) - mean).mul_(invstd)
        dbias = dout.sum(0)
        dweight = (dout * xhat).sum(0)
        m = rows.shape[0]
        scale = invstd if weight is None else invstd * weight.to(acc)
        drows = (dout - dbias / m).sub_(xhat.mul_(dweight / m)).mul_(scale).to(rows.dtype)
        gweight = None if weight is None or not ctx.needs_input_grad[1] else dweight.to(weight.dtype)
        gbias = dbias.to(rows.dtype if weight is None else weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return drows, gweight, gbias, None


def _batch_norm_rows(rows, bn):
    """bn (a BatchNormArgs using batch statistics) over rows (M, C), its running statistics updated as
    F.batch_norm updates them (momentum, unbiased variance). irmlp has refused a single row (m < 2)."""
    m = rows.shape[0]
    out, mean, var = _RowBatchNorm.apply(rows, bn.weight, bn.bias, float(bn.eps))
    if bn.running_mean is not None:
        with torch.no_grad():
            bn.running_mean.mul_(1 - bn.momentum).add_(mean.to(bn.running_mean.dtype), alpha=bn.momentum)
            unbiased = var * (m / (m - 1))
            bn.running_var.mul_(1 - bn.momentum).add_(unbiased.to(bn.running_var.dtype), alpha=bn.momentum)
    return out


def _affine(bn):
    """(scale, shift) of an eval-mode BatchNorm: bn(v) = v * scale + shift, per channel."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _folds(bn):
    """Whether this BatchNorm uses its running statistics (eval mode), so that it is an affine map."""
    return not bn.training and bn.running_mean is not None and bn.running_var is not None


def _fused_gelu_linear(rows, weight, bias):
    """gelu(rows @ weight.T + bias) as one oneDNN call where it can run (no autograd, no autocast, one dtype),
    else as F.linear and F.gelu."""
    plain = not torch.is_grad_enabled() or not (rows.requires_grad or weight.requires_grad)
    if (plain and HAS_ONEDNN and not torch.is_autocast_enabled("cpu")
            and rows.dtype in (torch.float32, torch.bfloat16) and weight.dtype == rows.dtype
            and (bias is None or bias.dtype == rows.dtype)):
        return onednn_rows(rows, weight, bias, "gelu")
    return F.gelu(_linear(rows, weight, bias))


def irmlp_gemm(x, conv1_weight, conv2_weight, conv3_weight, bn1, bn3):
    b, c, h, w = x.shape
    y = F.gelu(_conv_rows(x, conv1_weight)) + x.permute(0, 2, 3, 1)
    rows = y.reshape(b * h * w, c)
    w2 = conv2_weight.reshape(conv2_weight.shape[0], c)
    bias2 = None
    if _folds(bn1):
        scale, shift = _affine(bn1)
        if w2.numel() <= rows.numel():  # scale the weight's columns: conv2(y * s + t) = (W2 s) y + W2 t
            bias2 = F.linear(shift.to(w2.dtype), w2)
            w2 = w2 * scale.to(w2.dtype)
        else:
            rows = rows * scale.to(rows.dtype) + shift.to(rows.dtype)
    else:
        rows = _batch_norm_rows(rows, bn1)
    hidden = _fused_gelu_linear(rows, w2, bias2)
    w3 = conv3_weight.reshape(conv3_weight.shape[0], -1)
    if _folds(bn3):
        scale, shift = _affine(bn3)
        if w3.numel() <= hidden.shape[0] * w3.shape[0]:
            out = _linear(hidden, w3 * scale.to(w3.dtype)[:, None], shift.to(w3.dtype))
        else:
            out = _linear(hidden, w3) * scale.to(hidden.dtype) + shift.to(hidden.dtype)
    else:
        out = _batch_norm_rows(_linear(hidden, w3), bn3)
    # NCHW like the reference: a channels-last result would send the following BatchNorms (HFF's Updim) through
    # PyTorch's less accurate channels-last kernel, whose errors the attention gradients amplify
    return out.view(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
