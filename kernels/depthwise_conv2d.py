"""Triton kernels of the depthwise convolution, installed as ``medkernels.kernels.depthwise_conv2d``.

Launchers (contracts of csrc/ops.h; x and grad in any strides, parameters contiguous):

* ``depthwise_conv2d_fwd(x, weight, bias, stride, padding, activation, channels_last) -> out``:
  ``act(conv2d(x, weight, bias, stride, padding, groups=C))``, (B, C, Ho, Wo), channels_last or contiguous.
* ``depthwise_conv2d_bwd(grad, x, weight, bias, stride, padding, activation) -> [dx, dweight, dbias]``
* ``depthwise_conv2d_layernorm_fwd(x, weight, bias, ln_weight, ln_bias, stride, padding, eps) -> out``:
  LayerNorm over the channels of the convolution, (B, Ho, Wo, C) contiguous.
* ``depthwise_conv2d_layernorm_bwd(grad, x, ...) -> [dx, dweight, dbias, dln_weight, dln_bias]``

Activations: "none", "silu", "gelu" (erf), "relu". Arithmetic in float32 (float64 for float64 inputs).

Design: a program owns a tile of BLOCK_P output pixels of one image by BLOCK_C channels (all channels for
the LayerNorm), and walks the k x k taps with masked loads (the zero padding), so any strides and layouts
work. The backward runs two kernels: the first recomputes the pre-activation z, forms d loss / d z
(written to a float32 buffer; skipped without an activation, when it is the incoming gradient) and the
tile's partial weight / bias (/ LayerNorm) gradients, one row per tile, later summed with torch in a fixed
order (deterministic, no atomics); the second gathers the input gradient of a tile of input pixels from
d loss / d z through the taps that reach it.

On a GPU the tensors must be CUDA tensors; CPU tensors need ``TRITON_INTERPRET=1`` set before import.
"""
import torch
import triton
import triton.language as tl

from ._utils import (MAX_GRID_1, SUPPORTED_DTYPES, acc_dtype, check_device, launch, store_as, tile_size,
                     tl_acc_dtype)

__all__ = [
    "depthwise_conv2d_fwd",
    "depthwise_conv2d_bwd",
    "depthwise_conv2d_layernorm_fwd",
    "depthwise_conv2d_layernorm_bwd",
    "SUPPORTED_DTYPES",
]

ACTIVATION_CODES = {"none": 0, "silu": 1, "gelu": 2, "relu": 3}
MAX_KERNEL = 31


# ----------------------------------------------------------------------------------------------------------
# jitted helpers
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _activation(z, ACT: tl.constexpr):
    """act(z): 0 none, 1 silu, 2 gelu (erf), 3 relu (the formulas of csrc/depthwise_conv_math.h)."""
    if ACT == 1:
        y = z / (1.0 + tl.exp(-z))
    elif ACT == 2:
        y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        y = tl.where(z <= 0.0, 0.0, z)  # NaN stays NaN, as torch.relu
    else:
        y = z
    return y


@triton.jit
def _activation_grad(z, ACT: tl.constexpr):
    """d act / dz."""
    if ACT == 1:
        s = 1.0 / (1.0 + tl.exp(-z))
        d = s * (1.0 + z * (1.0 - s))
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        d = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 3:
        d = tl.where(z <= 0.0, 0.0, 1.0)
    else:
        d = tl.full(z.shape, 1.0, z.dtype)
    return d


@triton.jit
def _tap(x_img, sxc, sxh, sxw, offs_c, mask_c, oh, ow, mask_p, H, W, i, j, stride, padding, ACC: tl.constexpr):
    """The (BLOCK_P, BLOCK_C) input values tap (i, j) reads for output pixels (oh, ow); zero in the padding."""
    ih = oh * stride - padding + i
    iw = ow * stride - padding + j
    m = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    ptrs = x_img + ih[:, None] * sxh + iw[:, None] * sxw + offs_c[None, :] * sxc
    return tl.load(ptrs, mask=m[:, None] & mask_c[None, :], other=0.0).to(ACC)


@triton.jit
def _conv_tile(x_img, w_ptr, b_ptr, sxc, sxh, sxw, offs_c, mask_c, oh, ow, mask_p, H, W, stride, padding,
               K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
               ACC: tl.constexpr):
    """z = bias + sum over taps of w[c, i, j] * x[ih, iw, c] for a (BLOCK_P, BLOCK_C) tile."""
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for i in tl.static_range(K):
        for j in tl.static_range(K):
            xv = _tap(x_img, sxc, sxh, sxw, offs_c, mask_c, oh, ow, mask_p, H, W, i, j, stride, padding, ACC)
            wv = tl.load(w_ptr + offs_c * (K * K) + (i * K + j), mask=mask_c, other=0.0).to(ACC)
            acc += xv * wv[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)[None, :]
    return acc


@triton.jit
def _tile_coords(n_pblocks, P, Wo, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // n_pblocks).to(tl.int64)
    offs_p = (pid % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return pid, b, offs_p, offs_p // Wo, offs_p % Wo, offs_p < P, offs_c, offs_c < C


@triton.jit
def _param_grad_partials(gz, x_img, sxc, sxh, sxw, offs_c, mask_c, oh, ow, mask_p, H, W, stride, padding,
                         gw_part, gb_part, C, K: tl.constexpr, ACC: tl.constexpr):
    """This tile's sums over its pixels: gb_part[c] = sum gz, gw_part[c * K * K + tap] = sum gz * x_tap."""
    tl.store(gb_part + offs_c, tl.sum(gz, axis=0), mask=mask_c)
    for i in tl.static_range(K):
        for j in tl.static_range(K):
            xv = _tap(x_img, sxc, sxh, sxw, offs_c, mask_c, oh, ow, mask_p, H, W, i, j, stride, padding, ACC)
            tl.store(gw_part + offs_c * (K * K) + (i * K + j), tl.sum(gz * xv, axis=0), mask=mask_c)


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, C, H, W, Ho, Wo, n_pblocks, stride, padding,
                sxb, sxc, sxh, sxw, sob, soc, soh, sow,
                K: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    _, b, _, oh, ow, mask_p, offs_c, mask_c = _tile_coords(n_pblocks, Ho * Wo, Wo, C, BLOCK_P, BLOCK_C)
    z = _conv_tile(x_ptr + b * sxb, w_ptr, b_ptr, sxc, sxh, sxw, offs_c, mask_c, oh, ow, mask_p, H, W,
                   stride, padding, K, HAS_BIAS, BLOCK_P, BLOCK_C, ACC)
    ptrs = out_ptr + b * sob + oh[:, None] * soh + ow[:, None] * sow + offs_c[None, :] * soc
    store_as(ptrs, _activation(z, ACT), mask_p[:, None] & mask_c[None, :])


@triton.jit
def _bwd_gz_kernel(x_ptr, w_ptr, b_ptr, g_ptr, gz_ptr, gw_part_ptr, gb_part_ptr, C, H, W, Ho, Wo, n_pblocks,
                   stride, padding, sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw, szb, szc, szh, szw,
                   K: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    pid, b, _, oh, ow, mask_p, offs_c, mask_c = _tile_coords(n_pblocks, Ho * Wo, Wo, C, BLOCK_P, BLOCK_C)
    mask = mask_p[:, None] & mask_c[None, :]
    x_img = x_ptr + b * sxb
    gz = tl.load(g_ptr + b * sgb + oh[:, None] * sgh + ow[:, None] * sgw + offs_c[None, :] * sgc,
                 mask=mask, other=0.0).to(ACC)
    if ACT != 0:
        z = _conv_tile(x_img, w_ptr, b_ptr, sxc, sxh, sxw, offs_c, mask_c, oh, ow, mask_p, H, W,
                       stride, padding, K, HAS_BIAS, BLOCK_P, BLOCK_C, ACC)
        gz = tl.where(mask, gz * _activation_grad(z, ACT), 0.0)
        tl.store(gz_ptr + b * szb + oh[:, None] * szh + ow[:, None] * szw + offs_c[None, :] * szc, gz, mask=mask)
    _param_grad_partials(gz, x_img, sxc, sxh, sxw, offs_c, mask_c, oh, ow, mask_p, H, W, stride, padding,
                         gw_part_ptr + pid.to(tl.int64) * C * K * K, gb_part_ptr + pid.to(tl.int64) * C, C, K, ACC)


@triton.jit
def _bwd_gx_kernel(gz_ptr, w_ptr, gx_ptr, C, H, W, Ho, Wo, n_pblocks, stride, padding,
                   szb, szc, szh, szw, sxb, sxc, sxh, sxw,
                   K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    # a tile of input pixels (ih, iw): dx = sum over the taps (i, j) with ih = oh * s - p + i, iw = ow * s - p + j
    _, b, _, ih, iw, mask_p, offs_c, mask_c = _tile_coords(n_pblocks, H * W, W, C, BLOCK_P, BLOCK_C)
    gz_img = gz_ptr + b * szb
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for i in tl.static_range(K):
        t = ih + padding - i
        oh = t // stride
        row_ok = mask_p & (t >= 0) & (t - oh * stride == 0) & (oh < Ho)
        for j in tl.static_range(K):
            u = iw + padding - j
            ow = u // stride
            m = row_ok & (u >= 0) & (u - ow * stride == 0) & (ow < Wo)
            ptrs = gz_img + oh[:, None] * szh + ow[:, None] * szw + offs_c[None, :] * szc
            v = tl.load(ptrs, mask=m[:, None] & mask_c[None, :], other=0.0).to(ACC)
            wv = tl.load(w_ptr + offs_c * (K * K) + (i * K + j), mask=mask_c, other=0.0).to(ACC)
            acc += v * wv[None, :]
    ptrs = gx_ptr + b * sxb + ih[:, None] * sxh + iw[:, None] * sxw + offs_c[None, :] * sxc
    store_as(ptrs, acc, mask_p[:, None] & mask_c[None, :])


@triton.jit
def _ln_moments(z, mask, C):
    """The tile centred per pixel (zero outside the channels) and each pixel's biased variance over C."""
    mean = tl.sum(z, axis=1) / C
    d = tl.where(mask, z - mean[:, None], 0.0)
    return d, tl.sum(d * d, axis=1) / C


@triton.jit
def _ln_fwd_kernel(x_ptr, w_ptr, b_ptr, lnw_ptr, lnb_ptr, out_ptr, C, H, W, Ho, Wo, n_pblocks, stride, padding,
                   eps, sxb, sxc, sxh, sxw,
                   K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    _, b, offs_p, oh, ow, mask_p, offs_c, mask_c = _tile_coords(n_pblocks, Ho * Wo, Wo, C, BLOCK_P, BLOCK_C)
    mask = mask_p[:, None] & mask_c[None, :]
    z = _conv_tile(x_ptr + b * sxb, w_ptr, b_ptr, sxc, sxh, sxw, offs_c, mask_c, oh, ow, mask_p, H, W,
                   stride, padding, K, HAS_BIAS, BLOCK_P, BLOCK_C, ACC)
    d, var = _ln_moments(z, mask, C)
    y = d * (1.0 / tl.sqrt(var + eps))[:, None]
    if HAS_LNW:
        y = y * tl.load(lnw_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)[None, :]
    if HAS_LNB:
        y = y + tl.load(lnb_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)[None, :]
    store_as(out_ptr + (b * Ho * Wo + offs_p[:, None]) * C + offs_c[None, :], y, mask)


@triton.jit
def _ln_bwd_gz_kernel(x_ptr, w_ptr, b_ptr, lnw_ptr, g_ptr, gz_ptr, gw_part_ptr, gb_part_ptr, gln_part_ptr,
                      C, H, W, Ho, Wo, n_pblocks, stride, padding, eps, sxb, sxc, sxh, sxw, sgb, sgh, sgw, sgc,
                      K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LNW: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    pid, b, offs_p, oh, ow, mask_p, offs_c, mask_c = _tile_coords(n_pblocks, Ho * Wo, Wo, C, BLOCK_P, BLOCK_C)
    mask = mask_p[:, None] & mask_c[None, :]
    x_img = x_ptr + b * sxb
    z = _conv_tile(x_img, w_ptr, b_ptr, sxc, sxh, sxw, offs_c, mask_c, oh, ow, mask_p, H, W,
                   stride, padding, K, HAS_BIAS, BLOCK_P, BLOCK_C, ACC)
    d, var = _ln_moments(z, mask, C)
    rstd = 1.0 / tl.sqrt(var + eps)
    xhat = d * rstd[:, None]
    gy = tl.load(g_ptr + b * sgb + oh[:, None] * sgh + ow[:, None] * sgw + offs_c[None, :] * sgc,
                 mask=mask, other=0.0).to(ACC)
    g = gy
    if HAS_LNW:
        g = gy * tl.load(lnw_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)[None, :]
    mean_g = tl.sum(g, axis=1) / C
    mean_gx = tl.sum(g * xhat, axis=1) / C
    gz = tl.where(mask, rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None]), 0.0)
    tl.store(gz_ptr + (b * Ho * Wo + offs_p[:, None]) * C + offs_c[None, :], gz, mask=mask)
    gln = gln_part_ptr + pid.to(tl.int64) * 2 * C
    tl.store(gln + offs_c, tl.sum(gy * xhat, axis=0), mask=mask_c)
    tl.store(gln + C + offs_c, tl.sum(gy, axis=0), mask=mask_c)
    _param_grad_partials(gz, x_img, sxc, sxh, sxw, offs_c, mask_c, oh, ow, mask_p, H, W, stride, padding,
                         gw_part_ptr + pid.to(tl.int64) * C * K * K, gb_part_ptr + pid.to(tl.int64) * C, C, K, ACC)


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------
def _check(op, x, weight, bias, stride, padding, extra=()):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{op}: expected x to be a 4-D tensor (B, C, H, W), got {getattr(x, 'shape', type(x))}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: expected x to have dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    check_device(x, op, "x")
    C = x.shape[1]
    if weight.dim() != 4 or tuple(weight.shape[:2]) != (C, 1) or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"{op}: expected weight of shape (C, 1, k, k) with C = {C}, got {tuple(weight.shape)}")
    if not 1 <= weight.shape[2] <= MAX_KERNEL:
        raise ValueError(f"{op}: expected the kernel size in [1, {MAX_KERNEL}], got {weight.shape[2]}")
    for name, t in (("weight", weight), ("bias", bias)) + tuple(extra):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: expected {name} to have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: expected {name} on x's device {x.device}, got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{op}: expected {name} to be contiguous")
        if t is not weight and tuple(t.shape) != (C,):
            raise ValueError(f"{op}: expected {name} of shape (C,) = ({C},), got {tuple(t.shape)}")
    if stride < 1 or padding < 0:
        raise ValueError(f"{op}: expected stride >= 1 and padding >= 0, got {stride} and {padding}")
    k = weight.shape[2]
    H, W = x.shape[2:]
    if H + 2 * padding < k or W + 2 * padding < k:
        raise ValueError(f"{op}: x's spatial size ({H}, {W}) with padding {padding} is smaller than the kernel {k}")
    return x.shape[0], C, H, W, k, (H + 2 * padding - k) // stride + 1, (W + 2 * padding - k) // stride + 1


def _blocks(pixels, C, all_channels=False):
    """(BLOCK_P, BLOCK_C). All channels in one tile for the LayerNorm. The interpreter pays per program, so
    it gets large tiles (see tile_size); small tiles are 2 pixels by 2 channels."""
    block_c = triton.next_power_of_2(C) if all_channels else min(tile_size(64, 32), triton.next_power_of_2(C))
    budget = tile_size(1 << 16, 2048, 2 * block_c)  # elements a tile
    block_p = max(1, min(triton.next_power_of_2(pixels), budget // block_c))
    return block_p, block_c


def _grid(B, pixels, C, block_p, block_c, op):
    n_pblocks = triton.cdiv(pixels, block_p)
    grid = (B * n_pblocks, triton.cdiv(C, block_c))
    if grid[1] > MAX_GRID_1:
        raise ValueError(f"{op}: too many channels for one launch (grid {grid})")
    return n_pblocks, grid


def _activation_code(op, activation):
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"{op}: expected activation in {sorted(ACTIVATION_CODES)}, got {activation!r}")
    return ACTIVATION_CODES[activation]


def depthwise_conv2d_fwd(x, weight, bias, stride, padding, activation, channels_last):
    """act(conv2d(x, weight, bias, stride, padding, groups=C)) -> (B, C, Ho, Wo) in x's dtype."""
    op = "depthwise_conv2d_fwd"
    B, C, H, W, k, Ho, Wo = _check(op, x, weight, bias, stride, padding)
    act = _activation_code(op, activation)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((B, C, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    if out.numel() == 0:
        return out
    block_p, block_c = _blocks(Ho * Wo, C)
    n_pblocks, grid = _grid(B, Ho * Wo, C, block_p, block_c, op)
    launch(_fwd_kernel, grid, x.device, x, weight, bias if bias is not None else weight, out,
            C, H, W, Ho, Wo, n_pblocks, stride, padding, *x.stride(), *out.stride(),
            K=k, ACT=act, HAS_BIAS=bias is not None, BLOCK_P=block_p, BLOCK_C=block_c, ACC=tl_acc_dtype(x.dtype))
    return out


def _input_grad(gz, weight, x, stride, padding, k, Ho, Wo, op):
    """dx from d loss / d z (any strides)."""
    B, C, H, W = x.shape
    gx = torch.empty_like(x)
    if gx.numel() == 0:
        return gx
    block_p, block_c = _blocks(H * W, C)
    n_pblocks, grid = _grid(B, H * W, C, block_p, block_c, op)
    launch(_bwd_gx_kernel, grid, x.device, gz, weight, gx, C, H, W, Ho, Wo, n_pblocks, stride, padding,
            *gz.stride(), *gx.stride(), K=k, BLOCK_P=block_p, BLOCK_C=block_c, ACC=tl_acc_dtype(x.dtype))
    return gx


def depthwise_conv2d_bwd(grad, x, weight, bias, stride, padding, activation):
    """-> [dx (empty_like(x)), dweight, dbias or None]."""
    op = "depthwise_conv2d_bwd"
    B, C, H, W, k, Ho, Wo = _check(op, x, weight, bias, stride, padding)
    act = _activation_code(op, activation)
    if tuple(grad.shape) != (B, C, Ho, Wo) or grad.dtype != x.dtype or grad.device != x.device:
        raise ValueError(f"{op}: expected grad of shape {(B, C, Ho, Wo)}, dtype {x.dtype} on {x.device}, "
                         f"got {tuple(grad.shape)}, {grad.dtype} on {grad.device}")
    acc = acc_dtype(x.dtype)
    block_p, block_c = _blocks(Ho * Wo, C)
    n_pblocks, grid = _grid(B, Ho * Wo, C, block_p, block_c, op)
    gw_part = torch.zeros((B * n_pblocks, C, k * k), dtype=acc, device=x.device)
    gb_part = torch.zeros((B * n_pblocks, C), dtype=acc, device=x.device)
    gz = torch.empty_like(grad, dtype=acc) if act != 0 else grad
    if grad.numel() > 0:
        launch(_bwd_gz_kernel, grid, x.device, x, weight, bias if bias is not None else weight, grad, gz,
                gw_part, gb_part, C, H, W, Ho, Wo, n_pblocks, stride, padding,
                *x.stride(), *grad.stride(), *gz.stride(),
                K=k, ACT=act, HAS_BIAS=bias is not None, BLOCK_P=block_p, BLOCK_C=block_c, ACC=tl_acc_dtype(x.dtype))
    gx = _input_grad(gz, weight, x, stride, padding, k, Ho, Wo, op)
    gw = gw_part.sum(0).reshape(weight.shape).to(x.dtype)
    gb = gb_part.sum(0).to(x.dtype) if bias is not None else None
    return [gx, gw, gb]


def _ln_check(op, x, weight, bias, ln_weight, ln_bias, stride, padding):
    return _check(op, x, weight, bias, stride, padding, extra=(("ln_weight", ln_weight), ("ln_bias", ln_bias)))


def depthwise_conv2d_layernorm_fwd(x, weight, bias, ln_weight, ln_bias, stride, padding, eps):
    """LayerNorm over C of conv2d(x, weight, bias, groups=C) -> (B, Ho, Wo, C) contiguous in x's dtype."""
    op = "depthwise_conv2d_layernorm_fwd"
    B, C, H, W, k, Ho, Wo = _ln_check(op, x, weight, bias, ln_weight, ln_bias, stride, padding)
    out = torch.empty((B, Ho, Wo, C), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_p, block_c = _blocks(Ho * Wo, C, all_channels=True)
    n_pblocks, grid = _grid(B, Ho * Wo, C, block_p, block_c, op)
    dummy = weight
    launch(_ln_fwd_kernel, grid, x.device, x, weight, bias if bias is not None else dummy,
            ln_weight if ln_weight is not None else dummy, ln_bias if ln_bias is not None else dummy, out,
            C, H, W, Ho, Wo, n_pblocks, stride, padding, float(eps), *x.stride(),
            K=k, HAS_BIAS=bias is not None, HAS_LNW=ln_weight is not None, HAS_LNB=ln_bias is not None,
            BLOCK_P=block_p, BLOCK_C=block_c, ACC=tl_acc_dtype(x.dtype))
    return out


def depthwise_conv2d_layernorm_bwd(grad, x, weight, bias, ln_weight, ln_bias, stride, padding, eps):
    """-> [dx, dweight, dbias, dln_weight, dln_bias] (None for absent inputs); grad (B, Ho, Wo, C)."""
    op = "depthwise_conv2d_layernorm_bwd"
    B, C, H, W, k, Ho, Wo = _ln_check(op, x, weight, bias, ln_weight, ln_bias, stride, padding)
    if tuple(grad.shape) != (B, Ho, Wo, C) or grad.dtype != x.dtype or grad.device != x.device:
        raise ValueError(f"{op}: expected grad of shape {(B, Ho, Wo, C)}, dtype {x.dtype} on {x.device}, "
                         f"got {tuple(grad.shape)}, {grad.dtype} on {grad.device}")
    acc = acc_dtype(x.dtype)
    block_p, block_c = _blocks(Ho * Wo, C, all_channels=True)
    n_pblocks, grid = _grid(B, Ho * Wo, C, block_p, block_c, op)
    gw_part = torch.zeros((B * n_pblocks, C, k * k), dtype=acc, device=x.device)
    gb_part = torch.zeros((B * n_pblocks, C), dtype=acc, device=x.device)
    gln_part = torch.zeros((B * n_pblocks, 2, C), dtype=acc, device=x.device)
    gz = torch.empty((B, Ho, Wo, C), dtype=acc, device=x.device)
    dummy = weight
    if grad.numel() > 0:
        launch(_ln_bwd_gz_kernel, grid, x.device, x, weight, bias if bias is not None else dummy,
                ln_weight if ln_weight is not None else dummy, grad, gz, gw_part, gb_part, gln_part,
                C, H, W, Ho, Wo, n_pblocks, stride, padding, float(eps), *x.stride(), *grad.stride(),
                K=k, HAS_BIAS=bias is not None, HAS_LNW=ln_weight is not None,
                BLOCK_P=block_p, BLOCK_C=block_c, ACC=tl_acc_dtype(x.dtype))
    gx = _input_grad(gz.permute(0, 3, 1, 2), weight, x, stride, padding, k, Ho, Wo, op)
    return [gx, gw_part.sum(0).reshape(weight.shape).to(x.dtype),
            gb_part.sum(0).to(x.dtype) if bias is not None else None,
            gln_part[:, 0].sum(0).to(x.dtype) if ln_weight is not None else None,
            gln_part[:, 1].sum(0).to(x.dtype) if ln_bias is not None else None]
