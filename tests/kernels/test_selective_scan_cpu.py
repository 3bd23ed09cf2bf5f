"""The C++ CPU kernels of selective_scan / ss2d_scan called directly (medkernels._C): the paths the op-level
tests do not reach on their own — several chunks of the backward's recomputation, the state size 16
specialisation next to the generic one, channels of a group split over threads, the SS2D walk — against
the float64 references with torch.autograd (fed the same rounded inputs and cotangents, elementwise:
helpers.scan_utils.tolerance), plus the kernels' own argument checks."""
import pytest
import torch

from medkernels import _ext
from medkernels.ops.selective_scan_ref import selective_scan_ref
from medkernels.ops.ss2d_scan_ref import ss2d_scan_ref

from helpers.scan_utils import assert_close_f64

if _ext.load_error() is not None:
    pytest.skip(f"medkernels._C unavailable: {_ext.load_error()}", allow_module_level=True)

C_ = _ext.module()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _scan_inputs(batch, dim, L, n, groups, dtype, seed=0, D=True, z=True, bias=True):
    g = _gen(seed)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    u = torch.randn(batch, dim, L, generator=g).to(dtype)
    delta = (0.5 * torch.rand(batch, dim, L, generator=g)).to(dtype)
    A = (-torch.exp(0.5 * torch.randn(dim, n, generator=g))).to(sdt)
    B = torch.randn(batch, groups, n, L, generator=g).to(dtype)
    C = torch.randn(batch, groups, n, L, generator=g).to(dtype)
    Dv = torch.randn(dim, generator=g).to(sdt) if D else None
    zv = torch.randn(batch, dim, L, generator=g).to(dtype) if z else None
    bv = (0.3 * torch.rand(dim, generator=g)).to(sdt) if bias else None
    return u, delta, A, B, C, Dv, zv, bv


def _ss2d_inputs(batch, dim, H, W, n, dtype, seed=0, D=True, bias=True):
    g = _gen(seed)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    u = torch.randn(batch, dim, H, W, generator=g).to(dtype)
    delta = (0.5 * torch.rand(batch, 4, dim, H, W, generator=g)).to(dtype)
    A = (-torch.exp(0.5 * torch.randn(4 * dim, n, generator=g))).to(sdt)
    B = torch.randn(batch, 4, n, H, W, generator=g).to(dtype)
    C = torch.randn(batch, 4, n, H, W, generator=g).to(dtype)
    Dv = torch.randn(4 * dim, generator=g).to(sdt) if D else None
    bv = (0.3 * torch.rand(4 * dim, generator=g)).to(sdt) if bias else None
    return u, delta, A, B, C, Dv, bv


def _check_scan(args, softplus, dtype, dlast=True, threads=None):
    u, delta, A, B, C, Dv, zv, bv = args
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        out, last = C_.selective_scan_fwd_cpu(u, delta, A, B, C, Dv, zv, bv, softplus)
        g = _gen(7)
        dout = torch.randn(out.shape, generator=g).to(dtype)
        dl = torch.randn(last.shape, generator=g).to(last.dtype) if dlast else None
        grads = C_.selective_scan_bwd_cpu(dout, dl, u, delta, A, B, C, Dv, zv, bv, softplus)
    finally:
        torch.set_num_threads(old)
    assert out.dtype == dtype and last.dtype == A.dtype
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in args]
    exp_out, exp_last = selective_scan_ref(*leaves, softplus)
    assert_close_f64(out, exp_out, "out")
    assert_close_f64(last, exp_last, "last_state")
    present = [t for t in leaves if t is not None]
    outs, gouts = [exp_out], [dout.double()]
    if dlast:
        outs.append(exp_last)
        gouts.append(dl.double())
    exp_grads = iter(torch.autograd.grad(outs, present, gouts, allow_unused=True))
    # kernel order: du, ddelta, dA, dB, dC, dD, dz, ddelta_bias (the order of the inputs)
    for name, got, leaf, inp in zip(["u", "delta", "A", "B", "C", "D", "z", "delta_bias"], grads, leaves, args):
        if leaf is None:
            assert got is None, name  # undefined tensors come back as None
            continue
        exp = next(exp_grads)
        exp = torch.zeros_like(leaf) if exp is None else exp
        assert got.shape == inp.shape and got.dtype == inp.dtype, name
        assert_close_f64(got, exp, f"grad of {name}")


@pytest.mark.parametrize("n", [16, 5], ids=["N16", "N5"])
@pytest.mark.parametrize("L", [1, 64, 200], ids=lambda L: f"L{L}")
@pytest.mark.parametrize("softplus", [False, True], ids=["linear", "softplus"])
def test_scan_float64_multi_chunk(n, L, softplus):
    _check_scan(_scan_inputs(2, 6, L, n, 3, torch.float64), softplus, torch.float64)


def test_scan_without_optionals_and_dlast():
    args = _scan_inputs(2, 4, 130, 16, 1, torch.float64, D=False, z=False, bias=False)
    _check_scan(args, False, torch.float64, dlast=False)


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_scan_channels_split_over_threads(threads):
    # batch * G = 1: the channels of the single group are split into `threads` tasks with partial dB / dC.
    _check_scan(_scan_inputs(1, 8, 150, 16, 1, torch.float64, seed=1), True, torch.float64, threads=threads)


LOW_DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float16, id="float16"),
              pytest.param(torch.bfloat16, id="bfloat16")]


@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_scan_low_precision(dtype):
    _check_scan(_scan_inputs(2, 8, 150, 16, 2, dtype, seed=2), True, dtype)


@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_scan_low_precision_split_over_threads(dtype):
    # the half dtypes' dB / dC summed from per-thread float32 partials (batch * G = 1, 3 tasks), rounded once
    _check_scan(_scan_inputs(1, 6, 100, 5, 1, dtype, seed=3), True, dtype, threads=3)


ISA_DTYPES = [pytest.param(torch.float64, id="float64")] + LOW_DTYPES


@pytest.mark.parametrize("dtype", ISA_DTYPES)
def test_scan_isa_variants_match_float64_reference(capped_cpu_isa, dtype):
    # the AVX2 and baseline builds of the scan tasks (this CPU may run AVX-512 by default): N = 16 (float32's
    # in-register blocks) and the generic N, several chunks, forward and backward
    for n in (16, 5):
        _check_scan(_scan_inputs(2, 6, 150, n, 3, dtype, seed=11), True, dtype)


@pytest.mark.parametrize("dtype", ISA_DTYPES)
def test_ss2d_isa_variants_match_float64_reference(capped_cpu_isa, dtype):
    # 9 x 8 = 72 pixels: two chunks per direction
    _check_ss2d(_ss2d_inputs(2, 5, 9, 8, 16, dtype, seed=12), True, dtype)


@pytest.mark.parametrize("L", [15, 16, 17, 97, 200], ids=lambda L: f"L{L}")
def test_scan_float32_state16_blocks(L):
    # float32 with N = 16 runs whole blocks of 16 positions through the in-register decay path and the
    # rest of each 64-position chunk through the generic loop: both, and their seams, against float64.
    _check_scan(_scan_inputs(2, 4, L, 16, 2, torch.float32, seed=5), True, torch.float32)


def test_scan_float32_decay_extremes():
    # Decays exp(dt * A) from 1 down past float32's smallest normal (A to -3000, dt to 5), and a few
    # growing states (A > 0): the inline exponential's range handling against float64.
    u, delta, A, B, C, Dv, zv, bv = _scan_inputs(1, 3, 80, 16, 1, torch.float32, seed=6)
    A = -torch.exp(torch.linspace(-4.0, 8.0, 3 * 16)).reshape(3, 16)
    A[1, :4] = torch.tensor([0.05, 0.1, 0.02, 0.0])
    delta = torch.linspace(-3.0, 5.0, 3 * 80).reshape(1, 3, 80)
    (out, last) = C_.selective_scan_fwd_cpu(u, delta, A, B, C, Dv, zv, bv, True)
    exp_out, exp_last = selective_scan_ref(u.double(), delta.double(), A.double(), B.double(), C.double(),
                                           Dv.double(), zv.double(), bv.double(), True)
    assert_close_f64(out, exp_out, "out")
    assert_close_f64(last, exp_last, "last_state")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["u", "delta", "B"])
def test_scan_float32_nonfinite_propagates_like_reference(bad, where):
    args = list(_scan_inputs(1, 2, 40, 16, 1, torch.float32, seed=8, z=False))
    pos = {"u": 0, "delta": 1, "B": 3}[where]
    args[pos] = args[pos].clone()
    args[pos].view(-1)[21] = bad
    out, _ = C_.selective_scan_fwd_cpu(*args, True)
    exp, _ = selective_scan_ref(*[None if t is None else t.double() for t in args], True)
    assert torch.equal(out.isnan(), exp.isnan())
    assert torch.equal(out.isinf(), exp.isinf())
    finite = exp.isfinite()
    assert_close_f64(out[finite], exp[finite], "out where finite")


def _check_ss2d(args, softplus, dtype, threads=None):
    u, delta, A, B, C, Dv, bv = args
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        (out,) = C_.ss2d_scan_fwd_cpu(u, delta, A, B, C, Dv, bv, softplus)
        dout = torch.randn(u.shape, generator=_gen(9)).to(dtype)
        grads = C_.ss2d_scan_bwd_cpu(dout, u, delta, A, B, C, Dv, bv, softplus)
    finally:
        torch.set_num_threads(old)
    assert out.shape == (u.shape[0], u.shape[1], u.shape[2] * u.shape[3]) and out.dtype == dtype
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in args]
    exp = ss2d_scan_ref(*leaves, softplus)
    assert_close_f64(out.reshape(exp.shape), exp, "out")
    present = [t for t in leaves if t is not None]
    exp_grads = iter(torch.autograd.grad(exp, present, dout.double()))
    for name, got, leaf, inp in zip(["u", "delta", "A", "B", "C", "D", "delta_bias"], grads, leaves, args):
        if leaf is None:
            continue
        assert got.shape == inp.shape and got.dtype == inp.dtype, name
        assert_close_f64(got, next(exp_grads), f"grad of {name}")


@pytest.mark.parametrize("hw", [(5, 7), (9, 16), (12, 17)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
@pytest.mark.parametrize("n", [16, 3], ids=["N16", "N3"])
def test_ss2d_float64(hw, n):
    _check_ss2d(_ss2d_inputs(2, 3, *hw, n, torch.float64), True, torch.float64)


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_ss2d_channels_split_over_threads(threads):
    _check_ss2d(_ss2d_inputs(1, 5, 11, 9, 16, torch.float64, seed=3, D=False, bias=False), False,
                torch.float64, threads=threads)


@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_ss2d_low_precision(dtype):
    # 130 pixels: three chunks per direction; float16/bfloat16 du sums the four directions in float32, rounded once
    _check_ss2d(_ss2d_inputs(2, 4, 10, 13, 16, dtype, seed=4), True, dtype)


@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_ss2d_low_precision_split_over_threads(dtype):
    _check_ss2d(_ss2d_inputs(1, 3, 9, 8, 5, dtype, seed=5), True, dtype, threads=2)


def test_empty_sizes():
    for L in (0,):
        u, delta, A, B, C, Dv, zv, bv = _scan_inputs(2, 4, L, 3, 2, torch.float32)
        out, last = C_.selective_scan_fwd_cpu(u, delta, A, B, C, Dv, zv, bv, True)
        assert out.shape == (2, 4, 0) and torch.equal(last, torch.zeros(2, 4, 3))
        grads = C_.selective_scan_bwd_cpu(torch.zeros_like(u), torch.ones_like(last), u, delta, A, B, C, Dv, zv, bv,
                                          True)
        assert torch.equal(grads[2], torch.zeros_like(A)) and torch.equal(grads[5], torch.zeros_like(Dv))
    u, delta, A, B, C, Dv, bv = _ss2d_inputs(0, 3, 4, 4, 2, torch.float32)
    (out,) = C_.ss2d_scan_fwd_cpu(u, delta, A, B, C, Dv, bv, True)
    assert out.shape == (0, 3, 16)
    grads = C_.ss2d_scan_bwd_cpu(torch.zeros_like(u), u, delta, A, B, C, Dv, bv, True)
    assert torch.equal(grads[2], torch.zeros_like(A))


def test_argument_checks_name_the_argument():
    u, delta, A, B, C, Dv, zv, bv = _scan_inputs(2, 4, 5, 3, 2, torch.float32)
    with pytest.raises(TypeError, match=r"\bdelta\b"):
        C_.selective_scan_fwd_cpu(u, delta.double(), A, B, C, Dv, zv, bv, True)
    with pytest.raises(TypeError, match=r"\bA\b"):
        C_.selective_scan_fwd_cpu(u, delta, A.double(), B, C, Dv, zv, bv, True)
    with pytest.raises(ValueError, match=r"\bC\b"):
        C_.selective_scan_fwd_cpu(u, delta, A, B, C[:, :1], Dv, zv, bv, True)
    with pytest.raises(ValueError, match=r"\bB\b"):
        C_.selective_scan_fwd_cpu(u, delta, A, B[:, :, :, :4], C, Dv, zv, bv, True)
    with pytest.raises(ValueError, match=r"\bz\b.*\bcontiguous\b"):
        C_.selective_scan_fwd_cpu(u, delta, A, B, C, Dv, zv.transpose(1, 2).contiguous().transpose(1, 2), bv, True)
    with pytest.raises(ValueError, match=r"\bdlast_state\b"):
        C_.selective_scan_bwd_cpu(u, torch.zeros(2, 4, 2), u, delta, A, B, C, Dv, zv, bv, True)
    su, sdelta, sA, sB, sC, sD, sbias = _ss2d_inputs(1, 2, 3, 4, 2, torch.float32)
    with pytest.raises(ValueError, match=r"\bdelta_bias\b"):
        C_.ss2d_scan_fwd_cpu(su, sdelta, sA, sB, sC, sD, sbias[:2], True)
    with pytest.raises(ValueError, match=r"\bdout\b"):
        C_.ss2d_scan_bwd_cpu(su[:, :1], su, sdelta, sA, sB, sC, sD, sbias, True)
