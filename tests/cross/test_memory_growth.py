"""No memory growth: 1,000 repeated forward+backward calls of each op on CPU leave the resident set flat."""
import gc

import pytest
import torch

import medkernels
from medkernels import ops

ITERATIONS = 1000
BOUND_MB = 8.0  # allocator noise; a leak of one small tensor per call would show as tens of MB


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _scan():
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(1, 4, 33, generator=g), torch.rand(1, 4, 33, generator=g)
    A, B, C = -torch.rand(4, 16, generator=g), torch.randn(1, 2, 16, 33, generator=g), torch.randn(1, 2, 16, 33, generator=g)
    leaves = [t.requires_grad_() for t in (u, delta, A, B, C)]
    return leaves, lambda: ops.selective_scan(*leaves, D=None, delta_softplus=True)


def _ss2d():
    g = torch.Generator().manual_seed(1)
    leaves = [torch.randn(1, 2, 5, 6, generator=g), torch.rand(1, 4, 2, 5, 6, generator=g), -torch.rand(8, 4, generator=g),
              torch.randn(1, 4, 4, 5, 6, generator=g), torch.randn(1, 4, 4, 5, 6, generator=g)]
    leaves = [t.requires_grad_() for t in leaves]
    return leaves, lambda: ops.ss2d_scan(*leaves)


def _cross():
    x = torch.randn(1, 3, 5, 6, requires_grad=True)
    return [x], lambda: ops.cross_merge(ops.cross_scan(x).reshape(1, 4, 3, 5, 6))


def _depthwise():
    x, w, b = torch.randn(2, 4, 9, 7, requires_grad=True), torch.randn(4, 1, 3, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    return [x, w, b], lambda: ops.depthwise_conv2d(x, w, b, activation="silu")


def _hff_spatial():
    x, cw = torch.randn(2, 4, 6, 5, requires_grad=True), torch.randn(1, 2, 7, 7, requires_grad=True)
    bw, bb = torch.ones(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    rm, rv = torch.zeros(1), torch.ones(1)
    return [x, cw, bw, bb], lambda: ops.hff_spatial_attention(x, cw, bw, bb, rm, rv, training=True)


def _hff_channel():
    x, w1, w2 = torch.randn(2, 8, 4, 3, requires_grad=True), torch.randn(2, 8, requires_grad=True), torch.randn(8, 2, requires_grad=True)
    return [x, w1, w2], lambda: ops.hff_channel_attention(x, w1, w2)


def _depthwise_layernorm():
    g = torch.Generator().manual_seed(2)
    leaves = [torch.randn(2, 4, 9, 7, generator=g), torch.randn(4, 1, 3, 3, generator=g), torch.randn(4, generator=g),
              torch.randn(4, generator=g), torch.randn(4, generator=g)]
    leaves = [t.requires_grad_() for t in leaves]
    return leaves, lambda: ops.depthwise_conv2d_layernorm(*leaves)


def _hff_tail():
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    l, g_, x_f, cw, bw, bb, w1, w2, lnw, lnb = r(2, 3, 6, 5), r(2, 4, 6, 5), r(2, 2, 6, 5), r(1, 2, 7, 7), r(1), r(1), \
        r(2, 4), r(4, 2), r(9), r(9)
    rm, rv = torch.zeros(1), torch.ones(1)
    return [l, g_, x_f, cw, bw, bb, w1, w2, lnw, lnb], lambda: ops.hff_attention_tail(
        l, g_, x_f, cw, bw, bb, rm, rv, True, w1, w2, lnw, lnb)


CASES = {"selective_scan": _scan, "ss2d_scan": _ss2d, "cross_scan_merge": _cross, "depthwise_conv2d": _depthwise,
         "depthwise_conv2d_layernorm": _depthwise_layernorm, "hff_spatial_attention": _hff_spatial,
         "hff_channel_attention": _hff_channel, "hff_attention_tail": _hff_tail}


@pytest.mark.parametrize("case", list(CASES))
def test_repeated_calls_leave_memory_flat(case):
    if medkernels.unavailable_reason("cpu") is not None:
        pytest.skip("the cpu backend is unavailable")
    leaves, fn = CASES[case]()

    def step():
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
        for t in leaves:
            t.grad = None

    with medkernels.use_backend("cpu"):
        for _ in range(100):
            step()
        gc.collect()
        before = _rss_mb()
        for _ in range(ITERATIONS):
            step()
        gc.collect()
        growth = _rss_mb() - before
    assert growth < BOUND_MB, f"{case}: resident memory grew by {growth:.1f} MB over {ITERATIONS} calls"
