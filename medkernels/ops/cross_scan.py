"""medkernels.ops.cross_scan / cross_merge: MedMamba's four-direction scan layout and its merge.

cross_merge is the adjoint of cross_scan, so each op's backward is the other op.
"""
import importlib

import torch

from .. import _ext
from .._backend import OpTable, resolve
from ._common import check_size, check_tensor
from .cross_scan_ref import cross_merge_ref, cross_scan_ref

CROSS_SCAN = OpTable("cross_scan", ref=cross_scan_ref)
CROSS_MERGE = OpTable("cross_merge", ref=cross_merge_ref)
CROSS_SCAN.register("cpu", lambda: _ext.module().cross_scan_cpu)
CROSS_MERGE.register("cpu", lambda: _ext.module().cross_merge_cpu)
CROSS_SCAN.register("cuda", lambda: _ext.module().cross_scan_cuda)
CROSS_MERGE.register("cuda", lambda: _ext.module().cross_merge_cuda)
CROSS_SCAN.register("triton", lambda: importlib.import_module("medkernels.kernels.cross_scan").cross_scan_fwd)
CROSS_MERGE.register("triton", lambda: importlib.import_module("medkernels.kernels.cross_scan").cross_merge_fwd)


@torch.library.custom_op("medkernels::cross_scan", mutates_args=())
def _cross_scan(x: torch.Tensor, backend: str) -> torch.Tensor:
    return CROSS_SCAN.impl(backend)(x.contiguous())


@_cross_scan.register_fake
def _(x, backend):
    b, c, h, w = x.shape
    return x.new_empty(b, 4, c, h * w)


@torch.library.custom_op("medkernels::cross_merge", mutates_args=())
def _cross_merge(y: torch.Tensor, backend: str) -> torch.Tensor:
    return CROSS_MERGE.impl(backend)(y.contiguous())


@_cross_merge.register_fake
def _(y, backend):
    b, _, c, h, w = y.shape
    return y.new_empty(b, c, h * w)


def _save_shape(ctx, inputs, output):
    ctx.shape = inputs[0].shape
    ctx.backend = inputs[1]


def _cross_scan_backward(ctx, grad):
    b, c, h, w = ctx.shape
    return _cross_merge(grad.reshape(b, 4, c, h, w), ctx.backend).reshape(b, c, h, w), None


def _cross_merge_backward(ctx, grad):
    b, _, c, h, w = ctx.shape
    return _cross_scan(grad.reshape(b, c, h, w), ctx.backend).reshape(b, 4, c, h, w), None


_cross_scan.register_autograd(_cross_scan_backward, setup_context=_save_shape)
_cross_merge.register_autograd(_cross_merge_backward, setup_context=_save_shape)


def cross_scan(x):
    """x: ``(B, C, H, W)`` -> ``(B, 4, C, H*W)``: the row-major, column-major, reversed row-major and
    reversed column-major scans of every channel, exactly as MedMamba's SS2D builds them. Any float dtype;
    the output keeps it, under ``torch.autocast`` too (data movement: nothing is cast)."""
    check_tensor(x, "x", ndim=4)
    b, c, h, w = x.shape
    check_size(4 * x.numel(), "the output", (b, 4, c, h * w))
    return _cross_scan(x, resolve(CROSS_SCAN, x.device))


def cross_merge(y):
    """y: ``(B, 4, C, H, W)`` with ``y[:, k]`` flattened in direction k's scan order (see cross_scan) ->
    ``(B, C, H*W)``: the four directions mapped back to row-major pixel order and summed, in y's dtype (under
    ``torch.autocast`` too: nothing is cast)."""
    check_tensor(y, "y", ndim=5)
    if y.shape[1] != 4:
        raise ValueError(f"y must have shape (B, 4, C, H, W) with 4 scan directions, got {tuple(y.shape)}")
    return _cross_merge(y, resolve(CROSS_MERGE, y.device))
