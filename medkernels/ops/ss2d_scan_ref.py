"""Pure-PyTorch reference of the fused SS2D scan: MedMamba's cross-scan, selective scan and merge,
stated with explicit flips and transposes."""
import torch

from ._common import acc_dtype
from .cross_scan_ref import cross_merge_ref, cross_scan_ref, direction_order
from .selective_scan_ref import selective_scan_ref


def _per_direction_scan_order(t):
    """t: (B, 4, C, H, W), slice k in pixel order -> (B, 4, C, H*W), slice k in direction k's order."""
    return torch.stack([direction_order(t[:, k], k) for k in range(4)], dim=1)


def ss2d_scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus):
    """u: (batch, dim, H, W); delta: (batch, 4, dim, H, W); A: (4*dim, N); B, C: (batch, 4, N, H, W);
    D, delta_bias: (4*dim,) or None -> (batch, dim, H, W) in u's dtype.

    Direction k scans u, delta[:, k], B[:, k], C[:, k] in its order (row-major, column-major, both reversed)
    with the channels k*dim .. k*dim+dim-1 of A, D and delta_bias; the four outputs are summed per pixel.
    """
    b, dim, h, w = u.shape
    # the four directions are scanned and summed in the accumulation dtype and rounded once, as the kernels do
    # (a half u would otherwise round each direction's output, and each direction's du, before the sums)
    acc = acc_dtype(u)
    u_, delta_, B_, C_ = (t.to(acc) for t in (u, delta, B, C))
    us = cross_scan_ref(u_).reshape(b, 4 * dim, h * w)
    ds = _per_direction_scan_order(delta_).reshape(b, 4 * dim, h * w)
    y, _ = selective_scan_ref(us, ds, A, _per_direction_scan_order(B_), _per_direction_scan_order(C_), D, None,
                              delta_bias, delta_softplus)
    return cross_merge_ref(y.reshape(b, 4, dim, h, w)).reshape(b, dim, h, w).to(u.dtype)
