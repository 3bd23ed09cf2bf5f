"""Triton kernels of medkernels, installed as the subpackage ``medkernels.kernels``.

Each module (e.g. ``medkernels.kernels.cross_scan``) imports triton itself; this package
imports nothing eagerly, so ``import medkernels.kernels`` works where triton is missing.
For CPU tensors, set ``TRITON_INTERPRET=1`` before importing a kernel module.
"""

__all__ = ["cross_scan", "depthwise_conv2d", "selective_scan", "ss2d_scan", "hff_attention", "hff_attention_tail"]
