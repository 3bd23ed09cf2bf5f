"""Independent float64 statements of the selective scan and of the SS2D scan, the tolerance every scan test
holds a result to against float64, and the expectation of a known, reported fault."""
import pytest
import torch


def scan_loop_f64(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Scalar-state statement of the scan: one (batch, channel) at a time, in float64. B and C may be grouped
    (batch, G, N, L), each with its own G, or ungrouped (batch, N, L). Differentiable (autograd)."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    batch, dim, L = u.shape

    def at(M, b, d, t):
        return M[b, d // (dim // M.shape[1]), :, t] if M.dim() == 4 else M[b, :, t]

    outs, lasts = [], []
    for b in range(batch):
        for d in range(dim):
            h = torch.zeros(A.shape[1], dtype=torch.float64)
            ys = []
            for t in range(L):
                dt = delta[b, d, t] + (delta_bias[d].double() if delta_bias is not None else 0.0)
                if delta_softplus:
                    dt = torch.log1p(torch.exp(dt)) if dt < 20 else dt
                h = torch.exp(dt * A[d]) * h + dt * at(B, b, d, t) * u[b, d, t]
                y = (h * at(C, b, d, t)).sum()
                if D is not None:
                    y = y + D[d].double() * u[b, d, t]
                if z is not None:
                    zz = z[b, d, t].double()
                    y = y * zz * torch.sigmoid(zz)
                ys.append(y)
            outs.append(torch.stack(ys) if ys else u.new_zeros(0))
            lasts.append(h)
    return torch.stack(outs).reshape(batch, dim, L), torch.stack(lasts).reshape(batch, dim, A.shape[1])


def pixel_orders(h, w):
    """The pixels (p = row * w + col) in the order each SS2D direction visits them: row-major, column-major,
    and both reversed."""
    rows = [r * w + q for r in range(h) for q in range(w)]
    cols = [r * w + q for q in range(w) for r in range(h)]
    return [rows, cols, rows[::-1], cols[::-1]]


def ss2d_loop_f64(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """The SS2D scan stated direction by direction with scan_loop_f64: direction k reads u, delta[:, k],
    B[:, k], C[:, k] in its pixel order with rows k*dim .. k*dim+dim-1 of A, D, delta_bias; the four outputs
    are summed per pixel. Float64, differentiable."""
    batch, dim, h, w = u.shape
    n = A.shape[1]
    out = torch.zeros(batch, dim, h * w, dtype=torch.float64)
    for k, order in enumerate(pixel_orders(h, w)):
        idx = torch.tensor(order, dtype=torch.long)
        rows = slice(k * dim, (k + 1) * dim)
        rows_of = lambda v: None if v is None else v[rows]  # noqa: E731
        y, _ = scan_loop_f64(u.reshape(batch, dim, -1)[..., idx], delta[:, k].reshape(batch, dim, -1)[..., idx],
                             A[rows], B[:, k].reshape(batch, n, -1)[..., idx], C[:, k].reshape(batch, n, -1)[..., idx],
                             D=rows_of(D), delta_bias=rows_of(delta_bias), delta_softplus=delta_softplus)
        out = out.index_add(-1, idx, y)
    return out.reshape(batch, dim, h, w)


# Accumulation (scan state) dtype's epsilon: float32 for float16/bfloat16/float32 results, float64 for float64.
def _acc_eps(dtype):
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def tolerance(dtype, exp, floor_scale=None):
    """(rtol, atol) for a scan result of `dtype` against its float64 value `exp`, both applied elementwise.

    rtol: a float16/bfloat16 result is computed in float32 and rounded once, which is within eps/2 of it:
    rtol = eps(dtype) leaves the other half for the float32 arithmetic (4 eps of bfloat16 would be 3 %, and let
    a 1 % error through). A float32 or float64 result carries only its own arithmetic's error: 32 eps.
    atol: an entry whose terms cancel (a sum over states, channels or positions that lands near zero) keeps the
    absolute error of the arithmetic on those terms, a few eps of the accumulation dtype times their size,
    which no relative bound covers: 4 eps(accumulation dtype) * floor_scale. The terms are of the size of the
    tensor's largest entries (sums over thousands of positions grow with them), so floor_scale is max|exp| by
    default: scaled by the largest entry, but at float32's eps, so that a float16 (bfloat16) result is held to
    its relative rounding bound at every entry above 1/2000 (1/16000) of the largest, and a float32 one at
    every entry above 1/8 of it and to 5e-7 of the largest below. Small cases (inputs of unit size, few terms)
    pass floor_scale=1: they hold with the floor at unit scale, whatever their largest entry. Plus half float16's
    subnormal spacing (below its smallest normal number the rounding is absolute)."""
    acc = _acc_eps(dtype)
    rtol = torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else 32 * acc
    if floor_scale is None:
        floor_scale = exp.abs().max().item() if exp.numel() else 0.0
    atol = 4 * acc * floor_scale
    if dtype == torch.float16:
        atol += torch.finfo(dtype).tiny * torch.finfo(dtype).eps / 2
    return rtol, atol


def assert_close_f64(got, exp, name="", dtype=None, floor_scale=None):
    """got (any dtype, any device) against its float64 value exp, elementwise to tolerance(dtype or got's)."""
    rtol, atol = tolerance(got.dtype if dtype is None else dtype, exp, floor_scale)
    torch.testing.assert_close(got.detach().cpu().double(), exp.detach().cpu().double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{name} ({got.dtype}, rtol {rtol:.3g}, atol {atol:.3g}): {m}")


def assert_all_close_f64(results, known_fault=None, floor_scale=None):
    """assert_close_f64 on each (name, got, float64 value) of results; known_fault = (reason, names): those are
    expected to fail (expect_known_fault), and are checked after all the others."""
    faulty = known_fault[1] if known_fault else ()
    for name, got, exp in results:
        if name not in faulty:
            assert_close_f64(got, exp, name, floor_scale=floor_scale)
    if known_fault:
        expect_known_fault(known_fault[0], [lambda r=r: assert_close_f64(r[1], r[2], r[0], floor_scale=floor_scale)
                                            for r in results if r[0] in faulty])


def expect_known_fault(reason, checks):
    """Runs checks (callables) that a known, reported fault makes fail: the test is xfailed, naming the reason
    and the first failure, while one of them fails; once all pass the test fails, so that the expectation is
    dropped with the fault. Call it after the checks the fault leaves alone."""
    try:
        for check in checks:
            check()
    except AssertionError as err:
        pytest.xfail(f"{reason}: {str(err).splitlines()[0]}")
    pytest.fail(f"the known fault no longer shows, drop its expectation: {reason}")
