"""The bad-input matrix of the depthwise and HFF ops and of the modules using them, beyond the per-op argument
checks in test_depthwise_conv*.py and test_hff_*.py: complex tensors, empty sizes (an empty batch gives the
correct empty result and gradients; no channels or no pixels is refused), sizes past 32-bit offsets (refused
before anything is allocated), NaN and Inf (propagated exactly where the reference puts them), and the modules'
argument names.

A message "names" an argument when the name is a word of it (``_named``): a bare ``match="g"`` would also pass
on the g of "got"."""
import pytest
import torch

import medkernels
from medkernels import nn as mnn
from medkernels import ops
from medkernels.ops.depthwise_conv2d_layernorm_ref import depthwise_conv2d_layernorm_ref
from medkernels.ops.depthwise_conv2d_ref import depthwise_conv2d_ref
from medkernels.ops.hff_attention_tail_ref import hff_attention_tail_ref

from helpers.matching import named

HUGE = 2**31  # elements: one past what 32-bit offsets address


def _huge(*shape):
    """A (B, C, H, W) tensor of `shape` with stride 0: its elements cost no memory."""
    return torch.zeros(1).expand(*shape)


def _tail_args(b=2, c1=3, c2=4, ci=2, h=4, w=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return dict(l=r(b, c1, h, w), g=r(b, c2, h, w), x_f=r(b, ci, h, w), conv_weight=0.3 * r(1, 2, 7, 7),
                bn_weight=1 + 0.1 * r(1), bn_bias=0.1 * r(1), running_mean=0.1 * r(1), running_var=1 + r(1).abs(),
                training=False, fc1_weight=r(2, c2), fc2_weight=r(c2, 2), ln_weight=1 + 0.2 * r(c1 + c2 + ci),
                ln_bias=0.1 * r(c1 + c2 + ci))


def _conv_args(b=2, c=3, h=6, w=7, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(b, c, h, w, generator=g), weight=0.3 * torch.randn(c, 1, k, k, generator=g),
                bias=torch.randn(c, generator=g))


# ---- wrong kinds of tensors --------------------------------------------------------------------------------

COMPLEX_CASES = {
    "depthwise-x": (lambda: ops.depthwise_conv2d(**{**_conv_args(), "x": _conv_args()["x"].to(torch.complex64)}), "x"),
    "depthwise-weight": (lambda: ops.depthwise_conv2d(**{**_conv_args(), "weight": _conv_args()["weight"].to(torch.complex64)}), "weight"),
    "dwln-x": (lambda: ops.depthwise_conv2d_layernorm(_conv_args()["x"].to(torch.complex64), _conv_args()["weight"]), "x"),
    "spatial-x": (lambda: ops.hff_spatial_attention(torch.zeros(2, 3, 4, 4, dtype=torch.complex64), torch.zeros(1, 2, 7, 7), None, None, None, None, True), "x"),
    "channel-fc1": (lambda: ops.hff_channel_attention(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, dtype=torch.complex64), torch.zeros(4, 2)), "fc1_weight"),
    "tail-g": (lambda: ops.hff_attention_tail(**{**_tail_args(), "g": _tail_args()["g"].to(torch.complex64)}), "g"),
    "tail-ln_bias-bool": (lambda: ops.hff_attention_tail(**{**_tail_args(), "ln_bias": torch.zeros(9, dtype=torch.bool)}), "ln_bias"),
}


@pytest.mark.parametrize("case", list(COMPLEX_CASES))
def test_complex_or_bool_tensor_isnamed(cpu_backend, case):
    call, name = COMPLEX_CASES[case]
    with medkernels.use_backend(cpu_backend), pytest.raises(TypeError, match=named(name)):
        call()


# ---- empty sizes ---------------------------------------------------------------------------------------------

def _empty_batch_calls():
    conv = {k: v[:0] if k == "x" else v for k, v in _conv_args().items()}
    tail = {k: v[:0] if k in ("l", "g", "x_f") else v for k, v in _tail_args().items()}
    return {
        "depthwise_conv2d": (conv, ("x", "weight", "bias"), lambda a: ops.depthwise_conv2d(**a, activation="gelu")),
        "depthwise_conv2d_layernorm": (conv, ("x", "weight", "bias"), lambda a: ops.depthwise_conv2d_layernorm(**a)),
        "hff_attention_tail": (tail, ("l", "g", "x_f", "conv_weight", "fc1_weight", "ln_weight"), lambda a: ops.hff_attention_tail(**a)),
        "hff_channel_attention": ({"x": tail["g"], "fc1_weight": tail["fc1_weight"], "fc2_weight": tail["fc2_weight"]},
                                  ("x", "fc1_weight"), lambda a: ops.hff_channel_attention(**a)),
    }


@pytest.mark.parametrize("op", list(_empty_batch_calls()))
def test_empty_batch_gives_empty_result_and_zero_gradients(cpu_backend, op):
    args, differentiable, call = _empty_batch_calls()[op]
    args = {k: v.clone().requires_grad_(k in differentiable) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with medkernels.use_backend(cpu_backend):
        out = call(args)
        assert out.shape[0] == 0
        out.sum().backward()
    for name in differentiable:
        grad = args[name].grad
        assert grad is not None and grad.shape == args[name].shape and not grad.any(), name


@pytest.mark.parametrize("call, pattern", [
    pytest.param(lambda: ops.depthwise_conv2d(torch.zeros(2, 0, 5, 5), torch.zeros(0, 1, 3, 3)), r"\bx\b.*\bchannel\b", id="depthwise-no-channels"),
    pytest.param(lambda: ops.depthwise_conv2d(torch.zeros(2, 3, 0, 5), torch.zeros(3, 1, 3, 3)), r"\bx\b.*\bspatial size\b", id="depthwise-no-rows"),
    pytest.param(lambda: ops.depthwise_conv2d_layernorm(torch.zeros(1, 0, 5, 5), torch.zeros(0, 1, 3, 3)), r"\bx\b.*\bchannel\b", id="dwln-no-channels"),
    pytest.param(lambda: ops.hff_attention_tail(**{**_tail_args(h=0)}), r"\bl\b.*\bpixel\b", id="tail-no-pixels"),
    pytest.param(lambda: ops.hff_channel_attention(torch.zeros(2, 4, 3, 0), torch.zeros(2, 4), torch.zeros(4, 2)), r"\bx\b.*\bspatial size\b", id="channel-no-pixels"),
])
def test_no_channels_or_pixels_is_refused(cpu_backend, call, pattern):
    """The message names the empty tensor and what it lacks."""
    with medkernels.use_backend(cpu_backend), pytest.raises(ValueError, match=pattern):
        call()


# ---- sizes past 32-bit offsets -------------------------------------------------------------------------------

HUGE_CASES = {
    "depthwise-x": (lambda: ops.depthwise_conv2d(_huge(2, 1, 2**15, 2**15), torch.zeros(1, 1, 3, 3)), "x"),
    # the input fits, the padded output does not
    "depthwise-output": (lambda: ops.depthwise_conv2d(_huge(1, 1, 46000, 46000), torch.zeros(1, 1, 3, 3), padding=300), "output"),
    "dwln-x": (lambda: ops.depthwise_conv2d_layernorm(_huge(2, 1, 2**15, 2**15), torch.zeros(1, 1, 3, 3)), "x"),
    "spatial-x": (lambda: ops.hff_spatial_attention(_huge(2, 2, 2**15, 2**14), torch.zeros(1, 2, 7, 7), None, None, None, None, True), "x"),
    "channel-x": (lambda: ops.hff_channel_attention(_huge(2, 4, 2**14, 2**14), torch.zeros(2, 4), torch.zeros(4, 2)), "x"),
    # each feature fits, their concatenation does not
    "tail-output": (lambda: ops.hff_attention_tail(**{**_tail_args(), "l": _huge(1, 1, 2**15, 2**15), "g": _huge(1, 1, 2**15, 2**15),
                                                      "x_f": _huge(1, 1, 2**15, 2**15), "fc1_weight": torch.zeros(1, 1),
                                                      "fc2_weight": torch.zeros(1, 1), "ln_weight": torch.ones(3), "ln_bias": torch.zeros(3)}), "output"),
    "selective_scan-u": (lambda: ops.selective_scan(_huge(1, 2**16, 2**15), _huge(1, 2**16, 2**15), -torch.ones(2**16, 1),
                                                    _huge(1, 1, 2**15), _huge(1, 1, 2**15)), "u"),
    "cross_scan-output": (lambda: ops.cross_scan(_huge(1, 2**10, 2**10, 2**9)), "output"),
}


@pytest.mark.parametrize("case", list(HUGE_CASES))
def test_sizes_past_32_bit_offsets_are_refused(cpu_backend, case):
    call, name = HUGE_CASES[case]
    with medkernels.use_backend(cpu_backend), pytest.raises(ValueError, match=named(name) + r".*2\*\*31"):
        call()


def test_a_view_spanning_past_32_bit_offsets_is_refused():
    # 8 GiB of address space, never touched (so never backed by memory): the view's two images lie 2**31 apart
    storage = torch.empty(HUGE + 64)
    x = storage.as_strided((2, 3, 4, 4), (HUGE, 1, 12, 3))
    with pytest.raises(ValueError, match=r"\bx spans .*2\*\*31"):
        ops.depthwise_conv2d(x, torch.zeros(3, 1, 3, 3))


# ---- NaN and Inf ---------------------------------------------------------------------------------------------

def _assert_same_nonfinite(out, exp, tol):
    """Non-finite exactly where the reference is, and close elsewhere. Which of NaN and +-Inf comes out may differ:
    PyTorch itself gives silu(-inf) = NaN and, in float32 only, gelu(inf) = NaN, where the kernels give -inf and inf."""
    out, exp = out.detach().double(), exp.detach().double()
    assert torch.equal(out.isfinite(), exp.isfinite()), (
        f"non-finite at {(~out.isfinite()).nonzero().tolist()}, the reference at {(~exp.isfinite()).nonzero().tolist()}")
    fin = exp.isfinite()
    torch.testing.assert_close(out[fin], exp[fin], rtol=tol, atol=tol)


NONFINITE = [pytest.param(float("nan"), id="nan"), pytest.param(float("inf"), id="inf"), pytest.param(float("-inf"), id="-inf")]


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("act", [None, "silu", "relu"])
def test_depthwise_conv2d_nonfinite_propagates_like_the_reference(cpu_backend, value, act):
    args = _conv_args()
    args["x"][1, 2, 3, 4] = value
    with medkernels.use_backend(cpu_backend):
        out = ops.depthwise_conv2d(**args, activation=act)
    exp = depthwise_conv2d_ref(*[t.double() for t in args.values()], 1, 1, act or "none")
    assert out.isnan().any() or out.isinf().any()
    _assert_same_nonfinite(out, exp, 1e-5)


@pytest.mark.parametrize("value", NONFINITE)
def test_depthwise_conv2d_layernorm_nonfinite_propagates_like_the_reference(cpu_backend, value):
    args = _conv_args()
    args["x"][0, 1, 2, 2] = value
    ln_w, ln_b = torch.ones(3), torch.zeros(3)
    with medkernels.use_backend(cpu_backend):
        out = ops.depthwise_conv2d_layernorm(**args, ln_weight=ln_w, ln_bias=ln_b)
    exp = depthwise_conv2d_layernorm_ref(*[t.double() for t in (*args.values(), ln_w, ln_b)], 1, 1, 1e-5)
    assert out.isnan().any()  # an Inf in the channels of a pixel makes its normalisation NaN
    _assert_same_nonfinite(out, exp, 1e-5)


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("where", ["l", "g", "x_f"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_hff_attention_tail_nonfinite_propagates_like_the_reference(cpu_backend, value, where, training):
    args = _tail_args()
    args["training"] = training
    args[where][1, 1, 2, 3] = value
    running = [args["running_mean"].clone(), args["running_var"].clone()]
    with medkernels.use_backend(cpu_backend):
        out = ops.hff_attention_tail(**args)
    ref = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    exp = hff_attention_tail_ref(ref["l"], ref["g"], ref["x_f"], ref["conv_weight"], ref["bn_weight"], ref["bn_bias"],
                                 running[0].double(), running[1].double(), training, 1e-5, ref["fc1_weight"],
                                 ref["fc2_weight"], ref["ln_weight"], ref["ln_bias"], 1e-6)[0]
    assert out.isnan().any()
    _assert_same_nonfinite(out, exp, 1e-5)


# ---- the modules ---------------------------------------------------------------------------------------------

def _hff_block():
    return mnn.HFFBlock(ch_1=4, ch_2=4, r_2=2, ch_int=4, ch_out=4).eval()


@pytest.mark.parametrize("call, word", [
    pytest.param(lambda: _hff_block()(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, 4)), "l", id="hff-l-channels"),
    pytest.param(lambda: _hff_block()(torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 5)), "l and g", id="hff-g-size"),
    pytest.param(lambda: _hff_block()(torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4)), "g", id="hff-g-rank"),
    pytest.param(lambda: _hff_block()(torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4), torch.zeros(1, 2, 4, 4)), "f", id="hff-f-size"),
    pytest.param(lambda: _hff_block()(torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4), "f"), "f", id="hff-f-not-tensor"),
    pytest.param(lambda: mnn.DepthwiseConv2d(4, 3)(torch.zeros(1, 3, 5, 5)), "weight", id="dwconv-channels"),
    pytest.param(lambda: mnn.DepthwiseConv2d(4, 3)(torch.zeros(1, 4, 5, 5), memory_format="nhwc"), "memory_format", id="dwconv-format"),
    pytest.param(lambda: mnn.LocalBlock(4)(torch.zeros(1, 5, 6, 6)), "weight", id="local-block-channels"),
])
def test_modules_name_the_bad_argument(cpu_backend, call, word):
    with medkernels.use_backend(cpu_backend), pytest.raises(ValueError, match=named(word)):
        call()


def test_hff_block_accepts_odd_previous_feature():
    """The official block average-pools f with a 2x2 window, which floors: a (2H + 1)-row f is accepted."""
    block = _hff_block()
    out = block(torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4), torch.randn(1, 2, 9, 9))
    assert out.shape == (1, 4, 4, 4)
