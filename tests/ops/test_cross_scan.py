"""cross_scan / cross_merge: every backend against explicit flips and transposes, and against each other."""
import pytest
import torch

import medkernels
from medkernels.ops import cross_merge, cross_scan

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 1e-6), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
SHAPES = [pytest.param(s, id="x".join(map(str, s))) for s in [(1, 1, 1, 1), (2, 3, 5, 7), (1, 4, 7, 5), (2, 2, 1, 9), (1, 3, 14, 14)]]


def scan_by_index(x):
    """Position i of direction k reads the pixel listed explicitly for that direction."""
    b, c, h, w = x.shape
    rows = [(r, q) for r in range(h) for q in range(w)]
    cols = [(r, q) for q in range(w) for r in range(h)]
    orders = [rows, cols, rows[::-1], cols[::-1]]
    y = x.new_zeros(b, 4, c, h * w)
    for k, order in enumerate(orders):
        for i, (r, q) in enumerate(order):
            y[:, k, :, i] = x[:, :, r, q]
    return y


def merge_by_flips(y, h, w):
    b, _, c, L = y.shape
    y = y.double()
    cols_back = lambda t: t.reshape(b, c, w, h).transpose(2, 3).reshape(b, c, L)  # noqa: E731
    return y[:, 0] + torch.flip(y[:, 2], dims=[-1]) + cols_back(y[:, 1]) + cols_back(torch.flip(y[:, 3], dims=[-1]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_cross_scan_matches_explicit_orders(device_backend, shape, dtype):
    device, backend = device_backend
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype).to(device)
    with medkernels.use_backend(backend):
        y = cross_scan(x)
    assert y.dtype == dtype and y.shape == (shape[0], 4, shape[1], shape[2] * shape[3])
    torch.testing.assert_close(y.cpu(), scan_by_index(x.cpu()), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_cross_merge_matches_flips_and_transposes(device_backend, shape, dtype):
    device, backend = device_backend
    b, c, h, w = shape
    y = torch.randn(b, 4, c, h * w, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    with medkernels.use_backend(backend):
        out = cross_merge(y.reshape(b, 4, c, h, w))
    assert out.dtype == dtype and out.shape == (b, c, h * w)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.cpu().double(), merge_by_flips(y.cpu(), h, w), rtol=rtol, atol=atol)


def test_non_contiguous_inputs(device_backend):
    device, backend = device_backend
    x = torch.randn(2, 7, 3, 5, device=device).permute(0, 2, 3, 1)  # (2, 3, 5, 7), not contiguous
    y = torch.randn(2, 3, 5, 7, 4, device=device).permute(0, 4, 1, 2, 3)
    with medkernels.use_backend(backend):
        torch.testing.assert_close(cross_scan(x), cross_scan(x.contiguous()))
        torch.testing.assert_close(cross_merge(y), cross_merge(y.contiguous()))


def test_backward_is_the_adjoint(device_backend):
    device, backend = device_backend
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.randn(2, 4, 3, 5, 7, dtype=torch.float64, device=device, requires_grad=True)
    # gradcheck launches a kernel per perturbed element: keep it tiny (the Triton interpreter is slow)
    x_small = torch.randn(1, 2, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    y_small = torch.randn(1, 4, 2, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    with medkernels.use_backend(backend):
        assert torch.autograd.gradcheck(cross_scan, (x_small,))
        assert torch.autograd.gradcheck(cross_merge, (y_small,))
        # <cross_scan(x), y> == <x, cross_merge(y)>
        lhs = (cross_scan(x) * y.reshape(2, 4, 3, 35)).sum()
        rhs = (x.reshape(2, 3, 35) * cross_merge(y)).sum()
    torch.testing.assert_close(lhs, rhs)


@pytest.mark.parametrize(
    "fn, arg, exc, pattern",
    [
        pytest.param(cross_scan, torch.zeros(2, 3, 4), ValueError, r"\bx\b", id="scan-rank"),
        pytest.param(cross_scan, torch.zeros(2, 3, 4, 4, dtype=torch.int32), TypeError, r"\bx\b", id="scan-int"),
        pytest.param(cross_merge, torch.zeros(2, 3, 4, 4, 4), ValueError, r"\by\b.*\b4 scan directions\b",
                     id="merge-directions"),
        pytest.param(cross_merge, torch.zeros(2, 4, 3, 4), ValueError, r"\by\b", id="merge-rank"),
        pytest.param(cross_merge, torch.zeros(2, 4, 3, 4, 4, dtype=torch.complex64), TypeError, r"\by\b",
                     id="merge-complex"),
    ],
)
def test_bad_inputs(fn, arg, exc, pattern):
    """The error names the argument as a word of the message (a bare "y" would also match the y of "dtype")."""
    with pytest.raises(exc, match=pattern):
        fn(arg)
