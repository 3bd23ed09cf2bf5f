"""Pure-PyTorch reference of HFFBlock's attention and fusion tail as one computation:
``norm3(cat[g * channel_gate(g), l * spatial_gate(l), x_f])``."""
from .hff_attention_ref import hff_channel_gate_ref, hff_spatial_gate_ref
from .hff_fused_tail_ref import hff_fused_tail_ref


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
