"""depthwise_conv2d_layernorm (HiFuse's Local block: depthwise conv -> channels-last LayerNorm) on every backend
against an independent float64 statement on the same rounded inputs and cotangent, outputs and every gradient
checked entry by entry, in every dtype and, on the CPU, in every SIMD build (the LayerNorm step has its own per-ISA
loops); one and two channels; the modules that use the fused paths (LocalBlock, SS2D's convolution) against their
unfused compositions; argument checks; opcheck."""
import pytest
import torch
import torch.nn.functional as F

import medkernels
from medkernels.nn import LocalBlock
from medkernels.nn.depthwise import DepthwiseConv2d
from medkernels.ops import depthwise_conv2d_layernorm

from helpers.hff_utils import assert_close_elementwise, assert_close_scaled


CASES = [  # (B, C, H, W, k, stride)
    pytest.param((2, 5, 13, 11, 3, 1), id="13x11-k3-s1"),
    pytest.param((1, 37, 6, 7, 5, 2), id="6x7-k5-s2-c37"),
    pytest.param((2, 16, 5, 9, 7, 1), id="5x9-k7-s1-c16"),
]
AFFINE = {"all": (True, True, True), "no-conv-bias": (False, True, True), "no-ln-affine": (True, False, False)}


def layernorm_f64(x, weight, bias, ln_weight, ln_bias, stride, eps):
    """The op stated independently in float64: conv, then (z - mean) / sqrt(biased var + eps) per pixel."""
    z = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride,
                 weight.shape[-1] // 2, groups=x.shape[1]).permute(0, 2, 3, 1)
    mean = z.mean(-1, keepdim=True)
    var = ((z - mean) ** 2).mean(-1, keepdim=True)
    y = (z - mean) / torch.sqrt(var + eps)
    if ln_weight is not None:
        y = y * ln_weight.double()
    if ln_bias is not None:
        y = y + ln_bias.double()
    return y


def make_inputs(case, layout, affine, dtype, device, seed=0, ln_dtype=None):
    """[x, weight, bias, ln_weight, ln_bias] rounded to `dtype` (the LayerNorm parameters to `ln_dtype`, default
    `dtype`), None where `affine` leaves one out."""
    B, C, H, W, k, _ = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = torch.empty_strided(x.shape, x.stride(), dtype=dtype, device=device).copy_(x)
    has_bias, has_lnw, has_lnb = affine
    vec = lambda on, dt: torch.randn(C, generator=g, dtype=torch.float64).to(device, dt) if on else None  # noqa: E731
    w = torch.randn(C, 1, k, k, generator=g, dtype=torch.float64).to(device, dtype)
    ln_dtype = dtype if ln_dtype is None else ln_dtype
    return [x, w, vec(has_bias, dtype), vec(has_lnw, ln_dtype), vec(has_lnb, ln_dtype)]


def check(device, backend, case, layout, affine, dtype=torch.float64, eps=1e-6, ln_dtype=None):
    """The op against layernorm_f64 on the same rounded values and cotangent; every result held elementwise to
    one rounding to x's dtype (half an epsilon relative, hff_utils.ELEMENTWISE_TOLERANCES): the kernels compute
    in float32 (float64) and round once."""
    stride = case[-1]
    tensors = make_inputs(case, layout, affine, dtype, device, ln_dtype=ln_dtype)
    tensors = [t.requires_grad_(True) if t is not None else None for t in tensors]
    with medkernels.use_backend(backend):
        y = depthwise_conv2d_layernorm(*tensors, eps=eps, stride=stride)
    B, C, H, W, k, _ = case
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    assert y.shape == (B, Ho, Wo, C) and y.is_contiguous() and y.dtype == dtype
    exact = [t.detach().double().requires_grad_(True) if t is not None else None for t in tensors]
    if ln_dtype not in (None, dtype) and backend != "ref":
        # Known limitation, kept: the compiled and Triton kernels take the LayerNorm parameters in x's dtype, so
        # float32 ones of a half x are rounded to it (ops/depthwise_conv2d_layernorm.py's _KernelImpl) and their
        # gradients are half values returned in float32. The statement gets the rounded parameters, and those
        # gradients are held to x's dtype, not to float32's.
        exact[3:] = [None if t is None else t.detach().to(dtype).double().requires_grad_(True) for t in exact[3:]]
    ref = layernorm_f64(*exact, stride, eps)
    assert_close_elementwise(y, ref, "output")
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(device, dtype)
    present = [i for i, t in enumerate(tensors) if t is not None]
    grads = torch.autograd.grad(y, [tensors[i] for i in present], cot)
    expected = torch.autograd.grad(ref, [exact[i] for i in present], cot.double())
    names = ("x", "weight", "bias", "ln_weight", "ln_bias")
    for i, got, exp in zip(present, grads, expected):
        assert got.dtype == tensors[i].dtype, f"grad {names[i]}: dtype {got.dtype}"
        assert_close_elementwise(got, exp, f"grad {names[i]}", dtype=dtype)


@pytest.mark.parametrize("affine", list(AFFINE.values()), ids=list(AFFINE))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES)
def test_kernels_match_float64_statement(kernel_backend, case, layout, affine):
    check(*kernel_backend, case, layout, affine)


def test_reference_matches_float64_statement():
    check(torch.device("cpu"), "ref", (2, 6, 7, 5, 3, 1), "nchw", AFFINE["all"])


@pytest.mark.parametrize("case, layout, affine", [
    pytest.param((1, 5, 4, 6, 3, 1), "nchw", AFFINE["all"], id="4x6-k3-s1-nchw"),
    pytest.param((2, 3, 5, 4, 5, 2), "channels_last", AFFINE["no-ln-affine"], id="5x4-k5-s2-channels_last"),
])
def test_triton_interpreter_matches_float64_statement(case, layout, affine):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: Triton runs the full matrix on it (cuda-triton)")
    reason = medkernels.unavailable_reason("triton")
    if reason is not None:
        pytest.fail(f"the Triton interpreter must run here: {reason}")
    check(torch.device("cpu"), "triton", case, layout, affine)


DTYPES = [  # (x's dtype, the LayerNorm parameters' dtype); tolerances: hff_utils.ELEMENTWISE_TOLERANCES
    pytest.param((torch.float32, torch.float32), id="float32"),
    pytest.param((torch.float16, torch.float16), id="float16"),
    pytest.param((torch.bfloat16, torch.bfloat16), id="bfloat16"),
    pytest.param((torch.float16, torch.float32), id="float16-float32_ln_params"),
    pytest.param((torch.bfloat16, torch.float32), id="bfloat16-float32_ln_params"),
]


@pytest.mark.parametrize("dtypes", DTYPES)
def test_kernel_dtypes(kernel_backend, dtypes):
    dtype, ln_dtype = dtypes
    check(*kernel_backend, (2, 24, 5, 6, 3, 1), "channels_last", AFFINE["all"], dtype, ln_dtype=ln_dtype)


@pytest.mark.parametrize("dtypes", DTYPES)
def test_triton_interpreter_dtypes(dtypes):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: Triton runs the full matrix on it (cuda-triton)")
    dtype, ln_dtype = dtypes
    check(torch.device("cpu"), "triton", (1, 24, 4, 5, 3, 1), "nchw", AFFINE["all"], dtype, ln_dtype=ln_dtype)


@pytest.mark.parametrize("dtypes", DTYPES)
def test_reference_dtypes(dtypes):
    """The ref backend (PyTorch's conv2d and layer_norm in the dtype) on a well-conditioned case: 24 channels.

    It rounds the conv's output to the dtype before the LayerNorm (and the LayerNorm's input gradient before the
    conv's backward sums it), so its float16/bfloat16 results are held to a floor of two epsilons of their
    largest entry besides the elementwise epsilon (test_depthwise_hff_ops_properties.py says why)."""
    dtype, ln_dtype = dtypes
    if dtype == torch.float32:
        check(torch.device("cpu"), "ref", (2, 24, 5, 6, 3, 1), "channels_last", AFFINE["all"], dtype)
        return
    inputs = make_inputs((2, 24, 5, 6, 3, 1), "channels_last", AFFINE["all"], dtype, "cpu", ln_dtype=ln_dtype)
    tensors = [t.requires_grad_(True) for t in inputs]
    with medkernels.use_backend("ref"):
        y = depthwise_conv2d_layernorm(*tensors, eps=1e-6)
    exact = [t.detach().double().requires_grad_(True) for t in tensors]
    ref = layernorm_f64(*exact, 1, 1e-6)
    floor = 2 * torch.finfo(dtype).eps
    assert y.dtype == dtype
    assert_close_elementwise(y, ref, "output", floor=floor)
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    for name, t, got, exp in zip(("x", "weight", "bias", "ln_weight", "ln_bias"), tensors,
                                 torch.autograd.grad(y, tensors, cot), torch.autograd.grad(ref, exact, cot.double())):
        assert got.dtype == t.dtype, f"grad {name}: dtype {got.dtype}"
        assert_close_elementwise(got, exp, f"grad {name}", dtype=dtype, floor=floor)


# the CPU kernels' AVX2 and baseline builds (this CPU may run AVX-512 by default): odd sizes, and channel counts
# that are no multiple of any vector width (4 to 16 lanes), so every build's remainder loops run too
ISA_CASES = [  # (B, C, H, W, k, stride)
    (2, 37, 5, 7, 3, 1),
    (1, 19, 9, 6, 7, 2),
    (2, 3, 7, 5, 3, 1),
    (1, 33, 4, 11, 5, 2),
]
ISA_DTYPES = [  # (x's dtype, the LayerNorm parameters' dtype)
    pytest.param((torch.float64, torch.float64), id="float64"),
    pytest.param((torch.float32, torch.float32), id="float32"),
    pytest.param((torch.float16, torch.float16), id="float16"),
    pytest.param((torch.bfloat16, torch.float32), id="bfloat16-float32_ln_params"),
]


@pytest.mark.parametrize("dtypes", ISA_DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpu_isa_variants_match_float64_statement(capped_cpu_isa, layout, dtypes):
    dtype, ln_dtype = dtypes
    for case in ISA_CASES:
        for affine in (AFFINE["all"], AFFINE["no-ln-affine"]):
            check(torch.device("cpu"), "cpu", case, layout, affine, dtype, ln_dtype=ln_dtype)


@pytest.mark.parametrize("channels", [1, 2])
def test_one_or_two_channels(cpu_backend, channels):
    """A LayerNorm over one channel gives its bias and over two +-1 (times the weight, plus the bias) whatever
    the conv computes: the output holds elementwise, but every gradient is zero (one channel) or of order
    eps / var (two) in exact arithmetic, and float32's rounding of z - mean divided by a standard deviation that
    is 0 or can be near it (up to 1 / sqrt(eps) = 100 here) is all the backends compute. The gradients are held
    to a floor of 1e-3 of their largest entry (1 at least), no relative term."""
    eps = 1e-4
    tensors = [t.requires_grad_(True) for t in make_inputs((2, channels, 5, 4, 3, 1), "nchw", AFFINE["all"],
                                                            torch.float32, "cpu")]
    with medkernels.use_backend(cpu_backend):
        y = depthwise_conv2d_layernorm(*tensors, eps=eps)
    exact = [t.detach().double().requires_grad_(True) for t in tensors]
    ref = layernorm_f64(*exact, 1, eps)
    assert_close_elementwise(y, ref, "output")
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(y, tensors, cot)
    for name, got, exp in zip(("x", "weight", "bias", "ln_weight", "ln_bias"), grads,
                              torch.autograd.grad(ref, exact, cot.double())):
        assert_close_scaled(got, exp, 1e-3, f"grad {name}")


# ------------------------------------------------------------------------------------------------- modules


def test_local_block_matches_unfused_composition(cpu_backend):
    torch.manual_seed(0)
    block = LocalBlock(24).eval()
    x = torch.randn(2, 24, 9, 7, requires_grad=True)
    with medkernels.use_backend(cpu_backend):
        out = block(x)
    conv = block.dwconv
    y = F.conv2d(x, conv.weight, conv.bias, 1, 1, groups=24).permute(0, 2, 3, 1)
    y = F.gelu(block.pwconv(F.layer_norm(y, (24,), block.norm.weight, block.norm.bias, block.norm.eps)))
    expected = x + y.permute(0, 3, 1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    params = (x, conv.weight, conv.bias, block.norm.weight, block.norm.bias)
    cot = torch.randn(out.shape)
    for got, exp in zip(torch.autograd.grad(out, params, cot), torch.autograd.grad(expected, params, cot)):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-4)


def test_ss2d_style_conv_reads_channels_last_slice_and_writes_nchw(cpu_backend):
    # SS2D: in_proj's output (B, H, W, 2 d) is split in two; the conv reads the first half in place
    torch.manual_seed(0)
    conv = DepthwiseConv2d(12, 3, activation="silu")
    xz = torch.randn(2, 5, 7, 24, requires_grad=True)
    with medkernels.use_backend(cpu_backend):
        out = conv(xz[..., :12].permute(0, 3, 1, 2), memory_format=torch.contiguous_format)
    expected = F.silu(F.conv2d(xz[..., :12].permute(0, 3, 1, 2).contiguous(), conv.weight, conv.bias, 1, 1, groups=12))
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    cot = torch.randn(out.shape)
    torch.testing.assert_close(torch.autograd.grad(out, xz, cot)[0], torch.autograd.grad(expected, xz, cot)[0],
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ argument checks


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        pytest.param(dict(ln_weight=torch.ones(4)), ValueError, r"\bln_weight\b", id="ln-weight-shape"),
        pytest.param(dict(ln_bias=torch.ones(3, dtype=torch.float64)), TypeError, r"\bln_bias\b", id="ln-bias-dtype"),
        pytest.param(dict(ln_bias=torch.ones(3, dtype=torch.int32)), TypeError, r"\bln_bias\b", id="ln-bias-int"),
        pytest.param(dict(ln_weight=torch.ones(3, device="meta")), ValueError, r"\bdevice\b", id="mixed-devices"),
        pytest.param(dict(eps=-1.0), ValueError, r"\beps\b", id="eps-negative"),
        pytest.param(dict(weight=torch.zeros(3, 1, 2, 2)), ValueError, r"\beven kernel\b", id="even-kernel-default-padding"),
        pytest.param(dict(weight=torch.zeros(3, 3, 3)), ValueError, r"\bweight\b", id="weight-3d"),
    ],
)
def test_op_rejects_bad_arguments(kwargs, exc, word):
    args = dict(x=torch.zeros(2, 3, 8, 8), weight=torch.zeros(3, 1, 3, 3), bias=None, ln_weight=None, ln_bias=None)
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        depthwise_conv2d_layernorm(**args)


def test_cpu_entry_points_check_arguments():
    reason = medkernels.unavailable_reason("cpu")
    if reason is not None:
        pytest.fail(f"the C++ extension must load here: {reason}")
    import medkernels._C as ext

    x, w = torch.zeros(2, 3, 8, 8), torch.zeros(3, 1, 3, 3)
    with pytest.raises(ValueError, match=r"\bln_weight\b"):
        ext.depthwise_conv2d_layernorm_fwd_cpu(x, w, None, torch.ones(4), None, 1, 1, 1e-6)
    with pytest.raises(TypeError, match=r"\bln_bias\b"):
        ext.depthwise_conv2d_layernorm_fwd_cpu(x, w, None, None, torch.ones(3, dtype=torch.float64), 1, 1, 1e-6)
    with pytest.raises(ValueError, match=r"\beps\b"):
        ext.depthwise_conv2d_layernorm_fwd_cpu(x, w, None, None, None, 1, 1, -1.0)
    with pytest.raises(ValueError, match=r"\bgrad\b"):
        ext.depthwise_conv2d_layernorm_bwd_cpu(torch.zeros(2, 3, 8, 8), x, w, None, None, None, 1, 1, 1e-6)


def test_opcheck(cpu_backend):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    args = (r(2, 4, 5, 3), r(4, 1, 3, 3), r(4), r(4), None, 2, 1, 1e-5, cpu_backend)
    torch.library.opcheck(torch.ops.medkernels.depthwise_conv2d_layernorm_fwd, args)
