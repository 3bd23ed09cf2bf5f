"""conv3x3 (the IRMLP's dense 3x3 convolution) on every backend against F.conv2d evaluated in float64 on the same
rounded inputs: output and both gradients, over shapes that take each path of the cpu backend (Winograd on one
tile, on odd sizes, over chunk boundaries, with channel counts off the vector width; the direct convolution on
small maps and for float64), input layouts, each compiled SIMD variant, bfloat16 autocast and torch.compile;
argument checks; opcheck."""
import pytest
import torch
import torch.nn.functional as F

import medkernels
import medkernels.ops.conv3x3_winograd as winograd
from medkernels.ops import conv3x3

from helpers.hff_utils import assert_close_scaled

# (batch, in, out, H, W)
CASES = [
    pytest.param((2, 5, 7, 9, 11), id="5to7-9x11"),  # fewer channels than a vector: the scalar tail alone
    pytest.param((1, 16, 16, 4, 4), id="16to16-one-tile"),
    pytest.param((3, 33, 20, 13, 6), id="33to20-13x6"),  # two vectors and a tail; partial tiles both ways
    pytest.param((2, 24, 40, 17, 9), id="24to40-17x9"),
    pytest.param((2, 6, 5, 3, 5), id="6to5-3x5-direct"),  # fewer than MIN_PIXELS pixels: direct convolution
    pytest.param((1, 8, 3, 1, 1), id="8to3-1x1-direct"),
]
LAYOUTS = ["nchw", "channels_last", "sliced"]
# (dtype, output tolerance, gradient tolerance) relative to the largest expected magnitude (at least 1). float32 on
# the cpu backend is Winograd F(4x4, 3x3): its transforms scale values by up to ~10x before the products' sums
# round, so its error is about 10x the direct convolution's (measured 2e-6 to 1e-5 of the largest entry at these
# widths; 1.5e-5 at 288 channels).
FLOAT32 = (torch.float32, 3e-5, 3e-5)
FLOAT_CASES = [pytest.param((torch.float64, 1e-12, 1e-11), id="float64"), pytest.param(FLOAT32, id="float32")]


def _require(backend):
    reason = medkernels.unavailable_reason(backend)
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")


def make_inputs(case, seed=0):
    """x, weight and the output's cotangent in float64 (the values every dtype is rounded from)."""
    b, cin, cout, h, w = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cin, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(cout, cin, 3, 3, generator=g, dtype=torch.float64) * (9 * cin) ** -0.5
    cot = torch.randn(b, cout, h, w, generator=g, dtype=torch.float64)
    return x, weight, cot


def _place(x, dtype, layout):
    if layout == "channels_last":
        return x.to(dtype).contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        wide = torch.zeros(*x.shape[:3], x.shape[3] + 3, dtype=dtype)
        wide[..., 1:1 + x.shape[3]] = x.to(dtype)
        return wide[..., 1:1 + x.shape[3]]
    return x.to(dtype)


def run(fn, x, weight, cot, dtype, layout="nchw", autocast=None):
    x = _place(x, dtype, layout).requires_grad_()
    weight = weight.to(dtype).requires_grad_()
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        out = fn(x, weight)
    grads = torch.autograd.grad(out, (x, weight), cot.to(out.dtype))
    return out, grads


def expected(x, weight, cot, dtype):
    """F.conv2d in float64 on the inputs rounded to dtype."""
    return run(lambda a, w: F.conv2d(a, w, None, 1, 1), x.to(dtype).double(), weight.to(dtype).double(), cot,
               torch.float64)


def check(case, backend, dtype_case, layout="nchw"):
    dtype, out_tol, grad_tol = dtype_case
    x, weight, cot = make_inputs(case)
    with medkernels.use_backend(backend):
        out, grads = run(conv3x3, x, weight, cot, dtype, layout)
    want, want_grads = expected(x, weight, cot, dtype)
    assert out.dtype == dtype and out.shape == want.shape
    assert_close_scaled(out, want, out_tol, "out")
    for name, g, e in zip(["x", "weight"], grads, want_grads):
        assert g.dtype == dtype and g.shape == e.shape, name
        assert_close_scaled(g, e, grad_tol, f"d{name}")


@pytest.mark.parametrize("backend", ["ref", "cpu"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype_case", FLOAT_CASES)
def test_conv3x3_matches_float64(backend, case, layout, dtype_case):
    _require(backend)
    check(case, backend, dtype_case, layout)


@pytest.mark.parametrize("case", [CASES[0], CASES[2]])
def test_conv3x3_each_simd_variant(capped_cpu_isa, case):
    check(case, "cpu", FLOAT32)


@pytest.mark.parametrize("workspace, case", [
    pytest.param(1 << 12, (2, 24, 40, 17, 9), id="4KB-one-tile-and-channel-a-chunk"),
    pytest.param(40 << 10, (2, 24, 40, 17, 9), id="40KB-tile-and-channel-chunks"),
    # the whole filter in half the workspace, tiles in chunks of 40 (the last one short); the filter gradient sums
    # its products over chunks of 15 tiles
    pytest.param(270 << 10, (4, 24, 40, 30, 30), id="270KB-whole-filter-tile-chunks"),
])
def test_conv3x3_in_chunks(monkeypatch, workspace, case):
    """Small workspaces split the work into chunks of tiles and of output channels."""
    _require("cpu")
    monkeypatch.setattr(winograd, "WORKSPACE_BYTES", workspace)
    winograd.release_workspace()
    try:
        check(case, "cpu", FLOAT32)
    finally:
        winograd.release_workspace()


def test_cpu_backend_takes_winograd_for_float32(monkeypatch):
    """The float32 cases above that claim Winograd run it (not a silent direct convolution), and the others not."""
    _require("cpu")
    calls = []
    real = winograd.winograd_conv_rows
    monkeypatch.setattr(winograd, "winograd_conv_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    for case, takes in ((CASES[2].values[0], True), (CASES[4].values[0], False)):
        x, weight, _ = make_inputs(case)
        calls.clear()
        with medkernels.use_backend("cpu"):
            conv3x3(x.float(), weight.float())
        assert bool(calls) == takes, case
        assert winograd.uses_winograd(x.float(), weight.float()) == takes
    x, weight, _ = make_inputs(CASES[2].values[0])
    assert not winograd.uses_winograd(x, weight)  # float64: direct
    wide = torch.empty(int(winograd.MAX_FILTER_ELEMENTS ** 0.5) + 1, int(winograd.MAX_FILTER_ELEMENTS ** 0.5) + 1, 3, 3)
    assert not winograd.uses_winograd(torch.empty(1, wide.shape[1], 8, 8), wide)
    monkeypatch.setattr(winograd, "ENABLED", False)  # what MEDKERNELS_WINOGRAD=0 sets
    x, weight, _ = make_inputs(CASES[2].values[0])
    assert not winograd.uses_winograd(x.float(), weight.float())


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_conv3x3_bfloat16_autocast_as_f_conv2d(backend):
    """Under bfloat16 autocast the op casts like F.conv2d: bfloat16 output, a float32 weight's gradient in float32,
    and the values of F.conv2d under the same autocast."""
    _require(backend)
    x, weight, cot = make_inputs(CASES[2].values[0])
    with medkernels.use_backend(backend):
        out, (dx, dw) = run(conv3x3, x, weight, cot, torch.float32, autocast=torch.bfloat16)
    want, (want_dx, want_dw) = run(lambda a, w: F.conv2d(a, w, None, 1, 1), x, weight, cot, torch.float32,
                                   autocast=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and dx.dtype == torch.float32 and dw.dtype == torch.float32
    for name, a, b in (("out", out, want), ("dx", dx, want_dx), ("dw", dw, want_dw)):
        assert_close_scaled(a, b, 2e-2, name)


def test_conv3x3_empty_batch(cpu_backend):
    x = torch.zeros(0, 4, 5, 5, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    with medkernels.use_backend(cpu_backend):
        out = conv3x3(x, w)
    assert out.shape == (0, 6, 5, 5)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_conv3x3_torch_compile(cpu_backend):
    x, weight, _ = make_inputs(CASES[0].values[0])
    x, weight = x.float(), weight.float()
    compiled = torch.compile(lambda a, w: conv3x3(a, w), backend="aot_eager", fullgraph=True)
    with medkernels.use_backend(cpu_backend):
        got = compiled(x, weight)
        eager = conv3x3(x, weight)
    torch.testing.assert_close(got, eager, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_opcheck(backend):
    _require(backend)
    x, weight, cot = make_inputs(CASES[2].values[0])
    x, weight, cot = x.float(), weight.float(), cot.float()
    torch.library.opcheck(torch.ops.medkernels.conv3x3_fwd, (x.requires_grad_(), weight.requires_grad_(), backend))
    torch.library.opcheck(torch.ops.medkernels.conv3x3_bwd, (cot, x.detach(), weight.detach(), backend, True, True))


BAD = [
    pytest.param(lambda: (torch.zeros(2, 3, 5), torch.zeros(4, 3, 3, 3)), ValueError, r"\bx\b.*4 dimensions",
                 id="x-3d"),
    pytest.param(lambda: (torch.zeros(2, 3, 5, 5), torch.zeros(4, 3, 5, 5)), ValueError, r"\bweight\b.*\(out, 3, 3, 3\)",
                 id="weight-5x5"),
    pytest.param(lambda: (torch.zeros(2, 3, 5, 5), torch.zeros(4, 2, 3, 3)), ValueError, r"\bweight\b.*\(out, 3, 3, 3\)",
                 id="weight-channels"),
    pytest.param(lambda: (torch.zeros(2, 3, 5, 5), torch.zeros(4, 3, 3, 3, dtype=torch.float64)), TypeError,
                 r"\bweight\b.*dtype", id="dtype-mismatch"),
    pytest.param(lambda: (torch.zeros(2, 3, 5, 5, dtype=torch.int32), torch.zeros(4, 3, 3, 3)), TypeError,
                 r"\bx\b.*floating", id="x-integer"),
    pytest.param(lambda: (torch.zeros(2, 3, 5, 5), torch.zeros(4, 3, 3, 3, device="meta")), ValueError,
                 r"one device", id="devices"),
    pytest.param(lambda: ("x", torch.zeros(4, 3, 3, 3)), TypeError, r"\bx\b.*torch.Tensor", id="x-not-tensor"),
]


@pytest.mark.parametrize("make, error, pattern", BAD)
def test_bad_arguments_are_named(cpu_backend, make, error, pattern):
    x, w = make()
    with medkernels.use_backend(cpu_backend), pytest.raises(error, match=pattern):
        conv3x3(x, w)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_input_spreads_at_most_over_its_winograd_tiles(value):
    """A non-finite input pixel makes every output the reference makes non-finite non-finite too; on the Winograd
    path it may also reach the rest of each 4x4 output tile whose 6x6 input tile holds the pixel (in every output
    channel), but nothing beyond those tiles, and every other output stays finite and correct."""
    _require("cpu")
    x, weight, _ = make_inputs((1, 8, 6, 12, 12))
    x, weight = x.float(), weight.float()
    row, col = 5, 8
    x[0, 3, row, col] = value
    with medkernels.use_backend("cpu"):
        got = conv3x3(x, weight)
    want = F.conv2d(x.double(), weight.double(), None, 1, 1)
    assert winograd.uses_winograd(x, weight)
    bad_want, bad_got = ~torch.isfinite(want), ~torch.isfinite(got)
    assert bool((bad_got | ~bad_want).all()), "an output the reference makes non-finite is finite"
    # the tiles whose input tile (outputs [4i - 1, 4i + 5) of rows, likewise columns) holds the pixel
    tiles = torch.zeros(12, 12, dtype=torch.bool)
    for i in range(3):
        for j in range(3):
            if 4 * i - 1 <= row < 4 * i + 5 and 4 * j - 1 <= col < 4 * j + 5:
                tiles[4 * i:4 * i + 4, 4 * j:4 * j + 4] = True
    assert not bool((bad_got[0].any(0) & ~tiles).any()), "non-finite outputs outside the pixel's tiles"
    assert bool(bad_got[0].any(0)[tiles].any()) and bool((bad_got[0].any(0) & ~bad_want[0].any(0)).any()), \
        "the tiles are not the Winograd path's (no spread beyond the reference's)"
    assert_close_scaled(got[..., ~tiles], want[..., ~tiles], FLOAT32[1], "finite outputs")
