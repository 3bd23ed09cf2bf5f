"""Property-based tests (hypothesis, bounded example counts): random shapes, strides, options and dtypes for
selective_scan and ss2d_scan, every backend against float64 fed the same rounded inputs and cotangent, elementwise
(helpers.scan_utils.tolerance): the float64 reference, or for the ref backend in float64 the independent loops."""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import medkernels  # noqa: E402
from medkernels import ops  # noqa: E402
from medkernels.ops.selective_scan_ref import selective_scan_ref  # noqa: E402
from medkernels.ops.ss2d_scan_ref import ss2d_scan_ref  # noqa: E402

from helpers.scan_utils import assert_close_f64, scan_loop_f64, ss2d_loop_f64  # noqa: E402

# the Triton interpreter is slow: fewer and smaller examples there
EXAMPLES = {"ref": 8, "cpu": 25, "triton": 4}
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _maybe_strided(t, transpose):
    """The same values, as a non-contiguous tensor when asked (a transposed copy viewed back)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2) if transpose and t.dim() >= 2 else t


@st.composite
def scan_cases(draw, small):
    batch = draw(st.integers(1, 2))
    groups = draw(st.sampled_from([0, 1, 2]))  # 0: B/C as (batch, N, L)
    dim = draw(st.integers(1, 3)) * max(1, groups)
    L = draw(st.integers(1, 12 if small else 80))
    n = draw(st.integers(1, 6 if small else 17))
    return dict(batch=batch, dim=dim, L=L, n=n, groups=groups,
                dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])),
                D=draw(st.booleans()), z=draw(st.booleans()), bias=draw(st.booleans()),
                softplus=draw(st.booleans()), strided=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def _check_scan(backend, c):
    g = torch.Generator().manual_seed(c["seed"])
    dt, sdt = c["dtype"], torch.float64 if c["dtype"] == torch.float64 else torch.float32
    b, d, L, n = c["batch"], c["dim"], c["L"], c["n"]
    bc_shape = (b, c["groups"], n, L) if c["groups"] else (b, n, L)
    t = dict(u=torch.randn(b, d, L, generator=g).to(dt), delta=(0.6 * torch.rand(b, d, L, generator=g)).to(dt),
             A=-torch.exp(0.5 * torch.randn(d, n, generator=g)).to(sdt), B=torch.randn(bc_shape, generator=g).to(dt),
             C=torch.randn(bc_shape, generator=g).to(dt),
             D=torch.randn(d, generator=g).to(sdt) if c["D"] else None,
             z=torch.randn(b, d, L, generator=g).to(dt) if c["z"] else None,
             delta_bias=(0.3 * torch.rand(d, generator=g)).to(sdt) if c["bias"] else None)
    t = {k: None if v is None else _maybe_strided(v, c["strided"]).requires_grad_() for k, v in t.items()}
    with medkernels.use_backend(backend):
        out = ops.selective_scan(**t, delta_softplus=c["softplus"])
    dout = torch.randn(out.shape, generator=g).to(dt)
    present = {k: v for k, v in t.items() if v is not None}
    grads = torch.autograd.grad(out, list(present.values()), dout)
    leaves = {k: None if v is None else v.detach().double().requires_grad_() for k, v in t.items()}
    if backend == "ref" and dt == torch.float64:  # not the float64 reference against itself
        exp = scan_loop_f64(**leaves, delta_softplus=c["softplus"])[0]
    else:
        exp = selective_scan_ref(*leaves.values(), c["softplus"])[0]
    exp_grads = torch.autograd.grad(exp, [v for v in leaves.values() if v is not None], dout.double())
    assert_close_f64(out, exp, "out")
    for name, got, want in zip(present, grads, exp_grads):
        assert got.shape == present[name].shape and got.dtype == present[name].dtype, name
        assert_close_f64(got, want, f"grad of {name}")


@pytest.mark.parametrize("backend", ["ref", "cpu", "triton"])
def test_selective_scan_matches_reference_on_random_cases(backend):
    if medkernels.unavailable_reason(backend) is not None:
        pytest.skip(f"backend {backend} unavailable")

    @settings(max_examples=EXAMPLES[backend], **SETTINGS)
    @given(scan_cases(small=backend == "triton"))
    def run(c):
        _check_scan(backend, c)

    run()


@st.composite
def ss2d_cases(draw, small):
    return dict(batch=draw(st.integers(1, 2)), dim=draw(st.integers(1, 3)), h=draw(st.integers(1, 4 if small else 9)),
                w=draw(st.integers(1, 4 if small else 9)), n=draw(st.integers(1, 4 if small else 16)),
                dtype=draw(st.sampled_from([torch.float32, torch.float64])), D=draw(st.booleans()),
                bias=draw(st.booleans()), softplus=draw(st.booleans()), strided=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("backend", ["ref", "cpu", "triton"])
def test_ss2d_scan_matches_reference_on_random_cases(backend):
    if medkernels.unavailable_reason(backend) is not None:
        pytest.skip(f"backend {backend} unavailable")

    @settings(max_examples=EXAMPLES[backend], **SETTINGS)
    @given(ss2d_cases(small=backend == "triton"))
    def run(c):
        g = torch.Generator().manual_seed(c["seed"])
        dt, sdt = c["dtype"], torch.float64 if c["dtype"] == torch.float64 else torch.float32
        b, d, h, w, n = c["batch"], c["dim"], c["h"], c["w"], c["n"]
        t = dict(u=torch.randn(b, d, h, w, generator=g).to(dt), delta=(0.6 * torch.rand(b, 4, d, h, w, generator=g)).to(dt),
                 A=-torch.exp(0.5 * torch.randn(4 * d, n, generator=g)).to(sdt),
                 B=torch.randn(b, 4, n, h, w, generator=g).to(dt), C=torch.randn(b, 4, n, h, w, generator=g).to(dt),
                 D=torch.randn(4 * d, generator=g).to(sdt) if c["D"] else None,
                 delta_bias=(0.3 * torch.rand(4 * d, generator=g)).to(sdt) if c["bias"] else None)
        t = {k: None if v is None else _maybe_strided(v, c["strided"]).requires_grad_() for k, v in t.items()}
        with medkernels.use_backend(backend):
            out = ops.ss2d_scan(**t, delta_softplus=c["softplus"])
        dout = torch.randn(out.shape, generator=g).to(dt)
        present = {k: v for k, v in t.items() if v is not None}
        grads = torch.autograd.grad(out, list(present.values()), dout)
        leaves = {k: None if v is None else v.detach().double().requires_grad_() for k, v in t.items()}
        if backend == "ref" and dt == torch.float64:  # not the float64 reference against itself
            exp = ss2d_loop_f64(**leaves, delta_softplus=c["softplus"])
        else:
            exp = ss2d_scan_ref(*leaves.values(), c["softplus"])
        exp_grads = torch.autograd.grad(exp, [v for v in leaves.values() if v is not None], dout.double().reshape(exp.shape))
        assert_close_f64(out.reshape(exp.shape), exp, "out")
        for name, got, want in zip(present, grads, exp_grads):
            assert got.shape == present[name].shape, name
            assert_close_f64(got, want, f"grad of {name}")

    run()
