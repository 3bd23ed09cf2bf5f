"""Reference of :func:`medkernels.ops.conv3x3`: ``F.conv2d`` with stride 1, padding 1 and no bias."""
import torch.nn.functional as F


def conv3x3_ref(x, weight):
    return F.conv2d(x, weight, None, 1, 1)
