"""medkernels.ops.irmlp: HiFuse's inverted residual MLP (the IRMLP of every HFF block) as one op: validation and
backend dispatch.

The op is a composition of ATen operators on every backend (the reference's NCHW chain in irmlp_ref.py, the
``cpu`` backend's channels-last matrix products in irmlp_gemm.py), so autograd, ``torch.autocast`` and
``torch.compile`` see through it as they see through the official module: there is no custom op to register,
and the autocast rule is PyTorch's own for each convolution, matrix product and BatchNorm inside.
"""
from typing import NamedTuple, Optional

import torch

from .._backend import OpTable, resolve
from ._common import check_same_device, check_tensor
from .irmlp_gemm import irmlp_gemm
from .irmlp_ref import irmlp_ref


class BatchNormArgs(NamedTuple):
    """A BatchNorm as ``F.batch_norm`` takes it: per-channel ``weight``, ``bias``, ``running_mean``,
    ``running_var`` (each (C,) or None), ``training`` (use the batch statistics, and update the running ones
    when given), ``momentum`` and ``eps``."""

    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]
    training: bool
    momentum: float = 0.1
    eps: float = 1e-5


IRMLP = OpTable("irmlp", ref=irmlp_ref)
IRMLP.register("cpu", lambda: irmlp_gemm)


def _check_bn(bn, name, channels, x):
    if not isinstance(bn, BatchNormArgs):
        raise TypeError(f"{name} must be a medkernels.ops.BatchNormArgs, got {type(bn).__name__}")
    for field in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(bn, field)
        check_tensor(t, f"{name}.{field}", ndim=1, optional=True)
        if t is not None and t.shape[0] != channels:
            raise ValueError(f"{name}.{field} must have shape ({channels},), got {tuple(t.shape)}")
        check_same_device(x=x, **{f"{name}.{field}": t})
    if (bn.running_mean is None) != (bn.running_var is None):
        raise ValueError(f"{name}: running_mean and running_var must both be given or both be None")
    if not bn.training and bn.running_mean is None:
        raise ValueError(f"{name}: training=False needs running_mean and running_var")
    if isinstance(bn.eps, bool) or not isinstance(bn.eps, (int, float)) or not bn.eps > 0:
        raise ValueError(f"{name}.eps must be a float > 0, got {bn.eps!r}")


def irmlp(x, conv1_weight, conv2_weight, conv3_weight, bn1, bn3):
    """HiFuse's IRMLP: ``y = bn1(gelu(conv1(x)) + x)``, ``out = bn3(conv3(gelu(conv2(y))))``, convolutions
    without bias, conv1 a dense odd-sized "same" convolution, conv2 and conv3 1x1.

    x: ``(batch, C, H, W)`` in any strides; conv1_weight ``(C, C, k, k)`` with k odd; conv2_weight
    ``(hidden, C, 1, 1)``; conv3_weight ``(out, hidden, 1, 1)``; bn1 and bn3 :class:`BatchNormArgs` over C and
    out channels (in training their running statistics are updated in place, as ``nn.BatchNorm2d`` does).
    Returns ``(batch, out, H, W)``: contiguous on the ``cpu`` backend, in ``F.conv2d``'s layout for x on the
    reference. Differentiable in
    x, the weights and the BatchNorms' affine parameters.

    dtypes: as the convolutions and ``F.batch_norm`` accept them (float32, float64, bfloat16, float16 where the
    device has them); under ``torch.autocast`` each convolution and matrix product is cast as PyTorch casts it.
    """
    check_tensor(x, "x", ndim=4)
    c = x.shape[1]
    check_tensor(conv1_weight, "conv1_weight", ndim=4)
    k = conv1_weight.shape[-1]
    if tuple(conv1_weight.shape) != (c, c, k, k) or k % 2 == 0:
        raise ValueError(f"conv1_weight must have shape (C, C, k, k) with C = {c} and k odd, "
                         f"got {tuple(conv1_weight.shape)}")
    check_tensor(conv2_weight, "conv2_weight", ndim=4)
    if conv2_weight.shape[1:] != (c, 1, 1):
        raise ValueError(f"conv2_weight must have shape (hidden, {c}, 1, 1), got {tuple(conv2_weight.shape)}")
    check_tensor(conv3_weight, "conv3_weight", ndim=4)
    if conv3_weight.shape[1:] != (conv2_weight.shape[0], 1, 1):
        raise ValueError(f"conv3_weight must have shape (out, {conv2_weight.shape[0]}, 1, 1), "
                         f"got {tuple(conv3_weight.shape)}")
    check_same_device(x=x, conv1_weight=conv1_weight, conv2_weight=conv2_weight, conv3_weight=conv3_weight)
    _check_bn(bn1, "bn1", c, x)
    _check_bn(bn3, "bn3", conv3_weight.shape[0], x)
    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    for name, bn in (("bn1", bn1), ("bn3", bn3)):
        if bn.training and pixels == 1:
            raise ValueError(f"{name} in training needs more than one value per channel, but x of shape "
                             f"{tuple(x.shape)} has one pixel in all (batch * H * W = 1)")
    if pixels == 0:
        backend = "ref"
    else:
        backend = resolve(IRMLP, x.device)
    return IRMLP.impl(backend)(x, conv1_weight, conv2_weight, conv3_weight, bn1, bn3)
