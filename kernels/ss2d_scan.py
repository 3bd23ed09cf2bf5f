"""Triton kernels of the fused SS2D scan (MedMamba's four-direction cross-scan, selective scan and merge in one
pass), installed as ``medkernels.kernels.ss2d_scan``.

Launchers (contracts of csrc/ops.h, contiguous tensors, everything in pixel order p = h * W + w):

* ``ss2d_scan_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus) -> [out]``
* ``ss2d_scan_bwd(dout, u, delta, A, B, C, D, delta_bias, delta_softplus)
  -> [du, ddelta, dA, dB, dC, dD, ddelta_bias]`` (None for absent inputs)

u (batch, D, H, W) of dtype T, shared by the four directions; delta (batch, 4, D, H, W) T; A (4 * D, N) in the
state dtype (row k * D + d: direction k, channel d); B, C (batch, 4, N, H, W) T; D, delta_bias (4 * D,) in
the state dtype; out (batch, D, H * W) T, the four directions' outputs summed per pixel.

The recurrence is the one of ``medkernels.kernels.selective_scan`` (its jitted ``_scan_fwd_range`` /
``_scan_bwd_range``), with position i of direction k read at pixel ``_pixel(i, H, W, L, k)``: row-major,
column-major, and both reversed.  A program owns (batch b, a block of channels) and loops over the four
directions itself (``tl.static_range``), adding each direction's output into a float32 (float64) buffer of
(batch, D, L): no two programs write the same pixel, so the sum is deterministic; the buffer is rounded once
to T with torch.  The backward does the same for du, and writes dB/dC as per-channel-block partials
(batch, n_blocks, 4, N, L) and dA/dD/ddelta_bias as per-batch partials, all summed with torch afterwards.
"""
import torch
import triton
import triton.language as tl

from ._utils import SUPPORTED_DTYPES, acc_dtype, check_tensor, launch
from .selective_scan import (_channel_tile, _load_channel_params, _scan_bwd_range, _scan_fwd_range, block_sizes, check_u,
                             chunk_length)

__all__ = ["ss2d_scan_fwd", "ss2d_scan_bwd", "SUPPORTED_DTYPES"]


@triton.jit
def _ss2d_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, out_ptr, states_ptr,
    Dim, N, H, W, L, n_chunks,
    SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
    WRITE_OUT: tl.constexpr, SAVE_STATES: tl.constexpr,
    CHUNK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: batch b, channels d0 .. d0 + BLOCK_D - 1, the four directions one after the other, each
    # chunk walked sequentially.
    b = tl.program_id(0).to(tl.int64)
    d0 = tl.program_id(1).to(tl.int64) * BLOCK_D
    offs_d, offs_n, mask_d, mask_n, mask_dn, state_tile = _channel_tile(d0, Dim, N, n_chunks, BLOCK_D, BLOCK_N)
    row0 = (b * Dim + d0) * L
    for k in tl.static_range(4):
        ch = k * Dim + d0  # row of A, D, delta_bias
        A, Dskip, bias = _load_channel_params(A_ptr + ch * N, D_ptr + ch, bias_ptr + ch, offs_d, mask_d, offs_n,
                                              mask_n, N, HAS_D, HAS_BIAS)
        drow0 = ((b * 4 + k) * Dim + d0) * L
        bc0 = (b * 4 + k) * N * L
        x = tl.zeros((BLOCK_D, BLOCK_N), A.dtype)
        for c in range(0, n_chunks):
            if SAVE_STATES:
                tl.store(states_ptr + ((b * 4 + k) * Dim + d0) * n_chunks * N + c * N + state_tile, x, mask=mask_dn)
            x = _scan_fwd_range(
                x, c * CHUNK_L, tl.minimum(c * CHUNK_L + CHUNK_L, L),
                u_ptr + row0, delta_ptr + drow0, B_ptr + bc0, C_ptr + bc0, u_ptr, out_ptr + row0, states_ptr,
                offs_d, mask_d, offs_n, mask_n, A, Dskip, bias, H, W, L,
                k, SOFTPLUS, False, 2 if WRITE_OUT else 0, False, BLOCK_D, BLOCK_N,
            )
        tl.debug_barrier()  # the next direction reads the output sums stored by other threads


@triton.jit
def _ss2d_scan_bwd_kernel(
    dout_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr,
    states_ptr, steps_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    Dim, N, H, W, L, n_chunks,
    SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
    CHUNK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: batch b, channel block blk; per direction, the chunks in reverse, each recomputed from its
    # saved start state; du of the four directions summed in the float buffer du_ptr.
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    n_blocks = tl.num_programs(1)
    d0 = blk * BLOCK_D
    offs_d, offs_n, mask_d, mask_n, mask_dn, state_tile = _channel_tile(d0, Dim, N, n_chunks, BLOCK_D, BLOCK_N)
    row0 = (b * Dim + d0) * L
    steps = steps_ptr + (b * n_blocks + blk) * (CHUNK_L + 1) * (BLOCK_D * BLOCK_N)
    tile = offs_d[:, None] * BLOCK_N + offs_n[None, :]
    for k in tl.static_range(4):
        ch = k * Dim + d0
        A, Dskip, bias = _load_channel_params(A_ptr + ch * N, D_ptr + ch, bias_ptr + ch, offs_d, mask_d, offs_n,
                                              mask_n, N, HAS_D, HAS_BIAS)
        drow0 = ((b * 4 + k) * Dim + d0) * L
        bc0 = (b * 4 + k) * N * L
        part0 = ((b * n_blocks + blk) * 4 + k) * N * L
        h = tl.zeros((BLOCK_D, BLOCK_N), A.dtype)
        dA_acc = tl.zeros((BLOCK_D, BLOCK_N), A.dtype)
        dD_acc = tl.zeros((BLOCK_D,), A.dtype)
        dbias_acc = tl.zeros((BLOCK_D,), A.dtype)
        for cc in range(0, n_chunks):
            c = n_chunks - 1 - cc
            start = c * CHUNK_L
            stop = tl.minimum(start + CHUNK_L, L)
            x0 = tl.load(states_ptr + ((b * 4 + k) * Dim + d0) * n_chunks * N + c * N + state_tile,
                         mask=mask_dn, other=0.0)
            tl.store(steps + tile, x0, mask=mask_dn)
            _scan_fwd_range(
                x0, start, stop,
                u_ptr + row0, delta_ptr + drow0, B_ptr + bc0, C_ptr + bc0, u_ptr, dout_ptr, steps,
                offs_d, mask_d, offs_n, mask_n, A, Dskip, bias, H, W, L,
                k, SOFTPLUS, False, 0, True, BLOCK_D, BLOCK_N,
            )
            tl.debug_barrier()  # the scratch written above is read by other threads below
            h, dA_acc, dD_acc, dbias_acc = _scan_bwd_range(
                h, dA_acc, dD_acc, dbias_acc, start, stop,
                u_ptr + row0, delta_ptr + drow0, B_ptr + bc0, C_ptr + bc0, u_ptr, dout_ptr + row0,
                du_ptr + row0, ddelta_ptr + drow0, u_ptr, dB_ptr + part0, dC_ptr + part0, steps,
                offs_d, mask_d, offs_n, mask_n, A, Dskip, bias, H, W, L,
                k, SOFTPLUS, False, True, BLOCK_D, BLOCK_N,
            )
            tl.debug_barrier()  # the scratch and du sums are rewritten next
        pn = (b * 4 * Dim + ch) * N + offs_d[:, None] * N + offs_n[None, :]
        tl.store(dA_ptr + pn, dA_acc, mask=mask_dn)
        tl.store(dD_ptr + b * 4 * Dim + ch + offs_d, dD_acc, mask=mask_d)
        tl.store(dbias_ptr + b * 4 * Dim + ch + offs_d, dbias_acc, mask=mask_d)


def _check_args(op, u, delta, A, B, C, D, delta_bias):
    check_u(u, op, 4, "(batch, D, H, W)")
    batch, dim, H, W = u.shape
    dev, T = u.device, u.dtype
    S = acc_dtype(T)
    check_tensor(u, op, "u", u.shape, "(batch, D, H, W)", T, dev)
    check_tensor(delta, op, "delta", (batch, 4, dim, H, W), "(batch, 4, D, H, W)", T, dev)
    if not isinstance(A, torch.Tensor) or A.dim() != 2:
        raise ValueError(f"{op}: expected A to be a 2-D tensor of shape (4 * D, N)")
    N = A.shape[1]
    check_tensor(A, op, "A", (4 * dim, N), "(4 * D, N)", S, dev)
    check_tensor(B, op, "B", (batch, 4, N, H, W), "(batch, 4, N, H, W)", T, dev)
    check_tensor(C, op, "C", (batch, 4, N, H, W), "(batch, 4, N, H, W)", T, dev)
    check_tensor(D, op, "D", (4 * dim,), "(4 * D,)", S, dev, optional=True)
    check_tensor(delta_bias, op, "delta_bias", (4 * dim,), "(4 * D,)", S, dev, optional=True)
    return batch, dim, H, W, N


def _forward_launch(u, delta, A, B, C, D, delta_bias, delta_softplus, write_out, save_states):
    batch, dim, H, W = u.shape
    N, L = A.shape[1], H * W
    block_d, block_n = block_sizes(dim, True, N)
    chunk = chunk_length()
    n_chunks = triton.cdiv(L, chunk)
    S = A.dtype
    acc = torch.zeros((batch, dim, L), dtype=S, device=u.device) if write_out else None
    states = torch.empty((batch, 4, dim, n_chunks, N), dtype=S, device=u.device) if save_states else None
    launch(_ss2d_scan_fwd_kernel, (batch, triton.cdiv(dim, block_d)), u.device,
           u, delta, A, B, C, A if D is None else D, A if delta_bias is None else delta_bias,
           A if acc is None else acc, A if states is None else states,
           dim, N, H, W, L, n_chunks,
           SOFTPLUS=bool(delta_softplus), HAS_D=D is not None, HAS_BIAS=delta_bias is not None,
           WRITE_OUT=write_out, SAVE_STATES=save_states,
           CHUNK_L=chunk, BLOCK_D=block_d, BLOCK_N=block_n)
    return acc, states


def ss2d_scan_fwd(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """-> [out (batch, D, H * W) in u's dtype]: the four directions' outputs summed per pixel."""
    batch, dim, H, W, N = _check_args("ss2d_scan_fwd", u, delta, A, B, C, D, delta_bias)
    if u.numel() == 0:
        return [torch.zeros((batch, dim, H * W), dtype=u.dtype, device=u.device)]
    acc, _ = _forward_launch(u, delta, A, B, C, D, delta_bias, delta_softplus, True, False)
    return [acc.to(u.dtype)]


def ss2d_scan_bwd(dout, u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """-> [du, ddelta, dA, dB, dC, dD, ddelta_bias], each with its input's shape and dtype (None where the input
    is None)."""
    op = "ss2d_scan_bwd"
    batch, dim, H, W, N = _check_args(op, u, delta, A, B, C, D, delta_bias)
    L = H * W
    if not isinstance(dout, torch.Tensor):
        raise TypeError(f"{op}: expected dout to be a torch.Tensor, got {type(dout).__name__}")
    if tuple(dout.shape) == tuple(u.shape):
        dout = dout.reshape(batch, dim, L)
    check_tensor(dout, op, "dout", (batch, dim, L), "(batch, D, H * W)", u.dtype, u.device)
    S = A.dtype

    def opt(t, g):
        return None if t is None else g

    if u.numel() == 0:
        return [torch.zeros_like(u), torch.zeros_like(delta), torch.zeros_like(A), torch.zeros_like(B),
                torch.zeros_like(C), opt(D, torch.zeros_like(A[:, 0])), opt(delta_bias, torch.zeros_like(A[:, 0]))]
    block_d, block_n = block_sizes(dim, True, N)
    n_blocks = triton.cdiv(dim, block_d)
    chunk = chunk_length()
    if L <= chunk:  # one chunk, starting from the zero state: no forward pass needed
        states = torch.zeros((batch, 4, dim, 1, N), dtype=S, device=u.device)
    else:
        _, states = _forward_launch(u, delta, A, B, C, D, delta_bias, delta_softplus, False, True)
    n_chunks = states.shape[3]
    dev = u.device
    steps = torch.empty((batch, n_blocks, chunk + 1, block_d * block_n), dtype=S, device=dev)
    du_acc = torch.zeros((batch, dim, L), dtype=S, device=dev)
    ddelta = torch.empty_like(delta)
    dA_part = torch.empty((batch, 4 * dim, N), dtype=S, device=dev)
    dB_part = torch.empty((batch, n_blocks, 4, N, L), dtype=S, device=dev)
    dC_part = torch.empty((batch, n_blocks, 4, N, L), dtype=S, device=dev)
    dD_part = torch.empty((batch, 4 * dim), dtype=S, device=dev)
    dbias_part = torch.empty((batch, 4 * dim), dtype=S, device=dev)
    launch(_ss2d_scan_bwd_kernel, (batch, n_blocks), dev,
           dout, u, delta, A, B, C, A if D is None else D, A if delta_bias is None else delta_bias,
           states, steps,
           du_acc, ddelta, dA_part, dB_part, dC_part, dD_part, dbias_part,
           dim, N, H, W, L, n_chunks,
           SOFTPLUS=bool(delta_softplus), HAS_D=D is not None, HAS_BIAS=delta_bias is not None,
           CHUNK_L=chunk, BLOCK_D=block_d, BLOCK_N=block_n)
    du = du_acc.reshape(u.shape).to(u.dtype)
    dB = dB_part.sum(1).reshape(B.shape).to(B.dtype)
    dC = dC_part.sum(1).reshape(C.shape).to(C.dtype)
    return [du, ddelta, dA_part.sum(0), dB, dC, opt(D, dD_part.sum(0)), opt(delta_bias, dbias_part.sum(0))]
