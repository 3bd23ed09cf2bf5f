"""depthwise_conv2d: every backend against F.conv2d(groups=C) + activation in float64, gradients, layouts."""
import pytest
import torch
import torch.nn.functional as F

import medkernels
from medkernels.nn import DepthwiseConv2d
from medkernels.ops import depthwise_conv2d

from helpers.hff_utils import assert_close_elementwise

ACTS = {None: lambda t: t, "silu": F.silu, "gelu": F.gelu, "relu": F.relu}
CASES = [  # (B, C, H, W, k, stride)
    pytest.param((2, 3, 13, 11, 3, 1), id="13x11-k3-s1"),
    pytest.param((1, 4, 5, 17, 5, 2), id="5x17-k5-s2"),
    pytest.param((2, 2, 9, 9, 7, 1), id="9x9-k7-s1"),
    pytest.param((1, 5, 8, 6, 3, 2), id="8x6-k3-s2"),
]


def expected(x, w, b, stride, act):
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, w.shape[-1] // 2, groups=x.shape[1])
    return ACTS[act](y)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("act", list(ACTS), ids=lambda a: a or "none")
@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_float32(device_backend, case, act, layout):
    device, backend = device_backend
    if backend == "triton" and device.type == "cpu" and case != CASES[0].values[0]:
        pytest.skip("Triton's CPU interpreter takes the first case only here; "
                    "test_depthwise_conv_kernels.py covers every kernel size and stride on tiny shapes")
    bsz, c, h, w, k, stride = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(bsz, c, h, w, generator=g).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    wt = torch.randn(c, 1, k, k, generator=g).to(device).requires_grad_(True)
    bias = torch.randn(c, generator=g).to(device).requires_grad_(True)
    with medkernels.use_backend(backend):
        y = depthwise_conv2d(x, wt, bias, stride=stride, activation=act)
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    ref = expected(x, wt, bias, stride, act)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    cot = torch.randn(y.shape, generator=g).to(device)
    grads = torch.autograd.grad((y * cot).sum(), (x, wt, bias))
    exp_grads = torch.autograd.grad((ref * cot.double()).sum(), (x, wt, bias))
    for name, got, exp in zip(("x", "weight", "bias"), grads, exp_grads):
        torch.testing.assert_close(got.double(), exp.double(), rtol=1e-4, atol=1e-4, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("act", ["silu", None], ids=lambda a: a or "none")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision(device_backend, dtype, act):
    """float16/bfloat16 output and gradients against float64 on the same rounded inputs and cotangent, entry by
    entry: one rounding, half an epsilon of the dtype relative (the kernels compute in float32 and round once).
    The ref backend is PyTorch's conv2d and activation in the dtype, which rounds between them and rounds the
    activation's gradient before the convolution's backward sums it: its results also get a floor of one epsilon
    of their largest entry.
    (float64: the kernels in test_depthwise_conv2d_kernels.py; the ref backend in float64 is the reference.)"""
    device, backend = device_backend
    g = torch.Generator().manual_seed(4)
    values = (torch.randn(2, 3, 7, 9, generator=g), 0.5 * torch.randn(3, 1, 3, 3, generator=g), torch.randn(3, generator=g))
    leaves = [t.to(device, dtype).requires_grad_(True) for t in values]
    with medkernels.use_backend(backend):
        y = depthwise_conv2d(*leaves, activation=act)
    assert y.dtype == dtype
    exact = [t.detach().cpu().double().requires_grad_(True) for t in leaves]
    ref = expected(*exact, 1, act)
    floor = torch.finfo(dtype).eps if backend == "ref" else None
    assert_close_elementwise(y, ref, "output", floor=floor)
    cot = torch.randn(y.shape, generator=g).to(device, dtype)
    grads = torch.autograd.grad(y, leaves, cot)
    for name, got, exp in zip(("x", "weight", "bias"), grads, torch.autograd.grad(ref, exact, cot.cpu().double())):
        assert got.dtype == dtype, f"grad {name}: dtype {got.dtype}"
        assert_close_elementwise(got, exp, f"grad {name}", floor=floor)


def test_gradcheck_float64(cpu_backend):
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    with medkernels.use_backend(cpu_backend):
        assert torch.autograd.gradcheck(lambda *a: depthwise_conv2d(*a, stride=2, activation="gelu"), (x, wt, b))


@pytest.mark.parametrize("act", ["silu", "relu", None])
def test_eager_fast_path_matches_custom_op(device_backend, act):
    # plain eager calls skip the torch.library op's dispatch (its implementation is called directly): the results
    # and gradients must be those of the op itself, and the op must still run under a dispatch mode
    device, backend = device_backend
    g = torch.Generator().manual_seed(3)
    x, wt, b, gy = (torch.randn(*s, generator=g).to(device) for s in ((2, 20, 9, 11), (20, 1, 3, 3), (20,), (2, 20, 9, 11)))
    x = x.contiguous(memory_format=torch.channels_last)
    gy = gy.contiguous(memory_format=torch.channels_last)
    outs = []
    for direct in (True, False):
        leaves = [t.detach().requires_grad_(True) for t in (x, wt, b)]
        with medkernels.use_backend(backend):
            if direct:
                y = depthwise_conv2d(*leaves, activation=act)
            else:
                y = torch.ops.medkernels.depthwise_conv2d_fwd(*leaves, 1, 1, act or "none", backend, True)
        y.backward(gy)
        outs.append([y.detach()] + [t.grad for t in leaves])
    for a, e in zip(*outs):
        torch.testing.assert_close(a, e, rtol=0, atol=0)

    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recorder(), medkernels.use_backend(backend), torch.no_grad():
        torch.testing.assert_close(depthwise_conv2d(x, wt, b, activation=act), outs[0][0], rtol=0, atol=0)
    assert any("depthwise_conv2d_fwd" in f for f in Recorder.seen)


def test_module_is_drop_in_for_conv2d():
    conv = torch.nn.Conv2d(6, 6, 5, padding=2, groups=6)
    mod = DepthwiseConv2d(6, 5)
    mod.load_state_dict(conv.state_dict(), strict=True)
    x = torch.randn(2, 6, 9, 7)
    torch.testing.assert_close(mod(x), conv(x))


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        pytest.param(dict(weight=torch.zeros(3, 2, 3, 3)), ValueError, r"\bweight\b", id="weight-not-depthwise"),
        pytest.param(dict(weight=torch.zeros(3, 1, 4, 4)), ValueError, r"\beven kernel\b", id="even-kernel-default-padding"),
        pytest.param(dict(weight=torch.zeros(3, 1, 3, 3, dtype=torch.float64)), TypeError, r"\bweight\b", id="weight-dtype"),
        pytest.param(dict(bias=torch.zeros(4)), ValueError, r"\bbias\b", id="bias-shape"),
        pytest.param(dict(activation="tanh"), ValueError, r"\bactivation\b", id="unknown-activation"),
        pytest.param(dict(stride=0), ValueError, r"\bstride\b", id="stride-zero"),
        pytest.param(dict(weight=torch.zeros(3, 1, 3, 3, device="meta")), ValueError, r"\bdevice\b", id="mixed-devices"),
        pytest.param(dict(x=torch.zeros(2, 3, 8, 8, dtype=torch.int64)), TypeError, r"\bx\b", id="x-int"),
    ],
)
def test_bad_inputs(kwargs, exc, word):
    args = dict(x=torch.zeros(2, 3, 8, 8), weight=torch.zeros(3, 1, 3, 3), bias=None)
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        depthwise_conv2d(**args)
