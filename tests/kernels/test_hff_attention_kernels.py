"""The HFF op family's kernels on every backend against their float64 references: the spatial and channel
attentions, their gate forms and the fusion tail (hff_attention_tail's private building blocks, checked on
their own here) and the combined op: outputs, gradients, BatchNorm running statistics, the pooling's ties,
determinism, torch.library registration and bad inputs."""
import pytest
import torch

import medkernels
from medkernels import _ext
from medkernels.ops import hff_attention_tail, hff_channel_attention, hff_spatial_attention
from medkernels.ops._hff_common import update_running_stats
from medkernels.ops.hff_attention import _channel_gate, _spatial_gate
from medkernels.ops.hff_attention_tail import _fused_tail
from medkernels.ops.hff_attention_ref import (
    hff_channel_attention_ref,
    hff_channel_gate_ref,
    hff_spatial_attention_ref,
    hff_spatial_gate_ref,
)
from medkernels.ops.hff_attention_tail_ref import hff_attention_tail_ref, hff_fused_tail_ref

from helpers.hff_utils import (DTYPE_CASES, assert_close_elementwise, assert_close_scaled, channels_last_like, rand, randn,
                               tolerance)
from helpers.matching import named


def _shape(backend):
    """(B, C, H, W): more pixels than one CPU tile (256) for the compiled kernels; tiny under the interpreter."""
    return (2, 5, 3, 4) if backend == "triton" else (2, 19, 37, 9)


def _grads(out, inputs, seed, rounded_like=None):
    """Gradients of `out` against a seeded random cotangent in out's dtype, or with the values rounded to
    `rounded_like`'s dtype (a float64 reference gets the cotangent the low-precision op got)."""
    cot = randn(out.shape, seed, out.dtype if rounded_like is None else rounded_like.dtype).to(out.device, out.dtype)
    return torch.autograd.grad(out, [t for t in inputs if t is not None], cot)


def _summed_grad_tol(t):
    """Tolerance of a gradient summed over every pixel (the weights'): the float32/float64 summation error
    grows with the count; a float16/bfloat16 result is still one rounding of its float32 sum."""
    return tolerance(t, "grad") * (4 if t.dtype in (torch.float32, torch.float64) else 1)


def _assert_grad_close(actual, expected, name, two_paths=False):
    """Elementwise against float64 (one rounding of each entry), except a gradient that adds two paths (x through
    the gate and through the product; the tail's l and g, into which the gates' gradients are added): each path is
    rounded to the dtype before the sum, so a cancelling entry keeps one path's rounding, and these are held to the
    max-scaled bound here. tests/ops/test_depthwise_hff_ops_properties.py holds them elementwise to two roundings
    of |path a| + |path b|."""
    if two_paths:
        assert_close_scaled(actual, expected, tolerance(actual, "grad"), f"grad {name}")
    else:
        assert_close_elementwise(actual, expected, f"grad {name}")


def _leaves(tensors, dtype, device):
    return [None if t is None else t.to(device=device, dtype=dtype).requires_grad_(True) for t in tensors]


# ---- spatial gate ------------------------------------------------------------------------------------------

def _spatial_params(seed, k=7):
    return [randn((1, 2, k, k), seed, scale=0.3), rand((1,), seed + 1, low=0.5, high=1.5),
            randn((1,), seed + 2, scale=0.5)]



@pytest.mark.parametrize("dtype_case", DTYPE_CASES)
@pytest.mark.parametrize("gate_only", [True, False], ids=["gate", "attention"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_spatial_matches_reference(device_backend, dtype_case, gate_only, training):
    device, backend = device_backend
    dtype = dtype_case[0]
    shape = _shape(backend)
    x64 = randn(shape, 0, scale=2.0, shift=0.5)
    stats64 = [t.to(dtype).double() for t in (randn((1,), 4, scale=0.1), rand((1,), 5, low=1.0, high=2.0))]
    x = channels_last_like(x64.to(dtype)).to(device).requires_grad_(True)
    params64 = _spatial_params(1)
    params = _leaves(params64, dtype, device)
    running = [s.to(device=device, dtype=dtype).clone() for s in stats64]
    fn = _spatial_gate if gate_only else hff_spatial_attention
    with medkernels.use_backend(backend):
        out = fn(x, *params, *running, training, momentum=0.3, eps=1e-4)
        got = _grads(out, [x] + params, 6)

    xr = x.detach().double().cpu().requires_grad_(True)  # the rounded input values
    params_r = [p.detach().double().cpu().requires_grad_(True) for p in params]
    ref = hff_spatial_gate_ref if gate_only else hff_spatial_attention_ref
    expected, batch_mean, batch_var = ref(xr, *params_r, *stats64, training, 1e-4)
    want = _grads(expected, [xr] + params_r, 6, rounded_like=out)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == (acc if gate_only else dtype)
    assert_close_elementwise(out, expected, "output")
    for name, a, b in zip(("x", "conv_weight", "bn_weight", "bn_bias"), got, want):
        assert a.dtype == dtype, f"grad {name}: dtype {a.dtype}"
        _assert_grad_close(a, b, name, two_paths=name == "x" and not gate_only)
    for s, s64, batch in zip(running, stats64, (batch_mean, batch_var)):
        assert s.dtype == dtype
        assert_close_scaled(s, s64 * 0.7 + 0.3 * batch if training else s64, tolerance(s, "output"), "running statistic")


def test_spatial_without_bn_affine_or_running_stats(cpu_backend):
    shape = _shape(cpu_backend)
    x = randn(shape, 10, torch.float32).requires_grad_(True)
    cw = randn((1, 2, 5, 5), 11, torch.float32, scale=0.3).requires_grad_(True)
    with medkernels.use_backend(cpu_backend):
        out = _spatial_gate(x, cw, None, None, None, None, training=False)
        got = _grads(out, [x, cw], 12)
    xr, cwr = x.detach().double().requires_grad_(True), cw.detach().double().requires_grad_(True)
    expected = hff_spatial_gate_ref(xr, cwr, None, None, None, None, True, 1e-5)[0]
    assert_close_scaled(out, expected, 2e-6, "output")
    for name, a, b in zip(("x", "conv_weight"), got, _grads(expected, [xr, cwr], 12)):
        assert_close_scaled(a, b, 1e-5, f"grad {name}")


# ---- channel gate ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype_case", DTYPE_CASES)
@pytest.mark.parametrize("gate_only", [True, False], ids=["gate", "attention"])
def test_channel_matches_reference(device_backend, dtype_case, gate_only):
    device, backend = device_backend
    dtype = dtype_case[0]
    shape = _shape(backend)
    C, hidden = shape[1], 3
    x = channels_last_like(randn(shape, 20, dtype, scale=2.0)).to(device).requires_grad_(True)
    weights = _leaves([randn((hidden, C, 1, 1), 21, scale=0.5), randn((C, hidden, 1, 1), 22, scale=0.5)], dtype, device)
    fn = _channel_gate if gate_only else hff_channel_attention
    with medkernels.use_backend(backend):
        out = fn(x, *weights)
        got = _grads(out, [x] + weights, 23)
    xr = x.detach().double().cpu().requires_grad_(True)
    weights_r = [w.detach().double().cpu().requires_grad_(True) for w in weights]
    ref = hff_channel_gate_ref if gate_only else hff_channel_attention_ref
    expected = ref(xr, weights_r[0].flatten(1), weights_r[1].flatten(1))
    want = _grads(expected, [xr] + weights_r, 23, rounded_like=out)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == (acc if gate_only else dtype)
    assert_close_elementwise(out, expected, "output")
    for name, a, b in zip(("x", "fc1_weight", "fc2_weight"), got, want):
        assert a.dtype == dtype, f"grad {name}: dtype {a.dtype}"
        _assert_grad_close(a, b, name, two_paths=name == "x" and not gate_only)


# ---- fusion tail -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype_case", DTYPE_CASES)
def test_fused_tail_matches_reference(device_backend, dtype_case):
    device, backend = device_backend
    if backend == "ref":
        pytest.skip("the reference backend's fusion tail is hff_fused_tail_ref itself")
    dtype = dtype_case[0]
    B, C, H, W = _shape(backend)
    C1, C2, Ci = C, C + 2, C - 1
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    # non-contiguous feature maps: every other channel of larger tensors
    l = randn((B, 2 * C1, H, W), 30, dtype, scale=2.0, shift=0.3)[:, ::2]
    g = randn((B, 2 * C2, H, W), 31, dtype)[:, 1::2]
    x_f = channels_last_like(randn((B, Ci, H, W), 32, dtype, scale=0.5))
    sg, cg = rand((B, 1, H, W), 33, acc), rand((B, C2, 1, 1), 34, acc)
    w, b = randn((C1 + C2 + Ci,), 35, acc, scale=0.5, shift=1.0), randn((C1 + C2 + Ci,), 36, acc, scale=0.2)
    inputs = _leaves([l, g, x_f, sg, cg, w, b], None, device)
    with medkernels.use_backend(backend):
        out = _fused_tail(*inputs, 1e-6, backend)
        got = _grads(out, inputs, 37)
    inputs_r = [t.detach().double().cpu().requires_grad_(True) for t in inputs]
    expected = hff_fused_tail_ref(*inputs_r, 1e-6)[0]
    want = _grads(expected, inputs_r, 37, rounded_like=out)
    assert out.dtype == dtype and out.shape == (B, C1 + C2 + Ci, H, W)
    assert_close_elementwise(out, expected, "output")
    names = ("l", "g", "x_f", "spatial_gate", "channel_gate", "ln_weight", "ln_bias")
    for name, a, bb, t in zip(names, got, want, inputs):
        assert a.dtype == t.dtype, f"grad {name}: dtype {a.dtype}"
        # the gates' and LayerNorm parameters' gradients (float32 for low-precision features) sum over pixels
        assert_close_elementwise(a, bb, f"grad {name}")


# ---- the combined op (HFFBlock's path) ------------------------------------------------------------------------

def _attention_tail_case(backend, dtype, seed=90):
    """(features l, g, x_f; weights conv, bn weight, bn bias, fc1, fc2, ln weight, ln bias; running stats)."""
    B, C, H, W = _shape(backend)
    C1, C2, Ci = C, C + 3, C - 2
    features = [channels_last_like(randn((B, C1, H, W), seed, dtype, scale=2.0, shift=0.4)),
                randn((B, 2 * C2, H, W), seed + 1, dtype)[:, ::2], randn((B, Ci, H, W), seed + 2, dtype, scale=0.5)]
    weights = _spatial_params(seed + 3) + [
        randn((2, C2, 1, 1), seed + 6, scale=0.5), randn((C2, 2, 1, 1), seed + 7, scale=0.5),
        randn((C1 + C2 + Ci,), seed + 8, scale=0.3, shift=1.0), randn((C1 + C2 + Ci,), seed + 9, scale=0.2)]
    stats = [randn((1,), seed + 10, scale=0.1), rand((1,), seed + 11, low=1.0, high=2.0)]
    return features, [w.to(dtype) for w in weights], [s.to(dtype) for s in stats]


def _call_attention_tail(features, weights, stats, training, fn=hff_attention_tail):
    cw, bw, bb, w1, w2, lnw, lnb = weights
    return fn(*features, cw, bw, bb, *stats, training, w1, w2, lnw, lnb, momentum=0.2, bn_eps=1e-4, ln_eps=1e-6)


@pytest.mark.parametrize("dtype_case", DTYPE_CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_attention_tail_matches_reference(device_backend, dtype_case, training):
    _check_attention_tail(*device_backend, dtype_case, training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_attention_tail_isa_variants_match_reference(capped_cpu_isa, training):
    # the AVX2 and baseline builds of the tiles and the channel MLP (this CPU may run AVX-512 by default)
    for dtype_case in DTYPE_CASES:
        _check_attention_tail(torch.device("cpu"), "cpu", dtype_case.values[0], training)


def _check_attention_tail(device, backend, dtype_case, training):
    dtype = dtype_case[0]
    features, weights, stats = _attention_tail_case(backend, dtype)
    features = _leaves(features, None, device)
    weights = _leaves(weights, None, device)
    running = [s.to(device).clone() for s in stats]
    with medkernels.use_backend(backend):
        out = _call_attention_tail(features, weights, running, training)
        got = _grads(out, features + weights, 91)
    features_r = [t.detach().double().cpu().requires_grad_(True) for t in features]
    weights_r = [t.detach().double().cpu().requires_grad_(True) for t in weights]
    cw, bw, bb, w1, w2, lnw, lnb = weights_r
    expected, batch_mean, batch_var = hff_attention_tail_ref(*features_r, cw, bw, bb, *[s.double() for s in stats],
                                                             training, 1e-4, w1.flatten(1), w2.flatten(1), lnw, lnb, 1e-6)
    want = _grads(expected, features_r + weights_r, 91, rounded_like=out)
    assert out.dtype == dtype
    assert_close_elementwise(out, expected, "output")
    names = ("l", "g", "x_f", "conv_weight", "bn_weight", "bn_bias", "fc1_weight", "fc2_weight", "ln_weight", "ln_bias")
    for name, a, b in zip(names, got, want):
        assert a.dtype == dtype, f"grad {name}: dtype {a.dtype}"
        _assert_grad_close(a, b, name, two_paths=name in ("l", "g"))
    for s, s0, batch in zip(running, stats, (batch_mean, batch_var)):
        assert s.dtype == dtype
        expected_stat = s0.double() * 0.8 + 0.2 * batch if training else s0.double()
        assert_close_scaled(s, expected_stat, tolerance(s, "output"), "running stat")


def test_attention_tail_is_its_three_building_blocks(cpu_backend):
    """The combined op and its building blocks called one by one (spatial gate, channel gate, fusion tail)
    compute the same on one backend (only the order of the additions into dl and dg differs)."""
    if cpu_backend == "ref":
        pytest.skip("the reference backend has no fusion tail kernels")

    def three_ops(l, g, x_f, cw, bw, bb, rm, rv, training, w1, w2, lnw, lnb, momentum, bn_eps, ln_eps):
        sg = _spatial_gate(l, cw, bw, bb, rm, rv, training, momentum=momentum, eps=bn_eps)
        return _fused_tail(l, g, x_f, sg, _channel_gate(g, w1, w2), lnw, lnb, ln_eps, cpu_backend)

    features, weights, stats = _attention_tail_case(cpu_backend, torch.float32, seed=95)
    results = []
    for fn in (hff_attention_tail, three_ops):
        inputs = [t.clone().requires_grad_(True) for t in features + weights]
        running = [s.clone() for s in stats]
        with medkernels.use_backend(cpu_backend):
            out = _call_attention_tail(inputs[:3], inputs[3:], running, True, fn)
            results.append([out, *running, *_grads(out, inputs, 96)])
    for a, b in zip(*results):
        assert_close_scaled(a, b, 1e-6, "combined vs three ops")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_attention_tail_eager_fast_path_matches_custom_op(device_backend, training):
    """Plain eager calls skip the torch.library op's dispatch and call its implementation directly: outputs,
    every gradient and the running statistics must be those of the op itself, and the op must still be what
    runs under a dispatch mode."""
    device, backend = device_backend
    features, weights, stats = _attention_tail_case(backend, torch.float32, seed=97)
    results = []
    for direct in (True, False):
        inputs = [t.to(device).clone().requires_grad_(True) for t in features + weights]
        running = [s.to(device).clone() for s in stats]
        cw, bw, bb, w1, w2, lnw, lnb = inputs[3:]
        with medkernels.use_backend(backend):
            if direct:
                out = _call_attention_tail(inputs[:3], inputs[3:], running, training)
                # the compiled backends take the fast path; ref and triton go through the op
                takes_fast_path = backend in ("cpu", "cuda")
                assert ("DirectAttentionTail" in type(out.grad_fn).__name__) == takes_fast_path
            else:
                out, batch_mean, batch_var, *_ = torch.ops.medkernels.hff_attention_tail_fwd(
                    *inputs[:3], cw, bw, bb, *running, training, 1e-4, w1.flatten(1), w2.flatten(1), lnw, lnb, 1e-6,
                    backend)
                assert "DirectAttentionTail" not in type(out.grad_fn).__name__
                # the op leaves the running statistics to its caller, as hff_attention_tail does after it
                update_running_stats(*running, batch_mean, batch_var, training, 0.2)
        results.append([out, *_grads(out, inputs, 98), *running])
    assert len(results[0]) == len(results[1])
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if training:
        for s, s0 in zip(results[0][-2:], stats):
            assert not torch.equal(s.cpu(), s0)

    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    running = [s.to(device).clone() for s in stats]
    with Recorder(), medkernels.use_backend(backend), torch.no_grad():
        out = _call_attention_tail([t.to(device) for t in features], [t.to(device) for t in weights], running, training)
    torch.testing.assert_close(out, results[0][0].detach(), rtol=0, atol=0)
    assert any("hff_attention_tail_fwd" in f for f in Recorder.seen)


# ---- the pooling's maxima ----------------------------------------------------------------------------------

def test_max_ties_route_to_the_first_index(device_backend):
    """Integer-valued inputs with many equal maxima: outputs, saved argmax and gradients as torch.max (first)."""
    device, backend = device_backend
    shape = _shape(backend)
    x64 = torch.randint(-2, 3, shape, generator=torch.Generator().manual_seed(40)).double()
    cw, bw, bb = _spatial_params(41)
    w1, w2 = randn((2, shape[1]), 42, scale=0.5), randn((shape[1], 2), 43, scale=0.5)
    x = x64.float().to(device).requires_grad_(True)
    with medkernels.use_backend(backend):
        sg = _spatial_gate(x, cw.float().to(device), bw.float().to(device), bb.float().to(device), None, None, True)
        cg = _channel_gate(x, w1.float().to(device), w2.float().to(device))
        dx = torch.autograd.grad((sg * randn(sg.shape, 44, torch.float32).to(device)).sum()
                                 + (cg * randn(cg.shape, 45, torch.float32).to(device)).sum(), x)[0]
    xr = x64.clone().requires_grad_(True)
    sg_r = hff_spatial_gate_ref(xr, cw, bw, bb, None, None, True, 1e-5)[0]
    cg_r = hff_channel_gate_ref(xr, w1, w2)
    dx_r = torch.autograd.grad((sg_r * randn(sg.shape, 44, torch.float32).double()).sum()
                               + (cg_r * randn(cg.shape, 45, torch.float32).double()).sum(), xr)[0]
    assert_close_scaled(sg, sg_r, 2e-6, "spatial gate")
    assert_close_scaled(cg, cg_r, 2e-6, "channel gate")
    assert_close_scaled(dx, dx_r, 1e-5, "grad x")
    ops = torch.ops.medkernels
    spatial = ops.hff_spatial_attention_fwd(x.detach(), cw.float().to(device), None, None, None, None, True, 1e-5,
                                            backend, True)
    channel = ops.hff_channel_attention_fwd(x.detach(), w1.float().to(device), w2.float().to(device), backend, True)
    assert torch.equal(spatial[4].cpu(), x64.max(dim=1).indices)
    assert torch.equal(channel[2].cpu(), x64.flatten(2).max(dim=-1).indices)


@pytest.mark.parametrize("shape", [(2, 19, 37, 9), (2, 70, 5, 7)], ids=["long-rows", "short-rows"])
def test_nan_maxima_like_torch_max(device_backend, shape):
    """A NaN is the maximum and the first NaN its argmax, as torch.max (Triton's pooling does not promise this)."""
    device, backend = device_backend
    if backend == "triton":
        pytest.skip("Triton's pooling does not specify which NaN is the maximum (kernels/hff_attention.py)")
    x = randn(shape, 110, torch.float32)
    for b, c, h, w in ((0, 3, 1, 2), (0, 7, 1, 2), (1, 5, 4, 0), (1, 5, 2, 6)):
        x[b, c, h, w] = float("nan")
    x = x.to(device)
    ops = torch.ops.medkernels
    spatial = ops.hff_spatial_attention_fwd(x, randn((1, 2, 7, 7), 111, torch.float32).to(device), None, None, None,
                                            None, True, 1e-5, backend, True)
    channel = ops.hff_channel_attention_fwd(x, randn((2, shape[1]), 112, torch.float32).to(device),
                                            randn((shape[1], 2), 113, torch.float32).to(device), backend, True)
    top, index = x.cpu().max(dim=1)
    assert torch.equal(spatial[4].cpu(), index) and torch.equal(spatial[3][:, 0].cpu().isnan(), top.isnan())
    top, index = x.cpu().flatten(2).max(dim=-1)
    assert torch.equal(channel[2].cpu(), index) and torch.equal(channel[1][:, 0].cpu().isnan(), top.isnan())


def _assert_same_values(actual, expected, name):
    """The same NaN and infinity pattern as `expected`, and close finite values."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double()
    assert torch.equal(actual.isnan(), expected.isnan()), f"{name}: NaNs at other places than the reference's"
    assert torch.equal(actual.isinf(), expected.isinf()), f"{name}: infinities at other places than the reference's"
    assert torch.equal(actual[actual.isinf()], expected[expected.isinf()]), f"{name}: infinities of other signs"
    finite = expected.isfinite()
    assert_close_scaled(actual[finite], expected[finite], 2e-6, name)


@pytest.mark.parametrize("rows", ["short-rows", "long-rows"])
def test_nan_and_inf_inputs_propagate_like_the_reference(device_backend, rows):
    """A NaN in one image and an infinity in the other: the gates (eval-mode BatchNorm, so that the batch
    statistics do not spread the NaN over the batch) and the combined op's output have the reference's NaNs,
    infinities and finite values (torch.relu propagates NaN into the channel MLP's hidden units)."""
    device, backend = device_backend
    shape = (2, 6, 5, 4) if rows == "short-rows" else (2, 6, 9, 8)
    x = randn(shape, 120, torch.float32)
    x[0, 2, 1, 1] = float("nan")
    x[1, 3, 2, 2] = float("inf")
    cw, bw, bb = [t.float() for t in _spatial_params(121)]
    stats = [torch.tensor([0.1]), torch.tensor([1.5])]
    w1, w2 = randn((2, shape[1]), 122, torch.float32, scale=0.5), randn((shape[1], 2), 123, torch.float32, scale=0.5)
    lnw, lnb = torch.ones(3 * shape[1]), torch.zeros(3 * shape[1])
    spatial_leaves, channel_leaves = [x, cw, bw, bb], [x, w1, w2]
    leaves = _leaves(spatial_leaves + channel_leaves[1:], None, device)
    with medkernels.use_backend(backend):
        sg = _spatial_gate(*leaves[:4], *[s.to(device) for s in stats], False)
        cg = _channel_gate(leaves[0], *leaves[4:])
        got = [_grads(sg, leaves[:4], 124), _grads(cg, [leaves[0]] + leaves[4:], 125)]
        on = [t.to(device) for t in (x, cw, bw, bb, *stats)]
        out = hff_attention_tail(on[0], on[0], *on, False, *[t.to(device) for t in (w1, w2, lnw, lnb)])
    ref = [t.double().requires_grad_(True) for t in spatial_leaves + channel_leaves[1:]]
    sg_r = hff_spatial_gate_ref(*ref[:4], *stats, False, 1e-5)[0]
    cg_r = hff_channel_gate_ref(ref[0], *ref[4:])
    want = [_grads(sg_r, ref[:4], 124), _grads(cg_r, [ref[0]] + ref[4:], 125)]
    _assert_same_values(sg, sg_r, "spatial gate")
    _assert_same_values(cg, cg_r, "channel gate")
    names = {"spatial": ("x", "conv_weight", "bn_weight", "bn_bias"), "channel": ("x", "fc1_weight", "fc2_weight")}
    for gate, got_grads, want_grads in zip(names, got, want):
        for name, a, b in zip(names[gate], got_grads, want_grads):
            _assert_same_values(a, b, f"{gate} gate: grad {name}")
    xd = x.double()
    expected = hff_attention_tail_ref(xd, xd, xd, cw, bw, bb, *stats, False, 1e-5, w1, w2, lnw, lnb, 1e-6)[0]
    _assert_same_values(out, expected, "attention tail")


# ---- determinism -------------------------------------------------------------------------------------------

def _all_ops_once(x, sgw, w1, w2, lnw, lnb):
    """Every kernel (gates, attentions, fusion tail, combined op) forward and backward on x on the cpu backend:
    [outputs..., grads...]."""
    sg = _spatial_gate(x, *sgw, None, None, True)
    cg = _channel_gate(x, w1, w2)
    outs = [_fused_tail(x, x, x, sg, cg, lnw, lnb, 1e-6, "cpu"), hff_spatial_attention(x, *sgw, None, None, True),
            hff_channel_attention(x, w1, w2),
            hff_attention_tail(x, x, x, *sgw, None, None, True, w1, w2, lnw, lnb)]
    leaves = [x, *sgw, w1, w2, lnw, lnb]
    loss = sum((out.double() * randn(out.shape, 50 + i).to(out.device)).sum() for i, out in enumerate(outs))
    return outs + list(torch.autograd.grad(loss, leaves))


def _determinism_case():
    """Operands whose passes are large enough to run in parallel regions (more than 2^18 elements a pass)."""
    if medkernels.unavailable_reason("cpu") is not None:
        pytest.skip("the cpu backend is unavailable")
    C = 40
    x = randn((2, C, 61, 59), 51, torch.float32).requires_grad_(True)
    sgw = [t.float().requires_grad_(True) for t in _spatial_params(52)]
    w1, w2 = randn((3, C), 53, torch.float32).requires_grad_(True), randn((C, 3), 54, torch.float32).requires_grad_(True)
    lnw = randn((3 * C,), 55, torch.float32).requires_grad_(True)
    lnb = randn((3 * C,), 56, torch.float32).requires_grad_(True)
    return x, sgw, w1, w2, lnw, lnb


def test_cpu_kernels_do_not_depend_on_the_thread_count():
    case = _determinism_case()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            with medkernels.use_backend("cpu"):
                results.append(_all_ops_once(*case))
    finally:
        torch.set_num_threads(threads)
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b), f"result {i} depends on the thread count"


def test_cpu_kernels_are_thread_safe():
    """Four Python threads running every op at once (each op's parallel regions inside) get the results of a
    serial run, bit for bit: the kernels keep no shared mutable state."""
    import threading

    case = _determinism_case()
    with medkernels.use_backend("cpu"):
        expected = _all_ops_once(*case)
    results, errors = [None] * 4, []

    def work(i):
        try:
            with medkernels.use_backend("cpu"):
                results[i] = _all_ops_once(*case)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    for got in results:
        for i, (a, b) in enumerate(zip(got, expected)):
            assert torch.equal(a, b), f"result {i} differs under concurrent calls"


# ---- torch.library registration ----------------------------------------------------------------------------

def _opcheck_calls():
    r = lambda *s, seed: randn(s, seed)  # noqa: E731
    ops = torch.ops.medkernels
    return {
        "spatial_gate_train": (ops.hff_spatial_attention_fwd, (r(2, 3, 5, 4, seed=60), r(1, 2, 3, 3, seed=61), r(1, seed=62), r(1, seed=63), None, None, True, 1e-5), True),
        "spatial_gate_eval": (ops.hff_spatial_attention_fwd, (r(2, 3, 5, 4, seed=64), r(1, 2, 3, 3, seed=65), None, r(1, seed=66), r(1, seed=67), r(1, seed=68).abs() + 1, False, 1e-5), True),
        "channel_gate": (ops.hff_channel_attention_fwd, (r(2, 6, 3, 4, seed=69), r(2, 6, seed=70), r(6, 2, seed=71)), True),
        "attention_tail_train": (ops.hff_attention_tail_fwd, (r(2, 3, 4, 3, seed=84), r(2, 4, 4, 3, seed=85), r(2, 2, 4, 3, seed=86), r(1, 2, 3, 3, seed=87), r(1, seed=88), None, None, None, True, 1e-5, r(2, 4, seed=89), r(4, 2, seed=90), r(9, seed=91), r(9, seed=92), 1e-6), None),
        "attention_tail_eval": (ops.hff_attention_tail_fwd, (r(2, 3, 4, 3, seed=93), r(2, 4, 4, 3, seed=94), r(2, 2, 4, 3, seed=95), r(1, 2, 3, 3, seed=96), None, r(1, seed=97), r(1, seed=98), r(1, seed=99).abs() + 1, False, 1e-5, r(2, 4, seed=100), r(4, 2, seed=101), r(9, seed=102), r(9, seed=103), 1e-6), None),
    }


@pytest.mark.parametrize("name", list(_opcheck_calls()))
def test_opcheck(cpu_backend, name):
    op, args, gate_only = _opcheck_calls()[name]
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args + (cpu_backend,) + (() if gate_only is None else (gate_only,)))


def test_hff_path_compiles_without_graph_breaks(cpu_backend):
    x = randn((2, 4, 5, 3), 80, torch.float32).requires_grad_(True)
    cw, bw, bb = [t.float() for t in _spatial_params(81)]
    w1, w2 = randn((2, 4), 82, torch.float32), randn((4, 2), 83, torch.float32)
    lnw, lnb = torch.ones(12), torch.zeros(12)

    def fn(x):
        return hff_attention_tail(x, x, x, cw, bw, bb, None, None, True, w1, w2, lnw, lnb)

    with medkernels.use_backend(cpu_backend):
        eager = fn(x)
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
        torch.testing.assert_close(compiled, eager)
        torch.testing.assert_close(torch.autograd.grad(compiled.sum(), x)[0], torch.autograd.grad(eager.sum(), x)[0])


# ---- bad inputs ----------------------------------------------------------------------------------------------

def _attention_tail_call(**changes):
    args = {"l": torch.zeros(2, 3, 4, 5), "g": torch.zeros(2, 2, 4, 5), "x_f": torch.zeros(2, 4, 4, 5),
            "conv_weight": torch.zeros(1, 2, 7, 7), "bn_weight": None, "bn_bias": None, "running_mean": None,
            "running_var": None, "training": True, "fc1_weight": torch.zeros(1, 2), "fc2_weight": torch.zeros(2, 1),
            "ln_weight": torch.ones(9), "ln_bias": torch.zeros(9)}
    args.update(changes)
    return hff_attention_tail(**args)


def _tail_args(**changes):
    args = {"l": torch.zeros(2, 3, 4, 5), "g": torch.zeros(2, 2, 4, 5), "x_f": torch.zeros(2, 4, 4, 5),
            "spatial_gate": torch.zeros(2, 1, 4, 5), "channel_gate": torch.zeros(2, 2, 1, 1),
            "ln_weight": torch.ones(9), "ln_bias": torch.zeros(9)}
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "call, exc, word",
    [
        pytest.param(lambda: _attention_tail_call(g=torch.zeros(2, 2, 4, 6)), ValueError, "g", id="attention-tail-g-shape"),
        pytest.param(lambda: _attention_tail_call(g=torch.zeros(2, 2, 4, 5, dtype=torch.int64)), TypeError, "g", id="attention-tail-g-int"),
        pytest.param(lambda: _attention_tail_call(ln_bias=torch.zeros(9, dtype=torch.int32)), TypeError, "ln_bias", id="attention-tail-ln-bias-int"),
        pytest.param(lambda: _fused_tail(**_tail_args(ln_weight=torch.ones(8)), eps=1e-6, backend="cpu"), ValueError, "ln_weight", id="fused-tail-ln-weight-shape"),
        pytest.param(lambda: _fused_tail(**_tail_args(), eps=1e-6, backend="ref"), ValueError, "fusion tail kernels", id="fused-tail-on-ref"),
        pytest.param(lambda: hff_spatial_attention(torch.zeros(2, 0, 4, 4), torch.zeros(1, 2, 7, 7), None, None, None, None, True), ValueError, "x", id="spatial-no-channels"),
        pytest.param(lambda: hff_spatial_attention(torch.zeros(2, 3, 4, 4), torch.zeros(1, 2, 7, 7, dtype=torch.int64), None, None, None, None, True), TypeError, "conv_weight", id="spatial-int-weight"),
        pytest.param(lambda: hff_channel_attention(torch.zeros(2, 8, 4, 4), torch.zeros(2, 8, 3, 1), torch.zeros(8, 2)), ValueError, "fc1_weight", id="channel-fc1-shape"),
        pytest.param(lambda: _attention_tail_call(g=torch.zeros(2, 4, 4, 5)), ValueError, "fc1_weight", id="attention-tail-g-channels"),
        pytest.param(lambda: _attention_tail_call(l=torch.zeros(2, 3, 4)), ValueError, "l", id="attention-tail-l-rank"),
        pytest.param(lambda: _attention_tail_call(x_f=torch.zeros(2, 4, 4, 5, dtype=torch.float16)), TypeError, "x_f", id="attention-tail-x_f-dtype"),
        pytest.param(lambda: _attention_tail_call(conv_weight=torch.zeros(1, 2, 7, 7, dtype=torch.int32)), TypeError, "conv_weight", id="attention-tail-int-conv"),
        pytest.param(lambda: _attention_tail_call(ln_weight=torch.ones(10)), ValueError, "ln_weight", id="attention-tail-ln-shape"),
        pytest.param(lambda: _attention_tail_call(fc2_weight=torch.zeros(2, 1, device="meta")), ValueError, "device", id="attention-tail-mixed-devices"),
    ],
)
def test_bad_inputs(call, exc, word):
    with pytest.raises(exc, match=named(word)):
        call()


def _compiled():
    if medkernels.unavailable_reason("cpu") is not None:
        pytest.skip("the cpu backend is unavailable")
    return _ext.module()


@pytest.mark.parametrize(
    "call, exc, word",
    [
        pytest.param(lambda m: m.hff_fused_tail_fwd_cpu(*_tail_args(spatial_gate=torch.zeros(2, 1, 4, 5, dtype=torch.float64)).values(), 1e-6), TypeError, "spatial_gate", id="tail-gate-dtype"),
        pytest.param(lambda m: m.hff_fused_tail_fwd_cpu(*_tail_args(g=torch.zeros(2, 5, 4, 2).transpose(1, 3)).values(), 1e-6), ValueError, "g", id="tail-g-noncontiguous"),
        pytest.param(lambda m: m.hff_spatial_gate_fwd_cpu(torch.zeros(2, 3, 4, 4), torch.zeros(1, 2, 6, 6), None, None, None, None, True, 1e-5, True), ValueError, "k", id="spatial-even-kernel"),
        pytest.param(lambda m: m.hff_spatial_gate_fwd_cpu(torch.zeros(2, 3, 4, 4), torch.zeros(1, 2, 7, 7), None, None, None, None, False, 1e-5, True), ValueError, "running_mean", id="spatial-eval-no-stats"),
        pytest.param(lambda m: m.hff_spatial_gate_fwd_cpu(torch.zeros(2, 3, 4, 4, dtype=torch.int32), torch.zeros(1, 2, 7, 7), None, None, None, None, True, 1e-5, True), TypeError, "x", id="spatial-int-x"),
        pytest.param(lambda m: m.hff_channel_gate_fwd_cpu(torch.zeros(2, 8, 4, 4), torch.zeros(2, 8), torch.zeros(7, 2), True), ValueError, "fc2_weight", id="channel-fc2-shape"),
        pytest.param(lambda m: m.hff_channel_gate_bwd_cpu(torch.zeros(2, 8, 1, 1), torch.zeros(2, 2, 8), torch.zeros(2, 8, dtype=torch.int32), torch.zeros(2, 8, 4, 4), torch.zeros(2, 8), torch.zeros(8, 2), True, None), TypeError, "argmax", id="channel-argmax-dtype"),
        pytest.param(lambda m: m.hff_channel_gate_bwd_cpu(torch.zeros(2, 8, 1, 1), torch.zeros(2, 2, 8), torch.zeros(2, 8, dtype=torch.int64), torch.zeros(2, 8, 4, 4), torch.zeros(2, 8), torch.zeros(8, 2), True, torch.zeros(2, 8, 4, 4, dtype=torch.float64)), TypeError, "dx_accumulate", id="channel-accumulate-dtype"),
        pytest.param(lambda m: m.hff_spatial_gate_bwd_cpu(torch.zeros(2, 1, 4, 4), torch.zeros(2, 2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.int64), torch.zeros(2, 3, 4, 4), torch.zeros(1, 2, 7, 7), None, None, None, None, True, 1e-5, True, torch.zeros(2, 3, 4, 5)), ValueError, "dx_accumulate", id="spatial-accumulate-shape"),
    ],
)
def test_cpu_kernels_reject_bad_operands(call, exc, word):
    with pytest.raises(exc, match=named(word)):
        call(_compiled())


def test_triton_launchers_reject_bad_operands():
    if medkernels.unavailable_reason("triton") is not None:
        pytest.skip("the triton backend is unavailable here")
    from medkernels.kernels import hff_attention, hff_attention_tail

    with pytest.raises(TypeError, match=named("spatial_gate")):
        hff_attention_tail.hff_fused_tail_fwd(*_tail_args(spatial_gate=torch.zeros(2, 1, 4, 5, dtype=torch.float64)).values(), 1e-6)
    with pytest.raises(ValueError, match=named("conv_weight")):
        hff_attention.hff_spatial_gate_fwd(torch.zeros(2, 3, 4, 4), torch.zeros(1, 2, 6, 6), None, None, None, None, True, 1e-5, True)
    with pytest.raises(TypeError, match=named("x")):
        hff_attention.hff_channel_gate_fwd(torch.zeros(2, 8, 4, 4, dtype=torch.int32), torch.zeros(2, 8), torch.zeros(8, 2), True)


# ---- BatchNorm running statistics ----------------------------------------------------------------------------

def test_float16_running_stats_are_rounded_once_like_batch_norm():
    """The running-statistics update of the spatial BatchNorm (update_running_stats, used by every op and backend)
    on float16 running statistics gives F.batch_norm's values bit for bit: the new value is computed in float32
    from the float32 batch statistics and rounded once (a float16-rounded batch statistic would round twice)."""
    import torch.nn.functional as F

    for seed in range(128):  # a double rounding changes about one value in ten
        z = randn((16, 1, 1, 1), 130 + seed, torch.float16, scale=0.3, shift=1.0)
        initial = [rand((1,), 200 + seed, torch.float16, 0.5, 1.5), rand((1,), 300 + seed, torch.float16, 0.5, 1.5)]
        expected = [t.clone() for t in initial]
        F.batch_norm(z, *expected, None, None, True, 0.3, 1e-5)
        got = [t.clone() for t in initial]
        zf = z.float().flatten()
        update_running_stats(*got, zf.mean().reshape(1), zf.var().reshape(1), True, 0.3)
        for name, a, b in zip(("running_mean", "running_var"), got, expected):
            assert a.dtype == torch.float16 and torch.equal(a, b), f"seed {seed}: {name} {a.item()} != {b.item()}"


# ---- empty batch -----------------------------------------------------------------------------------------------

def test_empty_batch(device_backend):
    """B = 0 (eval-mode BatchNorm; training needs batch statistics): empty outputs of the right shapes and dtypes,
    empty input gradients and zero weight gradients, like the reference (the CPU fusion tail divided by the batch
    size when tiling and crashed the process with SIGFPE)."""
    device, backend = device_backend
    C1, C2, Ci, H, W = 3, 4, 2, 5, 6
    l, g, x_f = [torch.zeros(0, c, H, W, device=device, requires_grad=True) for c in (C1, C2, Ci)]
    cw, bw, bb = [t.float().to(device).requires_grad_(True) for t in _spatial_params(140)]
    stats = [torch.zeros(1, device=device), torch.ones(1, device=device)]
    w1 = randn((2, C2), 141, torch.float32).to(device).requires_grad_(True)
    w2 = randn((C2, 2), 142, torch.float32).to(device).requires_grad_(True)
    lnw, lnb = [torch.ones(C1 + C2 + Ci, device=device, requires_grad=True) for _ in range(2)]
    sg = torch.zeros(0, 1, H, W, device=device, requires_grad=True)
    cg = torch.zeros(0, C2, 1, 1, device=device, requires_grad=True)
    with medkernels.use_backend(backend):
        results = {
            "spatial attention": (hff_spatial_attention(l, cw, bw, bb, *stats, False), [l, cw, bw, bb]),
            "spatial gate": (_spatial_gate(l, cw, bw, bb, *stats, False), [l, cw, bw, bb]),
            "channel attention": (hff_channel_attention(g, w1, w2), [g, w1, w2]),
            "channel gate": (_channel_gate(g, w1, w2), [g, w1, w2]),
            "attention tail": (hff_attention_tail(l, g, x_f, cw, bw, bb, *stats, False, w1, w2, lnw, lnb),
                               [l, g, x_f, cw, bw, bb, w1, w2, lnw, lnb]),
        }
        if backend != "ref":  # the reference backend has no fusion tail kernels
            results["fused tail"] = (_fused_tail(l, g, x_f, sg, cg, lnw, lnb, 1e-6, backend), [l, g, x_f, sg, cg, lnw, lnb])
        shapes = {"spatial attention": (0, C1, H, W), "spatial gate": (0, 1, H, W), "channel attention": (0, C2, H, W),
                  "channel gate": (0, C2, 1, 1), "fused tail": (0, C1 + C2 + Ci, H, W),
                  "attention tail": (0, C1 + C2 + Ci, H, W)}
        for name, (out, inputs) in results.items():
            assert tuple(out.shape) == shapes[name], f"{name}: shape {tuple(out.shape)}"
            assert out.dtype == torch.float32 and out.device.type == device.type, name
            grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
            for t, gr in zip(inputs, grads):
                assert gr.shape == t.shape and gr.dtype == t.dtype, name
                assert not gr.any(), f"{name}: a gradient of an empty batch is not zero"
    assert torch.equal(stats[0].cpu(), torch.zeros(1)) and torch.equal(stats[1].cpu(), torch.ones(1))


def test_cpu_tail_kernels_take_an_empty_batch():
    """The compiled CPU fusion tail itself (not only the op) accepts B = 0 (it used to die with SIGFPE)."""
    m = _compiled()
    args = list(_tail_args(**{k: torch.zeros(0, *v) for k, v in (("l", (3, 4, 5)), ("g", (2, 4, 5)), ("x_f", (4, 4, 5)),
                                                                    ("spatial_gate", (1, 4, 5)), ("channel_gate", (2, 1, 1)))}).values())
    out, mean, rstd = m.hff_fused_tail_fwd_cpu(*args, 1e-6)
    assert out.shape == (0, 9, 4, 5) and mean.shape == rstd.shape == (0, 4, 5)
    grads = m.hff_fused_tail_bwd_cpu(torch.zeros(0, 9, 4, 5), *args, mean, rstd)
    assert [tuple(t.shape) for t in grads] == [(0, 3, 4, 5), (0, 2, 4, 5), (0, 4, 4, 5), (0, 1, 4, 5), (0, 2, 1, 1), (9,), (9,)]
    assert not grads[5].any() and not grads[6].any()
