"""Pure-PyTorch references of HiFuse's HFF attentions (spatial attention on the local feature, channel
attention on the global feature)."""
import torch
import torch.nn.functional as F


def hff_spatial_attention_ref(x, conv_weight, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps):
    """x * sigmoid(BN(conv7x7(cat[max over C, mean over C]))).

    x: (B, C, H, W); conv_weight: (1, 2, k, k), no bias, padding k // 2; BN over the single map channel with
    batch statistics when `use_batch_stats`, else the running ones. Returns (out, batch_mean, batch_var):
    the (1,)-shaped batch mean and unbiased variance of the map (empty when running stats were used).
    """
    pooled = torch.cat([x.max(dim=1, keepdim=True).values, x.mean(dim=1, keepdim=True)], dim=1)
    k = conv_weight.shape[-1]
    s = F.conv2d(pooled, conv_weight, None, 1, k // 2)
    if use_batch_stats:
        mean = s.mean(dim=(0, 2, 3))
        var = s.var(dim=(0, 2, 3), unbiased=False)
        count = s.numel() // s.shape[1]
        batch_mean, batch_var = mean.detach(), var.detach() * count / (count - 1)
    else:
        mean, var = running_mean, running_var
        batch_mean, batch_var = s.new_empty(0), s.new_empty(0)
    s = (s - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + eps)
    if bn_weight is not None:
        s = s * bn_weight[None, :, None, None]
    if bn_bias is not None:
        s = s + bn_bias[None, :, None, None]
    return x * torch.sigmoid(s), batch_mean, batch_var


def hff_channel_attention_ref(x, fc1_weight, fc2_weight):
    """x * gate, gate = sigmoid(mlp(max over H, W) + mlp(mean over H, W)).

    x: (B, C, H, W); fc1_weight: (C // r, C); fc2_weight: (C, C // r); mlp(v) = fc2(relu(fc1(v))), no biases.
    """
    pooled_max = x.flatten(2).max(dim=-1).values
    pooled_avg = x.mean(dim=(2, 3))

    def mlp(v):
        return F.relu(v @ fc1_weight.t()) @ fc2_weight.t()

    gate = torch.sigmoid(mlp(pooled_max) + mlp(pooled_avg))
    return x * gate[:, :, None, None]
