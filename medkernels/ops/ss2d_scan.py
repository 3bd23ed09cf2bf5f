"""medkernels.ops.ss2d_scan: MedMamba's four-direction scan fused (no materialised cross-scan or merge)."""
import importlib
from typing import List, Optional

import torch

from .. import _ext
from .._backend import OpTable, resolve
from ._autocast import autocast_dtype, run_cast
from ._common import acc_dtype, check_same_device, check_shape, check_tensor, vjp
from .selective_scan import MAX_STATE, kernel_operand, restore_grads
from .ss2d_scan_ref import ss2d_scan_ref


class _RefImpl:
    forward = staticmethod(ss2d_scan_ref)

    @staticmethod
    def backward(dout, u, delta, A, B, C, D, delta_bias, delta_softplus):
        def fn(u, delta, A, B, C, D, delta_bias):
            return ss2d_scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus)

        return vjp(fn, (u, delta, A, B, C, D, delta_bias), dout)


class _KernelImpl:
    """Adapts a backend's ss2d_scan_fwd/bwd: contiguous operands, A, D, delta_bias in the state dtype,
    everything else in u's dtype (csrc/ops.h)."""

    def __init__(self, fwd, bwd):
        self.fwd, self.bwd = fwd, bwd

    @staticmethod
    def _operands(u, delta, A, B, C, D, delta_bias):
        sdt = acc_dtype(u)
        return (kernel_operand(u, u.dtype), kernel_operand(delta, u.dtype), kernel_operand(A, sdt),
                kernel_operand(B, u.dtype), kernel_operand(C, u.dtype), kernel_operand(D, sdt),
                kernel_operand(delta_bias, sdt))

    def forward(self, u, delta, A, B, C, D, delta_bias, delta_softplus):
        (out,) = self.fwd(*self._operands(u, delta, A, B, C, D, delta_bias), delta_softplus)
        return out.reshape(u.shape)

    def backward(self, dout, u, delta, A, B, C, D, delta_bias, delta_softplus):
        operands = self._operands(u, delta, A, B, C, D, delta_bias)
        grads = self.bwd(kernel_operand(dout, u.dtype), *operands, delta_softplus)
        return restore_grads(grads, (u, delta, A, B, C, D, delta_bias))


def _triton_impl():
    module = importlib.import_module("medkernels.kernels.ss2d_scan")
    return _KernelImpl(module.ss2d_scan_fwd, module.ss2d_scan_bwd)


SS2D_SCAN = OpTable("ss2d_scan", ref=_RefImpl)
SS2D_SCAN.register("cpu", lambda: _KernelImpl(_ext.module().ss2d_scan_fwd_cpu, _ext.module().ss2d_scan_bwd_cpu))
# the CUDA kernels sum the four directions (forward) and the gradients (backward) with atomics
SS2D_SCAN.register("cuda", lambda: _KernelImpl(_ext.module().ss2d_scan_fwd_cuda, _ext.module().ss2d_scan_bwd_cuda),
                   deterministic=False)
SS2D_SCAN.register("triton", _triton_impl)


@torch.library.custom_op("medkernels::ss2d_scan_fwd", mutates_args=())
def _ss2d_scan_fwd(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], delta_softplus: bool, backend: str,
) -> torch.Tensor:
    return SS2D_SCAN.impl(backend).forward(u, delta, A, B, C, D, delta_bias, delta_softplus)


@_ss2d_scan_fwd.register_fake
def _(u, delta, A, B, C, D, delta_bias, delta_softplus, backend):
    return torch.empty_like(u, memory_format=torch.contiguous_format)


@torch.library.custom_op("medkernels::ss2d_scan_bwd", mutates_args=())
def _ss2d_scan_bwd(
    dout: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], delta_softplus: bool, backend: str,
) -> List[torch.Tensor]:
    grads = SS2D_SCAN.impl(backend).backward(dout, u, delta, A, B, C, D, delta_bias, delta_softplus)
    # contiguous whatever the inputs' strides, as the fake kernel promises (compiled graphs rely on it)
    return [g.contiguous() if g is not None else u.new_empty(0) for g in grads]


@_ss2d_scan_bwd.register_fake
def _(dout, u, delta, A, B, C, D, delta_bias, delta_softplus, backend):
    return [t.new_empty(t.shape) if t is not None else u.new_empty(0) for t in (u, delta, A, B, C, D, delta_bias)]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, delta_softplus, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
    ctx.args = (delta_softplus, backend)


def _backward(ctx, dout):
    saved = ctx.saved_tensors
    grads = _ss2d_scan_bwd(dout, *saved, *ctx.args)
    return tuple(g if t is not None else None for g, t in zip(grads, saved)) + (None, None)


_ss2d_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def _validate(u, delta, A, B, C, D, delta_bias):
    check_tensor(u, "u", ndim=4)
    batch, dim, h, w = u.shape
    check_tensor(delta, "delta", ndim=5)
    check_shape(delta, "delta", (batch, 4, dim, h, w), "(batch, 4, dim, H, W)")
    if delta.dtype != u.dtype:
        raise TypeError(f"delta must have u's dtype {u.dtype}, got {delta.dtype}")
    if isinstance(A, torch.Tensor) and A.is_complex():
        raise TypeError("A must be real: complex A is not supported by medkernels.ss2d_scan")
    check_tensor(A, "A", ndim=2, dtypes=(torch.float32, torch.float64))
    if A.shape[0] != 4 * dim:
        raise ValueError(f"A must have shape (4 * dim, N) with dim = {dim}, got {tuple(A.shape)}")
    n = A.shape[1]
    if not 1 <= n <= MAX_STATE:
        raise ValueError(f"A's state size N = {n} is out of range: 1 <= N <= {MAX_STATE}")
    for name, M in (("B", B), ("C", C)):
        check_tensor(M, name, ndim=5)
        check_shape(M, name, (batch, 4, n, h, w), "(batch, 4, N, H, W)")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        check_tensor(v, name, ndim=1, optional=True)
        check_shape(v, name, (4 * dim,), "(4 * dim,)")
    check_same_device(u=u, delta=delta, A=A, B=B, C=C, D=D, delta_bias=delta_bias)


def ss2d_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """MedMamba's SS2D scan core with the four directions walked inside the kernel.

    u: ``(batch, dim, H, W)``, the activations shared by the four directions; delta: ``(batch, 4, dim, H, W)``;
    B, C: ``(batch, 4, N, H, W)``; A: ``(4 * dim, N)``; D, delta_bias: ``(4 * dim,)`` — all in pixel order
    (the per-pixel projections need no reordering). Direction k (row-major, column-major, reversed
    row-major, reversed column-major) scans u, delta[:, k], B[:, k], C[:, k] in its order with rows
    ``k * dim .. k * dim + dim - 1`` of A, D and delta_bias, exactly as ``cross_scan`` + ``selective_scan``
    (B, C grouped by direction) + ``cross_merge`` would. Returns the four outputs summed per pixel,
    ``(batch, dim, H, W)`` in u's dtype. Differentiable in every tensor argument.

    dtypes: u, delta float16/bfloat16/float32 (state and arithmetic in float32) or float64, one dtype; B, C any
    float dtype (read in u's); A float32 or float64. Under ``torch.autocast`` the activations u, delta, B and C
    are cast to the autocast dtype, A, D and delta_bias are left as they are, the state stays float32, and
    the output is in the autocast dtype.
    """
    amp = autocast_dtype(u)
    if amp is not None:
        return run_cast(ss2d_scan, amp, (u, delta, A, B, C, D, delta_bias, delta_softplus), (0, 1, 3, 4))
    _validate(u, delta, A, B, C, D, delta_bias)
    return _ss2d_scan_fwd(u, delta, A, B, C, D, delta_bias, bool(delta_softplus), resolve(SS2D_SCAN, u.device))
