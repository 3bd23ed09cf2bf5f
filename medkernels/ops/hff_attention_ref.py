"""Pure-PyTorch references of HiFuse's HFF attentions (spatial attention on the local feature, channel
attention on the global feature), in gate form and multiplied into their input.

The gates are computed in the accumulation dtype: float32 for float16/bfloat16/float32 inputs, float64 for
float64 inputs (the kernels' statistics dtype).
"""
import torch
import torch.nn.functional as F

from ._common import acc_dtype


def spatial_pool_ref(x):
    """(pooled (B, 2, H, W) = [max, mean] over C in the accumulation dtype, argmax (B, H, W) int64)."""
    xa = x.to(acc_dtype(x))
    top, index = xa.max(dim=1, keepdim=True)
    return torch.cat([top, xa.mean(dim=1, keepdim=True)], dim=1), index[:, 0]


def channel_pool_ref(x):
    """(pooled (B, 2, C) = [max, mean] over H, W in the accumulation dtype, argmax (B, C) int64 flat pixel)."""
    xa = x.to(acc_dtype(x)).flatten(2)
    top, index = xa.max(dim=-1)
    return torch.stack([top, xa.mean(dim=-1)], dim=1), index


def hff_spatial_gate_ref(x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps):
    """gate = sigmoid(BN(conv(cat[max over C, mean over C]))), of shape (B, 1, H, W) in the accumulation dtype.

    x: (B, C, H, W); conv_weight: (1, 2, k, k), no bias, padding k // 2; BN over the single map channel with
    batch statistics when `use_batch_stats`, else the running ones. Returns (gate, batch_mean, batch_var):
    the (1,)-shaped batch mean and unbiased variance of the map (empty when running stats were used).
    """
    acc = acc_dtype(x)
    pooled = spatial_pool_ref(x)[0]
    k = conv_weight.shape[-1]
    s = F.conv2d(pooled, conv_weight.to(acc), None, 1, k // 2)
    if use_batch_stats:
        mean = s.mean(dim=(0, 2, 3))
        var = s.var(dim=(0, 2, 3), unbiased=False)
        count = s.numel() // s.shape[1]
        batch_mean, batch_var = mean.detach(), var.detach() * count / (count - 1)
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
        batch_mean, batch_var = s.new_empty(0), s.new_empty(0)
    s = (s - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + eps)
    if bn_weight is not None:
        s = s * bn_weight.to(acc)[None, :, None, None]
    if bn_bias is not None:
        s = s + bn_bias.to(acc)[None, :, None, None]
    return torch.sigmoid(s), batch_mean, batch_var


def hff_spatial_attention_ref(x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps):
    """x * hff_spatial_gate_ref(...), in x's dtype; returns (out, batch_mean, batch_var)."""
    gate, batch_mean, batch_var = hff_spatial_gate_ref(
        x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps
    )
    return (x * gate).to(x.dtype), batch_mean, batch_var


def hff_channel_gate_ref(x, fc1_weight, fc2_weight):
    """gate = sigmoid(mlp(max over H, W) + mlp(mean over H, W)), of shape (B, C, 1, 1) in the accumulation dtype.

    x: (B, C, H, W); fc1_weight: (C // r, C); fc2_weight: (C, C // r); mlp(v) = fc2(relu(fc1(v))), no biases.
    """
    acc = acc_dtype(x)
    pooled = channel_pool_ref(x)[0]
    w1, w2 = fc1_weight.to(acc), fc2_weight.to(acc)

    def mlp(v):
        return F.relu(v @ w1.t()) @ w2.t()

    return torch.sigmoid(mlp(pooled[:, 0]) + mlp(pooled[:, 1]))[:, :, None, None]


def hff_channel_attention_ref(x, fc1_weight, fc2_weight):
    """x * hff_channel_gate_ref(...), in x's dtype."""
    return (x * hff_channel_gate_ref(x, fc1_weight, fc2_weight)).to(x.dtype)
