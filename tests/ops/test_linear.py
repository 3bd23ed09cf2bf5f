"""linear (nn.Linear's op) on every backend against F.linear evaluated in float64 on the same rounded inputs:
output and every gradient, over shapes (one row, odd sizes, leading batch dimensions, no bias), input layouts,
dtypes and bfloat16 autocast; the cpu backend's oneDNN path is taken where it claims to be; argument checks;
medkernels.nn.Linear as a drop-in nn.Linear."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medkernels
from medkernels.nn import Linear
from medkernels.ops import linear
import medkernels.ops.linear_onednn as linear_onednn
from medkernels.ops.linear_onednn import (ONEDNN_DW_MIN_ROWS, ONEDNN_DW_NARROW_MAX_INPUT, ONEDNN_DW_NARROW_OUT,
                                         ONEDNN_DX_MIN_ROWS)

from helpers.hff_utils import assert_close_scaled

# (x shape, out_features, bias)
CASES = [
    pytest.param(((7, 13), 5, True), id="7x13-to-5"),
    pytest.param(((2, 49, 96), 288, True), id="tokens-2x49x96-to-288"),
    pytest.param(((1, 33), 1, False), id="one-row-one-out-no-bias"),
    pytest.param(((17,), 9, True), id="vector"),
    pytest.param(((3, 4, 5, 70), 31, False), id="4d-no-bias"),
    # enough rows for the cpu backend's weight gradient to go through oneDNN's convolution weight gradient
    pytest.param(((2, (ONEDNN_DW_MIN_ROWS + 9) // 2, 40), 56, True), id="rows-over-onednn-dw-threshold"),
    # enough rows for the input gradient to go through oneDNN too
    pytest.param(((ONEDNN_DX_MIN_ROWS + 3, 24), 10, True), id="rows-over-onednn-dx-threshold"),
]
LAYOUTS = ["contiguous", "transposed", "sliced"]
# (dtype, output tolerance, gradient tolerance) relative to the largest expected magnitude: sums of up to 96
# products (output, input gradient) and of up to 1027 rows (weight and bias gradients)
FLOAT_CASES = [
    pytest.param((torch.float64, 1e-13, 1e-12), id="float64"),
    pytest.param((torch.float32, 2e-6, 4e-6), id="float32"),
]


def _require(backend):
    reason = medkernels.unavailable_reason(backend)
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")


def make_inputs(case, seed=0):
    shape, out, bias = case
    g = torch.Generator().manual_seed(seed)
    k = shape[-1]
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    w = torch.randn(out, k, generator=g, dtype=torch.float64) * k ** -0.5
    b = torch.randn(out, generator=g, dtype=torch.float64) if bias else None
    cot = torch.randn(*shape[:-1], out, generator=g, dtype=torch.float64)
    return x, w, b, cot


def _place(x, dtype, layout):
    if layout == "transposed" and x.dim() >= 2:  # same values, the last dimension not contiguous
        return x.to(dtype).transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        wide = torch.zeros(*x.shape[:-1], x.shape[-1] + 3, dtype=dtype)
        wide[..., 2:2 + x.shape[-1]] = x.to(dtype)
        return wide[..., 2:2 + x.shape[-1]]
    return x.to(dtype)


def run(fn, x, w, b, cot, dtype, layout="contiguous", autocast=None):
    x = _place(x, dtype, layout).requires_grad_()
    w = w.to(dtype).requires_grad_()
    leaves = [x, w]
    if b is not None:
        b = b.to(dtype).requires_grad_()
        leaves.append(b)
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        out = fn(x, w, b)
    grads = torch.autograd.grad(out, leaves, cot.to(out.dtype))
    return out, grads


@pytest.mark.parametrize("backend", ["ref", "cpu"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype_case", FLOAT_CASES)
def test_linear_matches_float64(backend, case, layout, dtype_case):
    _require(backend)
    dtype, out_tol, grad_tol = dtype_case
    x, w, b, cot = make_inputs(case)
    with medkernels.use_backend(backend):
        out, grads = run(linear, x, w, b, cot, dtype, layout)
    rounded = [t.to(dtype).double() if t is not None else None for t in (x, w, b)]
    want, want_grads = run(F.linear, *rounded, cot, torch.float64)
    assert out.dtype == dtype and out.shape == want.shape
    assert_close_scaled(out, want, out_tol, "out")
    for name, g, e in zip(["x", "weight", "bias"], grads, want_grads):
        assert g.dtype == dtype, name
        assert_close_scaled(g, e, grad_tol, f"d{name}")


def test_cpu_backend_runs_onednn_for_float32():
    """The float32 product of the cpu backend is the oneDNN function, not a silent F.linear."""
    _require("cpu")
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch has no oneDNN")
    x, w, b, _ = make_inputs(((7, 13), 5, True))
    x = x.float().requires_grad_()
    with medkernels.use_backend("cpu"):
        out = linear(x, w.float(), b.float())
    assert type(out.grad_fn).__name__ == "_OneDNNLinearBackward"


# (rows, in_features, out_features, whether the weight gradient is oneDNN's convolution weight gradient)
DW_PATHS = [
    pytest.param((ONEDNN_DW_MIN_ROWS - 1, 19, 23, False), id="rows-below"),
    pytest.param((ONEDNN_DW_MIN_ROWS, 19, 23, True), id="rows-at"),
    pytest.param((ONEDNN_DW_MIN_ROWS, ONEDNN_DW_NARROW_MAX_INPUT // ONEDNN_DW_MIN_ROWS + 1, 23, False),
                 id="narrow-out-large-input"),
    pytest.param((ONEDNN_DW_MIN_ROWS, ONEDNN_DW_NARROW_MAX_INPUT // ONEDNN_DW_MIN_ROWS + 1, ONEDNN_DW_NARROW_OUT,
                  True), id="wide-out-large-input"),
]


@pytest.mark.parametrize("path", DW_PATHS)
def test_cpu_weight_gradient_path_follows_its_rule(monkeypatch, path):
    """The weight gradient takes the convolution path exactly where the rule says, and agrees with the float64
    product either way; the output gradient arrives non-contiguous here (a transposed cotangent)."""
    _require("cpu")
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch has no oneDNN")
    rows, k, n, by_conv = path
    calls = []
    real = linear_onednn.onednn_weight_grad
    monkeypatch.setattr(linear_onednn, "onednn_weight_grad", lambda g, r: calls.append(1) or real(g, r))
    x, w, b, _ = make_inputs(((rows, k), n, True))
    cot = torch.randn(n, rows, dtype=torch.float64).t()
    x32, w32 = x.float().requires_grad_(), w.float().requires_grad_()
    with medkernels.use_backend("cpu"):
        out = linear(x32, w32, b.float())
    out.backward(cot.float())
    assert len(calls) == int(by_conv)
    assert_close_scaled(w32.grad, cot.t() @ x.float().double(), 4e-6, "dweight")


@pytest.mark.parametrize("backend", ["ref", "cpu"])
@pytest.mark.parametrize("mode", ["bfloat16", "bf16-autocast"])
def test_linear_half_precision(backend, mode):
    """bfloat16 inputs, or float32 under bfloat16 autocast: the product in bfloat16 as F.linear computes it."""
    _require(backend)
    x, w, b, cot = make_inputs(((2, 49, 96), 288, True))
    dtype, autocast = (torch.bfloat16, None) if mode == "bfloat16" else (torch.float32, torch.bfloat16)
    with medkernels.use_backend(backend):
        out, grads = run(linear, x, w, b, cot, dtype, autocast=autocast)
    want, want_grads = run(F.linear, x, w, b, cot, dtype, autocast=autocast)
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for name, g, e in zip(["x", "weight", "bias"], grads, want_grads):
        assert g.dtype == e.dtype, name
        torch.testing.assert_close(g, e, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("backend", ["ref", "cpu"])
@pytest.mark.parametrize("shape,out", [((0, 8), 4), ((3, 0), 4), ((3, 8), 0)], ids=["no-rows", "no-inputs", "no-outputs"])
def test_linear_empty(backend, shape, out):
    _require(backend)
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(out, shape[-1], requires_grad=True)
    b = torch.randn(out, requires_grad=True)
    with medkernels.use_backend(backend):
        got = linear(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b))
    got.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and b.grad.shape == b.shape


BAD = [
    pytest.param(lambda: linear(torch.randn(3, 4), torch.randn(5, 6)), ValueError, "weight must have shape",
                 id="in-features"),
    pytest.param(lambda: linear(torch.randn(3, 4), torch.randn(5, 4, 1)), ValueError, "weight must have 2",
                 id="weight-rank"),
    pytest.param(lambda: linear(torch.randn(3, 4), torch.randn(5, 4), torch.randn(4)), ValueError,
                 "bias must have shape", id="bias-shape"),
    pytest.param(lambda: linear(torch.randn(3, 4), torch.randn(5, 4).double()), TypeError, "weight must have x's dtype",
                 id="dtype-mismatch"),
    pytest.param(lambda: linear(torch.ones(3, 4, dtype=torch.int64), torch.ones(5, 4, dtype=torch.int64)), TypeError,
                 "x must have a floating dtype", id="integer"),
    pytest.param(lambda: linear(torch.tensor(1.0), torch.randn(1, 1)), ValueError, "x must have at least 1",
                 id="scalar-x"),
    pytest.param(lambda: linear([1.0, 2.0], torch.randn(1, 2)), TypeError, "x must be a torch.Tensor", id="list-x"),
    pytest.param(lambda: linear(torch.randn(3, 4), torch.randn(5, 4, device="meta")), ValueError, "one device",
                 id="devices"),
]


@pytest.mark.parametrize("call,error,match", BAD)
def test_linear_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_module_is_a_drop_in_nn_linear(backend):
    _require(backend)
    torch.manual_seed(0)
    official = nn.Linear(20, 7)
    ours = Linear(20, 7)
    ours.load_state_dict(official.state_dict())
    assert isinstance(ours, nn.Linear) and list(ours.state_dict()) == ["weight", "bias"]
    x = torch.randn(4, 3, 20, dtype=torch.float64)
    with medkernels.use_backend(backend):
        got = ours.double()(x)
    torch.testing.assert_close(got, official.double()(x), rtol=1e-13, atol=1e-13)
