"""torch.autograd.gradcheck in float64 for the fused ops without one elsewhere: depthwise_conv2d_layernorm,
hff_attention_tail and its fusion tail kernels alone (the other ops have theirs beside their tests)."""
import pytest
import torch

import medkernels
from medkernels import ops
from medkernels.ops.hff_attention_tail import _fused_tail


def _r(g, *shape, shift=0.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) + shift).requires_grad_()


def _check(backend, fn, inputs):
    # fast mode checks one random projection of the Jacobian: the full check launches a kernel per input
    # element, which the Triton interpreter makes slow
    with medkernels.use_backend(backend):
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=backend == "triton")


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_conv2d_layernorm(cpu_backend, stride):
    g = torch.Generator().manual_seed(0)
    inputs = (_r(g, 2, 3, 5, 4), _r(g, 3, 1, 3, 3), _r(g, 3), _r(g, 3, shift=1.0), _r(g, 3))
    _check(cpu_backend, lambda *a: ops.depthwise_conv2d_layernorm(*a, stride=stride), inputs)


def test_hff_fusion_tail_kernels(cpu_backend):
    if cpu_backend == "ref":
        pytest.skip("the reference backend has no fusion tail kernels (its fusion tail is hff_fused_tail_ref)")
    g = torch.Generator().manual_seed(1)
    inputs = (_r(g, 2, 2, 3, 4), _r(g, 2, 3, 3, 4), _r(g, 2, 2, 3, 4), _r(g, 2, 1, 3, 4), _r(g, 2, 3, 1, 1),
              _r(g, 7, shift=1.0), _r(g, 7))
    _check(cpu_backend, lambda *a: _fused_tail(*a, 1e-6, cpu_backend), inputs)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_hff_attention_tail(cpu_backend, training):
    g = torch.Generator().manual_seed(2)
    l, g_, x_f = _r(g, 2, 2, 3, 4), _r(g, 2, 4, 3, 4), _r(g, 2, 2, 3, 4)
    cw, bw, bb = _r(g, 1, 2, 3, 3), _r(g, 1, shift=1.0), _r(g, 1)
    w1, w2, lnw, lnb = _r(g, 2, 4), _r(g, 4, 2), _r(g, 8, shift=1.0), _r(g, 8)

    def fn(*a):
        # fresh running statistics per call: training mode updates them in place
        stats = (torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
        return ops.hff_attention_tail(*a[:6], *stats, training, *a[6:])

    _check(cpu_backend, fn, (l, g_, x_f, cw, bw, bb, w1, w2, lnw, lnb))
