"""Pure-PyTorch reference of the depthwise convolution followed by a LayerNorm over channels (HiFuse's Local
block)."""
import torch.nn.functional as F


def depthwise_conv2d_layernorm_ref(x, weight, bias, ln_weight, ln_bias, stride, padding, eps):
    """x: (B, C, H, W) -> LayerNorm over C of conv2d(x, weight, bias, groups=C), as (B, Ho, Wo, C) contiguous."""
    y = F.conv2d(x, weight, bias, stride, padding, groups=x.shape[1]).permute(0, 2, 3, 1)
    if any(t is not None and t.dtype != y.dtype for t in (ln_weight, ln_bias)):
        # float32 parameters of a half y: normalised in float32 (not every device's layer_norm takes the mix)
        w, b = (None if t is None else t.float() for t in (ln_weight, ln_bias))
        return F.layer_norm(y.float(), (x.shape[1],), w, b, eps).to(y.dtype).contiguous()
    return F.layer_norm(y, (x.shape[1],), ln_weight, ln_bias, eps).contiguous()
