"""selective_scan: every backend against an independent float64 statement of the recurrence, gradients by
gradcheck, and the boundary checks."""
import math

import pytest
import torch

import medkernels
from medkernels.ops import selective_scan

from helpers.scan_utils import scan_loop_f64

TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}


def make_inputs(batch, dim, L, n, groups, dtype, options, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device)

    u = rnd(batch, dim, L).to(dtype)
    delta = (0.5 * torch.rand(batch, dim, L, generator=g)).to(device).to(dtype)
    A = -torch.exp(rnd(dim, n, scale=0.5)).to(torch.float64 if dtype == torch.float64 else torch.float32)
    bshape = (batch, n, L) if groups is None else (batch, groups, n, L)
    B, C = rnd(*bshape).to(dtype), rnd(*bshape).to(dtype)
    kw = {}
    if "D" in options:
        kw["D"] = rnd(dim).to(A.dtype)
    if "z" in options:
        kw["z"] = rnd(batch, dim, L).to(dtype)
    if "delta_bias" in options:
        kw["delta_bias"] = rnd(dim, scale=0.3).to(A.dtype)
    kw["delta_softplus"] = "softplus" in options
    return (u, delta, A, B, C), kw


OPTION_SETS = [(), ("D",), ("z",), ("delta_bias", "softplus"), ("D", "z", "delta_bias", "softplus")]
SHAPES = [  # (batch, dim, L, N, groups)
    pytest.param((1, 1, 1, 1, None), id="L1-N1"),
    pytest.param((2, 4, 7, 4, None), id="L7-N4"),
    pytest.param((2, 4, 7, 4, 1), id="L7-N4-G1"),
    pytest.param((1, 8, 13, 16, 4), id="L13-N16-G4"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "+".join(o) or "plain")
def test_reference_matches_float64_loop(shape, options):
    batch, dim, L, n, groups = shape
    args, kw = make_inputs(batch, dim, L, n, groups, torch.float64, options)
    with medkernels.use_backend("ref"):
        out, last = selective_scan(*args, **kw, return_last_state=True)
    exp_out, exp_last = scan_loop_f64(*args, **kw)
    torch.testing.assert_close(out, exp_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, exp_last, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_every_backend_and_dtype_against_float64(device_backend, dtype):
    device, backend = device_backend
    args, kw = make_inputs(2, 8, 64, 16, 4, dtype, OPTION_SETS[-1], device=device)
    with medkernels.use_backend(backend):
        out, last = selective_scan(*args, **kw, return_last_state=True)
    assert out.dtype == dtype and last.dtype == torch.float32
    exp_out, exp_last = scan_loop_f64(*(a.cpu() for a in args), **{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()})
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.cpu().double(), exp_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(last.cpu().double(), exp_last, rtol=TOL[torch.float32][0], atol=1e-4)


def test_non_contiguous_inputs_match_contiguous(device_backend):
    device, backend = device_backend
    args, kw = make_inputs(2, 6, 9, 4, 3, torch.float32, OPTION_SETS[-1], device=device)
    u, delta, A, B, C = args
    strided = (u.transpose(0, 1).contiguous().transpose(0, 1), delta[..., :].clone().transpose(1, 2).contiguous().transpose(1, 2),
               A.t().contiguous().t(), B.transpose(2, 3).contiguous().transpose(2, 3), C)
    assert not strided[0].is_contiguous() and not strided[1].is_contiguous()
    with medkernels.use_backend(backend):
        torch.testing.assert_close(selective_scan(*strided, **kw), selective_scan(*args, **kw))


@pytest.mark.parametrize("options", [OPTION_SETS[0], OPTION_SETS[-1]], ids=["plain", "all-options"])
@pytest.mark.parametrize("groups", [None, 2], ids=["ungrouped", "G2"])
def test_gradcheck_float64(cpu_backend, options, groups):
    args, kw = make_inputs(2, 4, 6, 3, groups, torch.float64, options)
    tensors = list(args) + [kw[k] for k in ("D", "z", "delta_bias") if k in kw]
    names = [k for k in ("D", "z", "delta_bias") if k in kw]
    for t in tensors:
        t.requires_grad_(True)

    def fn(*ts):
        extra = dict(zip(names, ts[5:]))
        out, last = selective_scan(*ts[:5], **extra, delta_softplus=kw["delta_softplus"], return_last_state=True)
        return out, last

    with medkernels.use_backend(cpu_backend):
        # fast_mode checks one random projection of the Jacobian: a full gradcheck launches a kernel per
        # input element, too slow for the Triton interpreter (the gradients are also compared elementwise
        # against float64 autograd in test_backend_matches_float64_reference_with_all_gradients)
        assert torch.autograd.gradcheck(fn, tuple(tensors), fast_mode=cpu_backend == "triton")


def test_gradients_of_every_input_match_float64_autograd():
    args, kw = make_inputs(2, 4, 5, 3, 2, torch.float32, OPTION_SETS[-1])
    leaves = [a.clone().requires_grad_() for a in args] + [kw[k].clone().requires_grad_() for k in ("D", "z", "delta_bias")]
    out = selective_scan(*leaves[:5], D=leaves[5], z=leaves[6], delta_bias=leaves[7], delta_softplus=True)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((out * weights).sum(), leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    exp, _ = scan_loop_f64(*leaves64[:5], D=leaves64[5], z=leaves64[6], delta_bias=leaves64[7], delta_softplus=True)
    exp_grads = torch.autograd.grad((exp * weights.double()).sum(), leaves64)
    for name, g, e in zip(["u", "delta", "A", "B", "C", "D", "z", "delta_bias"], grads, exp_grads):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad of {name}: {m}")


def test_empty_sequence_gives_empty_output():
    args, kw = make_inputs(2, 4, 0, 3, None, torch.float32, ("D",))
    out, last = selective_scan(*args, **kw, return_last_state=True)
    assert out.shape == (2, 4, 0) and torch.equal(last, torch.zeros(2, 4, 3))


def test_nan_propagates():
    args, kw = make_inputs(1, 2, 5, 3, None, torch.float32, ())
    args[0][0, 0, 2] = math.nan
    out = selective_scan(*args, **kw)
    assert out[0, 0, :2].isfinite().all() and out[0, 0, 2:].isnan().all() and out[0, 1].isfinite().all()


def _bad(case):
    args, kw = make_inputs(2, 4, 5, 3, None, torch.float32, ("D",))
    u, delta, A, B, C = args
    return {
        "u-rank": ((u[0], delta, A, B, C), kw, ValueError, "u"),
        "u-int": ((u.long(), delta, A, B, C), kw, TypeError, "u"),
        "delta-shape": ((u, delta[:, :, :4], A, B, C), kw, ValueError, "delta"),
        "A-complex": ((u, delta, A.to(torch.complex64), B, C), kw, TypeError, "A"),
        "A-dim": ((u, delta, A[:3], B, C), kw, ValueError, "A"),
        "N-too-large": ((u, delta, torch.zeros(4, 300), torch.zeros(2, 300, 5), torch.zeros(2, 300, 5)), kw, ValueError, "N"),
        "B-shape": ((u, delta, A, B[:, :2], C), kw, ValueError, "B"),
        "C-groups": ((u, delta, A, B, torch.zeros(2, 3, 3, 5)), kw, ValueError, "C"),
        "D-shape": ((u, delta, A, B, C), {"D": torch.ones(5)}, ValueError, "D"),
        "z-shape": ((u, delta, A, B, C), {"z": torch.ones(2, 4, 6)}, ValueError, "z"),
        "mixed-devices": ((u, delta, A.to("meta"), B, C), kw, ValueError, "device"),
    }[case]


@pytest.mark.parametrize("case", ["u-rank", "u-int", "delta-shape", "A-complex", "A-dim", "N-too-large", "B-shape",
                                  "C-groups", "D-shape", "z-shape", "mixed-devices"])
def test_bad_inputs_raise_naming_the_argument(case):
    args, kw, exc, word = _bad(case)
    with pytest.raises(exc, match=word):
        selective_scan(*args, **kw)


CURATED = [  # (batch, dim, L, N, G, options)
    pytest.param((1, 2, 1, 1, None, OPTION_SETS[-1]), id="L1-N1-all"),
    pytest.param((2, 4, 7, 4, None, ()), id="L7-N4-plain"),
    pytest.param((1, 3, 129, 1, None, ("z", "softplus")), id="L129-N1-z"),
    pytest.param((1, 4, 129, 4, 1, ("D", "z")), id="L129-N4-G1-D-z"),
    pytest.param((2, 4, 64, 16, 4, OPTION_SETS[-1]), id="L64-N16-G4-all"),
    pytest.param((1, 8, 2051, 16, 4, ("delta_bias", "softplus")), id="L2051-N16-G4"),
    pytest.param((1, 8, 3136, 16, 4, ("D", "delta_bias", "softplus")), id="L3136-N16-G4-medmamba"),
]
CURATED_TOL = {torch.float32: (2e-4, 2e-5), torch.float64: (1e-9, 1e-10)}


def _forward_and_grads(args, kw, weights):
    leaves = [a.detach().clone().requires_grad_(True) for a in args]
    opt = {k: (v.detach().clone().requires_grad_(True) if torch.is_tensor(v) else v) for k, v in kw.items()}
    out, last = selective_scan(*leaves, **opt, return_last_state=True)
    loss = (out.double() * weights[0]).sum() + (last.double() * weights[1]).sum()
    tensors = leaves + [v for v in opt.values() if torch.is_tensor(v)]
    return out, last, torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CURATED)
def test_backend_matches_float64_reference_with_all_gradients(device_backend, case, dtype):
    device, backend = device_backend
    batch, dim, L, n, groups, options = case
    if backend == "ref" and L > 129:
        pytest.skip("the reference against itself in float64: covered by the small cases")
    if backend == "triton" and device.type == "cpu" and L > 129:
        pytest.skip("the Triton interpreter is too slow for long sequences; they run on GPU")
    args, kw = make_inputs(batch, dim, L, n, groups, dtype, options, device=device)
    g = torch.Generator().manual_seed(11)
    weights = (torch.randn(batch, dim, L, generator=g, dtype=torch.float64).to(device),
               torch.randn(batch, dim, n, generator=g, dtype=torch.float64).to(device))
    with medkernels.use_backend(backend):
        out, last, grads = _forward_and_grads(args, kw, weights)
    args64 = [a.detach().cpu().double() for a in args]
    kw64 = {k: (v.detach().cpu().double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    with medkernels.use_backend("ref"):
        exp_out, exp_last, exp_grads = _forward_and_grads(args64, kw64, tuple(w.cpu() for w in weights))
    rtol, atol = CURATED_TOL[dtype]
    scale = lambda t: atol * max(1.0, t.abs().max().item())  # noqa: E731
    torch.testing.assert_close(out.cpu().double(), exp_out, rtol=rtol, atol=scale(exp_out))
    torch.testing.assert_close(last.cpu().double(), exp_last, rtol=rtol, atol=scale(exp_last))
    names = ["u", "delta", "A", "B", "C"] + [k for k, v in kw.items() if torch.is_tensor(v)]
    for name, got, exp in zip(names, grads, exp_grads):
        torch.testing.assert_close(got.cpu().double(), exp, rtol=10 * rtol, atol=10 * scale(exp),
                                   msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("grouping", [("G2", None), (None, "G2"), ("G2", "G4")], ids=["B-G2-C-plain", "B-plain-C-G2", "B-G2-C-G4"])
def test_mixed_grouping_of_B_and_C(device_backend, grouping):
    device, backend = device_backend
    args, kw = make_inputs(2, 8, 9, 3, None, torch.float64, OPTION_SETS[-1], device=device)
    u, delta, A, B, C = args
    g = torch.Generator().manual_seed(5)
    make = lambda spec: (torch.randn(2, int(spec[1:]), 3, 9, generator=g, dtype=torch.float64) if spec  # noqa: E731
                         else torch.randn(2, 3, 9, generator=g, dtype=torch.float64)).to(device)
    B, C = make(grouping[0]), make(grouping[1])
    weights = (torch.randn(2, 8, 9, generator=g, dtype=torch.float64).to(device), torch.zeros(2, 8, 3, dtype=torch.float64).to(device))
    with medkernels.use_backend(backend):
        out, _, grads = _forward_and_grads((u, delta, A, B, C), kw, weights)
    with medkernels.use_backend("ref"):
        exp, _, exp_grads = _forward_and_grads((u.cpu(), delta.cpu(), A.cpu(), B.cpu(), C.cpu()),
                                               {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()},
                                               tuple(w.cpu() for w in weights))
    torch.testing.assert_close(out.cpu(), exp, rtol=1e-9, atol=1e-10)
    for got, want in zip(grads, exp_grads):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-8, atol=1e-9)
