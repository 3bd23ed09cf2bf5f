"""DepthwiseConv2d: a drop-in for ``nn.Conv2d(C, C, k, groups=C)`` running ``medkernels.ops.depthwise_conv2d``."""
import math

import torch
from torch import nn

from ..ops import depthwise_conv2d


class DepthwiseConv2d(nn.Module):
    """Depthwise 2-D convolution with an optional fused activation.

    Same parameters and state_dict keys as ``nn.Conv2d(channels, channels, kernel_size, stride, padding,
    groups=channels, bias=bias)``: ``weight (C, 1, k, k)``, ``bias (C,)``. Input ``(B, C, H, W)`` in any
    strides (NCHW, channels_last, a permuted channels-last slice), read in place; output in the input's
    memory format, or in ``memory_format`` when ``forward`` is given one. padding defaults to
    ``kernel_size // 2``. activation: None, "silu", "gelu" or "relu", applied in the same pass.
    """

    def __init__(self, channels, kernel_size, stride=1, padding=None, bias=True, activation=None, device=None, dtype=None):
        super().__init__()
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = kernel_size // 2 if padding is None else padding
        self.activation = activation
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size, kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Conv2d's default initialisation (fan_in = k * k for a depthwise kernel)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.kernel_size * self.kernel_size)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x, memory_format=None):
        return depthwise_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.activation, memory_format)

    def extra_repr(self):
        return (f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"bias={self.bias is not None}, activation={self.activation}")
