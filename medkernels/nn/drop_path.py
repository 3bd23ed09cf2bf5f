"""Stochastic depth (DropPath), shared by the HiFuse and MedMamba blocks."""
import torch
from torch import nn


def drop_path(x, drop_prob=0.0, training=False):
    """Zero whole samples of ``x`` with probability ``drop_prob`` in training; scale survivors by 1/(1-p).

    x: (batch, ...) -> same shape. The identity in eval or with ``drop_prob == 0``.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).add_(keep).floor_()
    return x.div(keep) * mask


class DropPath(nn.Module):
    """Module form of :func:`drop_path`."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"
