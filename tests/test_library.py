"""torch.library registration: opcheck on every op (schema, fake kernel, autograd registration) and
torch.compile tracing through the ops without graph breaks."""
import pytest
import torch

import medkernels
from medkernels import ops


def _sample_calls():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    u, delta = r(2, 4, 6), r(2, 4, 6).abs()
    A = -r(4, 3).abs()
    return {
        "selective_scan_fwd": (torch.ops.medkernels.selective_scan_fwd, (u, delta, A, r(2, 2, 3, 6), r(2, 3, 6), r(4), r(2, 4, 6), r(4), True)),
        "ss2d_scan_fwd": (torch.ops.medkernels.ss2d_scan_fwd, (r(1, 2, 3, 4), r(1, 4, 2, 3, 4).abs(), -r(8, 3).abs(), r(1, 4, 3, 3, 4), r(1, 4, 3, 3, 4), r(8), r(8), True)),
        "cross_scan": (torch.ops.medkernels.cross_scan, (r(2, 3, 4, 5),)),
        "cross_merge": (torch.ops.medkernels.cross_merge, (r(2, 4, 3, 4, 5),)),
        "depthwise_conv2d_fwd": (torch.ops.medkernels.depthwise_conv2d_fwd, (r(2, 3, 7, 6), r(3, 1, 3, 3), r(3), 2, 1, "silu")),
        "hff_spatial_attention_eval": (torch.ops.medkernels.hff_spatial_attention_fwd, (r(2, 3, 5, 5), r(1, 2, 7, 7), r(1), r(1), r(1), r(1).abs() + 1, False, 1e-5)),
        "hff_spatial_attention_train": (torch.ops.medkernels.hff_spatial_attention_fwd, (r(2, 3, 5, 5), r(1, 2, 7, 7), r(1), r(1), None, None, True, 1e-5)),
        "hff_channel_attention_fwd": (torch.ops.medkernels.hff_channel_attention_fwd, (r(2, 8, 3, 4), r(2, 8), r(8, 2))),
    }


@pytest.mark.parametrize("name", list(_sample_calls()))
def test_opcheck(cpu_backend, name):
    op, args = _sample_calls()[name]
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.dim() > 1 else a for a in args)
    torch.library.opcheck(op, args + (cpu_backend,))


class _TinySS2DLike(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = medkernels.nn.DepthwiseConv2d(4, 3, activation="silu")
        self.A = torch.nn.Parameter(-torch.rand(16, 2))
        self.w1 = torch.nn.Parameter(torch.randn(2, 4))
        self.w2 = torch.nn.Parameter(torch.randn(4, 2))

    def forward(self, x):
        b, c, h, w = x.shape
        x = self.conv(x)
        x = ops.hff_channel_attention(x, self.w1, self.w2)
        xs = ops.cross_scan(x).reshape(b, 4 * c, h * w)
        bc = xs.reshape(b, 4, c, h * w)[:, :, :2]
        y = ops.selective_scan(xs, xs.sigmoid(), self.A, bc, bc, delta_softplus=True)
        return ops.cross_merge(y.reshape(b, 4, c, h, w))


def test_torch_compile_fullgraph_matches_eager(cpu_backend):
    model = _TinySS2DLike()
    x = torch.randn(2, 4, 3, 5, requires_grad=True)
    with medkernels.use_backend(cpu_backend):
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        torch.testing.assert_close(compiled, eager)
        g_eager = torch.autograd.grad(eager.sum(), x)[0]
        g_comp = torch.autograd.grad(compiled.sum(), x)[0]
    torch.testing.assert_close(g_comp, g_eager)
