"""medkernels.nn.Linear: ``nn.Linear`` running :func:`medkernels.ops.linear`."""
from torch import nn

from .. import ops as _ops


class Linear(nn.Linear):
    """``nn.Linear`` (the same parameters, initialisation and state_dict keys) whose forward is
    :func:`medkernels.ops.linear`: x ``(..., in_features)`` -> ``(..., out_features)``."""

    def forward(self, x):
        return _ops.linear(x, self.weight, self.bias)
