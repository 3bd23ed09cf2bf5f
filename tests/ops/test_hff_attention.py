"""HFF spatial and channel attention ops: every backend against a statement built from torch.nn modules, run in
float64 on the same values; outputs, gradients and running statistics checked entry by entry."""
import copy

import pytest
import torch
from torch import nn

import medkernels
from medkernels.ops import hff_channel_attention, hff_spatial_attention

from helpers.hff_utils import assert_close_elementwise

WIDTHS = [pytest.param((2, 96, 7, 9), id="96ch-7x9"), pytest.param((3, 5, 6, 5), id="5ch-6x5"), pytest.param((1, 16, 1, 3), id="16ch-1x3")]


class SpatialAttention(nn.Module):
    """The official arrangement: Conv(2, 1, 7, bn=True, relu=False, bias=False), sigmoid, multiply."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x):
        pooled = torch.cat([torch.max(x, dim=1, keepdim=True)[0], torch.mean(x, dim=1, keepdim=True)], 1)
        return torch.sigmoid(self.bn(self.conv(pooled))) * x


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.dim() == 1 and "weight" in str(p) else 0.0))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(1 + torch.rand(b.shape, generator=g))
    return module


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape", WIDTHS)
def test_spatial_attention(device_backend, shape, training):
    device, backend = device_backend
    ref = _randomize(SpatialAttention(), 0).to(device).train(training)
    bn = ref.bn
    mine_mean, mine_var = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_(True)
    with medkernels.use_backend(backend):
        out = hff_spatial_attention(x, ref.conv.weight, bn.weight, bn.bias, mine_mean, mine_var, training,
                                    momentum=bn.momentum, eps=bn.eps)
    # the official module in float64 on the same values (a float32 oracle would be as far off as the op)
    ref64 = copy.deepcopy(ref).cpu().double()
    x64 = x.detach().cpu().double().requires_grad_(True)
    expected = ref64(x64)
    assert_close_elementwise(out, expected, "output")
    assert_close_elementwise(mine_mean, ref64.bn.running_mean, "running_mean")
    assert_close_elementwise(mine_var, ref64.bn.running_var, "running_var")
    cot = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(device)
    got = torch.autograd.grad((out * cot).sum(), (x, ref.conv.weight, bn.weight, bn.bias))
    exp = torch.autograd.grad((expected * cot.cpu().double()).sum(),
                              (x64, ref64.conv.weight, ref64.bn.weight, ref64.bn.bias))
    for name, a, b in zip(("x", "conv_weight", "bn_weight", "bn_bias"), got, exp):
        assert_close_elementwise(a, b, f"grad {name}")


@pytest.mark.parametrize("shape", WIDTHS)
def test_channel_attention(device_backend, shape):
    device, backend = device_backend
    c = shape[1]
    hidden = max(c // 16, 1)
    se = _randomize(nn.Sequential(nn.Conv2d(c, hidden, 1, bias=False), nn.ReLU(), nn.Conv2d(hidden, c, 1, bias=False)), 3).to(device)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(device).requires_grad_(True)
    with medkernels.use_backend(backend):
        out = hff_channel_attention(x, se[0].weight, se[2].weight)
    # the official module in float64 on the same values (a float32 oracle is off by up to 4e-5 in small entries
    # of fc1_weight's gradient, a sum over every pixel)
    se64 = copy.deepcopy(se).cpu().double()
    x64 = x.detach().cpu().double().requires_grad_(True)
    gate = torch.sigmoid(se64(nn.functional.adaptive_max_pool2d(x64, 1)) + se64(nn.functional.adaptive_avg_pool2d(x64, 1)))
    expected = gate * x64
    assert_close_elementwise(out, expected, "output")
    cot = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(device)
    got = torch.autograd.grad((out * cot).sum(), (x, se[0].weight, se[2].weight))
    exp = torch.autograd.grad((expected * cot.cpu().double()).sum(), (x64, se64[0].weight, se64[2].weight))
    for name, a, b in zip(("x", "fc1_weight", "fc2_weight"), got, exp):
        assert_close_elementwise(a, b, f"grad {name}")


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gradcheck_float64(cpu_backend, training):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    cw = torch.randn(1, 2, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    bw = torch.rand(1, dtype=torch.float64, generator=g).add(0.5).requires_grad_(True)
    bb = torch.randn(1, dtype=torch.float64, generator=g, requires_grad=True)
    w1 = torch.randn(2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w2 = torch.randn(3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    with medkernels.use_backend(cpu_backend):
        assert torch.autograd.gradcheck(
            lambda *a: hff_spatial_attention(*a, torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), training),
            (x, cw, bw, bb))
        assert torch.autograd.gradcheck(hff_channel_attention, (x, w1, w2))


def test_batch_statistics_without_running_stats():
    x = torch.randn(2, 3, 4, 4)
    cw = torch.randn(1, 2, 7, 7)
    out = hff_spatial_attention(x, cw, None, None, None, None, training=False)
    bn = nn.BatchNorm2d(1, affine=False, track_running_stats=False)
    pooled = torch.cat([x.max(1, keepdim=True)[0], x.mean(1, keepdim=True)], 1)
    torch.testing.assert_close(out, x * torch.sigmoid(bn(nn.functional.conv2d(pooled, cw, padding=3))))


@pytest.mark.parametrize(
    "call, exc, word",
    [
        pytest.param(lambda: hff_spatial_attention(torch.zeros(2, 3, 4), torch.zeros(1, 2, 7, 7), None, None, None, None, False), ValueError, r"\bx\b", id="spatial-x-rank"),
        pytest.param(lambda: hff_spatial_attention(torch.zeros(2, 3, 4, 4), torch.zeros(1, 3, 7, 7), None, None, None, None, False), ValueError, r"\bconv_weight\b", id="spatial-conv-shape"),
        pytest.param(lambda: hff_spatial_attention(torch.zeros(2, 3, 4, 4), torch.zeros(1, 2, 7, 7), torch.ones(2), None, None, None, False), ValueError, r"\bbn_weight\b", id="spatial-bn-shape"),
        pytest.param(lambda: hff_spatial_attention(torch.zeros(1, 3, 1, 1), torch.zeros(1, 2, 7, 7), None, None, None, None, True), ValueError, r"\bsingle value\b", id="spatial-one-value-training"),
        pytest.param(lambda: hff_spatial_attention(torch.zeros(2, 3, 4, 4, dtype=torch.int32), torch.zeros(1, 2, 7, 7), None, None, None, None, False), TypeError, r"\bx\b", id="spatial-int"),
        pytest.param(lambda: hff_channel_attention(torch.zeros(2, 8, 4, 4), torch.zeros(2, 6), torch.zeros(8, 2)), ValueError, r"\bfc1_weight\b", id="channel-fc1-shape"),
        pytest.param(lambda: hff_channel_attention(torch.zeros(2, 8, 4, 4), torch.zeros(2, 8), torch.zeros(8, 3)), ValueError, r"\bfc2_weight\b", id="channel-fc2-shape"),
        pytest.param(lambda: hff_channel_attention(torch.zeros(2, 8, 4, 4), torch.zeros(2, 8, device="meta"), torch.zeros(8, 2)), ValueError, r"\bdevice\b", id="channel-mixed-devices"),
        pytest.param(lambda: hff_channel_attention(torch.zeros(2, 8, 0, 4), torch.zeros(2, 8), torch.zeros(8, 2)), ValueError, r"\bspatial\b", id="channel-empty-spatial"),
    ],
)
def test_bad_inputs(call, exc, word):
    with pytest.raises(exc, match=word):
        call()
