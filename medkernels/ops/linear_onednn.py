"""The ``cpu`` backend of :func:`medkernels.ops.linear`: float32 matrix products through oneDNN (PyTorch's
``mkldnn::_linear_pointwise``, the op inductor itself uses for frozen linears) instead of ATen's BLAS call.

PyTorch sends a float32 ``F.linear`` on a CPU to MKL, which on AMD processors runs its AVX2 code: on a Zen 5
EPYC oneDNN's AVX-512 kernels are 2.0-2.7x faster at HiFuse's and MedMamba's shapes (benchmarks/NOTES.md,
issue 20). Backward: the input gradient is the same oneDNN product with the transposed weight (on 1024 rows or
more; below that the weight's transposing copy costs more than the product saves); the weight gradient
goes, from 784 rows on, through oneDNN's weight gradient of a 1x1 convolution, reading the rows and the
output gradient in place as (1, features, rows, 1) channels-last maps (1.2-2.2x faster than ``mm`` at
HiFuse's shapes); on fewer rows, and for narrow outputs over large inputs, it stays on ATen's ``mm``
(oneDNN's kernels were up to 7x slower there). Every other case (other dtypes, which ATen already hands to oneDNN;
autocast; empty operands; a PyTorch without oneDNN) is ``F.linear`` itself.
"""
import torch
import torch.nn.functional as F

from torch.autograd.function import once_differentiable

# read once: torch.compile refuses to trace torch.backends.mkldnn.is_available
HAS_ONEDNN = torch.backends.mkldnn.is_available()
# The input gradient goes through oneDNN from this many rows on. Transposing the weight for it took about
# 2 ns an element here, and the faster product saves about 6 ps an element per row: HiFuse's stage-4 IRMLP
# (196 rows, weights of 21M-48M elements) lost 50 ms a step to the copies (benchmarks/NOTES.md).
ONEDNN_DX_MIN_ROWS = 1024
# The weight gradient goes through oneDNN's 1x1-convolution weight gradient from this many rows on. On a
# Zen 5 EPYC it was 1.2-2.2x faster at HiFuse's training shapes with 784 rows or more, 0.15-1.2x with 196,
# and mixed between 256 and 640 rows (benchmarks/NOTES.md). Its one loss above: fewer than 128 output
# features over an input of 8M elements or more ((12544 x 1152 -> 96) 0.88x, (25088 x 1152 -> 96) 0.89x,
# (25088 x 384 -> 96) even; at 4.8M elements 1.4-2.3x).
ONEDNN_DW_MIN_ROWS = 784
ONEDNN_DW_NARROW_OUT = 128
ONEDNN_DW_NARROW_MAX_INPUT = 1 << 23


def _weight_grad_by_convolution(rows, out_features):
    m, k = rows.shape
    return m >= ONEDNN_DW_MIN_ROWS and (out_features >= ONEDNN_DW_NARROW_OUT or m * k < ONEDNN_DW_NARROW_MAX_INPUT)


def onednn_usable(x, weight, bias=None):
    """Whether a float32 product of these operands can run through oneDNN here and now."""
    return (HAS_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32) and x.numel() > 0 and weight.numel() > 0
            and not torch.is_autocast_enabled("cpu"))


def onednn_rows(rows, weight, bias=None, post="none"):
    """``post(rows @ weight.T + bias)`` for rows (M, K) and weight (N, K) in one oneDNN call; post is "none"
    or a oneDNN eltwise post-op name such as "gelu". No autograd."""
    return torch.ops.mkldnn._linear_pointwise(rows.contiguous(), weight.contiguous(), bias, post, [], "none")


def onednn_weight_grad(grad, rows):
    """``grad.T @ rows`` for grad (M, N) and rows (M, K), both row-major: the weight gradient of a 1x1
    convolution over an image of M x 1 pixels, which oneDNN computes from the two channels-last views
    without copying either."""
    n, k = grad.shape[1], rows.shape[1]
    image = rows.contiguous().t().unsqueeze(0).unsqueeze(-1)
    grad_image = grad.contiguous().t().unsqueeze(0).unsqueeze(-1)
    # only its shape and channels-last strides are read; .to(memory_format=) would copy even this empty tensor
    weight = rows.new_empty_strided((n, k, 1, 1), (k, 1, k, k))
    gw = torch.ops.aten.convolution_backward(grad_image, image, weight, None, [1, 1], [0, 0], [1, 1], False,
                                             [0, 0], 1, [False, True, False])[1]
    return gw.reshape(n, k)


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        rows = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(rows, weight)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return onednn_rows(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        g = grad.reshape(-1, weight.shape[0])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            # oneDNN needs the weight transposed into a copy, which costs more than it saves on few rows
            gx = onednn_rows(g, weight.t()) if g.shape[0] >= ONEDNN_DX_MIN_ROWS else torch.mm(g, weight)
            gx = gx.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            by_conv = _weight_grad_by_convolution(rows, g.shape[1])
            gw = onednn_weight_grad(g, rows) if by_conv else torch.mm(g.t(), rows)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


def linear_onednn(x, weight, bias=None):
    if not onednn_usable(x, weight, bias):
        return F.linear(x, weight, bias)
    return _OneDNNLinear.apply(x, weight, bias)
