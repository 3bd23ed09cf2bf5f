"""Triton kernels of the HFF fusion tail (the last building block of hff_attention_tail), installed as
``medkernels.kernels.hff_attention_tail``.

Launchers (contracts of csrc/ops.h; contiguous tensors; ``acc`` = float32, float64 for float64 inputs):

* ``hff_fused_tail_fwd(l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias, eps) -> [out, mean, rstd]``
* ``hff_fused_tail_bwd(dout, l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias, mean, rstd)
  -> [dl, dg, dx_f, dspatial_gate, dchannel_gate, dln_weight, dln_bias]``

out (B, C2 + C1 + Ci, H, W) = channels-first LayerNorm of cat[g * channel_gate, l * spatial_gate, x_f]: l
(B, C1, H, W), g (B, C2, H, W), x_f (B, Ci, H, W) of one dtype; spatial_gate (B, 1, H, W), channel_gate
(B, C2, 1, 1), ln_weight and ln_bias (C2 + C1 + Ci,) in acc; mean and rstd (B, H, W) in acc.

Design: one program per image and block of pixels walks the concatenated channels in (BLOCK_C, BLOCK_P)
tiles straight from the three inputs (gated on load): a pass for the mean, one for the centred variance and
one writing the output (the re-reads of a program's tiles come from the cache). The backward walks twice:
the per-pixel sums of dxhat and dxhat * xhat, then dl, dg, dx_f and d loss / d spatial_gate. The parameter
gradients and d loss / d channel_gate are written as per-program partials and summed in a fixed order.
"""
import torch
import triton
import triton.language as tl

from ._utils import acc_dtype, check_tensor, launch, store_as, tl_acc_dtype
from .hff_attention import _tile

__all__ = ["hff_fused_tail_fwd", "hff_fused_tail_bwd"]


@triton.jit
def _part(part: tl.constexpr, l_ptr, g_ptr, xf_ptr, C1, C2, Ci):
    """Source pointer, channel count and offset in the concatenation of part 0 (g), 1 (l) or 2 (x_f)."""
    if part == 0:
        return g_ptr, C2, 0
    elif part == 1:
        return l_ptr, C1, C2
    else:
        return xf_ptr, Ci, C2 + C1


@triton.jit
def _gated_tile(src_ptr, cg_ptr, sg, b, c0, count, HW, p, pmask, part: tl.constexpr, ACC: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """(gated values, raw values, mask, channels) of the tile of channels c0.. of one part (0 where masked)."""
    c = c0 + tl.arange(0, BLOCK_C)
    m = (c[:, None] < count) & pmask[None, :]
    raw = tl.load(src_ptr + (b * count + c[:, None]) * HW + p[None, :], mask=m, other=0.0).to(ACC)
    if part == 0:
        v = raw * tl.load(cg_ptr + b * count + c, mask=c < count, other=0.0)[:, None]
    elif part == 1:
        v = raw * sg[None, :]
    else:
        v = raw
    return v, raw, m, c


@triton.jit
def _tail_fwd_kernel(l_ptr, g_ptr, xf_ptr, sg_ptr, cg_ptr, w_ptr, bias_ptr, out_ptr, mean_ptr, rstd_ptr,
                     C1, C2, Ci, HW, eps, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HW
    CT = C1 + C2 + Ci
    sg = tl.load(sg_ptr + b * HW + p, mask=pmask, other=0.0)
    total = tl.zeros([BLOCK_P], ACC)
    for part in tl.static_range(3):
        src, count, offset = _part(part, l_ptr, g_ptr, xf_ptr, C1, C2, Ci)
        for c0 in range(0, count, BLOCK_C):
            v, raw, m, c = _gated_tile(src, cg_ptr, sg, b, c0, count, HW, p, pmask, part, ACC, BLOCK_C)
            total += tl.sum(v, axis=0)
    mean = total / CT
    sq = tl.zeros([BLOCK_P], ACC)
    for part in tl.static_range(3):
        src, count, offset = _part(part, l_ptr, g_ptr, xf_ptr, C1, C2, Ci)
        for c0 in range(0, count, BLOCK_C):
            v, raw, m, c = _gated_tile(src, cg_ptr, sg, b, c0, count, HW, p, pmask, part, ACC, BLOCK_C)
            centred = tl.where(m, v - mean[None, :], 0.0)
            sq += tl.sum(centred * centred, axis=0)
    rstd = 1.0 / tl.sqrt(sq / CT + eps)
    for part in tl.static_range(3):
        src, count, offset = _part(part, l_ptr, g_ptr, xf_ptr, C1, C2, Ci)
        for c0 in range(0, count, BLOCK_C):
            v, raw, m, c = _gated_tile(src, cg_ptr, sg, b, c0, count, HW, p, pmask, part, ACC, BLOCK_C)
            w = tl.load(w_ptr + offset + c, mask=c < count, other=0.0)
            bias = tl.load(bias_ptr + offset + c, mask=c < count, other=0.0)
            y = (v - mean[None, :]) * rstd[None, :] * w[:, None] + bias[:, None]
            store_as(out_ptr + (b * CT + offset + c[:, None]) * HW + p[None, :], y, m)
    tl.store(mean_ptr + b * HW + p, mean, mask=pmask)
    tl.store(rstd_ptr + b * HW + p, rstd, mask=pmask)


@triton.jit
def _tail_bwd_kernel(dout_ptr, l_ptr, g_ptr, xf_ptr, sg_ptr, cg_ptr, w_ptr, mean_ptr, rstd_ptr,
                     dl_ptr, dg_ptr, dxf_ptr, dsg_ptr, dw_part_ptr, db_part_ptr, dcg_part_ptr,
                     C1, C2, Ci, HW, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    prog = b * tl.num_programs(1) + tl.program_id(1)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HW
    CT = C1 + C2 + Ci
    sg = tl.load(sg_ptr + b * HW + p, mask=pmask, other=0.0)
    mean = tl.load(mean_ptr + b * HW + p, mask=pmask, other=0.0)
    rstd = tl.load(rstd_ptr + b * HW + p, mask=pmask, other=0.0)
    m1 = tl.zeros([BLOCK_P], ACC)
    m2 = tl.zeros([BLOCK_P], ACC)
    for part in tl.static_range(3):
        src, count, offset = _part(part, l_ptr, g_ptr, xf_ptr, C1, C2, Ci)
        for c0 in range(0, count, BLOCK_C):
            v, raw, m, c = _gated_tile(src, cg_ptr, sg, b, c0, count, HW, p, pmask, part, ACC, BLOCK_C)
            xhat = tl.where(m, (v - mean[None, :]) * rstd[None, :], 0.0)
            d = tl.load(dout_ptr + (b * CT + offset + c[:, None]) * HW + p[None, :], mask=m, other=0.0).to(ACC)
            w = tl.load(w_ptr + offset + c, mask=c < count, other=0.0)
            dxhat = d * w[:, None]
            m1 += tl.sum(dxhat, axis=0)
            m2 += tl.sum(dxhat * xhat, axis=0)
            tl.store(dw_part_ptr + prog * CT + offset + c, tl.sum(d * xhat, axis=1), mask=c < count)
            tl.store(db_part_ptr + prog * CT + offset + c, tl.sum(d, axis=1), mask=c < count)
    m1 = m1 / CT
    m2 = m2 / CT
    ds = tl.zeros([BLOCK_P], ACC)
    for part in tl.static_range(3):
        src, count, offset = _part(part, l_ptr, g_ptr, xf_ptr, C1, C2, Ci)
        for c0 in range(0, count, BLOCK_C):
            v, raw, m, c = _gated_tile(src, cg_ptr, sg, b, c0, count, HW, p, pmask, part, ACC, BLOCK_C)
            xhat = (v - mean[None, :]) * rstd[None, :]
            d = tl.load(dout_ptr + (b * CT + offset + c[:, None]) * HW + p[None, :], mask=m, other=0.0).to(ACC)
            w = tl.load(w_ptr + offset + c, mask=c < count, other=0.0)
            dv = tl.where(m, rstd[None, :] * (d * w[:, None] - m1[None, :] - xhat * m2[None, :]), 0.0)
            at = (b * count + c[:, None]) * HW + p[None, :]
            if part == 0:
                cg = tl.load(cg_ptr + b * count + c, mask=c < count, other=0.0)
                store_as(dg_ptr + at, dv * cg[:, None], m)
                tl.store(dcg_part_ptr + prog * C2 + c, tl.sum(dv * raw, axis=1), mask=c < count)
            elif part == 1:
                store_as(dl_ptr + at, dv * sg[None, :], m)
                ds += tl.sum(dv * raw, axis=0)
            else:
                store_as(dxf_ptr + at, dv, m)
    tl.store(dsg_ptr + b * HW + p, ds, mask=pmask)


def _check(op, l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias):
    for name, t in (("l", l), ("g", g), ("x_f", x_f)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{op}: expected {name} to be a 4-D tensor of shape (B, C, H, W)")
    B, C1, H, W = l.shape
    if l.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{op}: expected l to have dtype float16, bfloat16, float32 or float64, got {l.dtype}")
    if H * W < 1:
        raise ValueError(f"{op}: expected l to have at least one pixel, got {tuple(l.shape)}")
    check_tensor(l, op, "l", l.shape, "(B, C1, H, W)", l.dtype, l.device)
    check_tensor(g, op, "g", (B, g.shape[1], H, W), "(B, C2, H, W)", l.dtype, l.device)
    check_tensor(x_f, op, "x_f", (B, x_f.shape[1], H, W), "(B, Ci, H, W)", l.dtype, l.device)
    acc, total = acc_dtype(l.dtype), C1 + g.shape[1] + x_f.shape[1]
    check_tensor(spatial_gate, op, "spatial_gate", (B, 1, H, W), "(B, 1, H, W)", acc, l.device)
    check_tensor(channel_gate, op, "channel_gate", (B, g.shape[1], 1, 1), "(B, C2, 1, 1)", acc, l.device)
    check_tensor(ln_weight, op, "ln_weight", (total,), "(C1 + C2 + Ci,)", acc, l.device)
    check_tensor(ln_bias, op, "ln_bias", (total,), "(C1 + C2 + Ci,)", acc, l.device)
    return B, C1, g.shape[1], x_f.shape[1], H, W


def _blocks(CT, HW):
    return _tile(CT, 32, 512), _tile(HW, 64, 512)


def hff_fused_tail_fwd(l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias, eps):
    """-> [out (B, C2 + C1 + Ci, H, W) in l's dtype, mean (B, H, W), rstd (B, H, W)]."""
    B, C1, C2, Ci, H, W = _check("hff_fused_tail_fwd", l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias)
    CT, HW = C1 + C2 + Ci, H * W
    out = torch.empty((B, CT, H, W), dtype=l.dtype, device=l.device)
    mean = torch.empty((B, H, W), dtype=acc_dtype(l.dtype), device=l.device)
    rstd = torch.empty_like(mean)
    block_c, block_p = _blocks(CT, HW)
    launch(_tail_fwd_kernel, (B, triton.cdiv(HW, block_p)), l.device, l, g, x_f, spatial_gate, channel_gate,
           ln_weight, ln_bias, out, mean, rstd, C1, C2, Ci, HW, float(eps), ACC=tl_acc_dtype(l.dtype), BLOCK_C=block_c,
           BLOCK_P=block_p)
    return [out, mean, rstd]


def hff_fused_tail_bwd(dout, l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias, mean, rstd):
    """-> [dl, dg, dx_f, dspatial_gate (B, 1, H, W), dchannel_gate (B, C2, 1, 1), dln_weight, dln_bias]."""
    op = "hff_fused_tail_bwd"
    B, C1, C2, Ci, H, W = _check(op, l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias)
    CT, HW = C1 + C2 + Ci, H * W
    acc = acc_dtype(l.dtype)
    check_tensor(dout, op, "dout", (B, CT, H, W), "(B, C1 + C2 + Ci, H, W)", l.dtype, l.device)
    check_tensor(mean, op, "mean", (B, H, W), "(B, H, W)", acc, l.device)
    check_tensor(rstd, op, "rstd", (B, H, W), "(B, H, W)", acc, l.device)
    block_c, block_p = _blocks(CT, HW)
    blocks = triton.cdiv(HW, block_p)
    dl, dg, dx_f = torch.empty_like(l), torch.empty_like(g), torch.empty_like(x_f)
    dsg = torch.empty((B, 1, H, W), dtype=acc, device=l.device)
    dw_part = torch.empty((B * blocks, CT), dtype=acc, device=l.device)
    db_part = torch.empty_like(dw_part)
    dcg_part = torch.empty((B, blocks, C2), dtype=acc, device=l.device)
    launch(_tail_bwd_kernel, (B, blocks), l.device, dout, l, g, x_f, spatial_gate, channel_gate, ln_weight, mean,
           rstd, dl, dg, dx_f, dsg, dw_part, db_part, dcg_part, C1, C2, Ci, HW, ACC=tl_acc_dtype(l.dtype),
           BLOCK_C=block_c, BLOCK_P=block_p)
    return [dl, dg, dx_f, dsg, dcg_part.sum(dim=1).reshape(B, C2, 1, 1), dw_part.sum(dim=0), db_part.sum(dim=0)]
