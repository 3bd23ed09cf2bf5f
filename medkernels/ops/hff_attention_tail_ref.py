"""Pure-PyTorch reference of HFFBlock's attention and fusion tail as one computation:
``norm3(cat[g * channel_gate(g), l * spatial_gate(l), x_f])``, and of its last step, the fusion tail."""
import torch

from ._common import acc_dtype
from .hff_attention_ref import hff_channel_gate_ref, hff_spatial_gate_ref


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


def hff_attention_tail_ref(l, g, x_f, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats,
                           bn_eps, fc1_weight, fc2_weight, ln_weight, ln_bias, ln_eps):
    """The spatial gate of l (hff_spatial_gate_ref), the channel gate of g (hff_channel_gate_ref, fc weights as
    matrices) and the fusion tail (hff_fused_tail_ref). Returns (out (B, C2 + C1 + Ci, H, W) in l's dtype,
    batch_mean, batch_var): the spatial BatchNorm's batch statistics (empty when running stats were used)."""
    spatial_gate, batch_mean, batch_var = hff_spatial_gate_ref(
        l, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, bn_eps
    )
    channel_gate = hff_channel_gate_ref(g, fc1_weight, fc2_weight)
    out = hff_fused_tail_ref(l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias, ln_eps)[0]
    return out, batch_mean, batch_var
