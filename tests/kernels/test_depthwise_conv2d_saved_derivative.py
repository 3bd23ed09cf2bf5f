"""The CPU forward that saves act'(z) and the backward that uses it (depthwise_conv2d_fwd_save_cpu /
depthwise_conv2d_bwd_saved_cpu; the eager autograd path of depthwise_conv2d takes them where it can): both
backward paths against float64, on images tall enough for several backward bands (the rows a band borrows from
its neighbours), which cases save, the input gradient written over the saved tensor, a second backward through
retain_graph, and the argument checks.
"""
import pytest
import torch

import medkernels
from medkernels.ops import depthwise_conv2d
from test_depthwise_conv2d_kernels import _ext, make_params, make_x, reference

# (B, C, H, W, k): H = 37 and 40 give three backward bands of 16 rows; C = 37 is no multiple of a vector width
TALL_CASES = [
    pytest.param((2, 37, 37, 9, 3), id="37x9-k3-c37"),
    pytest.param((1, 16, 40, 6, 5), id="40x6-k5"),
    pytest.param((2, 8, 35, 12, 7), id="35x12-k7"),
    pytest.param((1, 5, 17, 11, 3), id="17x11-k3-short-last-band"),
]
LAYOUTS = ["channels_last", "cl_slice->nchw", "nchw", "nchw_col_slice"]  # (nchw rows here are under 20: row walk)
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5)}


def _inputs(case, layout, dtype):
    B, C, H, W, k = case
    x = make_x((B, C, H, W), layout, dtype)
    w, b = make_params(C, k, dtype, "cpu")
    cot = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return x, w, b, cot


def _expected(x, w, b, act, cot):
    exact = [t.detach().double().requires_grad_(True) for t in (x, w, b)]
    ref = reference(*exact, 1, act)
    return ref.detach(), torch.autograd.grad(ref, exact, cot)


def _assert_close(got, expected, dtype, what):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", ["silu", "gelu"])
@pytest.mark.parametrize("case", TALL_CASES)
def test_both_backward_paths_match_float64_reference(case, act, layout, dtype):
    ext = _ext()
    x, w, b, cot = _inputs(case, layout, dtype)
    k = case[-1]
    y_ref, grads_ref = _expected(x, w, b, act, cot)
    out, dact = ext.depthwise_conv2d_fwd_save_cpu(x, w, b, 1, k // 2, act, False)
    assert dact.numel() > 0, "this case must save the derivative"
    assert dact.shape == x.shape and dact.dtype == dtype
    _assert_close(out, y_ref, dtype, "out")
    g = cot.to(dtype)
    recomputed = ext.depthwise_conv2d_bwd_cpu(g, x, w, b, 1, k // 2, act)
    dact_storage = dact.data_ptr()
    saved = ext.depthwise_conv2d_bwd_saved_cpu(g, x, w, b, dact, 1, k // 2)
    assert saved[0].data_ptr() == dact_storage, "the input gradient is written over the saved derivative"
    for name, got, again, exp in zip(("x", "weight", "bias"), saved, recomputed, grads_ref):
        assert got.shape == exp.shape and got.dtype == dtype
        _assert_close(got, exp, dtype, f"grad {name}")
        assert torch.equal(got, again), f"grad {name}: the saved and the recomputed derivative differ"
    assert torch.equal(out, ext.depthwise_conv2d_fwd_cpu(x, w, b, 1, k // 2, act, False))


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_isa_variants_save_what_they_recompute(capped_cpu_isa, act):
    # each SIMD build: the saving forward's output and the saved backward equal the plain ones to the bit
    ext = _ext()
    for layout, C in (("channels_last", 32), ("cl_slice->nchw", 37)):
        x, w, b, cot = _inputs((2, C, 19, 13, 3), layout, torch.float32)
        g = cot.float()
        out, dact = ext.depthwise_conv2d_fwd_save_cpu(x, w, b, 1, 1, act, False)
        assert torch.equal(out, ext.depthwise_conv2d_fwd_cpu(x, w, b, 1, 1, act, False))
        recomputed = ext.depthwise_conv2d_bwd_cpu(g, x, w, b, 1, 1, act)
        for got, again in zip(ext.depthwise_conv2d_bwd_saved_cpu(g, x, w, b, dact, 1, 1), recomputed):
            assert torch.equal(got, again)


@pytest.mark.parametrize(
    "dtype, act, stride, padding, layout",
    [
        pytest.param(torch.float16, "silu", 1, 1, "channels_last", id="float16"),
        pytest.param(torch.bfloat16, "silu", 1, 1, "channels_last", id="bfloat16"),
        pytest.param(torch.float32, "none", 1, 1, "channels_last", id="no-activation"),
        pytest.param(torch.float32, "relu", 1, 1, "channels_last", id="relu"),
        pytest.param(torch.float32, "silu", 2, 1, "channels_last", id="stride-2"),
        pytest.param(torch.float32, "silu", 1, 0, "channels_last", id="output-smaller"),
        pytest.param(torch.float32, "silu", 1, 1, "nchw-planes", id="nchw-plane-walk"),
    ],
)
def test_cases_that_do_not_save(dtype, act, stride, padding, layout):
    ext = _ext()
    W = 24 if layout == "nchw-planes" else 9
    x = make_x((1, 4, 7, W), "nchw" if layout == "nchw-planes" else layout, dtype)
    w, b = make_params(4, 3, dtype, "cpu")
    out, dact = ext.depthwise_conv2d_fwd_save_cpu(x, w, b, stride, padding, act, False)
    assert dact.numel() == 0
    assert torch.equal(out, ext.depthwise_conv2d_fwd_cpu(x, w, b, stride, padding, act, False))


def test_op_saves_in_eager_autograd_and_recomputes_for_a_second_backward(monkeypatch):
    from medkernels.ops.depthwise_conv2d import DEPTHWISE_CONV2D

    _ext()
    impl = DEPTHWISE_CONV2D.impl("cpu")
    calls = []
    for name in ("backward_saved", "backward"):
        original = getattr(impl, name)
        monkeypatch.setattr(impl, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    x, w, b, cot = _inputs((2, 6, 21, 7, 3), "cl_slice->nchw", torch.float64)
    leaves = [t.requires_grad_(True) for t in (x, w, b)]
    with medkernels.use_backend("cpu"):
        y = depthwise_conv2d(*leaves, activation="silu", memory_format=torch.contiguous_format)
    first = torch.autograd.grad(y, leaves, cot, retain_graph=True)
    second = torch.autograd.grad(y, leaves, cot)
    assert calls == ["backward_saved", "backward"]
    _, expected = _expected(x, w, b, "silu", cot)
    for name, a, c, exp in zip(("x", "weight", "bias"), first, second, expected):
        _assert_close(a, exp, torch.float64, f"first grad {name}")
        _assert_close(c, exp, torch.float64, f"second grad {name}")


GOOD = dict(x=torch.zeros(2, 3, 8, 8), weight=torch.zeros(3, 1, 3, 3), bias=torch.zeros(3))


@pytest.mark.parametrize(
    "change, exc, word",
    [
        pytest.param(dict(dact=torch.zeros(2, 3, 8, 7)), ValueError, r"\bdact\b", id="dact-shape"),
        pytest.param(dict(dact=torch.zeros(2, 3, 8, 8, dtype=torch.float64)), TypeError, r"\bdact\b", id="dact-dtype"),
        pytest.param(dict(dact=torch.zeros(2, 3, 8, 16)[..., ::2]), ValueError, r"\bdense\b", id="dact-not-dense"),
        pytest.param(dict(dact=torch.zeros(2, 3, 8, 8, device="meta")), ValueError, r"\bdact\b", id="dact-device"),
        pytest.param(dict(stride=2, grad=torch.zeros(2, 3, 4, 4), dact=torch.zeros(2, 3, 4, 4)), ValueError,
                     "stride 1", id="stride-2"),
        pytest.param(dict(x=torch.zeros(2, 3, 8, 8, dtype=torch.float16), weight=torch.zeros(3, 1, 3, 3).half(),
                          bias=torch.zeros(3).half(), grad=torch.zeros(2, 3, 8, 8).half(),
                          dact=torch.zeros(2, 3, 8, 8).half()), TypeError, r"\bfloat32 or float64\b", id="float16"),
    ],
)
def test_saved_backward_checks_arguments(change, exc, word):
    ext = _ext()
    args = dict(grad=torch.zeros(2, 3, 8, 8), **GOOD, dact=torch.zeros(2, 3, 8, 8), stride=1, padding=1)
    args.update(change)
    with pytest.raises(exc, match=word):
        ext.depthwise_conv2d_bwd_saved_cpu(*args.values())


def test_save_forward_checks_arguments():
    ext = _ext()
    with pytest.raises(ValueError, match=r"\bweight\b"):
        ext.depthwise_conv2d_fwd_save_cpu(GOOD["x"], torch.zeros(3, 2, 3, 3), None, 1, 1, "silu", False)
    with pytest.raises(ValueError, match=r"\bactivation\b"):
        ext.depthwise_conv2d_fwd_save_cpu(*GOOD.values(), 1, 1, "tanh", False)


def test_saved_derivative_goes_through_saved_tensor_hooks():
    # so that activation checkpointing and offloading manage it like any saved tensor
    _ext()
    x, w, b, cot = _inputs((2, 6, 9, 7, 3), "channels_last", torch.float32)
    leaves = [t.requires_grad_(True) for t in (x, w, b)]
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with medkernels.use_backend("cpu"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = depthwise_conv2d(*leaves, activation="silu")
    assert sum(t.data_ptr() != x.data_ptr() and t.shape == x.shape for t in packed) == 1
    plain = torch.autograd.grad(depthwise_conv2d(*leaves, activation="silu"), leaves, cot.float())
    for got, expected in zip(torch.autograd.grad(y, leaves, cot.float()), plain):
        assert torch.equal(got, expected)


def test_non_reentrant_checkpoint_gives_the_same_gradients():
    from torch.utils.checkpoint import checkpoint

    _ext()
    x, w, b, cot = _inputs((2, 6, 19, 7, 3), "cl_slice->nchw", torch.float32)
    leaves = [t.requires_grad_(True) for t in (x, w, b)]

    def conv(*a):
        return depthwise_conv2d(*a, activation="gelu", memory_format=torch.contiguous_format)

    with medkernels.use_backend("cpu"):
        expected = torch.autograd.grad(conv(*leaves), leaves, cot.float())
        got = torch.autograd.grad(checkpoint(conv, *leaves, use_reentrant=False), leaves, cot.float())
    for a, e in zip(got, expected):
        assert torch.equal(a, e)
