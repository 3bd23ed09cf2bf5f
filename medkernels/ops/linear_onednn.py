"""The ``cpu`` backend of :func:`medkernels.ops.linear`: float32 matrix products through oneDNN (PyTorch's
``mkldnn::_linear_pointwise``, the op inductor itself uses for frozen linears) instead of ATen's BLAS call.

PyTorch sends a float32 ``F.linear`` on a CPU to MKL, which on AMD processors runs its AVX2 code: on a Zen 5
EPYC oneDNN's AVX-512 kernels are 2.0-2.7x faster at HiFuse's and MedMamba's shapes (benchmarks/NOTES.md,
issue 20). Backward: the input gradient is the same oneDNN product with the transposed weight (on 1024 rows or
more; below that the weight's transposing copy costs more than the product saves); the weight gradient
stays on ATen's ``mm``, which reads the transposed operands in place (oneDNN would need two copies
and was 1.4-2.8x slower with them). Every other case (other dtypes, which ATen already hands to oneDNN;
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


def onednn_usable(x, weight, bias=None):
    """Whether a float32 product of these operands can run through oneDNN here and now."""
    return (HAS_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32) and x.numel() > 0 and weight.numel() > 0
            and not torch.is_autocast_enabled("cpu"))


def onednn_rows(rows, weight, bias=None, post="none"):
    """``post(rows @ weight.T + bias)`` for rows (M, K) and weight (N, K) in one oneDNN call; post is "none"
    or a oneDNN eltwise post-op name such as "gelu". No autograd."""
    return torch.ops.mkldnn._linear_pointwise(rows.contiguous(), weight.contiguous(), bias, post, [], "none")


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
            gw = torch.mm(g.t(), rows)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


def linear_onednn(x, weight, bias=None):
    if not onednn_usable(x, weight, bias):
        return F.linear(x, weight, bias)
    return _OneDNNLinear.apply(x, weight, bias)
