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

# dtype -> (rtol, floor) of the elementwise checks (assert_close_elementwise): |error| <= rtol * |expected| +
# floor * max(1, max |expected|) in every entry, against float64 on the same rounded inputs. float16/bfloat16:
# a result computed in float32 and rounded once to nearest is within half an epsilon of the exact value, which is
# rtol; the floor (1e-5, far below either epsilon) takes float32's own error (a float32 result on the other side
# of a rounding midpoint) and float16's subnormal spacing. float32 / float64: the kernels' sums round at every
# addition, which a cancelling sum leaves larger than rtol * |result|; the floor takes that.
_HALF_FLOOR = 1e-5
ELEMENTWISE_TOLERANCES = {
    torch.float64: (1e-11, 1e-13),
    torch.float32: (2e-5, 5e-6),
    torch.float16: (_EPS16 / 2, _HALF_FLOOR),
    torch.bfloat16: (_EPSBF16 / 2, _HALF_FLOOR),
}


def tolerance(t, kind):
    """The tolerance of `kind` ("output" or "grad") for a result tensor, by its dtype."""
    return _ROWS[t.dtype][0 if kind == "output" else 1]


def assert_close_scaled(actual, expected, tol, name, rtol=0.0, magnitude=None):
    """|actual - expected| <= tol * max(1, max |expected|) + rtol * magnitude elementwise, compared in float64.

    magnitude (default |expected|) is what the relative term scales: a test that knows a larger bound on an
    entry's rounding (the magnitudes of two partial sums rounded separately) passes it. With rtol = 0 (the
    default) the bound is scaled by the largest entry alone, which leaves small entries unchecked: it is right
    only where the error of every entry grows with the whole tensor's size (sums over thousands of terms)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not expected.numel():
        return
    scale = max(1.0, float(expected.abs().max()))
    magnitude = expected.abs() if magnitude is None else magnitude.detach().double().cpu().abs()
    err = (actual - expected).abs()
    bound = tol * scale + rtol * magnitude
    excess = (err - bound).flatten()
    failed = ~(excess <= 0)  # NaN fails too
    if bool(failed.any()):
        worst = int(torch.where(excess.isnan(), torch.inf, excess).argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), expected.shape))
        a, e, b = (float(t.flatten()[worst]) for t in (actual, expected, bound))
        raise AssertionError(
            f"{name}: |error| > {tol:.1e} * {scale:.3g} + {rtol:.1e} * magnitude in {int(failed.sum())} of "
            f"{expected.numel()} entries; worst at {index}: {a!r} vs {e!r} (|error| {abs(a - e):.3e} > {b:.3e})")


def assert_close_elementwise(actual, expected, name, dtype=None, magnitude=None, floor=None, roundings=1):
    """assert_close_scaled with the (rtol, floor) of ELEMENTWISE_TOLERANCES for `dtype` (default actual's).

    `roundings` multiplies rtol, for a result rounded more than once to the dtype: two partial sums rounded
    before they are added (round(round(a) + b), or round(round(a) + round(b))) are within one epsilon of
    |a| + |b|, which the caller passes as `magnitude` with roundings=2. `floor` replaces the row's floor where a
    test states why its case needs a larger one."""
    rtol, row_floor = ELEMENTWISE_TOLERANCES[actual.dtype if dtype is None else dtype]
    assert_close_scaled(actual, expected, row_floor if floor is None else floor, name, rtol=rtol * roundings,
                        magnitude=magnitude)


def randn(shape, seed, dtype=torch.float64, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale + shift).to(dtype)


def rand(shape, seed, dtype=torch.float64, low=0.0, high=1.0):
    u = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (low + (high - low) * u).to(dtype)


def channels_last_like(t):
    """The same values as `t` (B, C, H, W) in a non-contiguous (B, H, W, C)-strided tensor."""
    return t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
