"""cross_scan / cross_merge kernels called directly, against a torch.flip/transpose statement of the layouts.

Backends: the C++ CPU kernels and the shared index math of medkernels._C, its CUDA kernels (with a GPU), and the
Triton kernels (on a GPU, or on CPU tensors when TRITON_INTERPRET=1).
"""
import importlib
import os

import pytest
import torch

SHAPES = [(2, 3, 5, 7), (1, 1, 1, 1), (2, 2, 1, 9), (1, 2, 9, 1), (1, 3, 4, 4), (3, 2, 16, 13)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _shape_id(shape):
    return "B{}C{}H{}W{}".format(*shape)


def _dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def ref_cross_scan(x):
    """(B, C, H, W) -> (B, 4, C, H*W): row-major, column-major, and both reversed."""
    B, C, H, W = x.shape
    rows = x.reshape(B, C, H * W)
    cols = x.transpose(2, 3).reshape(B, C, H * W)
    return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)


def ref_cross_merge(y):
    """(B, 4, C, H, W) -> (B, C, H*W) in float64: each direction mapped back to pixel order, summed."""
    B, _, C, H, W = y.shape
    y = y.reshape(B, 4, C, H * W).double()
    rows = y[:, 0] + y[:, 2].flip(-1)
    cols = y[:, 1] + y[:, 3].flip(-1)  # column-major order: index w * H + h
    return rows + cols.reshape(B, C, W, H).transpose(2, 3).reshape(B, C, H * W)


def _random(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def _assert_merge_close(out, y):
    expected = ref_cross_merge(y.cpu())
    assert out.dtype == y.dtype
    if y.dtype in (torch.float16, torch.bfloat16):
        # Summed in float32 and rounded once: bit-exact with the float64 sum rounded to the dtype.
        torch.testing.assert_close(out.cpu(), expected.to(y.dtype), rtol=0, atol=0)
    else:
        torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- backends


def _ext():
    try:
        return importlib.import_module("medkernels._C")
    except ImportError as exc:
        pytest.fail(f"medkernels._C does not import: {exc}")


def _triton_module():
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton needs a GPU, or TRITON_INTERPRET=1 for CPU tensors")
    return importlib.import_module("medkernels.kernels.cross_scan")


def _cpu_backend():
    ext = _ext()
    return ext.cross_scan_cpu, ext.cross_merge_cpu, torch.device("cpu")


def _cuda_backend():
    ext = _ext()
    if not ext.build_info()["cuda"]:
        pytest.skip("medkernels._C was built without CUDA kernels")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return ext.cross_scan_cuda, ext.cross_merge_cuda, torch.device("cuda")


def _triton_backend():
    module = _triton_module()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return module.cross_scan_fwd, module.cross_merge_fwd, device


BACKENDS = {"cpu_ext": _cpu_backend, "cuda_ext": _cuda_backend, "triton": _triton_backend}


@pytest.fixture(params=list(BACKENDS))
def backend(request):
    return BACKENDS[request.param]()


# ---------------------------------------------------------------------------------------------- index math


@pytest.mark.parametrize("hw", [(5, 7), (1, 1), (1, 9), (9, 1), (4, 4), (16, 13)], ids=lambda hw: "H{}W{}".format(*hw))
def test_shared_index_math_matches_layouts(hw):
    # csrc/cross_scan.h, the formulas the CPU and CUDA kernels share, evaluated on the host.
    H, W = hw
    L = H * W
    pixel, position = _ext().cross_scan_indices(H, W)
    assert pixel.shape == position.shape == (4, L)
    assert pixel.dtype == position.dtype == torch.int64
    expected_pixel = ref_cross_scan(torch.arange(L).reshape(1, 1, H, W))[0, :, 0]
    torch.testing.assert_close(pixel, expected_pixel, rtol=0, atol=0)
    # position is pixel's inverse permutation, direction by direction.
    torch.testing.assert_close(position, torch.argsort(expected_pixel, dim=1), rtol=0, atol=0)
    assert torch.equal(torch.gather(position, 1, pixel), torch.arange(L).expand(4, L))


def test_shared_index_math_rejects_negative_sizes():
    with pytest.raises(ValueError, match="cross_scan_indices"):
        _ext().cross_scan_indices(-1, 3)


# ---------------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_cross_scan(backend, shape, dtype):
    scan, _, device = backend
    x = _random(shape, dtype, device, seed=1)
    y = scan(x)
    B, C, H, W = shape
    assert y.shape == (B, 4, C, H * W)
    assert y.dtype == dtype and y.device == x.device
    torch.testing.assert_close(y.cpu(), ref_cross_scan(x.cpu()), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_cross_merge(backend, shape, dtype):
    _, merge, device = backend
    B, C, H, W = shape
    y = _random((B, 4, C, H, W), dtype, device, seed=2)
    x = merge(y)
    assert x.shape == (B, C, H * W)
    assert x.device == y.device
    _assert_merge_close(x, y)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 2, 6, 3)], ids=_shape_id)
def test_merge_is_adjoint_of_scan(backend, shape):
    # <scan(x), y> == <x, merge(y)>, so each is the other's backward.
    scan, merge, device = backend
    B, C, H, W = shape
    x = _random(shape, torch.float64, device, seed=3)
    y = _random((B, 4, C, H, W), torch.float64, device, seed=4)
    lhs = (scan(x) * y.reshape(B, 4, C, H * W)).sum()
    rhs = (x.reshape(B, C, H * W) * merge(y)).sum()
    torch.testing.assert_close(lhs, rhs)


def test_merge_of_scan_is_four_times_identity(backend):
    scan, merge, device = backend
    x = _random((2, 3, 5, 7), torch.float32, device, seed=5)
    y = scan(x).reshape(2, 4, 3, 5, 7)
    torch.testing.assert_close(merge(y), 4 * x.reshape(2, 3, 35))


def test_empty_inputs(backend):
    scan, merge, device = backend
    assert scan(torch.empty(0, 3, 4, 5, device=device)).shape == (0, 4, 3, 20)
    assert merge(torch.empty(2, 4, 3, 0, 5, device=device)).shape == (2, 3, 0)


def test_cross_scan_bf16_rounding_and_specials(backend):
    # The merge rounds its float32 sum to nearest (even); infinities and NaN pass through.
    _, merge, device = backend
    y = torch.zeros(1, 4, 1, 1, 6, dtype=torch.bfloat16)
    y[0, 0, 0, 0] = torch.tensor([1.0, 1.0, float("inf"), float("nan"), -2.0, 3.0])
    y[0, 1, 0, 0] = torch.tensor([2.0**-8, 3 * 2.0**-9, 1.0, 1.0, -(2.0**-7), 0.0])
    y[0, 3, 0, 0] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 2.0**-6])
    out = merge(y.to(device)).cpu()
    expected = ref_cross_merge(y).to(torch.bfloat16)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------- argument checks


def test_rejects_bad_arguments(backend):
    """Each error names the argument as a word ("x" alone would match the x of "expected") and what is wrong."""
    scan, merge, device = backend
    with pytest.raises(ValueError, match=r"\bx\b.*\b4-D\b"):
        scan(torch.zeros(2, 3, 4, device=device))
    with pytest.raises(ValueError, match=r"\bx\b.*\bcontiguous\b"):
        scan(torch.zeros(2, 3, 4, 5, device=device).transpose(2, 3))
    with pytest.raises(TypeError, match=r"\bx\b.*\bdtype\b"):
        scan(torch.zeros(2, 3, 4, 5, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"\by\b.*\b5-D\b"):
        merge(torch.zeros(2, 4, 3, 20, device=device))
    with pytest.raises(ValueError, match=r"\by\b.*== 4 \(one slice per scan direction\)"):
        merge(torch.zeros(2, 3, 3, 4, 5, device=device))
    with pytest.raises(ValueError, match=r"\by\b.*\bcontiguous\b"):
        merge(torch.zeros(2, 4, 3, 5, 4, device=device).transpose(3, 4))


def test_cpu_kernels_reject_cuda_tensors():
    ext = _ext()
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    with pytest.raises(ValueError, match="cross_scan_cpu: expected x to be a cpu tensor"):
        ext.cross_scan_cpu(torch.zeros(1, 1, 2, 2, device="cuda"))


def test_cuda_kernels_reject_cpu_tensors():
    ext = _ext()
    if not hasattr(ext, "cross_scan_cuda"):
        pytest.skip("medkernels._C was built without CUDA kernels")
    with pytest.raises(ValueError, match="cross_scan_cuda: expected x to be a cuda tensor"):
        ext.cross_scan_cuda(torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="cross_merge_cuda: expected y to be a cuda tensor"):
        ext.cross_merge_cuda(torch.zeros(1, 4, 1, 2, 2))
