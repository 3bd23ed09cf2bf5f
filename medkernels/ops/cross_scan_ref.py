"""Pure-PyTorch reference of MedMamba's four-direction cross-scan and its merge.

Directions, for an (H, W) map flattened to L = H*W positions: 0 row-major, 1 column-major,
2 reversed row-major, 3 reversed column-major.
"""
import torch


def direction_order(x, k):
    """x: (B, C, H, W) -> (B, C, H*W) in scan direction k's order."""
    b, c, h, w = x.shape
    seq = x.reshape(b, c, h * w) if k in (0, 2) else x.transpose(2, 3).reshape(b, c, h * w)
    return seq.flip(-1) if k >= 2 else seq


def cross_scan_ref(x):
    """x: (B, C, H, W) -> (B, 4, C, H*W), each direction in its scan order."""
    return torch.stack([direction_order(x, k) for k in range(4)], dim=1)


def cross_merge_ref(y):
    """y: (B, 4, C, H, W), y[:, k] flattened in direction k's order -> (B, C, H*W) summed in row-major order."""
    b, _, c, h, w = y.shape
    flat = y.reshape(b, 4, c, h * w)

    def from_columns(t):  # column-major positions back to row-major pixels
        return t.reshape(b, c, w, h).transpose(2, 3).reshape(b, c, h * w)

    return flat[:, 0] + from_columns(flat[:, 1]) + flat[:, 2].flip(-1) + from_columns(flat[:, 3].flip(-1))
