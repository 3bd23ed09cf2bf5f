"""Property-based tests (hypothesis, bounded example counts): random shapes, layouts, options and dtypes for
depthwise_conv2d, depthwise_conv2d_layernorm and the HFF attention tail (spatial gate, channel gate, concatenation,
LayerNorm), every CPU backend against the float64 reference: outputs, every gradient, BatchNorm running stats."""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import medkernels  # noqa: E402
from medkernels import ops  # noqa: E402
from medkernels.ops.depthwise_conv_ref import depthwise_conv2d_layernorm_ref, depthwise_conv2d_ref  # noqa: E402
from medkernels.ops.hff_attention_tail_ref import hff_attention_tail_ref  # noqa: E402

# (output, gradient) tolerance relative to max(1, max |expected|); the kernels accumulate in float32 (float64)
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 1e-4), torch.float16: (4e-3, 2e-2),
       torch.bfloat16: (3e-2, 1e-1)}
EXAMPLES = {"ref": 6, "cpu": 25, "triton": 4}
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
# the Triton interpreter has no bfloat16 arithmetic; float16 goes through numpy there
DTYPES = {"ref": [torch.float32, torch.float64, torch.bfloat16], "cpu": [torch.float32, torch.float64, torch.float16, torch.bfloat16],
          "triton": [torch.float32, torch.float64]}


def _require(backend):
    if medkernels.unavailable_reason(backend) is not None:
        pytest.skip(f"backend {backend} unavailable")


def _close(got, exp, tol, what):
    got, exp = got.detach().double(), exp.detach().double()
    assert got.shape == exp.shape, what
    scale = max(1.0, exp.abs().max().item()) if exp.numel() else 1.0
    torch.testing.assert_close(got, exp, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def _layout(t, layout):
    """The same values as (B, C, H, W) `t` in the drawn layout: contiguous, channels_last, or a channel slice."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "slice":
        return torch.cat([t, t], dim=1)[:, ::2]
    return t


def _leaf(t, dtype):
    return None if t is None else t.to(dtype).requires_grad_()


def _reference_leaves(tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def _grads(out, tensors, cot):
    present = [t for t in tensors if t is not None]
    return torch.autograd.grad(out, present, cot)


@st.composite
def conv_cases(draw, backend):
    small = backend == "triton"
    k = draw(st.sampled_from([3, 5, 7] if not small else [3, 5]))
    stride = draw(st.sampled_from([1, 2]))
    padding = draw(st.one_of(st.none(), st.integers(0, k // 2)))
    pad = k // 2 if padding is None else padding
    h = draw(st.integers(max(1, k - 2 * pad), 6 if small else 17))
    w = draw(st.integers(max(1, k - 2 * pad), 6 if small else 17))
    return dict(b=draw(st.integers(1, 2)), c=draw(st.integers(1, 4 if small else 9)), h=h, w=w, k=k, stride=stride,
                padding=padding, bias=draw(st.booleans()), act=draw(st.sampled_from([None, "silu", "gelu", "relu"])),
                layout=draw(st.sampled_from(["nchw", "channels_last", "slice"])),
                dtype=draw(st.sampled_from(DTYPES[backend])), seed=draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("backend", ["ref", "cpu", "triton"])
def test_depthwise_conv2d_matches_reference_on_random_cases(backend):
    _require(backend)

    @settings(max_examples=EXAMPLES[backend], **SETTINGS)
    @given(conv_cases(backend))
    def run(c):
        g = torch.Generator().manual_seed(c["seed"])
        dt = c["dtype"]
        x = _layout(torch.randn(c["b"], c["c"], c["h"], c["w"], generator=g, dtype=torch.float64), c["layout"])
        tensors = [x, 0.4 * torch.randn(c["c"], 1, c["k"], c["k"], generator=g, dtype=torch.float64),
                   torch.randn(c["c"], generator=g, dtype=torch.float64) if c["bias"] else None]
        tensors = [_leaf(t, dt) for t in tensors]
        with medkernels.use_backend(backend):
            out = ops.depthwise_conv2d(*tensors, stride=c["stride"], padding=c["padding"], activation=c["act"])
        cot = torch.randn(out.shape, generator=g, dtype=torch.float64)
        grads = _grads(out, tensors, cot.to(dt))
        ref = _reference_leaves(tensors)
        pad = c["k"] // 2 if c["padding"] is None else c["padding"]
        exp = depthwise_conv2d_ref(*ref, c["stride"], pad, c["act"] or "none")
        exp_grads = _grads(exp, ref, cot)
        out_tol, grad_tol = TOL[dt]
        assert out.dtype == dt
        _close(out, exp, out_tol, "output")
        for name, got, want in zip(("x", "weight", "bias"), grads, exp_grads):
            _close(got, want, grad_tol, f"grad {name}")

    run()


@pytest.mark.parametrize("backend", ["ref", "cpu", "triton"])
def test_depthwise_conv2d_layernorm_matches_reference_on_random_cases(backend):
    _require(backend)

    @settings(max_examples=EXAMPLES[backend], **SETTINGS)
    @given(conv_cases(backend), st.booleans())
    def run(c, affine):
        g = torch.Generator().manual_seed(c["seed"])
        dt = c["dtype"]
        if dt in (torch.float16, torch.bfloat16):
            dt = torch.float32  # the fused conv + LayerNorm claims float32 and float64 only
        x = _layout(torch.randn(c["b"], c["c"], c["h"], c["w"], generator=g, dtype=torch.float64), c["layout"])
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        tensors = [x, 0.4 * r(c["c"], 1, c["k"], c["k"]), r(c["c"]) if c["bias"] else None,
                   1 + 0.3 * r(c["c"]) if affine else None, 0.2 * r(c["c"]) if affine else None]
        tensors = [_leaf(t, dt) for t in tensors]
        with medkernels.use_backend(backend):
            out = ops.depthwise_conv2d_layernorm(*tensors, eps=1e-5, stride=c["stride"], padding=c["padding"])
        cot = torch.randn(out.shape, generator=g, dtype=torch.float64)
        grads = _grads(out, tensors, cot.to(dt))
        ref = _reference_leaves(tensors)
        pad = c["k"] // 2 if c["padding"] is None else c["padding"]
        exp = depthwise_conv2d_layernorm_ref(*ref, c["stride"], pad, 1e-5)
        exp_grads = _grads(exp, ref, cot)
        # a LayerNorm over 1 channel is 0 (plus the bias) whatever the conv gives: its gradients are pure rounding
        out_tol, grad_tol = TOL[dt]
        _close(out, exp, out_tol, "output")
        present = [n for n, t in zip(("x", "weight", "bias", "ln_weight", "ln_bias"), tensors) if t is not None]
        for name, got, want in zip(present, grads, exp_grads):
            # normalising by a small per-pixel std amplifies rounding in the input-side gradients
            _close(got, want, grad_tol * (1 if name.startswith("ln") else 10), f"grad {name}")

    run()


@st.composite
def hff_cases(draw, backend):
    small = backend == "triton"
    b = draw(st.integers(1, 2))
    h, w = draw(st.integers(1, 4 if small else 9)), draw(st.integers(1, 4 if small else 9))
    training = draw(st.booleans())
    running = draw(st.booleans())
    if (training or not running) and b * h * w < 2:
        w = 2  # batch statistics need two values
    c2 = draw(st.integers(1, 4 if small else 12))
    return dict(b=b, c1=draw(st.integers(1, 4 if small else 12)), c2=c2, ci=draw(st.integers(1, 3 if small else 8)),
                h=h, w=w, k=draw(st.sampled_from([3, 7])), hidden=draw(st.integers(1, c2)), training=training,
                running=running, bn_affine=draw(st.booleans()), layout=draw(st.sampled_from(["nchw", "channels_last", "slice"])),
                dtype=draw(st.sampled_from(DTYPES[backend])), seed=draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("backend", ["ref", "cpu", "triton"])
def test_hff_attention_tail_matches_reference_on_random_cases(backend):
    _require(backend)

    @settings(max_examples=EXAMPLES[backend], **SETTINGS)
    @given(hff_cases(backend))
    def run(c):
        g = torch.Generator().manual_seed(c["seed"])
        dt = c["dtype"]
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        b, h, w, c1, c2, ci = c["b"], c["h"], c["w"], c["c1"], c["c2"], c["ci"]
        features = [_layout(1.5 * r(b, c1, h, w) + 0.3, c["layout"]), r(b, c2, h, w), 0.5 * r(b, ci, h, w)]
        weights = [0.3 * r(1, 2, c["k"], c["k"]), (1 + 0.2 * r(1)) if c["bn_affine"] else None,
                   0.3 * r(1) if c["bn_affine"] else None, 0.5 * r(c["hidden"], c2), 0.5 * r(c2, c["hidden"]),
                   1 + 0.3 * r(c1 + c2 + ci), 0.2 * r(c1 + c2 + ci)]
        stats = [0.1 * r(1), 1 + r(1).abs()] if c["running"] else [None, None]
        features, weights = [_leaf(t, dt) for t in features], [_leaf(t, dt) for t in weights]
        running = [None if s is None else s.to(dt).clone() for s in stats]  # updated in place by the op
        cw, bw, bb, w1, w2, lnw, lnb = weights
        with medkernels.use_backend(backend):
            out = ops.hff_attention_tail(*features, cw, bw, bb, *running, c["training"], w1, w2, lnw, lnb,
                                         momentum=0.2, bn_eps=1e-4, ln_eps=1e-6)
        cot = torch.randn(out.shape, generator=g, dtype=torch.float64)
        grads = _grads(out, features + weights, cot.to(dt))

        ref_f, ref_w = _reference_leaves(features), _reference_leaves(weights)
        cw, bw, bb, w1, w2, lnw, lnb = ref_w
        use_batch_stats = c["training"] or not c["running"]
        ref_stats = [None if s is None else s.to(dt).double() for s in stats]
        exp, batch_mean, batch_var = hff_attention_tail_ref(*ref_f, cw, bw, bb, *ref_stats, use_batch_stats, 1e-4,
                                                            w1, w2, lnw, lnb, 1e-6)
        exp_grads = _grads(exp, ref_f + ref_w, cot)
        out_tol, grad_tol = TOL[dt]
        assert out.dtype == dt
        _close(out, exp, out_tol, "output")
        names = [n for n, t in zip(("l", "g", "x_f", "conv_weight", "bn_weight", "bn_bias", "fc1_weight", "fc2_weight",
                                    "ln_weight", "ln_bias"), features + weights) if t is not None]
        for name, got, want in zip(names, grads, exp_grads):
            # weight gradients sum over every pixel of the batch
            _close(got, want, grad_tol * (1 if name in ("l", "g", "x_f") else 4), f"grad {name}")
        if c["training"] and c["running"]:
            for s, s0, batch in zip(running, ref_stats, (batch_mean, batch_var)):
                _close(s, 0.8 * s0 + 0.2 * batch, out_tol, "running stat")

    run()
