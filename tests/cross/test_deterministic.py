"""torch.use_deterministic_algorithms(True): every backend that runs here gives bitwise-identical outputs and
gradients run after run; `auto` passes over kernels marked nondeterministic (atomics), and those raise PyTorch's
standard error when asked for explicitly."""
import contextlib

import pytest
import torch

import medkernels
from medkernels import _backend, ops


@contextlib.contextmanager
def deterministic_mode(warn_only=False):
    before, before_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn)


def _scan_case(device):
    g = torch.Generator().manual_seed(0)
    b, d, L, n = 2, 8, 37, 4
    t = dict(u=torch.randn(b, d, L, generator=g), delta=torch.rand(b, d, L, generator=g),
             A=-torch.rand(d, n, generator=g) - 0.5, B=torch.randn(b, 2, n, L, generator=g),
             C=torch.randn(b, 2, n, L, generator=g), D=torch.randn(d, generator=g), z=torch.randn(b, d, L, generator=g),
             delta_bias=torch.rand(d, generator=g))
    t = {k: v.to(device).requires_grad_() for k, v in t.items()}
    return t, lambda: ops.selective_scan(**t, delta_softplus=True)


def _ss2d_case(device):
    g = torch.Generator().manual_seed(1)
    b, d, h, w, n = 2, 3, 5, 6, 4
    t = dict(u=torch.randn(b, d, h, w, generator=g), delta=torch.rand(b, 4, d, h, w, generator=g),
             A=-torch.rand(4 * d, n, generator=g) - 0.5, B=torch.randn(b, 4, n, h, w, generator=g),
             C=torch.randn(b, 4, n, h, w, generator=g), D=torch.randn(4 * d, generator=g),
             delta_bias=torch.rand(4 * d, generator=g))
    t = {k: v.to(device).requires_grad_() for k, v in t.items()}
    return t, lambda: ops.ss2d_scan(**t)


def _cross_case(device):
    x = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(2)).to(device).requires_grad_()
    return {"x": x}, lambda: ops.cross_merge(ops.cross_scan(x).reshape(2, 4, 3, 5, 4))


def _depthwise_case(device):
    g = torch.Generator().manual_seed(3)
    t = dict(x=torch.randn(2, 5, 9, 7, generator=g).to(memory_format=torch.channels_last),
             weight=torch.randn(5, 1, 3, 3, generator=g), bias=torch.randn(5, generator=g))
    t = {k: v.to(device).requires_grad_() for k, v in t.items()}
    return t, lambda: ops.depthwise_conv2d(**t, activation="silu")


def _depthwise_layernorm_case(device):
    g = torch.Generator().manual_seed(4)
    t = dict(x=torch.randn(2, 5, 9, 7, generator=g), weight=torch.randn(5, 1, 3, 3, generator=g),
             bias=torch.randn(5, generator=g), ln_weight=torch.randn(5, generator=g), ln_bias=torch.randn(5, generator=g))
    t = {k: v.to(device).requires_grad_() for k, v in t.items()}
    return t, lambda: ops.depthwise_conv2d_layernorm(**t)


def _hff_tail_case(device):
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t = dict(l=r(2, 3, 6, 5), g=r(2, 4, 6, 5), x_f=r(2, 2, 6, 5), conv_weight=r(1, 2, 7, 7), bn_weight=r(1),
             bn_bias=r(1), fc1_weight=r(2, 4), fc2_weight=r(4, 2), ln_weight=r(9), ln_bias=r(9))
    t = {k: v.to(device).requires_grad_() for k, v in t.items()}
    stats = [torch.zeros(1, device=device), torch.ones(1, device=device)]
    return t, lambda: ops.hff_attention_tail(**t, running_mean=stats[0], running_var=stats[1], training=True)


CASES = {"selective_scan": _scan_case, "ss2d_scan": _ss2d_case, "cross_scan_merge": _cross_case,
         "depthwise_conv2d": _depthwise_case, "depthwise_conv2d_layernorm": _depthwise_layernorm_case,
         "hff_attention_tail": _hff_tail_case}
OPS_OF_CASE = {"selective_scan": ("selective_scan",), "ss2d_scan": ("ss2d_scan",),
               "cross_scan_merge": ("cross_scan", "cross_merge"), "depthwise_conv2d": ("depthwise_conv2d",),
               "depthwise_conv2d_layernorm": ("depthwise_conv2d_layernorm",), "hff_attention_tail": ("hff_attention_tail",)}


def _run(case, device):
    inputs, fn = case(device)
    out = fn()
    out.backward(torch.ones_like(out) + torch.arange(out.numel(), device=out.device).reshape(out.shape) % 3)
    return [out.detach().clone()] + [t.grad.clone() for t in inputs.values()]


@pytest.mark.parametrize("case", list(CASES))
def test_two_runs_are_bitwise_identical(device_backend, case):
    device, backend = device_backend
    with deterministic_mode(), medkernels.use_backend(backend):
        if not all(_backend.OPS[name].deterministic_in(backend) for name in OPS_OF_CASE[case]):
            # asked for explicitly, a kernel with atomics raises PyTorch's standard error
            with pytest.raises(RuntimeError, match="deterministic"):
                _run(CASES[case], device)
            return
        first = _run(CASES[case], device)
        second = _run(CASES[case], device)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_auto_passes_over_nondeterministic_kernels():
    table = _backend.OpTable("determinism_probe", ref=object())
    try:
        table.register("cpu", object, deterministic=False)
        with medkernels.use_backend("auto"):
            expected = "cpu" if _backend.unavailable_reason("cpu") is None else "ref"
            assert _backend.resolve(table, "cpu") == expected
            with deterministic_mode():
                assert _backend.resolve(table, "cpu") == "ref"
            with deterministic_mode(warn_only=True):
                assert _backend.resolve(table, "cpu") == "ref"
    finally:
        del _backend.OPS["determinism_probe"]


def test_cpu_and_triton_kernels_are_marked_deterministic():
    for name in ("selective_scan", "ss2d_scan", "cross_scan", "cross_merge"):
        table = _backend.OPS[name]
        assert table.deterministic_in("cpu") and table.deterministic_in("triton") and table.deterministic_in("ref")
