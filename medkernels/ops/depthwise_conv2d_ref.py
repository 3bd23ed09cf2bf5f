"""Pure-PyTorch reference of the depthwise convolution with a fused activation."""
import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "none": lambda t: t,
    "silu": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
}


def depthwise_conv2d_ref(x, weight, bias, stride, padding, activation, channels_last=None):
    """x: (B, C, H, W), weight: (C, 1, k, k), bias: (C,) or None -> act(conv), channels_last or contiguous
    (None: x's memory format)."""
    y = ACTIVATIONS[activation](F.conv2d(x, weight, bias, stride, padding, groups=x.shape[1]))
    if channels_last is None:
        channels_last = is_channels_last(x)
    return y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def is_channels_last(x):
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
