"""Helpers of the HFF kernel and block tests."""
import torch

# (dtype, tolerance of outputs, tolerance of gradients), relative to the largest magnitude of the expected
# tensor: float16/bfloat16 inputs and outputs are rounded to 11/8 significant bits, the arithmetic inside the
# kernels is float32 (float64 for float64).
DTYPE_TOLERANCES = {
    torch.float64: (1e-12, 1e-11),
    torch.float32: (2e-6, 1e-5),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (1e-2, 2e-2),
}


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
