"""irmlp (HiFuse's inverted residual MLP) on every backend against the reference chain evaluated in float64 on the
same rounded inputs: output, every gradient and the BatchNorms' running statistics, in training and eval mode,
over shapes that take each of the cpu backend's paths (3x3 convolution on channels-last maps or as im2col matrix
product; eval BatchNorms folded into the weights or applied to the activations), input layouts, dtypes and bfloat16
autocast; argument checks."""
import pytest
import torch

import medkernels
from medkernels.ops import BatchNormArgs, irmlp
from medkernels.ops.irmlp_gemm import IM2COL_MAX_PIXELS
from medkernels.ops.irmlp_ref import irmlp_ref

from helpers.hff_utils import assert_close_scaled

# (batch, C, H, W, k); hidden = 4C and out = C // 3 as in HiFuse (out 4 here, 3C = 12 input channels)
CASES = [
    pytest.param((2, 12, 9, 9, 3), id="9x9-conv-fold-weight"),
    pytest.param((2, 12, 7, 7, 3), id="7x7-im2col"),
    pytest.param((3, 12, 5, 13, 3), id="5x13-conv"),
    pytest.param((1, 12, 3, 3, 5), id="3x3-k5-im2col-fold-rows"),
]
LAYOUTS = ["nchw", "channels_last", "sliced"]

# (dtype, output tolerance, gradient tolerance) relative to the largest expected magnitude, for float64 and float32:
# the chain's sums (up to 9C = 108 products in the convolution, up to 4C = 48 in the 1x1 ones, batch * H * W rows
# in the BatchNorm statistics and weight gradients) round at every addition. Half precision is held to the
# reference backend's own error instead (test_irmlp_half_precision_as_accurate_as_the_reference).
FLOAT_CASES = [
    pytest.param((torch.float64, 1e-11, 1e-10), id="float64"),
    pytest.param((torch.float32, 2e-6, 2e-5), id="float32"),
]


def _backends():
    return [pytest.param(b, id=b) for b in ("ref", "cpu")]


def _require(backend):
    reason = medkernels.unavailable_reason(backend)
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")


def make_inputs(case, seed=0):
    """{x, w1, w2, w3, bn1, bn3 tensors} in float64 (the values every dtype is rounded from)."""
    b, c, h, w, k = case
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    hidden, out = 4 * c, c // 3
    t = {"x": r(b, c, h, w), "w1": r(c, c, k, k, scale=(c * k * k) ** -0.5), "w2": r(hidden, c, 1, 1, scale=c ** -0.5),
         "w3": r(out, hidden, 1, 1, scale=hidden ** -0.5)}
    for name, n in (("bn1", c), ("bn3", out)):
        t[name] = [r(n).abs() + 0.5, r(n), r(n) * 0.1, torch.rand(n, generator=g, dtype=torch.float64) + 0.5]
    return t


def _place(x64, dtype, layout):
    if layout == "channels_last":
        return x64.to(dtype).contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        wide = torch.zeros(*x64.shape[:3], x64.shape[3] + 3, dtype=dtype)
        wide[..., 1:1 + x64.shape[3]] = x64.to(dtype)
        return wide[..., 1:1 + x64.shape[3]]
    return x64.to(dtype)


def run(fn, t, dtype, training, layout="nchw", bn_dtype=None, autocast=None):
    """(output, [gradients of x, w1, w2, w3, bn1 weight and bias, bn3 weight and bias], [running statistics after])
    of fn on the inputs rounded to dtype (BatchNorm parameters to bn_dtype, default dtype)."""
    bn_dtype = bn_dtype or dtype
    x = _place(t["x"], dtype, layout).requires_grad_()
    ws = [t[n].to(dtype).requires_grad_() for n in ("w1", "w2", "w3")]
    bns, leaves = [], []
    for name in ("bn1", "bn3"):
        weight, bias, mean, var = (v.to(bn_dtype) for v in t[name])
        weight.requires_grad_()
        bias.requires_grad_()
        leaves += [weight, bias]
        bns.append(BatchNormArgs(weight, bias, mean, var, training, 0.1, 1e-5))
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        out = fn(x, *ws, *bns)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, [x, *ws, *leaves], cot)
    stats = [bn.running_mean for bn in bns] + [bn.running_var for bn in bns]
    return out, list(grads), stats


def expected(t, dtype, training, bn_dtype=None):
    """The reference chain in float64 on the inputs rounded to dtype (and bn_dtype)."""
    bn_dtype = bn_dtype or dtype
    rounded = {k: (v.to(dtype).double() if not isinstance(v, list) else [u.to(bn_dtype).double() for u in v])
               for k, v in t.items()}
    return run(irmlp_ref, rounded, torch.float64, training)


GRAD_NAMES = ["x", "conv1_weight", "conv2_weight", "conv3_weight", "bn1.weight", "bn1.bias", "bn3.weight", "bn3.bias"]
STAT_NAMES = ["bn1.running_mean", "bn3.running_mean", "bn1.running_var", "bn3.running_var"]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype_case", FLOAT_CASES)
def test_irmlp_matches_float64(backend, case, training, layout, dtype_case):
    _require(backend)
    dtype, out_tol, grad_tol = dtype_case
    t = make_inputs(case)
    with medkernels.use_backend(backend):
        out, grads, stats = run(irmlp, t, dtype, training, layout)
    want_out, want_grads, want_stats = expected(t, dtype, training)
    assert out.dtype == dtype
    if backend == "cpu":  # NCHW like a plain input's reference result, whatever the input's layout
        assert out.is_contiguous()
    assert_close_scaled(out, want_out, out_tol, "out")
    for name, g, e in zip(GRAD_NAMES, grads, want_grads):
        assert g.dtype == dtype, name
        assert_close_scaled(g, e, grad_tol, f"d{name}")
    for name, s, e in zip(STAT_NAMES, stats, want_stats):
        assert_close_scaled(s, e, out_tol, name)


def test_irmlp_inference_without_autograd_matches():
    """Under no_grad the cpu backend fuses the expansion's GELU into the matrix product (oneDNN); eval mode."""
    _require("cpu")
    t = make_inputs((2, 12, 9, 9, 3))
    args = [t["x"].float(), t["w1"].float(), t["w2"].float(), t["w3"].float()]
    bns = [BatchNormArgs(*(v.float() for v in t[n]), False) for n in ("bn1", "bn3")]
    with torch.no_grad(), medkernels.use_backend("cpu"):
        got = irmlp(*args, *bns)
    with torch.no_grad():
        want = irmlp_ref(*(a.double() for a in args), *[BatchNormArgs(*(v.double() for v in t[n]), False)
                                                          for n in ("bn1", "bn3")])
    assert_close_scaled(got, want, 2e-6, "out")


def _error(actual, want):
    actual, want = actual.detach().double(), want.detach().double()
    return float((actual - want).abs().max() / max(1.0, float(want.abs().max())))


@pytest.mark.parametrize("case", CASES[:2])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", ["bfloat16", "bfloat16-autocast"])
def test_irmlp_half_precision_as_accurate_as_the_reference(case, training, mode):
    """bfloat16 inputs (float32 BatchNorm parameters, as autocast leaves them), or float32 inputs under bfloat16
    autocast: the cpu backend's error against float64 stays within twice the reference backend's plus one
    bfloat16 epsilon, for the output, every gradient and the running statistics (the chain rounds to bfloat16 after
    every convolution, in a different order on each backend)."""
    _require("cpu")
    eps = torch.finfo(torch.bfloat16).eps
    t = make_inputs(case)
    dtype, autocast = (torch.bfloat16, None) if mode == "bfloat16" else (torch.float32, torch.bfloat16)
    results = {}
    for backend in ("ref", "cpu"):
        with medkernels.use_backend(backend):
            results[backend] = run(irmlp, t, dtype, training, bn_dtype=torch.float32, autocast=autocast)
    want_out, want_grads, want_stats = expected(t, dtype, training, bn_dtype=torch.float32)
    ref_out, ref_grads, ref_stats = results["ref"]
    out, grads, stats = results["cpu"]
    assert out.dtype == ref_out.dtype
    pairs = [("out", out, ref_out, want_out)] + list(zip(GRAD_NAMES, grads, ref_grads, want_grads)) + \
        list(zip(STAT_NAMES, stats, ref_stats, want_stats))
    for name, got, ref, want in pairs:
        assert got.dtype == ref.dtype, name
        err, ref_err = _error(got, want), _error(ref, want)
        assert err <= 2 * ref_err + eps, f"{name}: error {err:.3e} > 2 * the reference's {ref_err:.3e} + {eps:.1e}"


def test_auto_picks_the_cpu_backend_on_cpu():
    _require("cpu")
    from medkernels._backend import resolve
    from medkernels.ops.irmlp import IRMLP

    assert resolve(IRMLP, torch.device("cpu")) == "cpu"


def test_im2col_threshold_separates_the_cases():
    sizes = [c.values[0][2] * c.values[0][3] for c in CASES]
    assert any(s <= IM2COL_MAX_PIXELS for s in sizes) and any(s > IM2COL_MAX_PIXELS for s in sizes)


def _valid():
    t = make_inputs((2, 12, 5, 5, 3))
    bn1 = BatchNormArgs(*(v.float() for v in t["bn1"]), True)
    bn3 = BatchNormArgs(*(v.float() for v in t["bn3"]), True)
    return [t["x"].float(), t["w1"].float(), t["w2"].float(), t["w3"].float(), bn1, bn3]


BAD = [
    pytest.param(0, torch.zeros(2, 12, 5), ValueError, "x", id="x-3d"),
    pytest.param(0, torch.zeros(2, 12, 5, 5, dtype=torch.int64), TypeError, "x", id="x-int"),
    pytest.param(1, torch.zeros(12, 12, 4, 4), ValueError, "conv1_weight", id="conv1-even-k"),
    pytest.param(1, torch.zeros(12, 6, 3, 3), ValueError, "conv1_weight", id="conv1-channels"),
    pytest.param(2, torch.zeros(48, 11, 1, 1), ValueError, "conv2_weight", id="conv2-in"),
    pytest.param(2, torch.zeros(48, 12, 3, 3), ValueError, "conv2_weight", id="conv2-not-1x1"),
    pytest.param(3, torch.zeros(4, 47, 1, 1), ValueError, "conv3_weight", id="conv3-in"),
    pytest.param(4, (None, None, None, None, True), TypeError, "bn1", id="bn1-tuple"),
    pytest.param(4, BatchNormArgs(torch.ones(11), None, None, None, True), ValueError, "bn1.weight", id="bn1-width"),
    pytest.param(4, BatchNormArgs(torch.ones(12, device="meta"), None, None, None, True), ValueError, "bn1.weight",
                 id="bn1-device"),
    pytest.param(5, BatchNormArgs(None, None, torch.zeros(4), None, True), ValueError, "bn3", id="bn3-half-stats"),
    pytest.param(5, BatchNormArgs(None, None, None, None, False), ValueError, "bn3", id="bn3-eval-no-stats"),
    pytest.param(5, BatchNormArgs(None, None, None, None, True, 0.1, 0.0), ValueError, "bn3.eps", id="bn3-eps"),
]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("position, value, error, name", BAD)
def test_bad_arguments_are_refused_by_name(backend, position, value, error, name):
    _require(backend)
    args = _valid()
    args[position] = value
    with medkernels.use_backend(backend), pytest.raises(error, match=name.replace(".", r"\.")):
        irmlp(*args)


@pytest.mark.parametrize("backend", _backends())
def test_one_value_per_channel_in_training_is_refused(backend):
    _require(backend)
    args = _valid()
    args[0] = args[0][:1, :, :1, :1]
    with medkernels.use_backend(backend), pytest.raises(ValueError, match="x"):
        irmlp(*args)
