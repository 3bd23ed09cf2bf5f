"""depthwise_conv2d on the kernel backends (cpu, cuda, triton) against F.conv2d(groups=C) + activation in
float64: outputs and every gradient, every kernel size and stride, odd sizes, every layout the kernels read in
place, each dtype; the argument checks of the compiled and Triton entry points; determinism.

The C++ kernels take two walks (planes for NCHW in and out with rows of at least 20 outputs, channels-last rows
otherwise), both covered by the cases below. Triton runs under its interpreter when there is no GPU, on a few
tiny cases only (the interpreter pays milliseconds per operation); on a GPU it runs the whole matrix.
"""
import pytest
import torch
import torch.nn.functional as F

import medkernels
from medkernels.ops import depthwise_conv2d

from helpers.hff_utils import assert_close_elementwise

ACTS = {None: lambda t: t, "silu": F.silu, "gelu": F.gelu, "relu": F.relu}

# (B, C, H, W, k, stride); C = 37 and 40 are not multiples of any vector width, W = 24 and 41 take the plane walk
CASES = [
    pytest.param((2, 5, 13, 11, 3, 1), id="13x11-k3-s1"),
    pytest.param((1, 4, 5, 17, 5, 2), id="5x17-k5-s2"),
    pytest.param((2, 3, 9, 9, 7, 1), id="9x9-k7-s1"),
    pytest.param((1, 6, 8, 6, 3, 2), id="8x6-k3-s2"),
    pytest.param((1, 3, 6, 24, 3, 1), id="6x24-k3-s1-planes"),
    pytest.param((1, 2, 7, 41, 5, 2), id="7x41-k5-s2-planes"),
    pytest.param((2, 37, 5, 7, 7, 1), id="5x7-k7-s1-c37"),
    pytest.param((1, 40, 11, 9, 3, 2), id="11x9-k3-s2-c40"),
]
# float32 cases for the fused activations (test_kernel_float32_activations says what they cover)
FLOAT32_ACTIVATION_CASES = ((2, 35, 6, 41, 3, 1), (1, 16, 5, 7, 5, 1), (1, 33, 7, 45, 3, 2))
# how x is laid out in memory -> the output format asked for (None: x's own)
LAYOUTS = {
    "nchw": None,
    "channels_last": None,
    "cl_slice->nchw": torch.contiguous_format,  # SS2D: the channels-last half of in_proj's output
    "nchw->channels_last": torch.channels_last,
    "nchw_col_slice": None,  # unit column stride, rows not packed
}
# the combinations Triton's CPU interpreter runs: tiny, every kernel size, stride and layout once
INTERPRETER_CASES = [
    pytest.param((1, 3, 5, 6, 3, 1), "silu", "nchw", id="5x6-k3-s1-silu-nchw"),
    pytest.param((2, 2, 5, 6, 3, 1), "gelu", "channels_last", id="5x6-k3-s1-gelu-channels_last"),
    pytest.param((1, 3, 6, 5, 3, 2), "relu", "cl_slice->nchw", id="6x5-k3-s2-relu-cl_slice"),
    pytest.param((1, 2, 6, 5, 3, 2), None, "nchw->channels_last", id="6x5-k3-s2-none-nchw_to_cl"),
    pytest.param((1, 2, 5, 5, 5, 1), "silu", "nchw_col_slice", id="5x5-k5-s1-silu-col_slice"),
    pytest.param((1, 2, 5, 4, 7, 2), "gelu", "channels_last", id="5x4-k7-s2-gelu-channels_last"),
]


def make_x(shape, layout, dtype=torch.float64, device="cpu", seed=0):
    B, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    if layout == "cl_slice->nchw":
        x = torch.randn(B, H, W, 2 * C, generator=g, dtype=torch.float64)[..., :C].permute(0, 3, 1, 2)
    elif layout == "nchw_col_slice":
        x = torch.randn(B, C, H, W + 3, generator=g, dtype=torch.float64)[..., 1:W + 1]
    else:
        x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    # keep the strides while converting
    return torch.empty_strided(x.shape, x.stride(), dtype=dtype, device=device).copy_(x)


def make_params(C, k, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, 1, k, k, generator=g, dtype=torch.float64).to(device, dtype)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(device, dtype)
    return w, b


def reference(x, w, b, stride, act):
    y = F.conv2d(x.double(), w.double(), b.double(), stride, w.shape[-1] // 2, groups=x.shape[1])
    return ACTS[act](y)


def check_against_float64(device, backend, case, act, layout, dtype=torch.float64, tol=(1e-10, 1e-10)):
    """The op against F.conv2d + activation in float64 on the same rounded values and cotangent: output and every
    gradient, elementwise to (rtol, atol) = tol, or with tol None to hff_utils.ELEMENTWISE_TOLERANCES' row for
    the dtype (float16/bfloat16: half an epsilon relative; the kernels compute in float32 and round once)."""
    B, C, H, W, k, stride = case
    x = make_x((B, C, H, W), layout, dtype, device).requires_grad_(True)
    w, b = (t.requires_grad_(True) for t in make_params(C, k, dtype, device))
    with medkernels.use_backend(backend):
        y = depthwise_conv2d(x, w, b, stride=stride, activation=act, memory_format=LAYOUTS[layout])
    expected_cl = LAYOUTS[layout] == torch.channels_last or layout == "channels_last"
    assert y.is_contiguous(memory_format=torch.channels_last if expected_cl else torch.contiguous_format)
    assert y.dtype == dtype and y.device == x.device
    exact = [t.detach().double().requires_grad_(True) for t in (x, w, b)]  # the same values, float64 leaves

    def close(got, exp, what):
        if tol is None:
            assert_close_elementwise(got, exp, what)
        else:
            torch.testing.assert_close(got.double(), exp, rtol=tol[0], atol=tol[1], msg=lambda m: f"{what}: {m}")

    ref = reference(*exact, stride, act)
    close(y, ref, "output")
    cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device, dtype)
    grads = torch.autograd.grad(y, (x, w, b), cot)
    expected = torch.autograd.grad(ref, exact, cot.double())
    for name, got, exp in zip(("x", "weight", "bias"), grads, expected):
        assert got.dtype == dtype and got.shape == exp.shape and got.device == x.device
        close(got, exp, f"grad {name}")


def require_interpreter():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: Triton runs the full matrix on it (cuda-triton)")
    reason = medkernels.unavailable_reason("triton")
    if reason is not None:
        pytest.fail(f"the Triton interpreter must run here: {reason}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("act", list(ACTS), ids=lambda a: a or "none")
@pytest.mark.parametrize("case", CASES)
def test_kernels_match_float64_reference(kernel_backend, case, act, layout):
    device, backend = kernel_backend
    check_against_float64(device, backend, case, act, layout)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "cl_slice->nchw"])
@pytest.mark.parametrize("act", list(ACTS), ids=lambda a: a or "none")
def test_cpu_isa_variants_match_float64_reference(capped_cpu_isa, act, layout):
    # the AVX2 and baseline builds of the row and plane kernels (this CPU may run AVX-512 by default)
    for case in CASES:
        check_against_float64(torch.device("cpu"), "cpu", case.values[0], act, layout)
    for case in FLOAT32_ACTIVATION_CASES:
        check_against_float64(torch.device("cpu"), "cpu", case, act, layout, torch.float32, (1e-5, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("act", ["silu", "gelu", None], ids=lambda a: a or "none")
def test_cpu_isa_variants_half_precision(capped_cpu_isa, act, dtype):
    # the AVX2 and baseline builds with float16/bfloat16 loads and stores (float32 arithmetic inside)
    for case in ((2, 37, 9, 7, 3, 1), (1, 5, 6, 23, 5, 2)):
        for layout in ("nchw", "channels_last", "cl_slice->nchw"):
            check_against_float64(torch.device("cpu"), "cpu", case, act, layout, dtype, None)


@pytest.mark.parametrize("case, act, layout", INTERPRETER_CASES)
def test_triton_interpreter_matches_float64_reference(case, act, layout):
    require_interpreter()
    check_against_float64(torch.device("cpu"), "triton", case, act, layout)


DTYPES = [  # (dtype, (rtol, atol)); None: hff_utils.ELEMENTWISE_TOLERANCES (one rounding of the dtype)
    pytest.param(torch.float32, (1e-5, 1e-5), id="float32"),
    pytest.param(torch.float16, None, id="float16"),
    pytest.param(torch.bfloat16, None, id="bfloat16"),
]


@pytest.mark.parametrize("layout", ["nchw", "cl_slice->nchw"])
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_kernel_dtypes(kernel_backend, dtype, tol, layout):
    device, backend = kernel_backend
    for case in ((2, 37, 9, 7, 3, 1), (1, 5, 6, 23, 5, 2)):
        check_against_float64(device, backend, case, "silu", layout, dtype, tol)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "cl_slice->nchw"])
@pytest.mark.parametrize("act", list(ACTS), ids=lambda a: a or "none")
def test_kernel_float32_activations(kernel_backend, act, layout):
    # float32 applies SiLU and ReLU inside the convolution kernels (C++), GELU and float64 afterwards: check each
    # path on the plane walk (rows of >= 20 outputs, with in-place interior reads) and on short rows
    device, backend = kernel_backend
    for case in FLOAT32_ACTIVATION_CASES:
        check_against_float64(device, backend, case, act, layout, torch.float32, (1e-5, 1e-5))


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_triton_interpreter_dtypes(dtype, tol):
    require_interpreter()
    check_against_float64(torch.device("cpu"), "triton", (1, 3, 5, 6, 3, 1), "gelu", "channels_last", dtype, tol)


def test_cpu_gradients_do_not_depend_on_threads():
    # per-task partial sums over a fixed split, reduced in a fixed order: bitwise equal for any thread count
    x = make_x((3, 16, 20, 24), "channels_last", torch.float32)
    w, b = make_params(16, 3, torch.float32, "cpu")
    grad = torch.randn(3, 16, 20, 24).contiguous(memory_format=torch.channels_last)
    ext = pytest.importorskip("medkernels._C")
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(ext.depthwise_conv2d_bwd_cpu(grad, x, w, b, 1, 1, "silu"))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for got, first in zip(other, results[0]):
            assert torch.equal(got, first)


# ------------------------------------------------------------------------------------------ argument checks


def _ext():
    reason = medkernels.unavailable_reason("cpu")
    if reason is not None:
        pytest.fail(f"the C++ extension must load here: {reason}")
    import medkernels._C as ext

    return ext


GOOD = dict(x=torch.zeros(2, 3, 8, 8), weight=torch.zeros(3, 1, 3, 3), bias=torch.zeros(3), stride=1, padding=1,
            activation="silu")


@pytest.mark.parametrize(
    "change, exc, word",
    [
        pytest.param(dict(weight=torch.zeros(3, 2, 3, 3)), ValueError, r"\bweight\b", id="weight-not-depthwise"),
        pytest.param(dict(weight=torch.zeros(4, 1, 3, 3)), ValueError, r"\bweight\b", id="weight-channels"),
        pytest.param(dict(weight=torch.zeros(3, 1, 3, 3, dtype=torch.float64)), TypeError, r"\bweight\b", id="weight-dtype"),
        pytest.param(dict(x=torch.zeros(2, 3, 8, 8, dtype=torch.int32)), TypeError, r"\bx\b", id="x-int"),
        pytest.param(dict(x=torch.zeros(3, 8, 8)), ValueError, r"\bx\b", id="x-3d"),
        pytest.param(dict(bias=torch.zeros(4)), ValueError, r"\bbias\b", id="bias-shape"),
        pytest.param(dict(bias=torch.zeros(3, dtype=torch.float16)), TypeError, r"\bbias\b", id="bias-dtype"),
        pytest.param(dict(stride=0), ValueError, r"\bstride\b", id="stride-0"),
        pytest.param(dict(padding=-1), ValueError, r"\bpadding\b", id="padding-negative"),
        pytest.param(dict(activation="tanh"), ValueError, r"\bactivation\b", id="activation"),
        pytest.param(dict(weight=torch.zeros(3, 1, 33, 33), padding=16), ValueError, r"\bkernel size\b", id="kernel-too-large"),
        pytest.param(dict(x=torch.zeros(2, 3, 2, 2), padding=0), ValueError, r"\bsmaller than the kernel\b", id="x-too-small"),
    ],
)
def test_cpu_entry_points_check_arguments(change, exc, word):
    ext = _ext()
    args = dict(GOOD, **change)
    with pytest.raises(exc, match=word):
        ext.depthwise_conv2d_fwd_cpu(*args.values(), False)
    grad = torch.zeros(2, 3, 8, 8)
    with pytest.raises(exc, match=word):
        ext.depthwise_conv2d_bwd_cpu(grad, *args.values())


def test_cpu_backward_checks_grad():
    ext = _ext()
    for grad, exc in ((torch.zeros(2, 3, 7, 8), ValueError), (torch.zeros(2, 3, 8, 8, dtype=torch.float64), TypeError)):
        with pytest.raises(exc, match=r"\bgrad\b"):
            ext.depthwise_conv2d_bwd_cpu(grad, *GOOD.values())


def test_cpu_entry_point_rejects_cuda_or_meta_tensors():
    ext = _ext()
    args = dict(GOOD, x=torch.zeros(2, 3, 8, 8, device="meta"))
    with pytest.raises(ValueError, match=r"\bx\b"):
        ext.depthwise_conv2d_fwd_cpu(*args.values(), False)


def test_triton_launcher_checks_arguments():
    reason = medkernels.unavailable_reason("triton")
    if reason is not None:
        pytest.fail(f"Triton must be usable here: {reason}")
    import medkernels.kernels.depthwise_conv2d as tk

    x = torch.zeros(2, 3, 8, 8, device="cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"\bweight\b"):
        tk.depthwise_conv2d_fwd(x, x.new_zeros(3, 2, 3, 3), None, 1, 1, "silu", False)
    with pytest.raises(TypeError, match=r"\bbias\b"):
        tk.depthwise_conv2d_fwd(x, x.new_zeros(3, 1, 3, 3), x.new_zeros(3, dtype=torch.float64), 1, 1, "silu", False)
    with pytest.raises(ValueError, match=r"\bactivation\b"):
        tk.depthwise_conv2d_fwd(x, x.new_zeros(3, 1, 3, 3), None, 1, 1, "tanh", False)
    with pytest.raises(ValueError, match=r"\bgrad\b"):
        tk.depthwise_conv2d_bwd(x[:1], x, x.new_zeros(3, 1, 3, 3), None, 1, 1, "silu")


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        pytest.param(dict(memory_format=torch.preserve_format), ValueError, r"\bmemory_format\b", id="memory-format"),
        pytest.param(dict(weight=torch.zeros(3, 1, 33, 33), padding=16), ValueError, r"\bk <= 31\b", id="kernel-too-large"),
        pytest.param(dict(bias=torch.zeros(3, dtype=torch.int64)), TypeError, r"\bbias\b", id="bias-int"),
        pytest.param(dict(padding=1.5), ValueError, r"\bpadding\b", id="padding-float"),
    ],
)
def test_op_rejects_bad_arguments(kwargs, exc, word):
    args = dict(x=torch.zeros(2, 3, 8, 8), weight=torch.zeros(3, 1, 3, 3), bias=None)
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        depthwise_conv2d(**args)


# ------------------------------------------------------------------------------------------ torch.library


@pytest.mark.parametrize("channels_last", [None, False, True], ids=["x-format", "nchw-out", "cl-out"])
def test_opcheck_forward(cpu_backend, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 3, generator=g, dtype=torch.float64)[:, :3].requires_grad_()  # a channel slice
    w = torch.randn(3, 1, 3, 3, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    torch.library.opcheck(torch.ops.medkernels.depthwise_conv2d_fwd, (x, w, b, 2, 1, "gelu", cpu_backend, channels_last))
