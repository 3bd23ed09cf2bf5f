"""torch.library registration: opcheck on every op (schema, fake kernel, autograd registration) and
torch.compile tracing through the ops without graph breaks."""
import pytest
import torch

import medkernels
from medkernels import ops


def _sample_calls():
    """name -> (op, args without the trailing backend). Small float64 inputs."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    u, delta = r(2, 4, 6), r(2, 4, 6).abs()
    A = -r(4, 3).abs()
    x_cl = r(2, 3, 7, 6).to(memory_format=torch.channels_last)
    l, gl, x_f = r(2, 3, 5, 5), r(2, 4, 5, 5), r(2, 2, 5, 5)
    ops_ = torch.ops.medkernels
    return {
        "selective_scan_fwd": (ops_.selective_scan_fwd, (u, delta, A, r(2, 2, 3, 6), r(2, 3, 6), r(4), r(2, 4, 6), r(4), True)),
        "ss2d_scan_fwd": (ops_.ss2d_scan_fwd, (r(1, 2, 3, 4), r(1, 4, 2, 3, 4).abs(), -r(8, 3).abs(), r(1, 4, 3, 3, 4), r(1, 4, 3, 3, 4), r(8), r(8), True)),
        "cross_scan": (ops_.cross_scan, (r(2, 3, 4, 5),)),
        "cross_merge": (ops_.cross_merge, (r(2, 4, 3, 4, 5),)),
        "depthwise_conv2d_fwd": (ops_.depthwise_conv2d_fwd, (r(2, 3, 7, 6), r(3, 1, 3, 3), r(3), 2, 1, "silu")),
        "depthwise_conv2d_fwd_channels_last": (ops_.depthwise_conv2d_fwd, (x_cl, r(3, 1, 5, 5), None, 1, 2, "gelu")),
        "depthwise_conv2d_layernorm_fwd": (ops_.depthwise_conv2d_layernorm_fwd, (r(2, 3, 7, 6), r(3, 1, 3, 3), r(3), r(3), r(3), 1, 1, 1e-5)),
        "depthwise_conv2d_layernorm_fwd_channels_last": (ops_.depthwise_conv2d_layernorm_fwd, (x_cl, r(3, 1, 3, 3), None, r(3), None, 2, 1, 1e-5)),
        "hff_spatial_attention_eval": (ops_.hff_spatial_attention_fwd, (r(2, 3, 5, 5), r(1, 2, 7, 7), r(1), r(1), r(1), r(1).abs() + 1, False, 1e-5)),
        "hff_spatial_attention_train": (ops_.hff_spatial_attention_fwd, (r(2, 3, 5, 5), r(1, 2, 7, 7), r(1), r(1), None, None, True, 1e-5)),
        "hff_channel_attention_fwd": (ops_.hff_channel_attention_fwd, (r(2, 8, 3, 4), r(2, 8), r(8, 2))),
        "hff_attention_tail_fwd_train": (ops_.hff_attention_tail_fwd, (l, gl, x_f, r(1, 2, 7, 7), r(1), r(1), None, None, True, 1e-5, r(2, 4), r(4, 2), r(9), r(9), 1e-6)),
    }


def _backward_calls(backend):
    """The backward ops, called with saved tensors from their forward op on the same backend."""
    calls = _sample_calls()
    g = torch.Generator().manual_seed(1)
    like = lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype).to(memory_format=torch.contiguous_format)  # noqa: E731
    ops_ = torch.ops.medkernels
    result = {}
    _, (x, w, b, stride, padding, act) = calls["depthwise_conv2d_fwd_channels_last"]
    out = ops_.depthwise_conv2d_fwd(x, w, b, stride, padding, act, backend, None)
    result["depthwise_conv2d_bwd"] = (ops_.depthwise_conv2d_bwd, (like(out), x, w, b, stride, padding, act))
    _, args = calls["depthwise_conv2d_layernorm_fwd"]
    out = ops_.depthwise_conv2d_layernorm_fwd(*args, backend)
    result["depthwise_conv2d_layernorm_bwd"] = (ops_.depthwise_conv2d_layernorm_bwd, (like(out),) + args)
    _, args = calls["hff_spatial_attention_train"]
    y, _, _, pooled, argmax = ops_.hff_spatial_attention_fwd(*args, backend, False)
    result["hff_spatial_attention_bwd"] = (ops_.hff_spatial_attention_bwd, (like(y), pooled, argmax) + args)
    _, args = calls["hff_channel_attention_fwd"]
    y, pooled, argmax = ops_.hff_channel_attention_fwd(*args, backend, False)
    result["hff_channel_attention_bwd"] = (ops_.hff_channel_attention_bwd, (like(y), pooled, argmax) + args)
    _, args = calls["hff_attention_tail_fwd_train"]
    out, *saved = ops_.hff_attention_tail_fwd(*args, backend)
    result["hff_attention_tail_bwd"] = (ops_.hff_attention_tail_bwd, (like(out), saved[2:]) + args)
    _, args = calls["selective_scan_fwd"]
    out = ops_.selective_scan_fwd(*args, backend)
    result["selective_scan_bwd"] = (ops_.selective_scan_bwd, (like(out[0]), None) + args)
    _, args = calls["ss2d_scan_fwd"]
    out = ops_.ss2d_scan_fwd(*args, backend)
    result["ss2d_scan_bwd"] = (ops_.ss2d_scan_bwd, (like(out),) + args)
    return result


# arguments after the backend; the schemas have no defaults (see medkernels/ops/hff_attention.py)
TRAILING = {"depthwise_conv2d_fwd": (None,), "hff_spatial_attention_eval": (False,), "hff_channel_attention_fwd": (False,),
            "hff_spatial_attention_bwd": (False,), "hff_channel_attention_bwd": (False,)}


# the HFF forward ops and the depthwise conv in other layouts have their opcheck in kernels/test_hff_attention_kernels.py and
# kernels/test_depthwise_conv2d_kernels.py; here they only feed the backward ops below
FORWARD_CHECKED_HERE = ["selective_scan_fwd", "ss2d_scan_fwd", "cross_scan", "cross_merge", "depthwise_conv2d_fwd",
                        "depthwise_conv2d_layernorm_fwd_channels_last", "hff_spatial_attention_eval",
                        "hff_channel_attention_fwd"]


@pytest.mark.parametrize("name", FORWARD_CHECKED_HERE)
def test_opcheck(cpu_backend, name):
    op, args = _sample_calls()[name]
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.dim() > 1 else a for a in args)
    torch.library.opcheck(op, args + (cpu_backend,) + TRAILING.get(name, ()))


@pytest.mark.parametrize("name", ["depthwise_conv2d_bwd", "depthwise_conv2d_layernorm_bwd", "hff_spatial_attention_bwd",
                                  "hff_channel_attention_bwd", "hff_attention_tail_bwd",
                                  "selective_scan_bwd", "ss2d_scan_bwd"])
def test_opcheck_backward_ops(cpu_backend, name):
    if cpu_backend == "ref":
        # the reference backward runs torch.func.vjp inside the op; opcheck's checking modes cannot look into its
        # wrapped tensors ("Cannot access storage of TensorWrapper", or an interpreter crash), so the backward ops'
        # schemas and fake kernels are checked on the kernel backends, which implement the same contract
        pytest.skip("opcheck cannot trace torch.func inside the reference backward")
    op, args = _backward_calls(cpu_backend)[name]
    torch.library.opcheck(op, args + (cpu_backend,) + TRAILING.get(name, ()))


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
