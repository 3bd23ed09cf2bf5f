"""medkernels.ops.depthwise_conv2d_layernorm: the depthwise convolution followed by a LayerNorm over channels,
written channels-last (HiFuse's Local block: dwconv -> permute -> LayerNorm, in one pass)."""
from typing import List, Optional

import torch

from .._backend import OpTable, resolve
from ._autocast import autocast_dtype, run_cast
from ._common import check_same_device, check_tensor, eager_plain, vjp
from .depthwise_conv2d import _contiguous, kernel_function, validate_conv
from .depthwise_conv2d_layernorm_ref import depthwise_conv2d_layernorm_ref


class _RefImpl:
    forward = staticmethod(depthwise_conv2d_layernorm_ref)

    @staticmethod
    def backward(grad, x, weight, bias, ln_weight, ln_bias, stride, padding, eps):
        args = (x, weight, bias, ln_weight, ln_bias, stride, padding, eps)
        return vjp(depthwise_conv2d_layernorm_ref, args, grad)[:5]


def _in_dtype(t, dtype):
    return None if t is None else t.to(dtype).contiguous()


class _KernelImpl:
    """Adapts a backend's depthwise_conv2d_layernorm_fwd/bwd (contract in csrc/ops.h): x and grad in any
    strides, the parameter vectors contiguous and in x's dtype (float32 LayerNorm parameters of a half x are
    rounded to it, and their gradients come back in float32 from the kernels' half ones)."""

    def __init__(self, fwd, bwd):
        self.fwd, self.bwd = fwd, bwd

    def forward(self, x, weight, bias, ln_weight, ln_bias, stride, padding, eps):
        return self.fwd(x, weight.contiguous(), _contiguous(bias), _in_dtype(ln_weight, x.dtype),
                        _in_dtype(ln_bias, x.dtype), stride, padding, eps)

    def backward(self, grad, x, weight, bias, ln_weight, ln_bias, stride, padding, eps):
        grads = self.bwd(grad.to(x.dtype), x, weight.contiguous(), _contiguous(bias), _in_dtype(ln_weight, x.dtype),
                         _in_dtype(ln_bias, x.dtype), stride, padding, eps)
        return [g if t is None or g is None else g.to(t.dtype)
                for g, t in zip(grads, (x, weight, bias, ln_weight, ln_bias))]


DEPTHWISE_CONV2D_LAYERNORM = OpTable("depthwise_conv2d_layernorm", ref=_RefImpl)
# on the H100 the fused kernels took 1.4-4.8x (cuda) and 1.9-5.0x (triton) PyTorch's conv + LayerNorm time forward
# and backward (same file as depthwise_conv2d's)
DEPTHWISE_CONV2D_LAYERNORM.prefer_ref_for_auto("cuda")
for _name in ("cpu", "cuda", "triton"):
    DEPTHWISE_CONV2D_LAYERNORM.register(
        _name, lambda b=_name: _KernelImpl(kernel_function(b, "depthwise_conv2d_layernorm_fwd"),
                                           kernel_function(b, "depthwise_conv2d_layernorm_bwd")))


@torch.library.custom_op("medkernels::depthwise_conv2d_layernorm_fwd", mutates_args=())
def _dwln_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor],
    ln_bias: Optional[torch.Tensor], stride: int, padding: int, eps: float, backend: str,
) -> torch.Tensor:
    return DEPTHWISE_CONV2D_LAYERNORM.impl(backend).forward(x, weight, bias, ln_weight, ln_bias, stride, padding, eps)


@_dwln_fwd.register_fake
def _(x, weight, bias, ln_weight, ln_bias, stride, padding, eps, backend):
    b, c, h, w = x.shape
    k = weight.shape[-1]
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    return x.new_empty((b, ho, wo, c))


@torch.library.custom_op("medkernels::depthwise_conv2d_layernorm_bwd", mutates_args=())
def _dwln_bwd(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor], stride: int, padding: int, eps: float,
    backend: str,
) -> List[torch.Tensor]:
    grads = DEPTHWISE_CONV2D_LAYERNORM.impl(backend).backward(grad, x, weight, bias, ln_weight, ln_bias, stride,
                                                              padding, eps)
    # absent optional inputs get an empty placeholder: custom ops cannot return None
    return [g if g is not None else x.new_empty(0) for g in grads]


@_dwln_bwd.register_fake
def _(grad, x, weight, bias, ln_weight, ln_bias, stride, padding, eps, backend):
    return [torch.empty_like(t) if t is not None else x.new_empty(0) for t in (x, weight, bias, ln_weight, ln_bias)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, ln_weight, ln_bias, stride, padding, eps, backend = inputs
    ctx.save_for_backward(x, weight, bias, ln_weight, ln_bias)
    ctx.args = (stride, padding, eps, backend)


def _backward(ctx, grad):
    saved = ctx.saved_tensors
    grads = _dwln_bwd(grad, *saved, *ctx.args)
    return tuple(g if t is not None else None for g, t in zip(grads, saved)) + (None,) * 4


_dwln_fwd.register_autograd(_backward, setup_context=_setup_context)


def depthwise_conv2d_layernorm(x, weight, bias=None, ln_weight=None, ln_bias=None, eps=1e-5, stride=1, padding=None):
    """``F.layer_norm(F.conv2d(x, weight, bias, stride, padding, groups=C).permute(0, 2, 3, 1), (C,), ln_weight,
    ln_bias, eps)`` in one pass.

    x: ``(B, C, H, W)`` in any strides (NCHW or channels_last, read in place); weight ``(C, 1, k, k)``;
    bias, ln_weight, ln_bias ``(C,)`` or None; eps a float >= 0; stride and padding as in
    :func:`depthwise_conv2d`. Returns ``(B, Ho, Wo, C)`` contiguous (channels-last rows, as a following
    ``nn.Linear`` over channels reads them). The normalisation is over the channels of each pixel, biased
    variance, eps inside the square root. Differentiable in every tensor argument.

    dtypes: x, weight and bias of one dtype (float16, bfloat16, float32, float64); ln_weight and ln_bias in x's
    dtype, or float32 for a half x (as ``F.layer_norm`` accepts); statistics in float32 (float64 for float64).
    The output is in x's dtype. Under ``torch.autocast``: x, weight and bias are cast to the autocast dtype (the
    convolution runs in it, as ``F.conv2d``), ln_weight and ln_bias are left as they are, the statistics stay
    float32, and the output is in the dtype ``F.layer_norm`` gives there: the autocast dtype on CPU, float32 on
    CUDA (where autocast runs layer_norm in float32).
    """
    amp = autocast_dtype(x)
    if amp is not None:
        return run_cast(depthwise_conv2d_layernorm, amp, (x, weight, bias, ln_weight, ln_bias, eps, stride, padding),
                        (0, 1, 2), layer_norm=True)
    padding = validate_conv(x, weight, bias, stride, padding)
    channels = x.shape[1]
    half = x.dtype in (torch.float16, torch.bfloat16)
    for name, v in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        check_tensor(v, name, ndim=1, optional=True)
        if v is not None and v.shape[0] != channels:
            raise ValueError(f"{name} must have shape (C,) = ({channels},), got {tuple(v.shape)}")
        if v is not None and v.dtype != x.dtype and not (half and v.dtype == torch.float32):
            allowed = f"x's dtype {x.dtype}" + (" or torch.float32" if half else "")
            raise TypeError(f"{name} must have {allowed}, got {v.dtype}")
    check_same_device(x=x, ln_weight=ln_weight, ln_bias=ln_bias)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    backend = resolve(DEPTHWISE_CONV2D_LAYERNORM, x.device)
    if backend == "ref" and eager_plain(x, weight, bias, ln_weight, ln_bias):
        return depthwise_conv2d_layernorm_ref(x, weight, bias, ln_weight, ln_bias, stride, padding, float(eps))
    return _dwln_fwd(x, weight, bias, ln_weight, ln_bias, stride, padding, float(eps), backend)
