"""medkernels.ops: the differentiable ops, validated at the boundary and dispatched to one backend."""
from .conv3x3 import conv3x3
from .cross_scan import cross_merge, cross_scan
from .depthwise_conv2d import depthwise_conv2d
from .depthwise_conv2d_layernorm import depthwise_conv2d_layernorm
from .hff_attention import hff_channel_attention, hff_spatial_attention
from .hff_attention_tail import hff_attention_tail
from .irmlp import BatchNormArgs, irmlp
from .linear import linear
from .selective_scan import selective_scan
from .ss2d_scan import ss2d_scan

__all__ = [
    "selective_scan",
    "ss2d_scan",
    "cross_scan",
    "cross_merge",
    "depthwise_conv2d",
    "depthwise_conv2d_layernorm",
    "hff_spatial_attention",
    "hff_channel_attention",
    "hff_attention_tail",
    "irmlp",
    "BatchNormArgs",
    "linear",
    "conv3x3",
]
