"""medkernels.ops.selective_scan: validation, backend dispatch, torch.library registration and autograd."""
from typing import List, Optional

import importlib
import math

import torch

from .. import _ext
from .._backend import OpTable, resolve
from ._autocast import autocast_dtype, run_cast
from ._common import FLOAT_DTYPES, acc_dtype, check_same_device, check_shape, check_tensor, vjp
from .selective_scan_ref import selective_scan_ref

MAX_STATE = 256


class _RefImpl:
    forward = staticmethod(selective_scan_ref)

    @staticmethod
    def backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        def fn(u, delta, A, B, C, D, z, delta_bias):
            return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

        return vjp(fn, (u, delta, A, B, C, D, z, delta_bias), (dout, dlast))


def kernel_operand(t, dtype):
    """A tensor as the compiled and Triton kernels take it: contiguous, in `dtype`; None stays None."""
    return None if t is None else t.to(dtype).contiguous()


def restore_grads(grads, inputs):
    """Kernel gradients back to each input's shape and dtype (None where the input is absent)."""
    return [None if t is None else g.reshape(t.shape).to(t.dtype) for g, t in zip(grads, inputs)]


class _KernelImpl:
    """Adapts a backend's selective_scan_fwd/bwd to the op: the kernels take contiguous tensors, B and C
    grouped as (batch, G, N, L) in u's dtype, and A, D, delta_bias in the state dtype (csrc/ops.h)."""

    def __init__(self, fwd, bwd):
        self.fwd, self.bwd = fwd, bwd

    @staticmethod
    def _own_groups(M):
        """B's or C's group count (ungrouped counts as one group)."""
        return M.shape[1] if M.dim() == 4 else 1

    @classmethod
    def _groups(cls, B, C):
        """The common group count of B and C."""
        return math.lcm(cls._own_groups(B), cls._own_groups(C))

    @staticmethod
    def _grouped(M, groups):
        M = M if M.dim() == 4 else M.unsqueeze(1)
        return M.repeat_interleave(groups // M.shape[1], dim=1) if M.shape[1] != groups else M

    @classmethod
    def _ungrouped_grad(cls, g, M, groups):
        """Gradient of _grouped: sum the copies of each of M's groups."""
        own = cls._own_groups(M)
        return g.reshape(g.shape[0], own, groups // own, *g.shape[2:]).sum(2)

    def _operands(self, u, delta, A, B, C, D, z, delta_bias):
        sdt = acc_dtype(u)
        groups = self._groups(B, C)
        return (kernel_operand(u, u.dtype), kernel_operand(delta, u.dtype), kernel_operand(A, sdt),
                kernel_operand(self._grouped(B, groups), u.dtype), kernel_operand(self._grouped(C, groups), u.dtype),
                kernel_operand(D, sdt), kernel_operand(z, u.dtype), kernel_operand(delta_bias, sdt))

    def forward(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        out, last_state = self.fwd(*self._operands(u, delta, A, B, C, D, z, delta_bias), delta_softplus)
        return out, last_state

    def backward(self, dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        if u.dtype in (torch.float16, torch.bfloat16) and self._own_groups(B) != self._own_groups(C):
            # B or C is repeated to the other's groups, and its gradient is the sum over the copies: in half
            # precision each copy would be rounded before the sum, so the kernel runs in float32 and the sums
            # are rounded once (restore_grads)
            def up(t):
                return None if t is None else t.float()

            grads = self.backward(up(dout), dlast, up(u), up(delta), A, up(B), up(C), D, up(z), delta_bias,
                                  delta_softplus)
            return restore_grads(grads, (u, delta, A, B, C, D, z, delta_bias))
        operands = self._operands(u, delta, A, B, C, D, z, delta_bias)
        dlast = kernel_operand(dlast, acc_dtype(u))
        grads = list(self.bwd(kernel_operand(dout, u.dtype), dlast, *operands, delta_softplus))
        groups = self._groups(B, C)
        grads[3] = self._ungrouped_grad(grads[3], B, groups)
        grads[4] = self._ungrouped_grad(grads[4], C, groups)
        return restore_grads(grads, (u, delta, A, B, C, D, z, delta_bias))


SELECTIVE_SCAN = OpTable("selective_scan", ref=_RefImpl)
SELECTIVE_SCAN.register("cpu", lambda: _KernelImpl(_ext.module().selective_scan_fwd_cpu, _ext.module().selective_scan_bwd_cpu))
# the CUDA backward sums dB, dC and the parameter gradients with atomics
SELECTIVE_SCAN.register("cuda", lambda: _KernelImpl(_ext.module().selective_scan_fwd_cuda, _ext.module().selective_scan_bwd_cuda),
                        deterministic=False)


def _triton_impl():
    module = importlib.import_module("medkernels.kernels.selective_scan")
    return _KernelImpl(module.selective_scan_fwd, module.selective_scan_bwd)


SELECTIVE_SCAN.register("triton", _triton_impl)


@torch.library.custom_op("medkernels::selective_scan_fwd", mutates_args=())
def _selective_scan_fwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
    backend: str,
) -> List[torch.Tensor]:
    out, last_state = SELECTIVE_SCAN.impl(backend).forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return [out, last_state]


@_selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    last_state = u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=acc_dtype(u))
    return [torch.empty_like(u, memory_format=torch.contiguous_format), last_state]


@torch.library.custom_op("medkernels::selective_scan_bwd", mutates_args=())
def _selective_scan_bwd(
    dout: torch.Tensor,
    dlast_state: Optional[torch.Tensor],
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
    backend: str,
) -> List[torch.Tensor]:
    grads = SELECTIVE_SCAN.impl(backend).backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    # absent optional inputs get an empty placeholder (custom ops cannot return None); gradients are contiguous
    # whatever the inputs' strides, as the fake kernel promises (compiled graphs rely on it)
    return [g.contiguous() if g is not None else u.new_empty(0) for g in grads]


@_selective_scan_bwd.register_fake
def _(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    return [t.new_empty(t.shape) if t is not None else u.new_empty(0) for t in inputs]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
    ctx.delta_softplus = delta_softplus
    ctx.backend = backend


def _backward(ctx, grads):
    dout, dlast = grads
    u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(u)
    g = _selective_scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, ctx.backend)
    present = (u, delta, A, B, C, D, z, delta_bias)
    return tuple(gi if t is not None else None for gi, t in zip(g, present)) + (None, None)


_selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def _validate(u, delta, A, B, C, D, z, delta_bias):
    check_tensor(u, "u", ndim=3)
    batch, dim, L = u.shape
    check_tensor(delta, "delta", ndim=3)
    check_shape(delta, "delta", u.shape, "(batch, dim, L)")
    if delta.dtype != u.dtype:
        raise TypeError(f"delta must have u's dtype {u.dtype}, got {delta.dtype}")
    if isinstance(A, torch.Tensor) and A.is_complex():
        raise TypeError("A must be real: complex A is not supported by medkernels.selective_scan")
    check_tensor(A, "A", ndim=2, dtypes=(torch.float32, torch.float64))
    if A.shape[0] != dim:
        raise ValueError(f"A must have shape (dim, N) with dim = {dim}, got {tuple(A.shape)}")
    n = A.shape[1]
    if not 1 <= n <= MAX_STATE:
        raise ValueError(f"A's state size N = {n} is out of range: 1 <= N <= {MAX_STATE}")
    for name, M in (("B", B), ("C", C)):
        check_tensor(M, name, ndim=(3, 4))
        if M.dim() == 3:
            check_shape(M, name, (batch, n, L), "(batch, N, L)")
        else:
            groups = M.shape[1]
            if groups < 1 or dim % groups != 0:
                raise ValueError(f"{name} has {groups} groups, which must divide dim = {dim}")
            check_shape(M, name, (batch, groups, n, L), "(batch, G, N, L)")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        check_tensor(v, name, ndim=1, optional=True)
        check_shape(v, name, (dim,), "(dim,)")
    check_tensor(z, "z", ndim=3, optional=True)
    check_shape(z, "z", u.shape, "(batch, dim, L)")
    check_same_device(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """The selective scan of Mamba, with mamba_ssm ``selective_scan_fn``'s signature and semantics (real A).

    Shapes: u, delta, z ``(batch, dim, L)``; A ``(dim, N)`` (N <= 256); B, C ``(batch, N, L)`` or
    ``(batch, G, N, L)`` (G groups of dim/G channels); D, delta_bias ``(dim,)``.
    Inputs may be float16/bfloat16/float32 (state and arithmetic in float32) or float64.
    Returns out ``(batch, dim, L)`` in u's dtype, and also last_state ``(batch, dim, N)`` (float32, or
    float64 for float64 inputs) when ``return_last_state``. Differentiable in every tensor argument.

    Under ``torch.autocast`` the activations u, delta, B, C and z are cast to the autocast dtype (as
    mamba_ssm's kernels take them, in the input dtype), A, D and delta_bias are left as they are, the state
    and arithmetic stay float32, and out is in the autocast dtype (last_state float32).
    """
    amp = autocast_dtype(u)
    if amp is not None:
        args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        return run_cast(selective_scan, amp, args, (0, 1, 3, 4, 6))
    _validate(u, delta, A, B, C, D, z, delta_bias)
    backend = resolve(SELECTIVE_SCAN, u.device)
    out, last_state = _selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), backend)
    return (out, last_state) if return_last_state else out


__all__ = ["selective_scan", "SELECTIVE_SCAN", "FLOAT_DTYPES"]
