"""medkernels.ops.linear: ``y = x @ weight.T + bias`` (``nn.Linear``'s op), validation and backend dispatch.

The reference is ``F.linear``; the ``cpu`` backend runs float32 products through oneDNN (linear_onednn.py),
which on AMD processors is about twice as fast as the BLAS call ATen makes. Both are compositions of ATen
operators with autograd, so ``torch.autocast`` applies PyTorch's own rule (the product in the autocast dtype).
"""
import torch

from .._backend import OpTable, resolve
from ._common import check_same_device, check_tensor
from .linear_onednn import linear_onednn
from .linear_ref import linear_ref

LINEAR = OpTable("linear", ref=linear_ref)
LINEAR.register("cpu", lambda: linear_onednn)


def linear(x, weight, bias=None):
    """``x @ weight.T + bias``.

    x: ``(..., in_features)`` in any strides; weight: ``(out_features, in_features)``; bias: ``(out_features,)``
    or None. Returns ``(..., out_features)``. Differentiable in all three. dtypes: float32, float64, bfloat16,
    float16 (where the device has them); x, weight and bias share one dtype, except under ``torch.autocast``.
    """
    check_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features), got a 0-dimensional tensor")
    check_tensor(weight, "weight", ndim=2)
    check_tensor(bias, "bias", ndim=1, optional=True)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape (out_features, {x.shape[-1]}) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_same_device(x=x, weight=weight, bias=bias)
    if not torch.is_autocast_enabled(x.device.type):
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != x.dtype:
                raise TypeError(f"{name} must have x's dtype {x.dtype} outside autocast, got {t.dtype}")
    return LINEAR.impl(resolve(LINEAR, x.device))(x, weight, bias)
