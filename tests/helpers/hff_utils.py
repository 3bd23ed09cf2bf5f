"""Helpers of the HFF kernel and block tests."""
import pytest
import torch

_EPS16, _EPSBF16 = torch.finfo(torch.float16).eps, torch.finfo(torch.bfloat16).eps

# (dtype, tolerance of outputs, tolerance of gradients) for tensors of that dtype, relative to the largest
# magnitude of the expected tensor (assert_close_scaled). The kernels compute in float32 (float64 for float64)
# and round each float16/bfloat16 result once, or twice where a gradient is accumulated into one already
# written (the combined op's dl and dg): at most one unit of the dtype's epsilon (2^-10, 2^-7), which is the
# low-precision rows' tolerance. Results a low-precision op returns in float32 (the gates, the fusion tail's gate
# and LayerNorm-parameter gradients) are held to the float32 row: nothing in them is rounded to the input dtype.
DTYPE_CASES = [
    pytest.param((torch.float64, 1e-12, 1e-11), id="float64"),
    pytest.param((torch.float32, 2e-6, 1e-5), id="float32"),
    pytest.param((torch.float16, _EPS16, _EPS16), id="float16"),
    pytest.param((torch.bfloat16, _EPSBF16, _EPSBF16), id="bfloat16"),
]
_ROWS = {case.values[0][0]: case.values[0][1:] for case in DTYPE_CASES}
DTYPE_TOLERANCES = _ROWS  # dtype -> (output tolerance, gradient tolerance)


def tolerance(t, kind):
    """The tolerance of `kind` ("output" or "grad") for a result tensor, by its dtype."""
    return _ROWS[t.dtype][0 if kind == "output" else 1]


def assert_close_scaled(actual, expected, tol, name):
    """|actual - expected| <= tol * max(1, max |expected|) elementwise, compared in float64."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert err <= tol * scale, f"{name}: max |error| {err:.3e} > {tol:.1e} * {scale:.3g}"


def randn(shape, seed, dtype=torch.float64, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale + shift).to(dtype)


def rand(shape, seed, dtype=torch.float64, low=0.0, high=1.0):
    u = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (low + (high - low) * u).to(dtype)


def channels_last_like(t):
    """The same values as `t` (B, C, H, W) in a non-contiguous (B, H, W, C)-strided tensor."""
    return t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
