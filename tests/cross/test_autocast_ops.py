"""Every public op under torch.autocast, on every backend of every device present (CUDA cases skip without a
GPU): the output dtype each op's docstring states, and the values and every gradient against the op's
float64 reference (on CPU) fed the operands the autocast rule produces (the cast ones rounded to the autocast
dtype) and the same rounded cotangent."""
import pytest
import torch

import medkernels
from medkernels import ops

AMP_DTYPES = [pytest.param(torch.bfloat16, id="bfloat16"), pytest.param(torch.float16, id="float16")]
# elementwise |actual - expected| <= K * eps * (|expected| + max |expected|): the kernels compute in float32 and
# round a half result once; a half input gradient passes through one more rounding (its float32 leaf's copy)
K_EPS = 4


def _randn(shape, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).mul(scale).add(shift).float()


def _assert_close(actual, expected, eps, name):
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    bound = K_EPS * eps * (expected.abs() + scale)
    err = (actual - expected).abs()
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (f"{name}: |error| {float(err.flatten()[worst]):.3e} > bound "
                                        f"{float(bound.flatten()[worst]):.3e} at flat index {worst}")


# Each case: (call(**tensors) -> output, {name: (float32 tensor, cast by the autocast rule)}, output dtype under
# autocast of dtype `amp` on CPU (None: the autocast dtype)).

def _depthwise():
    x = _randn((2, 5, 7, 9), 1).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels_last
    tensors = {"x": (x, True), "weight": (_randn((5, 1, 3, 3), 2, 0.3), True), "bias": (_randn((5,), 3, 0.1), True)}
    return (lambda x, weight, bias: ops.depthwise_conv2d(x, weight, bias, activation="silu")), tensors


def _depthwise_layernorm():
    tensors = {"x": (_randn((2, 6, 5, 7), 4), True), "weight": (_randn((6, 1, 3, 3), 5, 0.3), True),
               "bias": (_randn((6,), 6, 0.1), True), "ln_weight": (_randn((6,), 7, 0.1, 1.0), False),
               "ln_bias": (_randn((6,), 8, 0.1), False)}

    def call(x, weight, bias, ln_weight, ln_bias):
        return ops.depthwise_conv2d_layernorm(x, weight, bias, ln_weight, ln_bias, eps=1e-6)

    return call, tensors


def _scan_operands(batch, dim, n, length, seed):
    return {"u": (_randn((batch, dim, length), seed), True),
            "delta": (_randn((batch, dim, length), seed + 1, 0.5), True),
            "A": (-torch.rand((dim, n), generator=torch.Generator().manual_seed(seed + 2)).add(0.5), False),
            "B": (_randn((batch, n, length), seed + 3), True), "C": (_randn((batch, n, length), seed + 4), True),
            "D": (_randn((dim,), seed + 5, 0.2, 1.0), False), "delta_bias": (_randn((dim,), seed + 6, 0.1), False)}


def _selective_scan():
    tensors = _scan_operands(2, 3, 4, 37, 10)
    tensors["z"] = (_randn((2, 3, 37), 20), True)

    def call(u, delta, A, B, C, D, z, delta_bias):
        return ops.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)

    return call, tensors


def _ss2d_scan():
    batch, dim, n, h, w = 1, 3, 4, 5, 6
    tensors = {"u": (_randn((batch, dim, h, w), 30), True), "delta": (_randn((batch, 4, dim, h, w), 31, 0.5), True),
               "A": (-torch.rand((4 * dim, n), generator=torch.Generator().manual_seed(32)).add(0.5), False),
               "B": (_randn((batch, 4, n, h, w), 33), True), "C": (_randn((batch, 4, n, h, w), 34), True),
               "D": (_randn((4 * dim,), 35, 0.2, 1.0), False), "delta_bias": (_randn((4 * dim,), 36, 0.1), False)}
    return ops.ss2d_scan, tensors


def _hff_params(c1, c2, ci, seed):
    return {"conv_weight": (_randn((1, 2, 7, 7), seed, 0.2), False), "bn_weight": (_randn((1,), seed + 1, 0.1, 1.0), False),
            "bn_bias": (_randn((1,), seed + 2, 0.1), False), "fc1_weight": (_randn((c2 // 2, c2), seed + 3, 0.4), False),
            "fc2_weight": (_randn((c2, c2 // 2), seed + 4, 0.4), False),
            "ln_weight": (_randn((c1 + c2 + ci,), seed + 5, 0.1, 1.0), False),
            "ln_bias": (_randn((c1 + c2 + ci,), seed + 6, 0.1), False)}


def _hff_attention_tail():
    b, c1, c2, ci, h, w = 2, 3, 4, 5, 5, 6
    tensors = {"l": (_randn((b, c1, h, w), 40), True), "g": (_randn((b, c2, h, w), 41), True),
               "x_f": (_randn((b, ci, h, w), 42), True), **_hff_params(c1, c2, ci, 43)}

    def call(l, g, x_f, conv_weight, bn_weight, bn_bias, fc1_weight, fc2_weight, ln_weight, ln_bias):
        return ops.hff_attention_tail(l, g, x_f, conv_weight, bn_weight, bn_bias, None, None, True, fc1_weight,
                                      fc2_weight, ln_weight, ln_bias)

    return call, tensors


def _hff_spatial_attention():
    tensors = {"x": (_randn((2, 4, 5, 6), 50), False), "conv_weight": (_randn((1, 2, 7, 7), 51, 0.2), False),
               "bn_weight": (_randn((1,), 52, 0.1, 1.0), False), "bn_bias": (_randn((1,), 53, 0.1), False)}

    def call(x, conv_weight, bn_weight, bn_bias):
        return ops.hff_spatial_attention(x, conv_weight, bn_weight, bn_bias, None, None, True)

    return call, tensors


def _hff_channel_attention():
    tensors = {"x": (_randn((2, 6, 5, 4), 60), False), "fc1_weight": (_randn((3, 6), 61, 0.4), False),
               "fc2_weight": (_randn((6, 3), 62, 0.4), False)}
    return ops.hff_channel_attention, tensors


def _cross_scan():
    return ops.cross_scan, {"x": (_randn((2, 3, 4, 5), 70), False)}


def _cross_merge():
    return ops.cross_merge, {"y": (_randn((2, 4, 3, 4, 5), 71), False)}


# (case, output dtype under autocast: "amp" for the autocast dtype, "input" for the input's own dtype,
# "layer_norm" for F.layer_norm's: the autocast dtype on CPU, float32 on CUDA)
CASES = [
    pytest.param(_depthwise, "amp", id="depthwise_conv2d"),
    pytest.param(_depthwise_layernorm, "layer_norm", id="depthwise_conv2d_layernorm"),
    pytest.param(_selective_scan, "amp", id="selective_scan"),
    pytest.param(_ss2d_scan, "amp", id="ss2d_scan"),
    pytest.param(_hff_attention_tail, "layer_norm", id="hff_attention_tail"),
    pytest.param(_hff_spatial_attention, "input", id="hff_spatial_attention"),
    pytest.param(_hff_channel_attention, "input", id="hff_channel_attention"),
    pytest.param(_cross_scan, "input", id="cross_scan"),
    pytest.param(_cross_merge, "input", id="cross_merge"),
]


def _expected_dtype(out_kind, amp, device):
    if out_kind == "input":
        return torch.float32
    return torch.float32 if out_kind == "layer_norm" and device.type == "cuda" else amp


@pytest.mark.parametrize("amp", AMP_DTYPES)
@pytest.mark.parametrize("case, out_kind", CASES)
def test_op_under_autocast_matches_float64_reference(device_backend, case, out_kind, amp):
    device, backend = device_backend
    call, tensors = case()
    leaves = {n: t.detach().clone().to(device).requires_grad_() for n, (t, _) in tensors.items()}
    with medkernels.use_backend(backend), torch.autocast(device.type, dtype=amp):
        out = call(**leaves)
    assert out.dtype == _expected_dtype(out_kind, amp, device)
    cotangent = _randn(out.shape, 99).to(out.dtype)
    out.backward(cotangent.to(device))

    # the reference: what the rule feeds the backend, in float64 on the CPU, with autocast off
    ref_leaves = {n: (t.to(amp) if cast else t).double().requires_grad_() for n, (t, cast) in tensors.items()}
    with medkernels.use_backend("ref"):
        expected = call(**ref_leaves)
    expected.backward(cotangent.double())

    # nothing is rounded to the autocast dtype by the ops that keep their input's dtype: float32 bounds there
    eps = torch.finfo(amp if out_kind != "input" else torch.float32).eps
    _assert_close(out.cpu(), expected, eps, "output")
    for n, leaf in leaves.items():
        assert leaf.grad is not None and leaf.grad.dtype == torch.float32, f"{n}: gradient {leaf.grad}"
        _assert_close(leaf.grad.cpu(), ref_leaves[n].grad, eps, f"d {n}")


@pytest.mark.parametrize("amp", AMP_DTYPES)
def test_hff_attention_tail_keeps_float32_running_stats_under_autocast(cpu_backend, amp):
    call, tensors = _hff_attention_tail()
    args = {n: t for n, (t, _) in tensors.items()}
    stats = {}
    for backend, dtype_ctx in ((cpu_backend, torch.autocast("cpu", dtype=amp)), ("ref", None)):
        running_mean, running_var = torch.zeros(1), torch.ones(1)
        a = dict(args) if dtype_ctx else {n: (t.to(amp) if tensors[n][1] else t).double() for n, t in args.items()}
        if dtype_ctx is None:
            running_mean, running_var = running_mean.double(), running_var.double()
        with medkernels.use_backend(backend), (dtype_ctx or torch.autocast("cpu", enabled=False)):
            ops.hff_attention_tail(a["l"], a["g"], a["x_f"], a["conv_weight"], a["bn_weight"], a["bn_bias"], running_mean,
                                   running_var, True, a["fc1_weight"], a["fc2_weight"], a["ln_weight"], a["ln_bias"])
        stats[backend if dtype_ctx else "float64"] = (running_mean, running_var)
    got, want = stats[cpu_backend], stats["float64"]
    for name, a, b in zip(("running_mean", "running_var"), got, want):
        assert a.dtype == torch.float32, f"{name} became {a.dtype}"
        _assert_close(a, b, torch.finfo(torch.float32).eps * 64, name)


def test_depthwise_layernorm_output_dtype_follows_layer_norm_under_autocast():
    """The rule's stated output dtype is F.layer_norm's under CPU autocast: the input's half dtype."""
    x = torch.randn(1, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch.nn.functional.layer_norm(x.bfloat16().permute(0, 2, 3, 1), (4,), torch.ones(4), torch.zeros(4)).dtype
        got = ops.depthwise_conv2d_layernorm(x, torch.randn(4, 1, 3, 3), None, torch.ones(4), torch.zeros(4)).dtype
    assert got == expected == torch.bfloat16


@pytest.mark.parametrize("call, match", [
    pytest.param(lambda: ops.depthwise_conv2d(torch.randn(1, 2, 5, 5).bfloat16(), torch.randn(2, 1, 3, 3)),
                 r"\bweight\b", id="depthwise-weight"),
    pytest.param(lambda: ops.depthwise_conv2d_layernorm(torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3), None,
                                                        torch.ones(2).double()), r"\bln_weight\b", id="layernorm-ln_weight"),
    pytest.param(lambda: ops.selective_scan(torch.randn(1, 2, 4).bfloat16(), torch.randn(1, 2, 4), -torch.ones(2, 3),
                                            torch.randn(1, 3, 4), torch.randn(1, 3, 4)), r"\bdelta\b", id="scan-delta"),
    pytest.param(lambda: ops.hff_attention_tail(torch.randn(1, 2, 3, 3).bfloat16(), torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3),
                                                torch.randn(1, 2, 7, 7), None, None, None, None, True, torch.randn(1, 2),
                                                torch.randn(2, 1), torch.ones(6), torch.zeros(6)), r"\bg\b", id="tail-g"),
])
def test_mixed_dtypes_outside_autocast_are_still_refused(call, match):
    with pytest.raises(TypeError, match=match):
        call()


def test_autocast_rule_holds_in_a_compiled_graph():
    """torch.compile traces the rule: same dtype and values as eager under autocast."""
    torch._dynamo.reset()
    x, w, b = torch.randn(2, 4, 6, 6), torch.randn(4, 1, 3, 3), torch.randn(4)

    def f(x, w, b):
        return ops.depthwise_conv2d(x, w, b, activation="silu") * 2

    with medkernels.use_backend("cpu" if medkernels.unavailable_reason("cpu") is None else "ref"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager = f(x, w, b)
            compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x, w, b)
    assert compiled.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
