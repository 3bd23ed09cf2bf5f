"""Triton kernels of the selective scan (Mamba's recurrence with real A), installed as
``medkernels.kernels.selective_scan``.

Launchers (contracts of csrc/ops.h, contiguous tensors):

* ``selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> (out, last_state)``
* ``selective_scan_bwd(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
  -> [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias]`` (None for absent inputs)

u, delta, z: (batch, D, L) of dtype T (float16, bfloat16, float32 or float64); A (D, N) and D, delta_bias (D,)
in the state dtype (float32, float64 for float64 inputs); B, C grouped (batch, G, N, L) of dtype T.
The formulas are those of csrc/selective_scan_math.h.

Design
------
A program owns (batch b, a block of BLOCK_D channels) with the whole state (BLOCK_D, N) in registers and walks
the positions sequentially (``_scan_fwd_range``).  The walk is written over a range [start, stop) of positions
from a given state, so the sequence is processed chunk by chunk (CHUNK positions).

Position i of the sequence maps to memory offset ``_pixel(i, H, W, L, DIRECTION)``: identity here
(DIRECTION 0), the four cross-scan orders in ``medkernels.kernels.ss2d_scan``, which reuses these helpers.

Backward, with no (batch, D, L, N) storage: a forward pass (the forward kernel with SAVE_STATES) stores the
state at the start of every chunk into (batch, D, n_chunks, N) (skipped when L <= CHUNK: the one chunk starts
from zero); the backward kernel then takes the chunks in
reverse, recomputes the chunk's states into a per-program scratch (CHUNK + 1, BLOCK_D, N) and runs the reverse
recurrence over it (``_scan_bwd_range``).  A channel block never straddles two groups of B/C, so dB/dC are
written as per-block partials (batch, n_blocks, N, L) and summed with torch afterwards; dA, dD, ddelta_bias
are per-(batch, channel) partials summed over the batch with torch: all deterministic.

State and arithmetic are float32 for float16/bfloat16/float32 inputs, float64 for float64 inputs (the dtype
of A).  On a GPU tensors must be CUDA tensors; CPU tensors need ``TRITON_INTERPRET=1`` set before import.
"""

import torch
import triton
import triton.language as tl

from ._utils import SUPPORTED_DTYPES, acc_dtype, check_tensor, launch, round_to_bf16, tile_size

__all__ = ["selective_scan_fwd", "selective_scan_bwd", "SUPPORTED_DTYPES", "CHUNK"]

# Positions per chunk of the backward (the recomputed states of one chunk live in the program's scratch).
CHUNK = 64


# ----------------------------------------------------------------------------------------------------------
# jitted helpers shared with ss2d_scan.py
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _pixel(i, H, W, L, DIRECTION: tl.constexpr):
    """Memory offset (pixel, p = h * W + w) of position i of scan direction DIRECTION: 0 row-major
    (identity, also the plain 1-D sequence), 1 column-major, 2 reversed row-major, 3 reversed column-major."""
    if DIRECTION == 0:
        p = i
    elif DIRECTION == 1:
        p = (i % H) * W + i // H
    elif DIRECTION == 2:
        p = L - 1 - i
    else:
        j = L - 1 - i
        p = (j % H) * W + j // H
    return p


@triton.jit
def _dt_of(delta, bias, SOFTPLUS: tl.constexpr):
    """(dt, d dt / d delta) from the raw delta: delta + bias, then softplus (linear above 20, as torch) when
    asked.  Self-contained (no nested helper calls: the interpreter pays for each)."""
    v = delta + bias
    if SOFTPLUS:
        e = tl.exp(tl.minimum(v, 20.0))
        w = 1.0 + e
        # log1p(e) accurate for small e (Goldberg): log(w) * e / (w - 1), w = 1 + e rounded
        log1p_e = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
        dt = tl.where(v <= 20.0, log1p_e, v)
        ddt = tl.where(v <= 20.0, e / w, 1.0)  # sigmoid(v) = e / (1 + e)
    else:
        dt = v
        ddt = tl.full(v.shape, 1.0, v.dtype)
    return dt, ddt


@triton.jit
def _store_bf16(ptr, value, mask):
    """Store float32/float64 value as bfloat16, rounding to nearest even (the interpreter would truncate
    otherwise; same result as the GPU conversion)."""
    tl.store(ptr, round_to_bf16(value.to(tl.float32)), mask=mask)


@triton.jit
def _scan_fwd_range(
    x, start, stop,
    u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, out_ptr, steps_ptr,
    offs_d, mask_d, offs_n, mask_n, A, Dskip, bias,
    H, W, L,
    DIRECTION: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr,
    OUT_MODE: tl.constexpr, STORE_STEPS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Walks positions start..stop-1 from state x (BLOCK_D, BLOCK_N) and returns the state after them.

    Pointers are offset to the program's first channel: u/delta/z/out rows are offs_d * L + p, B/C rows
    offs_n * L + p (the channel block's group).  OUT_MODE: 0 no output, 1 store out in out_ptr's dtype,
    2 add out to the float32/float64 buffer out_ptr.  STORE_STEPS: state after position start + j stored
    at entry j + 1 of steps_ptr (entries of BLOCK_D * BLOCK_N)."""
    acc_t = x.dtype
    mask_dn = mask_d[:, None] & mask_n[None, :]
    tile = offs_d[:, None] * BLOCK_N + offs_n[None, :]
    for t in range(start, stop):
        if DIRECTION == 0:
            p = t
        else:
            p = _pixel(t, H, W, L, DIRECTION)
        u = tl.load(u_ptr + offs_d * L + p, mask=mask_d, other=0.0).to(acc_t)
        delta = tl.load(delta_ptr + offs_d * L + p, mask=mask_d, other=0.0).to(acc_t)
        dt, _ = _dt_of(delta, bias, SOFTPLUS)
        Bt = tl.load(B_ptr + offs_n * L + p, mask=mask_n, other=0.0).to(acc_t)
        decay = tl.exp(dt[:, None] * A)
        # padding lanes (n >= N) stay 0: an infinite u or dt times their zero B / A would make NaNs that the
        # output's sum over n would spread
        x = tl.where(mask_n[None, :], decay * x + (dt * u)[:, None] * Bt[None, :], 0.0)
        if STORE_STEPS:
            tl.store(steps_ptr + (t - start + 1) * (BLOCK_D * BLOCK_N) + tile, x, mask=mask_dn)
        if OUT_MODE != 0:
            Ct = tl.load(C_ptr + offs_n * L + p, mask=mask_n, other=0.0).to(acc_t)
            y = tl.sum(x * Ct[None, :], axis=1) + Dskip * u
            if HAS_Z:
                zv = tl.load(z_ptr + offs_d * L + p, mask=mask_d, other=0.0).to(acc_t)
                y = y * (zv / (1.0 + tl.exp(-zv)))
            if OUT_MODE == 1:
                if out_ptr.dtype.element_ty == tl.bfloat16:
                    _store_bf16(out_ptr + offs_d * L + p, y, mask_d)
                else:
                    tl.store(out_ptr + offs_d * L + p, y.to(out_ptr.dtype.element_ty), mask=mask_d)
            else:
                prev = tl.load(out_ptr + offs_d * L + p, mask=mask_d, other=0.0)
                tl.store(out_ptr + offs_d * L + p, prev + y.to(prev.dtype), mask=mask_d)
    return x


@triton.jit
def _scan_bwd_range(
    h, dA_acc, dD_acc, dbias_acc, start, stop,
    u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, dout_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, steps_ptr,
    offs_d, mask_d, offs_n, mask_n, A, Dskip, bias,
    H, W, L,
    DIRECTION: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, DU_ACCUMULATE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Reverse recurrence over positions stop-1..start, given the states of the range in steps_ptr (entry 0:
    the state before start, entry j + 1: after start + j).  h is d loss / d x carried from position stop
    (already multiplied by its decay).  Stores du (added to a float buffer when DU_ACCUMULATE), ddelta, dz, and
    this block's partial dB/dC (rows offs_n * L + p); returns the carried h and the dA/dD/ddelta_bias sums."""
    acc_t = h.dtype
    mask_dn = mask_d[:, None] & mask_n[None, :]
    tile = offs_d[:, None] * BLOCK_N + offs_n[None, :]
    for j in range(0, stop - start):
        t = stop - 1 - j
        if DIRECTION == 0:
            p = t
        else:
            p = _pixel(t, H, W, L, DIRECTION)
        row = offs_d * L + p
        u = tl.load(u_ptr + row, mask=mask_d, other=0.0).to(acc_t)
        delta = tl.load(delta_ptr + row, mask=mask_d, other=0.0).to(acc_t)
        dt, dt_grad = _dt_of(delta, bias, SOFTPLUS)
        Bt = tl.load(B_ptr + offs_n * L + p, mask=mask_n, other=0.0).to(acc_t)
        Ct = tl.load(C_ptr + offs_n * L + p, mask=mask_n, other=0.0).to(acc_t)
        x_t = tl.load(steps_ptr + (t - start + 1) * (BLOCK_D * BLOCK_N) + tile, mask=mask_dn, other=0.0)
        x_prev = tl.load(steps_ptr + (t - start) * (BLOCK_D * BLOCK_N) + tile, mask=mask_dn, other=0.0)
        g = tl.load(dout_ptr + row, mask=mask_d, other=0.0).to(acc_t)
        if HAS_Z:
            zv = tl.load(z_ptr + row, mask=mask_d, other=0.0).to(acc_t)
            y = tl.sum(x_t * Ct[None, :], axis=1) + Dskip * u
            s = 1.0 / (1.0 + tl.exp(-zv))
            dz = g * y * (s * (1.0 + zv * (1.0 - s)))  # d silu(z) / dz = s (1 + z (1 - s))
            if dz_ptr.dtype.element_ty == tl.bfloat16:
                _store_bf16(dz_ptr + row, dz, mask_d)
            else:
                tl.store(dz_ptr + row, dz.to(dz_ptr.dtype.element_ty), mask=mask_d)
            g = g * (zv * s)
        h = tl.where(mask_n[None, :], h + g[:, None] * Ct[None, :], 0.0)
        decay = tl.where(mask_n[None, :], tl.exp(dt[:, None] * A), 0.0)
        tl.store(dC_ptr + offs_n * L + p, tl.sum(g[:, None] * x_t, axis=0), mask=mask_n)
        tl.store(dB_ptr + offs_n * L + p, tl.sum(h * (dt * u)[:, None], axis=0), mask=mask_n)
        du = g * Dskip + tl.sum(h * Bt[None, :], axis=1) * dt
        if DU_ACCUMULATE:
            prev = tl.load(du_ptr + row, mask=mask_d, other=0.0)
            tl.store(du_ptr + row, prev + du.to(prev.dtype), mask=mask_d)
        else:
            if du_ptr.dtype.element_ty == tl.bfloat16:
                _store_bf16(du_ptr + row, du, mask_d)
            else:
                tl.store(du_ptr + row, du.to(du_ptr.dtype.element_ty), mask=mask_d)
        hx = h * x_prev * decay
        ddt = tl.sum(hx * A + h * Bt[None, :] * u[:, None], axis=1)
        dA_acc += hx * dt[:, None]
        dD_acc += g * u
        ddelta = ddt * dt_grad
        dbias_acc += ddelta
        if ddelta_ptr.dtype.element_ty == tl.bfloat16:
            _store_bf16(ddelta_ptr + row, ddelta, mask_d)
        else:
            tl.store(ddelta_ptr + row, ddelta.to(ddelta_ptr.dtype.element_ty), mask=mask_d)
        h = h * decay
    return h, dA_acc, dD_acc, dbias_acc


@triton.jit
def _load_channel_params(A_ptr, D_ptr, bias_ptr, offs_d, mask_d, offs_n, mask_n, N,
                         HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """A (BLOCK_D, BLOCK_N), D and delta_bias (BLOCK_D,) of the channels offs_d (zeros where absent); pointers
    offset to the program's first channel."""
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_d[:, None] & mask_n[None, :], other=0.0)
    if HAS_D:
        Dskip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
    else:
        Dskip = tl.zeros(offs_d.shape, A.dtype)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
    else:
        bias = tl.zeros(offs_d.shape, A.dtype)
    return A, Dskip, bias


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _channel_tile(d0, Dim, N, n_chunks, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """A program's channels d0 .. d0 + BLOCK_D - 1 and its states: their offsets and masks, and the offsets of
    the (channel, state) tile in a per-chunk saved-state buffer (channel stride n_chunks * N)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = d0 + offs_d < Dim
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    state_tile = offs_d[:, None] * (n_chunks * N) + offs_n[None, :]
    return offs_d, offs_n, mask_d, mask_n, mask_dn, state_tile


@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr, states_ptr,
    Dim, G, N, L, n_chunks,
    SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    WRITE_OUT: tl.constexpr, SAVE_STATES: tl.constexpr,
    CHUNK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: batch b, channels d0 .. d0 + BLOCK_D - 1 (one group of B/C), all N states, all positions.
    b = tl.program_id(0).to(tl.int64)
    d0 = tl.program_id(1).to(tl.int64) * BLOCK_D
    g = d0 // (Dim // G)
    offs_d, offs_n, mask_d, mask_n, mask_dn, state_tile = _channel_tile(d0, Dim, N, n_chunks, BLOCK_D, BLOCK_N)
    A, Dskip, bias = _load_channel_params(A_ptr + d0 * N, D_ptr + d0, bias_ptr + d0, offs_d, mask_d, offs_n,
                                          mask_n, N, HAS_D, HAS_BIAS)
    row0 = (b * Dim + d0) * L
    bc0 = (b * G + g) * N * L
    x = tl.zeros((BLOCK_D, BLOCK_N), A.dtype)
    for c in range(0, n_chunks):
        if SAVE_STATES:
            tl.store(states_ptr + (b * Dim + d0) * n_chunks * N + c * N + state_tile, x, mask=mask_dn)
        x = _scan_fwd_range(
            x, c * CHUNK_L, tl.minimum(c * CHUNK_L + CHUNK_L, L),
            u_ptr + row0, delta_ptr + row0, B_ptr + bc0, C_ptr + bc0, z_ptr + row0, out_ptr + row0, states_ptr,
            offs_d, mask_d, offs_n, mask_n, A, Dskip, bias, 1, L, L,
            0, SOFTPLUS, HAS_Z, 1 if WRITE_OUT else 0, False, BLOCK_D, BLOCK_N,
        )
    tl.store(last_ptr + (b * Dim + d0) * N + offs_d[:, None] * N + offs_n[None, :], x, mask=mask_dn)


@triton.jit
def _selective_scan_bwd_kernel(
    dout_ptr, dlast_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    states_ptr, steps_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    Dim, G, N, L, n_chunks,
    SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DLAST: tl.constexpr,
    CHUNK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: batch b, channel block blk; the chunks in reverse, each recomputed from its saved start state.
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    n_blocks = tl.num_programs(1)
    d0 = blk * BLOCK_D
    g = d0 // (Dim // G)
    offs_d, offs_n, mask_d, mask_n, mask_dn, state_tile = _channel_tile(d0, Dim, N, n_chunks, BLOCK_D, BLOCK_N)
    A, Dskip, bias = _load_channel_params(A_ptr + d0 * N, D_ptr + d0, bias_ptr + d0, offs_d, mask_d, offs_n,
                                          mask_n, N, HAS_D, HAS_BIAS)
    row0 = (b * Dim + d0) * L
    bc0 = (b * G + g) * N * L
    part0 = (b * n_blocks + blk) * N * L
    steps = steps_ptr + (b * n_blocks + blk) * (CHUNK_L + 1) * (BLOCK_D * BLOCK_N)
    tile = offs_d[:, None] * BLOCK_N + offs_n[None, :]
    pn = (b * Dim + d0) * N + offs_d[:, None] * N + offs_n[None, :]
    if HAS_DLAST:
        h = tl.load(dlast_ptr + pn, mask=mask_dn, other=0.0).to(A.dtype)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), A.dtype)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), A.dtype)
    dD_acc = tl.zeros((BLOCK_D,), A.dtype)
    dbias_acc = tl.zeros((BLOCK_D,), A.dtype)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        start = c * CHUNK_L
        stop = tl.minimum(start + CHUNK_L, L)
        x0 = tl.load(states_ptr + (b * Dim + d0) * n_chunks * N + c * N + state_tile, mask=mask_dn, other=0.0)
        tl.store(steps + tile, x0, mask=mask_dn)
        _scan_fwd_range(
            x0, start, stop,
            u_ptr + row0, delta_ptr + row0, B_ptr + bc0, C_ptr + bc0, z_ptr + row0, dout_ptr, steps,
            offs_d, mask_d, offs_n, mask_n, A, Dskip, bias, 1, L, L,
            0, SOFTPLUS, HAS_Z, 0, True, BLOCK_D, BLOCK_N,
        )
        tl.debug_barrier()  # the scratch written above is read by other threads below
        h, dA_acc, dD_acc, dbias_acc = _scan_bwd_range(
            h, dA_acc, dD_acc, dbias_acc, start, stop,
            u_ptr + row0, delta_ptr + row0, B_ptr + bc0, C_ptr + bc0, z_ptr + row0, dout_ptr + row0,
            du_ptr + row0, ddelta_ptr + row0, dz_ptr + row0, dB_ptr + part0, dC_ptr + part0, steps,
            offs_d, mask_d, offs_n, mask_n, A, Dskip, bias, 1, L, L,
            0, SOFTPLUS, HAS_Z, False, BLOCK_D, BLOCK_N,
        )
        tl.debug_barrier()  # the next chunk overwrites the scratch
    tl.store(dA_ptr + pn, dA_acc, mask=mask_dn)
    tl.store(dD_ptr + b * Dim + d0 + offs_d, dD_acc, mask=mask_d)
    tl.store(dbias_ptr + b * Dim + d0 + offs_d, dbias_acc, mask=mask_d)


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------
def check_u(u, op, rank, layout):
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"{op}: expected u to be a torch.Tensor, got {type(u).__name__}")
    if u.dim() != rank:
        raise ValueError(f"{op}: expected u of shape {layout}, got shape {tuple(u.shape)}")
    if u.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: expected u to have dtype float16, bfloat16, float32 or float64, got {u.dtype}")


def block_sizes(channels_per_block_unit, masked_ok, N):
    """(BLOCK_D, BLOCK_N). BLOCK_D divides `channels_per_block_unit` (so a block stays inside one group of
    B/C) unless masked_ok; the interpreter pays per program, a GPU per register (see tile_size)."""
    block_n = triton.next_power_of_2(N)
    cap = tile_size(256, max(1, 512 // block_n))
    if masked_ok:
        return min(cap, triton.next_power_of_2(channels_per_block_unit)), block_n
    block_d = 1
    while block_d * 2 <= cap and channels_per_block_unit % (block_d * 2) == 0:
        block_d *= 2
    return block_d, block_n


def chunk_length():
    """Positions per chunk of the backward: CHUNK, or 4 with small tiles (so that short sequences span several
    chunks)."""
    return tile_size(CHUNK, CHUNK, 4)


def _check_args(op, u, delta, A, B, C, D, z, delta_bias):
    check_u(u, op, 3, "(batch, D, L)")
    batch, dim, L = u.shape
    dev, T = u.device, u.dtype
    S = acc_dtype(T)
    check_tensor(u, op, "u", u.shape, "(batch, D, L)", T, dev)
    check_tensor(delta, op, "delta", u.shape, "(batch, D, L)", T, dev)
    if not isinstance(A, torch.Tensor) or A.dim() != 2:
        raise ValueError(f"{op}: expected A to be a 2-D tensor of shape (D, N)")
    N = A.shape[1]
    check_tensor(A, op, "A", (dim, N), "(D, N)", S, dev)
    if not isinstance(B, torch.Tensor) or B.dim() != 4:
        raise ValueError(f"{op}: expected B to be a 4-D tensor of shape (batch, G, N, L)")
    G = B.shape[1]
    if G < 1 or dim % G != 0:
        raise ValueError(f"{op}: B has {G} groups, which must divide D = {dim}")
    check_tensor(B, op, "B", (batch, G, N, L), "(batch, G, N, L)", T, dev)
    check_tensor(C, op, "C", (batch, G, N, L), "(batch, G, N, L)", T, dev)
    check_tensor(D, op, "D", (dim,), "(D,)", S, dev, optional=True)
    check_tensor(z, op, "z", u.shape, "(batch, D, L)", T, dev, optional=True)
    check_tensor(delta_bias, op, "delta_bias", (dim,), "(D,)", S, dev, optional=True)
    return batch, dim, L, N, G


def _forward_launch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, write_out, save_states):
    batch, dim, L, N, G = u.shape[0], u.shape[1], u.shape[2], A.shape[1], B.shape[1]
    block_d, block_n = block_sizes(dim // G, G == 1, N)
    chunk = chunk_length()
    n_chunks = triton.cdiv(L, chunk)
    S = A.dtype
    out = torch.empty_like(u) if write_out else None
    last = torch.empty((batch, dim, N), dtype=S, device=u.device)
    states = torch.empty((batch, dim, n_chunks, N), dtype=S, device=u.device) if save_states else None
    grid = (batch, triton.cdiv(dim, block_d))
    launch(_selective_scan_fwd_kernel, grid, u.device,
           u, delta, A, B, C, A if D is None else D, u if z is None else z, A if delta_bias is None else delta_bias,
           u if out is None else out, last, last if states is None else states,
           dim, G, N, L, n_chunks,
           SOFTPLUS=bool(delta_softplus), HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
           WRITE_OUT=write_out, SAVE_STATES=save_states,
           CHUNK_L=chunk, BLOCK_D=block_d, BLOCK_N=block_n)
    return out, last, states


def selective_scan_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """-> (out (batch, D, L) in u's dtype, last_state (batch, D, N) in the state dtype)."""
    batch, dim, L, N, G = _check_args("selective_scan_fwd", u, delta, A, B, C, D, z, delta_bias)
    if L == 0 or batch * dim == 0:
        return torch.empty_like(u), torch.zeros((batch, dim, N), dtype=A.dtype, device=u.device)
    out, last, _ = _forward_launch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True, False)
    return out, last


def selective_scan_bwd(dout, dlast_state, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """-> [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias], each with its input's shape and dtype (None where the
    input is None)."""
    op = "selective_scan_bwd"
    batch, dim, L, N, G = _check_args(op, u, delta, A, B, C, D, z, delta_bias)
    check_tensor(dout, op, "dout", u.shape, "(batch, D, L)", u.dtype, u.device)
    check_tensor(dlast_state, op, "dlast_state", (batch, dim, N), "(batch, D, N)", A.dtype, u.device, optional=True)
    S = A.dtype

    def opt(t, g):
        return None if t is None else g

    if L == 0 or batch * dim == 0:
        z_ = torch.zeros
        return [torch.zeros_like(u), torch.zeros_like(delta), torch.zeros_like(A), torch.zeros_like(B),
                torch.zeros_like(C), opt(D, z_((dim,), dtype=S, device=u.device)), opt(z, torch.zeros_like(u)),
                opt(delta_bias, z_((dim,), dtype=S, device=u.device))]
    block_d, block_n = block_sizes(dim // G, G == 1, N)
    n_blocks = triton.cdiv(dim, block_d)
    chunk = chunk_length()
    if L <= chunk:  # one chunk, starting from the zero state: no forward pass needed
        states = torch.zeros((batch, dim, 1, N), dtype=S, device=u.device)
    else:
        _, _, states = _forward_launch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, False, True)
    n_chunks = states.shape[2]
    dev = u.device
    steps = torch.empty((batch, n_blocks, chunk + 1, block_d * block_n), dtype=S, device=dev)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(u) if z is not None else None
    dA_part = torch.empty((batch, dim, N), dtype=S, device=dev)
    dB_part = torch.empty((batch, n_blocks, N, L), dtype=S, device=dev)
    dC_part = torch.empty((batch, n_blocks, N, L), dtype=S, device=dev)
    dD_part = torch.empty((batch, dim), dtype=S, device=dev)
    dbias_part = torch.empty((batch, dim), dtype=S, device=dev)
    launch(_selective_scan_bwd_kernel, (batch, n_blocks), dev,
           dout, A if dlast_state is None else dlast_state, u, delta, A, B, C,
           A if D is None else D, u if z is None else z, A if delta_bias is None else delta_bias,
           states, steps,
           du, ddelta, du if dz is None else dz, dA_part, dB_part, dC_part, dD_part, dbias_part,
           dim, G, N, L, n_chunks,
           SOFTPLUS=bool(delta_softplus), HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
           HAS_DLAST=dlast_state is not None, CHUNK_L=chunk, BLOCK_D=block_d, BLOCK_N=block_n)
    # per-block partials of dB/dC: the blocks of one group are consecutive (a block never straddles groups,
    # or G == 1)
    dB = dB_part.reshape(batch, G, n_blocks // G, N, L).sum(2).to(B.dtype)
    dC = dC_part.reshape(batch, G, n_blocks // G, N, L).sum(2).to(C.dtype)
    dA = dA_part.sum(0)
    return [du, ddelta, dA, dB, dC, opt(D, dD_part.sum(0)), dz, opt(delta_bias, dbias_part.sum(0))]
