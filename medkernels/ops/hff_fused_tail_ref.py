"""Pure-PyTorch reference of the HFF fusion tail: both attention gates applied, the concatenation with the
fused feature and the channels-first LayerNorm (HFFBlock's ``norm3(cat[g', l', x_f])``)."""
import torch

from ._common import acc_dtype


def hff_fused_tail_ref(l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias, eps):
    """LayerNorm over the channels of ``cat[g * channel_gate, l * spatial_gate, x_f]``.

    l: (B, C1, H, W), g: (B, C2, H, W), x_f: (B, Ci, H, W); spatial_gate: (B, 1, H, W); channel_gate:
    (B, C2, 1, 1); ln_weight, ln_bias: (C2 + C1 + Ci,). Biased variance, ``eps`` inside the square root;
    computed in the accumulation dtype (float32, float64 for float64 l). Returns (out (B, C2 + C1 + Ci, H, W)
    in l's dtype, mean (B, H, W), rstd (B, H, W)): the per-pixel mean and 1 / sqrt(var + eps).
    """
    acc = acc_dtype(l)
    v = torch.cat([g.to(acc) * channel_gate.to(acc), l.to(acc) * spatial_gate.to(acc), x_f.to(acc)], dim=1)
    mean = v.mean(dim=1, keepdim=True)
    centred = v - mean
    rstd = torch.rsqrt(centred.pow(2).mean(dim=1, keepdim=True) + eps)
    out = centred * rstd * ln_weight.to(acc)[:, None, None] + ln_bias.to(acc)[:, None, None]
    return out.to(l.dtype), mean[:, 0], rstd[:, 0]
