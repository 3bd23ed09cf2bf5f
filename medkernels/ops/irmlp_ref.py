"""Reference of :func:`medkernels.ops.irmlp`: the official HiFuse IRMLP chain, NCHW convolutions and
BatchNorm2d exactly as the official module runs them."""
import torch.nn.functional as F


def batch_norm_ref(x, bn):
    """``F.batch_norm`` with a :class:`~medkernels.ops.irmlp.BatchNormArgs` (updates its running statistics in
    place when ``bn.training`` and they are given, as ``nn.BatchNorm2d`` does)."""
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training, bn.momentum, bn.eps)


def irmlp_ref(x, conv1_weight, conv2_weight, conv3_weight, bn1, bn3):
    pad = (conv1_weight.shape[-1] - 1) // 2
    y = batch_norm_ref(F.gelu(F.conv2d(x, conv1_weight, None, 1, pad)) + x, bn1)
    y = F.gelu(F.conv2d(y, conv2_weight))
    return batch_norm_ref(F.conv2d(y, conv3_weight), bn3)
