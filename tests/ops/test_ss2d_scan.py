"""ss2d_scan (the fused four-direction SS2D scan): the reference against an explicit per-direction statement,
every backend against the reference in float64 (outputs and every gradient), and the boundary checks."""
import pytest
import torch

import medkernels
from medkernels.ops import cross_merge, cross_scan, selective_scan, ss2d_scan
from medkernels.ops.ss2d_scan_ref import ss2d_scan_ref

from helpers.scan_utils import scan_loop_f64

TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}
GRAD_TOL = {torch.float64: (1e-8, 1e-8), torch.float32: (1e-3, 1e-4)}


def make_inputs(batch, dim, h, w, n, dtype, with_d=True, with_bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    u = torch.randn(batch, dim, h, w, generator=g)
    delta = 0.5 * torch.rand(batch, 4, dim, h, w, generator=g) - 0.2
    A = -torch.exp(0.5 * torch.randn(4 * dim, n, generator=g))
    B = torch.randn(batch, 4, n, h, w, generator=g)
    C = torch.randn(batch, 4, n, h, w, generator=g)
    D = torch.randn(4 * dim, generator=g) if with_d else None
    bias = 0.3 * torch.randn(4 * dim, generator=g) if with_bias else None
    cast = lambda t, dt: None if t is None else t.to(dt).to(device)  # noqa: E731
    return (cast(u, dtype), cast(delta, dtype), cast(A, sdt), cast(B, dtype), cast(C, dtype), cast(D, sdt), cast(bias, sdt))


def pixel_orders(h, w):
    rows = [r * w + q for r in range(h) for q in range(w)]
    cols = [r * w + q for q in range(w) for r in range(h)]
    return [rows, cols, rows[::-1], cols[::-1]]


@pytest.mark.parametrize("hw", [(1, 1), (3, 4), (4, 3), (2, 5)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_reference_matches_explicit_directions(hw):
    h, w = hw
    u, delta, A, B, C, D, bias = make_inputs(2, 3, h, w, 2, torch.float64)
    expected = torch.zeros(2, 3, h * w, dtype=torch.float64)
    for k, order in enumerate(pixel_orders(h, w)):
        idx = torch.tensor(order)
        rows = slice(k * 3, k * 3 + 3)
        y, _ = scan_loop_f64(u.reshape(2, 3, -1)[..., idx], delta[:, k].reshape(2, 3, -1)[..., idx], A[rows],
                             B[:, k].reshape(2, 2, -1)[..., idx], C[:, k].reshape(2, 2, -1)[..., idx],
                             D=D[rows], delta_bias=bias[rows], delta_softplus=True)
        expected[..., idx] += y
    with medkernels.use_backend("ref"):
        out = ss2d_scan(u, delta, A, B, C, D=D, delta_bias=bias, delta_softplus=True)
    torch.testing.assert_close(out.reshape(2, 3, -1), expected, rtol=1e-10, atol=1e-10)


def test_equals_unfused_cross_scan_selective_scan_cross_merge():
    b, d, h, w, n = 2, 4, 5, 6, 3
    u, delta, A, B, C, D, bias = make_inputs(b, d, h, w, n, torch.float64)
    in_scan_order = lambda t: torch.stack([cross_scan(t[:, k])[:, k] for k in range(4)], 1)  # noqa: E731
    with medkernels.use_backend("ref"):
        y = selective_scan(cross_scan(u).reshape(b, 4 * d, h * w), in_scan_order(delta).reshape(b, 4 * d, h * w), A,
                           in_scan_order(B), in_scan_order(C), D=D, delta_bias=bias, delta_softplus=True)
        unfused = cross_merge(y.reshape(b, 4, d, h, w)).reshape(b, d, h, w)
        fused = ss2d_scan(u, delta, A, B, C, D=D, delta_bias=bias)
    torch.testing.assert_close(fused, unfused, rtol=1e-10, atol=1e-10)


CASES = [  # (batch, dim, H, W, N, D and bias, softplus)
    pytest.param((1, 1, 1, 1, 1, True, True), id="1x1-N1"),
    pytest.param((2, 4, 3, 5, 4, True, True), id="3x5-N4"),
    pytest.param((1, 3, 7, 2, 16, False, False), id="7x2-N16-noD-nosoftplus"),
    pytest.param((2, 8, 14, 14, 16, True, True), id="14x14-N16"),
]


def _run_and_grads(inputs, softplus, cot):
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
    out = ss2d_scan(*leaves[:5], D=leaves[5], delta_bias=leaves[6], delta_softplus=softplus)
    present = [t for t in leaves if t is not None]
    return out, torch.autograd.grad((out * cot).sum(), present)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_every_backend_against_float64_reference(device_backend, case, dtype):
    device, backend = device_backend
    batch, dim, h, w, n, with_d, softplus = case
    if backend == "triton" and device.type == "cpu" and h * w > 16:
        pytest.skip("the Triton interpreter is too slow for this size; covered by the smaller cases")
    inputs = make_inputs(batch, dim, h, w, n, dtype, with_d, with_d, device=device)
    cot = torch.randn(batch, dim, h, w, generator=torch.Generator().manual_seed(9)).to(device, dtype)
    with medkernels.use_backend(backend):
        out, grads = _run_and_grads(inputs, softplus, cot)
    inputs64 = [t.detach().cpu().double() if t is not None else None for t in inputs]
    with medkernels.use_backend("ref"):
        exp_out, exp_grads = _run_and_grads(inputs64, softplus, cot.cpu().double())
    assert out.dtype == dtype and out.shape == (batch, dim, h, w)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.cpu().double(), exp_out, rtol=rtol, atol=atol)
    names = [nm for nm, t in zip(("u", "delta", "A", "B", "C", "D", "delta_bias"), inputs) if t is not None]
    grtol, gatol = GRAD_TOL[dtype]
    for name, g, e in zip(names, grads, exp_grads):
        torch.testing.assert_close(g.cpu().double(), e, rtol=grtol, atol=gatol * max(1.0, e.abs().max().item()),
                                   msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_inputs(device_backend, dtype):
    device, backend = device_backend
    inputs = make_inputs(2, 4, 3, 5, 4, dtype, device=device)
    with medkernels.use_backend(backend):
        out = ss2d_scan(*inputs[:5], D=inputs[5], delta_bias=inputs[6])
    exp = ss2d_scan_ref(*[t.cpu().double() if t is not None else None for t in inputs], True)
    assert out.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.cpu().double(), exp, rtol=rtol, atol=atol * max(1.0, exp.abs().max().item()))


def test_non_contiguous_inputs(device_backend):
    device, backend = device_backend
    u, delta, A, B, C, D, bias = make_inputs(1, 3, 4, 5, 2, torch.float32, device=device)
    strided = (u.transpose(2, 3).contiguous().transpose(2, 3), delta.transpose(1, 2).contiguous().transpose(1, 2),
               A.t().contiguous().t(), B.transpose(3, 4).contiguous().transpose(3, 4), C)
    assert not strided[0].is_contiguous() and not strided[1].is_contiguous() and not strided[3].is_contiguous()
    with medkernels.use_backend(backend):
        torch.testing.assert_close(ss2d_scan(*strided, D=D, delta_bias=bias), ss2d_scan(u, delta, A, B, C, D=D, delta_bias=bias))


def test_gradcheck_float64(cpu_backend):
    inputs = [t.requires_grad_(True) for t in make_inputs(1, 2, 2, 3, 2, torch.float64)]
    with medkernels.use_backend(cpu_backend):
        # fast_mode for the Triton interpreter, as in test_selective_scan.py
        assert torch.autograd.gradcheck(lambda *a: ss2d_scan(*a[:5], D=a[5], delta_bias=a[6]), tuple(inputs),
                                        fast_mode=cpu_backend == "triton")


def _bad(case):
    u, delta, A, B, C, D, bias = make_inputs(1, 3, 4, 5, 2, torch.float32)
    return {
        "u-rank": ((u[0], delta, A, B, C), {}, ValueError, "u"),
        "delta-shape": ((u, delta[:, :3], A, B, C), {}, ValueError, "delta"),
        "delta-dtype": ((u, delta.double(), A, B, C), {}, TypeError, "delta"),
        "A-rows": ((u, delta, A[:3], B, C), {}, ValueError, "A"),
        "A-complex": ((u, delta, A.to(torch.complex64), B, C), {}, TypeError, "A"),
        "N-too-large": ((u, delta, torch.zeros(12, 257), torch.zeros(1, 4, 257, 4, 5), torch.zeros(1, 4, 257, 4, 5)), {}, ValueError, "N"),
        "B-shape": ((u, delta, A, B[:, :, :1], C), {}, ValueError, "B"),
        "D-shape": ((u, delta, A, B, C), {"D": torch.ones(3)}, ValueError, "D"),
        "mixed-devices": ((u, delta, A, B, C.to("meta")), {}, ValueError, "device"),
    }[case]


@pytest.mark.parametrize("case", ["u-rank", "delta-shape", "delta-dtype", "A-rows", "A-complex", "N-too-large", "B-shape", "D-shape", "mixed-devices"])
def test_bad_inputs_raise_naming_the_argument(case):
    args, kw, exc, word = _bad(case)
    with pytest.raises(exc, match=word):
        ss2d_scan(*args, **kw)
