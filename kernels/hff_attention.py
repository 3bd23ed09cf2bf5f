"""Triton kernels of HiFuse's HFF spatial and channel gates, installed as ``medkernels.kernels.hff_attention``.

Launchers (contracts of csrc/ops.h; contiguous tensors; ``acc`` = float32, float64 for float64 x):

* ``hff_spatial_gate_fwd(x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps,
  gate_only) -> [y, batch_mean, batch_var, pooled, argmax]``
* ``hff_spatial_gate_bwd(grad, pooled, argmax, x, conv_weight, ...same..., dx_accumulate=None) -> [dx,
  dconv_weight, dbn_weight, dbn_bias]``
* ``hff_channel_gate_fwd(x, fc1_weight, fc2_weight, gate_only) -> [y, pooled, argmax]``
* ``hff_channel_gate_bwd(grad, pooled, argmax, x, fc1_weight, fc2_weight, gate_only, dx_accumulate=None)
  -> [dx, dfc1, dfc2]``

x (B, C, H, W) of dtype float16/bfloat16/float32/float64; y = x * gate in x's dtype, or the gate in acc
((B, 1, H, W) spatial, (B, C, 1, 1) channel) when ``gate_only``. With ``dx_accumulate`` (x's shape and dtype)
the backward adds dx into it in place and returns it.

Design. The passes over x are Triton kernels: the pooling (max, first argmax and mean in one pass, over the
channels of a block of pixels for the spatial gate, over the pixels of a block of (b, c) rows for the
channel gate), the gate multiply, d loss / d gate (sum of grad * x) and dx (grad * gate plus the pooling's
gradient) in one pass each. The 7x7 convolution of the (B, 2, H, W) map and its adjoints are Triton kernels
(one program per image and block of pixels, gathering each input plane's taps as one (taps, pixels) tile;
the weight gradient as per-program partials summed in a fixed order). What acts on the small map or the pooled (B, 2, C) vectors as a whole — the
BatchNorm's statistics and affine, the sigmoid, the channel MLP — is a handful of torch ops on those small
tensors. Every reduction has a fixed order: no atomics.

NaN inputs give NaN gates, but unlike the compiled kernels the pooling's argmax does not promise to point at
the first NaN (``tl.max`` / ``tl.argmax`` semantics), so the gradient of the max may be routed elsewhere.

On a GPU the tensors must be CUDA tensors; CPU tensors need ``TRITON_INTERPRET=1`` set before import.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import SUPPORTED_DTYPES, acc_dtype, check_tensor, launch, store_as, tile_size, tl_acc_dtype

__all__ = ["hff_spatial_gate_fwd", "hff_spatial_gate_bwd", "hff_channel_gate_fwd", "hff_channel_gate_bwd",
           "SUPPORTED_DTYPES"]



# ----------------------------------------------------------------------------------------------------------
# jitted helpers and kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _channel_pool_kernel(x_ptr, pooled_ptr, argmax_ptr, C, HW, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_P: tl.constexpr):
    # program (b, block of pixels): max, first argmax and mean over the C channels
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HW
    top = tl.full([BLOCK_P], float("-inf"), ACC)
    arg = tl.zeros([BLOCK_P], tl.int64)
    total = tl.zeros([BLOCK_P], ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = (c[:, None] < C) & pmask[None, :]
        v = tl.load(x_ptr + (b * C + c[:, None]) * HW + p[None, :], mask=m, other=float("-inf")).to(ACC)
        tile_top = tl.max(v, axis=0)
        tile_arg = tl.argmax(v, axis=0, tie_break_left=True)
        take = tile_top > top
        arg = tl.where(take, c0 + tile_arg, arg)
        top = tl.where(take, tile_top, top)
        total += tl.sum(tl.where(m, v, 0.0), axis=0)
    tl.store(pooled_ptr + b * 2 * HW + p, top, mask=pmask)
    tl.store(pooled_ptr + b * 2 * HW + HW + p, total / C, mask=pmask)
    tl.store(argmax_ptr + b * HW + p, arg, mask=pmask)


@triton.jit
def _pixel_pool_kernel(x_ptr, pooled_ptr, argmax_ptr, R, C, HW, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_P: tl.constexpr):
    # program (block of (b, c) rows): max, first argmax and mean over the HW pixels of each row
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = row < R
    top = tl.full([BLOCK_R], float("-inf"), ACC)
    arg = tl.zeros([BLOCK_R], tl.int64)
    total = tl.zeros([BLOCK_R], ACC)
    for p0 in range(0, HW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m = rmask[:, None] & (p[None, :] < HW)
        v = tl.load(x_ptr + row[:, None] * HW + p[None, :], mask=m, other=float("-inf")).to(ACC)
        tile_top = tl.max(v, axis=1)
        tile_arg = tl.argmax(v, axis=1, tie_break_left=True)
        take = tile_top > top
        arg = tl.where(take, p0 + tile_arg, arg)
        top = tl.where(take, tile_top, top)
        total += tl.sum(tl.where(m, v, 0.0), axis=1)
    b = row // C
    c = row - b * C
    tl.store(pooled_ptr + b * 2 * C + c, top, mask=rmask)
    tl.store(pooled_ptr + b * 2 * C + C + c, total / HW, mask=rmask)
    tl.store(argmax_ptr + row, arg, mask=rmask)


@triton.jit
def _taps(K: tl.constexpr, TAPS: tl.constexpr):
    """Taps t < TAPS (a power of two >= K * K) of one input plane: row offset i - K // 2, column offset
    j - K // 2 and whether t is a real tap."""
    t = tl.arange(0, TAPS)
    return t // K - K // 2, t % K - K // 2, t < K * K


@triton.jit
def _map_conv_kernel(pooled_ptr, w_ptr, z_ptr, H, W, K: tl.constexpr, TAPS: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_P: tl.constexpr):
    # program (b, block of pixels): z = the 2 -> 1 channel K x K convolution (zero padding K // 2), each plane's
    # taps gathered as one (TAPS, BLOCK_P) tile
    b = tl.program_id(0).to(tl.int64)
    HW = H * W
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HW
    h = p // W
    w = p - h * W
    di, dj, real = _taps(K, TAPS)
    hh = h[None, :] + di[:, None]
    ww = w[None, :] + dj[:, None]
    ok = real[:, None] & pmask[None, :] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    acc = tl.zeros([BLOCK_P], ACC)
    for c in tl.static_range(2):
        src = tl.load(pooled_ptr + (b * 2 + c) * HW + hh * W + ww, mask=ok, other=0.0)
        taps = tl.load(w_ptr + c * K * K + tl.arange(0, TAPS), mask=real, other=0.0)
        acc += tl.sum(src * taps[:, None], axis=0)
    tl.store(z_ptr + b * HW + p, acc, mask=pmask)


@triton.jit
def _map_conv_bwd_kernel(dz_ptr, pooled_ptr, w_ptr, dpooled_ptr, dw_part_ptr, H, W, K: tl.constexpr,
                         TAPS: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr):
    # program (b, block of pixels): dpooled = transposed convolution of dz at the block's pixels, and the
    # block's share of d loss / d weight (one partial per program and tap), taps gathered as (TAPS, BLOCK_P)
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    HW = H * W
    p = blk * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HW
    h = p // W
    w = p - h * W
    di, dj, real = _taps(K, TAPS)
    dz = tl.load(dz_ptr + b * HW + p, mask=pmask, other=0.0)
    h_out, w_out = h[None, :] - di[:, None], w[None, :] - dj[:, None]
    ok_out = real[:, None] & pmask[None, :] & (h_out >= 0) & (h_out < H) & (w_out >= 0) & (w_out < W)
    dz_out = tl.load(dz_ptr + b * HW + h_out * W + w_out, mask=ok_out, other=0.0)
    h_in, w_in = h[None, :] + di[:, None], w[None, :] + dj[:, None]
    ok_in = real[:, None] & pmask[None, :] & (h_in >= 0) & (h_in < H) & (w_in >= 0) & (w_in < W)
    part_row = (b * tl.num_programs(1) + blk) * (2 * K * K)
    for c in tl.static_range(2):
        taps = tl.load(w_ptr + c * K * K + tl.arange(0, TAPS), mask=real, other=0.0)
        tl.store(dpooled_ptr + (b * 2 + c) * HW + p, tl.sum(dz_out * taps[:, None], axis=0), mask=pmask)
        src = tl.load(pooled_ptr + (b * 2 + c) * HW + h_in * W + w_in, mask=ok_in, other=0.0)
        tl.store(dw_part_ptr + part_row + c * K * K + tl.arange(0, TAPS), tl.sum(src * dz[None, :], axis=1),
                 mask=real)


@triton.jit
def _apply_gate_kernel(x_ptr, gate_ptr, out_ptr, R, C, HW, PER_PIXEL: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    # program (block of (b, c) rows, block of pixels): out = x * gate, the gate per (b, pixel) or per row
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    m = (row[:, None] < R) & (p[None, :] < HW)
    v = tl.load(x_ptr + row[:, None] * HW + p[None, :], mask=m, other=0.0).to(ACC)
    if PER_PIXEL:
        s = tl.load(gate_ptr + (row[:, None] // C) * HW + p[None, :], mask=m, other=0.0)
    else:
        s = tl.load(gate_ptr + row, mask=row < R, other=0.0)[:, None]
    store_as(out_ptr + row[:, None] * HW + p[None, :], v * s, m)


@triton.jit
def _channel_dot_kernel(grad_ptr, x_ptr, out_ptr, C, HW, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_P: tl.constexpr):
    # program (b, block of pixels): out[b, p] = sum over c of grad * x
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HW
    total = tl.zeros([BLOCK_P], ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = (c[:, None] < C) & pmask[None, :]
        offs = (b * C + c[:, None]) * HW + p[None, :]
        g = tl.load(grad_ptr + offs, mask=m, other=0.0).to(ACC)
        total += tl.sum(g * tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC), axis=0)
    tl.store(out_ptr + b * HW + p, total, mask=pmask)


@triton.jit
def _pixel_dot_kernel(grad_ptr, x_ptr, out_ptr, R, HW, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_P: tl.constexpr):
    # program (block of rows): out[row] = sum over the pixels of grad * x
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = row < R
    total = tl.zeros([BLOCK_R], ACC)
    for p0 in range(0, HW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m = rmask[:, None] & (p[None, :] < HW)
        offs = row[:, None] * HW + p[None, :]
        g = tl.load(grad_ptr + offs, mask=m, other=0.0).to(ACC)
        total += tl.sum(g * tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC), axis=1)
    tl.store(out_ptr + row, total, mask=rmask)


@triton.jit
def _gate_input_grad_kernel(grad_ptr, gate_ptr, dpooled_ptr, argmax_ptr, dx_ptr, R, C, HW,
                            PER_PIXEL: tl.constexpr, GATE_ONLY: tl.constexpr, ACCUMULATE: tl.constexpr,
                            ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    # program (block of (b, c) rows, block of pixels): dx (+)= grad * gate (unless GATE_ONLY) + d mean / count +
    # d max where this element was the pooled maximum (added to dx's values when ACCUMULATE)
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    rmask = row < R
    m = rmask[:, None] & (p[None, :] < HW)
    b = row // C
    c = row - b * C
    if PER_PIXEL:  # spatial gate: pooled over channels, per (b, pixel)
        at = b[:, None] * HW + p[None, :]
        dmax = tl.load(dpooled_ptr + b[:, None] * 2 * HW + p[None, :], mask=m, other=0.0)
        dmean = tl.load(dpooled_ptr + b[:, None] * 2 * HW + HW + p[None, :], mask=m, other=0.0) / C
        hit = tl.load(argmax_ptr + at, mask=m, other=-1) == c[:, None]
        s = tl.load(gate_ptr + at, mask=m, other=0.0)
    else:  # channel gate: pooled over pixels, per row
        dmax = tl.load(dpooled_ptr + b * 2 * C + c, mask=rmask, other=0.0)[:, None]
        dmean = tl.load(dpooled_ptr + b * 2 * C + C + c, mask=rmask, other=0.0)[:, None] / HW
        hit = tl.load(argmax_ptr + row, mask=rmask, other=-1)[:, None] == p[None, :]
        s = tl.load(gate_ptr + row, mask=rmask, other=0.0)[:, None]
    d = dmean + tl.where(hit, dmax, 0.0)
    if not GATE_ONLY:
        d += tl.load(grad_ptr + row[:, None] * HW + p[None, :], mask=m, other=0.0).to(ACC) * s
    if ACCUMULATE:
        d += tl.load(dx_ptr + row[:, None] * HW + p[None, :], mask=m, other=0.0).to(ACC)
    store_as(dx_ptr + row[:, None] * HW + p[None, :], d, m)


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------
def _tile(n, gpu_cap, interp_cap):
    """A power-of-two block over n elements: the interpreter pays per program, a GPU per register (see
    tile_size)."""
    return max(2, min(tile_size(interp_cap, gpu_cap), triton.next_power_of_2(n)))


def _check_x(op, x):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{op}: expected x to be a 4-D tensor of shape (B, C, H, W)")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: expected x to have dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[1] < 1 or x.shape[2] * x.shape[3] < 1:
        raise ValueError(f"{op}: expected x to have at least one channel and one pixel, got {tuple(x.shape)}")
    check_tensor(x, op, "x", x.shape, "(B, C, H, W)", x.dtype, x.device)


def _check_gate_grad(op, grad, x, gate_only, gate_shape, layout):
    if gate_only:
        check_tensor(grad, op, "grad", gate_shape, layout, acc_dtype(x.dtype), x.device)
    else:
        check_tensor(grad, op, "grad", x.shape, "(B, C, H, W)", x.dtype, x.device)


def _rows_pixels_grid(R, HW):
    block_r, block_p = _tile(R, 8, 256), _tile(HW, 128, 1024)
    return block_r, block_p, (triton.cdiv(R, block_r), triton.cdiv(HW, block_p))


def _apply_gate(x, gate, per_pixel):
    B, C, H, W = x.shape
    out = torch.empty_like(x)
    block_r, block_p, grid = _rows_pixels_grid(B * C, H * W)
    launch(_apply_gate_kernel, grid, x.device, x, gate, out, B * C, C, H * W, PER_PIXEL=per_pixel,
           ACC=tl_acc_dtype(x.dtype), BLOCK_R=block_r, BLOCK_P=block_p)
    return out


def _gate_input_grad(op, grad, gate, dpooled, argmax, x, per_pixel, gate_only, dx_accumulate):
    B, C, H, W = x.shape
    if dx_accumulate is None:
        dx = torch.empty_like(x)
    else:
        check_tensor(dx_accumulate, op, "dx_accumulate", x.shape, "(B, C, H, W)", x.dtype, x.device)
        dx = dx_accumulate
    block_r, block_p, grid = _rows_pixels_grid(B * C, H * W)
    launch(_gate_input_grad_kernel, grid, x.device, dx if gate_only else grad, gate, dpooled, argmax, dx,
           B * C, C, H * W, PER_PIXEL=per_pixel, GATE_ONLY=gate_only, ACCUMULATE=dx_accumulate is not None,
           ACC=tl_acc_dtype(x.dtype), BLOCK_R=block_r, BLOCK_P=block_p)
    return dx


# ---- spatial gate ------------------------------------------------------------------------------------------
def _check_spatial(op, x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats):
    _check_x(op, x)
    acc = acc_dtype(x.dtype)
    if not isinstance(conv_weight, torch.Tensor) or conv_weight.dim() != 4 or conv_weight.shape[-1] % 2 == 0:
        raise ValueError(f"{op}: expected conv_weight of shape (1, 2, k, k) with odd k")
    k = conv_weight.shape[-1]
    check_tensor(conv_weight, op, "conv_weight", (1, 2, k, k), "(1, 2, k, k)", acc, x.device)
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        check_tensor(t, op, name, (1,), "(1,)", acc, x.device, optional=True)
    B, _, H, W = x.shape
    if use_batch_stats:
        if B * H * W < 2:
            raise ValueError(f"{op}: batch statistics need more than one value of the map, got x of shape {tuple(x.shape)}")
    else:
        check_tensor(running_mean, op, "running_mean", (1,), "(1,)", acc, x.device)
        check_tensor(running_var, op, "running_var", (1,), "(1,)", acc, x.device)
    return k


def _map_conv(pooled, weight, k):
    B, _, H, W = pooled.shape
    z = torch.empty((B, H, W), dtype=pooled.dtype, device=pooled.device)
    block_p = _tile(H * W, 32, 1024)
    launch(_map_conv_kernel, (B, triton.cdiv(H * W, block_p)), pooled.device, pooled, weight, z, H, W, K=k,
           TAPS=triton.next_power_of_2(k * k), ACC=tl_acc_dtype(pooled.dtype), BLOCK_P=block_p)
    return z


def _map_affine(z, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps):
    """The map's BatchNorm as y = z * scale + shift (device tensors of shape (1,)), its mean and rstd, and the
    batch mean and unbiased variance (empty without batch statistics). Statistics summed in float64."""
    if use_batch_stats:
        zd = z.reshape(1, -1).double()
        n = zd.shape[1]
        mean64 = zd.mean(dim=1)
        var64 = (zd - mean64[:, None]).square().sum(dim=1)
        mean, var = mean64.to(z.dtype), (var64 / n).to(z.dtype)
        batch_mean, batch_var = mean, (var64 / (n - 1)).to(z.dtype)
    else:
        mean, var = running_mean, running_var
        batch_mean, batch_var = z.new_empty(0), z.new_empty(0)
    rstd = torch.rsqrt(var + eps)
    scale = rstd if bn_weight is None else bn_weight * rstd
    shift = -mean * scale if bn_bias is None else bn_bias - mean * scale
    return scale, shift, mean, rstd, batch_mean, batch_var


def hff_spatial_gate_fwd(x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps,
                         gate_only):
    """-> [y, batch_mean, batch_var, pooled (B, 2, H, W), argmax (B, H, W)] (csrc/ops.h)."""
    op = "hff_spatial_gate_fwd"
    k = _check_spatial(op, x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats)
    B, C, H, W = x.shape
    pooled = torch.empty((B, 2, H, W), dtype=acc_dtype(x.dtype), device=x.device)
    argmax = torch.empty((B, H, W), dtype=torch.int64, device=x.device)
    block_c, block_p = _tile(C, 16, 512), _tile(H * W, 128, 1024)
    launch(_channel_pool_kernel, (B, triton.cdiv(H * W, block_p)), x.device, x, pooled, argmax, C, H * W,
           ACC=tl_acc_dtype(x.dtype), BLOCK_C=block_c, BLOCK_P=block_p)
    z = _map_conv(pooled, conv_weight, k)
    scale, shift, _, _, batch_mean, batch_var = _map_affine(z, bn_weight, bn_bias, running_mean, running_var,
                                                            use_batch_stats, eps)
    gate = torch.sigmoid(z * scale + shift).reshape(B, 1, H, W)
    y = gate if gate_only else _apply_gate(x, gate, True)
    return [y, batch_mean, batch_var, pooled, argmax]


def hff_spatial_gate_bwd(grad, pooled, argmax, x, conv_weight, bn_weight, bn_bias, running_mean, running_var,
                         use_batch_stats, eps, gate_only, dx_accumulate=None):
    """-> [dx, dconv_weight, dbn_weight, dbn_bias] (None for absent BatchNorm parameters)."""
    op = "hff_spatial_gate_bwd"
    k = _check_spatial(op, x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats)
    B, C, H, W = x.shape
    HW = H * W
    check_tensor(pooled, op, "pooled", (B, 2, H, W), "(B, 2, H, W)", acc_dtype(x.dtype), x.device)
    check_tensor(argmax, op, "argmax", (B, H, W), "(B, H, W)", torch.int64, x.device)
    _check_gate_grad(op, grad, x, gate_only, (B, 1, H, W), "(B, 1, H, W)")
    z = _map_conv(pooled, conv_weight, k)
    scale, shift, mean, rstd, _, _ = _map_affine(z, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps)
    gate = torch.sigmoid(z * scale + shift)
    if gate_only:
        dgate = grad.reshape(B, H, W)
    else:
        dgate = torch.empty((B, H, W), dtype=acc_dtype(x.dtype), device=x.device)
        block_c, block_p = _tile(C, 16, 512), _tile(HW, 128, 1024)
        launch(_channel_dot_kernel, (B, triton.cdiv(HW, block_p)), x.device, grad, x, dgate, C, HW,
               ACC=tl_acc_dtype(x.dtype), BLOCK_C=block_c, BLOCK_P=block_p)
    # the BatchNorm's backward on the small map (batch statistics depend on every pixel)
    dy = dgate * gate * (1 - gate)
    zhat = (z - mean) * rstd
    sum_dy, sum_dy_zhat = dy.double().sum().to(z.dtype), (dy.double() * zhat.double()).sum().to(z.dtype)
    dz = dy - (sum_dy + zhat * sum_dy_zhat) / z.numel() if use_batch_stats else dy
    dz = (dz * scale).contiguous()
    dpooled = torch.empty_like(pooled)
    block_p = _tile(HW, 32, 1024)
    blocks = triton.cdiv(HW, block_p)
    dw_part = torch.empty((B * blocks, 2 * k * k), dtype=acc_dtype(x.dtype), device=x.device)
    launch(_map_conv_bwd_kernel, (B, blocks), x.device, dz, pooled, conv_weight, dpooled, dw_part, H, W, K=k,
           TAPS=triton.next_power_of_2(k * k), ACC=tl_acc_dtype(x.dtype), BLOCK_P=block_p)
    dx = _gate_input_grad(op, grad, gate, dpooled, argmax, x, True, gate_only, dx_accumulate)
    dbn_weight = None if bn_weight is None else sum_dy_zhat.reshape(1)
    dbn_bias = None if bn_bias is None else sum_dy.reshape(1)
    return [dx, dw_part.sum(dim=0).reshape(1, 2, k, k), dbn_weight, dbn_bias]


# ---- channel gate ------------------------------------------------------------------------------------------
def _check_channel(op, x, fc1_weight, fc2_weight):
    _check_x(op, x)
    C = x.shape[1]
    if not isinstance(fc1_weight, torch.Tensor) or fc1_weight.dim() != 2:
        raise ValueError(f"{op}: expected fc1_weight to be a 2-D tensor of shape (hidden, C)")
    hidden = fc1_weight.shape[0]
    check_tensor(fc1_weight, op, "fc1_weight", (hidden, C), "(hidden, C)", acc_dtype(x.dtype), x.device)
    check_tensor(fc2_weight, op, "fc2_weight", (C, hidden), "(C, hidden)", acc_dtype(x.dtype), x.device)


def _mlp_pre(pooled, fc1_weight):
    return pooled @ fc1_weight.t()  # (B, 2, hidden)


def _mlp_gate(pooled, fc1_weight, fc2_weight):
    return torch.sigmoid(F.relu(_mlp_pre(pooled, fc1_weight)).sum(dim=1) @ fc2_weight.t())


def hff_channel_gate_fwd(x, fc1_weight, fc2_weight, gate_only):
    """-> [y, pooled (B, 2, C), argmax (B, C)] (csrc/ops.h)."""
    op = "hff_channel_gate_fwd"
    _check_channel(op, x, fc1_weight, fc2_weight)
    B, C, H, W = x.shape
    pooled = torch.empty((B, 2, C), dtype=acc_dtype(x.dtype), device=x.device)
    argmax = torch.empty((B, C), dtype=torch.int64, device=x.device)
    block_r, block_p = _tile(B * C, 8, 256), _tile(H * W, 256, 1024)
    launch(_pixel_pool_kernel, (triton.cdiv(B * C, block_r), 1), x.device, x, pooled, argmax, B * C, C, H * W,
           ACC=tl_acc_dtype(x.dtype), BLOCK_R=block_r, BLOCK_P=block_p)
    gate = _mlp_gate(pooled, fc1_weight, fc2_weight).contiguous()
    y = gate.reshape(B, C, 1, 1) if gate_only else _apply_gate(x, gate, False)
    return [y, pooled, argmax]


def hff_channel_gate_bwd(grad, pooled, argmax, x, fc1_weight, fc2_weight, gate_only, dx_accumulate=None):
    """-> [dx, dfc1_weight, dfc2_weight]."""
    op = "hff_channel_gate_bwd"
    _check_channel(op, x, fc1_weight, fc2_weight)
    B, C, H, W = x.shape
    check_tensor(pooled, op, "pooled", (B, 2, C), "(B, 2, C)", acc_dtype(x.dtype), x.device)
    check_tensor(argmax, op, "argmax", (B, C), "(B, C)", torch.int64, x.device)
    _check_gate_grad(op, grad, x, gate_only, (B, C, 1, 1), "(B, C, 1, 1)")
    pre = _mlp_pre(pooled, fc1_weight)
    hidden = F.relu(pre).sum(dim=1)
    gate = torch.sigmoid(hidden @ fc2_weight.t()).contiguous()
    if gate_only:
        dgate = grad.reshape(B, C)
    else:
        dgate = torch.empty((B, C), dtype=acc_dtype(x.dtype), device=x.device)
        block_r, block_p = _tile(B * C, 8, 256), _tile(H * W, 256, 1024)
        launch(_pixel_dot_kernel, (triton.cdiv(B * C, block_r), 1), x.device, grad, x, dgate, B * C, H * W,
               ACC=tl_acc_dtype(x.dtype), BLOCK_R=block_r, BLOCK_P=block_p)
    dlogit = dgate * gate * (1 - gate)
    dfc2 = dlogit.t() @ hidden
    # relu's gradient as torch's: zero where pre <= 0 (even for a NaN dhidden), passed through for NaN pre
    dpre = torch.where(pre <= 0, 0.0, (dlogit @ fc2_weight).unsqueeze(1))
    dfc1 = dpre.reshape(2 * B, -1).t() @ pooled.reshape(2 * B, C)
    dpooled = (dpre @ fc1_weight).contiguous()
    dx = _gate_input_grad(op, grad, gate, dpooled, argmax, x, False, gate_only, dx_accumulate)
    return [dx, dfc1, dfc2]
