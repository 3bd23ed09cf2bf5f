"""medkernels.nn: drop-in modules with the official state_dict keys, running medkernels.ops."""
from .depthwise import DepthwiseConv2d
from .hifuse import GlobalBlock, HFFBlock, LocalBlock
from .linear import Linear
from .ss2d import SS2D, SSConvSSM

__all__ = ["DepthwiseConv2d", "Linear", "LocalBlock", "GlobalBlock", "HFFBlock", "SS2D", "SSConvSSM"]
