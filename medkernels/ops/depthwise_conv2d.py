"""medkernels.ops.depthwise_conv2d: validation, backend dispatch, torch.library registration and autograd."""
from typing import List, Optional

import importlib

import torch

from .. import _ext
from .._backend import OpTable, resolve
from ._autocast import autocast_dtype, run_cast
from ._common import check_same_device, check_size, check_tensor, eager_plain, vjp
from .depthwise_conv2d_ref import ACTIVATIONS, depthwise_conv2d_ref, is_channels_last

MAX_KERNEL = 31


class _RefImpl:
    forward = staticmethod(depthwise_conv2d_ref)

    @staticmethod
    def backward(grad, x, weight, bias, stride, padding, activation):
        return vjp(depthwise_conv2d_ref, (x, weight, bias, stride, padding, activation), grad)[:3]


def _contiguous(t):
    return None if t is None else t.contiguous()


class _KernelImpl:
    """Adapts a backend's depthwise_conv2d_fwd/bwd (contract in csrc/ops.h): x and grad in any strides,
    weight and bias contiguous. Backends that have them also give fwd_save / bwd_saved: a forward that saves
    act'(z) and a backward that uses it instead of recomputing the convolution (see forward_save)."""

    def __init__(self, fwd, bwd, fwd_save=None, bwd_saved=None):
        self.fwd, self.bwd = fwd, bwd
        self.fwd_save, self.bwd_saved = fwd_save, bwd_saved

    def forward(self, x, weight, bias, stride, padding, activation, channels_last):
        return self.fwd(x, weight.contiguous(), _contiguous(bias), stride, padding, activation, channels_last)

    def backward(self, grad, x, weight, bias, stride, padding, activation):
        gx, gw, gb = self.bwd(grad, x, weight.contiguous(), _contiguous(bias), stride, padding, activation)
        return gx, gw, gb

    def forward_save(self, x, weight, bias, stride, padding, activation, channels_last):
        """(out, dact): dact = act'(z), for backward_saved, or None where the backend or the case has none (the
        backend decides which cases save: csrc's can_save_derivative for cpu)."""
        if self.fwd_save is None:
            return self.forward(x, weight, bias, stride, padding, activation, channels_last), None
        out, dact = self.fwd_save(x, weight.contiguous(), _contiguous(bias), stride, padding, activation,
                                  channels_last)
        return out, (dact if dact.numel() > 0 else None)

    def backward_saved(self, grad, x, weight, bias, dact, stride, padding):
        """The backward from forward_save's dact, which it consumes: the input gradient is written over it."""
        gx, gw, gb = self.bwd_saved(grad, x, weight.contiguous(), _contiguous(bias), dact, stride, padding)
        return gx, gw, gb


def kernel_function(backend, name):
    """Kernel `name` of `backend`: `name`_cpu / `name`_cuda in the extension, `name` in the Triton module."""
    if backend == "triton":
        return getattr(importlib.import_module("medkernels.kernels.depthwise_conv2d"), name)
    return getattr(_ext.module(), f"{name}_{backend}")


DEPTHWISE_CONV2D = OpTable("depthwise_conv2d", ref=_RefImpl)
# H100, torch 2.11, batch 64, channels_last fp16/bf16, HiFuse/MedMamba shapes (benchmarks/results/
# archive/nvidia-h100-80gb-hbm3-depthwise.txt): the cuda kernels took 2.2-4.2x cuDNN + activation's time forward and
# 1.8-8.3x forward+backward, the triton ones 1.1-4.2x and 2.4-6.7x. Until they are faster, auto runs PyTorch.
DEPTHWISE_CONV2D.prefer_ref_for_auto("cuda")
for _name in ("cuda", "triton"):
    DEPTHWISE_CONV2D.register(_name, lambda b=_name: _KernelImpl(kernel_function(b, "depthwise_conv2d_fwd"),
                                                                 kernel_function(b, "depthwise_conv2d_bwd")))
DEPTHWISE_CONV2D.register("cpu", lambda: _KernelImpl(*(kernel_function("cpu", f"depthwise_conv2d_{name}") for name in
                                                       ("fwd", "bwd", "fwd_save", "bwd_saved"))))


@torch.library.custom_op("medkernels::depthwise_conv2d_fwd", mutates_args=())
def _depthwise_conv2d_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int, padding: int, activation: str,
    backend: str, channels_last: Optional[bool],
) -> torch.Tensor:
    if channels_last is None:
        channels_last = is_channels_last(x)
    return DEPTHWISE_CONV2D.impl(backend).forward(x, weight, bias, stride, padding, activation, channels_last)


def _out_size(size, k, stride, padding):
    return (size + 2 * padding - k) // stride + 1


@_depthwise_conv2d_fwd.register_fake
def _(x, weight, bias, stride, padding, activation, backend, channels_last):
    b, c, h, w = x.shape
    k = weight.shape[-1]
    if channels_last is None:
        channels_last = is_channels_last(x)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
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
    x, weight, bias, stride, padding, activation, backend, _ = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.args = (stride, padding, activation, backend)


def _backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    gx, gw, gb = _depthwise_conv2d_bwd(grad, x, weight, bias, *ctx.args)
    return gx, gw, (gb if bias is not None else None), None, None, None, None, None


_depthwise_conv2d_fwd.register_autograd(_backward, setup_context=_setup_context)

# Backends whose implementation depthwise_conv2d calls directly in plain eager mode (see eager_plain): the
# compiled extension's kernels.
_DIRECT_BACKENDS = ("cpu", "cuda")


class _DirectDepthwiseConv2d(torch.autograd.Function):
    """The autograd of the custom op above, without its dispatch: for eager calls that need gradients.

    Where the backend can (CPU: SiLU or GELU, float32/float64, stride 1, output the input's size, not the NCHW
    plane walk), the forward keeps act'(z) instead of having the backward recompute the convolution and the
    activation; the first backward consumes it (the input gradient is written over it), a second one (through
    retain_graph) recomputes. The results are those of the recomputing path to the bit. It holds one
    output-sized tensor from forward to backward, as PyTorch's conv + activation does with z; that tensor is
    saved with save_for_backward, so that saved-tensor hooks (activation checkpointing, offloading) handle it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, activation, backend, channels_last):
        out, dact = DEPTHWISE_CONV2D.impl(backend).forward_save(x, weight, bias, stride, padding, activation,
                                                               channels_last)
        ctx.save_for_backward(x, weight, bias, dact)
        ctx.args = (stride, padding, activation, backend)
        ctx.dact_unused = dact is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, bias, dact = ctx.saved_tensors
        stride, padding, activation, backend = ctx.args
        impl = DEPTHWISE_CONV2D.impl(backend)
        if ctx.dact_unused:
            ctx.dact_unused = False
            gx, gw, gb = impl.backward_saved(grad, x, weight, bias, dact, stride, padding)
        else:
            gx, gw, gb = impl.backward(grad, x, weight, bias, stride, padding, activation)
        return gx, gw, (gb if bias is not None else None), None, None, None, None, None


def validate_conv(x, weight, bias, stride, padding):
    """Checks the arguments shared by the depthwise ops; returns the padding (default k // 2)."""
    check_tensor(x, "x", ndim=4)
    check_tensor(weight, "weight", ndim=4)
    channels = x.shape[1]
    if channels == 0:
        raise ValueError(f"x must have at least one channel, got shape {tuple(x.shape)}")
    if weight.shape[0] != channels or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must have shape (C, 1, k, k) with C = {channels}, got {tuple(weight.shape)}")
    k = weight.shape[-1]
    if k > MAX_KERNEL:
        raise ValueError(f"weight's kernel size k = {k} is too large: k <= {MAX_KERNEL}")
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
    if x.shape[2] + 2 * padding < k or x.shape[3] + 2 * padding < k:
        raise ValueError(f"x's spatial size {tuple(x.shape[2:])} with padding {padding} is smaller than the kernel {k}")
    out_shape = (x.shape[0], channels, _out_size(x.shape[2], k, stride, padding), _out_size(x.shape[3], k, stride, padding))
    check_size(out_shape[0] * out_shape[1] * out_shape[2] * out_shape[3], "the output", out_shape)
    return padding


def depthwise_conv2d(x, weight, bias=None, stride=1, padding=None, activation=None, memory_format=None):
    """``act(F.conv2d(x, weight, bias, stride, padding, groups=C))`` with the bias and activation fused.

    x: ``(B, C, H, W)`` in any strides (NCHW, channels_last, slices; the kernels read them in place);
    weight ``(C, 1, k, k)``, k <= 31; bias ``(C,)`` or None; stride a positive int; padding an int >= 0,
    default ``k // 2`` (k must then be odd); activation None, "silu", "gelu" (erf) or "relu".
    Returns ``(B, C, Ho, Wo)``, ``Ho = (H + 2 padding - k) // stride + 1``, in ``memory_format``
    (``torch.contiguous_format`` or ``torch.channels_last``; default: channels_last when x is
    channels_last-contiguous, else contiguous). Differentiable in x, weight and bias.

    Memory in training: the backward keeps x (and weight, bias). On the cpu backend in eager mode, with SiLU or
    GELU, float32/float64, stride 1 and an output the size of x, it also keeps ``act'(z)`` (one output-sized
    tensor, as PyTorch's conv + activation keeps z) so that the backward need not recompute the convolution;
    the input gradient is then written over it. Elsewhere (other cases, ``torch.compile``) the backward
    recomputes z and keeps nothing more. The results are the same to the bit either way.

    dtypes: float16, bfloat16, float32, float64, one for x, weight and bias (accumulation in float32, float64
    for float64). Under ``torch.autocast``, as ``F.conv2d``: x, weight and bias are cast to the autocast dtype
    (float64 stays), the convolution and activation run in it and the result is in it; the gradients of
    float32 parameters come back in float32.
    """
    amp = autocast_dtype(x)
    if amp is not None:
        return run_cast(depthwise_conv2d, amp, (x, weight, bias, stride, padding, activation, memory_format), (0, 1, 2))
    padding = validate_conv(x, weight, bias, stride, padding)
    name = "none" if activation is None else activation
    if name not in ACTIVATIONS or name == "none" and activation is not None:
        raise ValueError(f"activation must be None, 'silu', 'gelu' or 'relu', got {activation!r}")
    if memory_format is None:
        channels_last = is_channels_last(x)
    elif memory_format in (torch.channels_last, torch.contiguous_format):
        channels_last = memory_format == torch.channels_last
    else:
        raise ValueError(f"memory_format must be None, torch.contiguous_format or torch.channels_last, got {memory_format!r}")
    backend = resolve(DEPTHWISE_CONV2D, x.device)
    if backend == "ref" and eager_plain(x, weight, bias):
        # plain PyTorch with its own autograd: the custom op would only add dispatch and a functorch backward
        return depthwise_conv2d_ref(x, weight, bias, stride, padding, name, channels_last)
    if backend in _DIRECT_BACKENDS and eager_plain(x, weight, bias):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return _DirectDepthwiseConv2d.apply(x, weight, bias, stride, padding, name, backend, channels_last)
        return DEPTHWISE_CONV2D.impl(backend).forward(x, weight, bias, stride, padding, name, channels_last)
    return _depthwise_conv2d_fwd(x, weight, bias, stride, padding, name, backend, channels_last)
