"""Benchmark of ``conv3x3`` (HiFuse's IRMLP convolution: dense 3x3, stride 1, padding 1, no bias) at HiFuse-T's four
IRMLP shapes (3C = 288, 576, 1152, 2304 channels on maps of 56, 28, 14, 7 pixels a side), batch 8 on CPU / 64 on a
GPU, float32.

Providers: ``ref`` (``F.conv2d`` on NCHW maps, as the official IRMLP runs it; the baseline), ``channels_last``
(``F.conv2d`` on channels-last maps and filter: PyTorch's fastest arrangement on a CPU) and each medkernels
backend that implements the op (``cpu``: Winograd F(4x4, 3x3) where it pays, see
medkernels/ops/conv3x3_winograd.py; stage 4 takes its direct convolution). The error column is the largest
difference from ``ref`` (output, or any gradient for forward+backward).
"""
import torch
import torch.nn.functional as F

from medkernels import ops

from .common import kernel_backends, on_backend
from .op import Case, run_op_bench

# (channels, map side) of the IRMLP's 3x3 convolution at HiFuse-T's four stages
STAGES = ((288, 56), (576, 28), (1152, 14), (2304, 7))


def conv3x3_inputs(device, batch, channels, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    weight = torch.randn(channels, channels, 3, 3, generator=g) * (9 * channels) ** -0.5
    return {"x": x.to(device), "weight": weight.to(device)}


def conv3x3_providers(device):
    cl = torch.channels_last

    def reference(t):
        return F.conv2d(t["x"], t["weight"], None, 1, 1)

    def channels_last(t):
        return F.conv2d(t["x"].contiguous(memory_format=cl), t["weight"].contiguous(memory_format=cl), None, 1, 1)

    def medkernels_op(t):
        return ops.conv3x3(t["x"], t["weight"])

    providers = {"ref": reference, "channels_last": channels_last}
    providers.update({b: on_backend(b, medkernels_op) for b in kernel_backends(device) if b in ("cpu", "cuda")})
    return providers


def bench_conv3x3(device, time_call, warmup, repeats, quick=True):
    device = torch.device(device)
    batch = 64 if device.type == "cuda" else 8
    rows = []
    for channels, size in STAGES:
        shape = {"batch": batch, "channels": channels, "H": size, "W": size, "dtype": "float32"}
        rows += run_op_bench("conv3x3", shape, conv3x3_inputs(device, batch, channels, size), conv3x3_providers(device),
                             device, time_call, warmup, repeats)
    return rows


def conv3x3_cases(device, stages, quick):
    """The pytest-benchmark cases (registry.OPS): the CLI's shapes and providers, batch 8."""
    device = torch.device(device)
    return [Case("conv3x3", f"stage{stage}", lambda c=c, n=n: conv3x3_inputs(device, 8, c, n),
                 conv3x3_providers(device))
            for stage, (c, n) in enumerate(STAGES, 1) if stage in stages]
