"""The Triton selective-scan and SS2D kernels called directly (medkernels.kernels.selective_scan / ss2d_scan):
the chunked backward across chunk boundaries, grouped B/C with d last_state, the fused four directions over
more than one chunk, determinism and the argument checks, against float64 fed the same rounded inputs and
cotangents, elementwise (helpers.scan_utils.tolerance).  Runs on a GPU, or on CPU tensors under
TRITON_INTERPRET=1 (tiny shapes: the interpreter is slow)."""
import importlib
import os

import pytest
import torch

from medkernels.ops.selective_scan_ref import selective_scan_ref
from medkernels.ops.ss2d_scan_ref import ss2d_scan_ref

from helpers.scan_utils import assert_close_f64

triton = pytest.importorskip("triton")

if torch.cuda.is_available():
    DEVICE = torch.device("cuda")
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = torch.device("cpu")
else:
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

ss = importlib.import_module("medkernels.kernels.selective_scan")
s2 = importlib.import_module("medkernels.kernels.ss2d_scan")

def _scan_inputs(batch, dim, L, n, groups, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    u = torch.randn(batch, dim, L, generator=g).to(dtype)
    delta = (0.5 * torch.rand(batch, dim, L, generator=g)).to(dtype)
    A = -torch.exp(0.5 * torch.randn(dim, n, generator=g)).to(sdt)
    B = torch.randn(batch, groups, n, L, generator=g).to(dtype)
    C = torch.randn(batch, groups, n, L, generator=g).to(dtype)
    D = torch.randn(dim, generator=g).to(sdt)
    z = torch.randn(batch, dim, L, generator=g).to(dtype)
    bias = (0.3 * torch.randn(dim, generator=g)).to(sdt)
    return [t.to(DEVICE) for t in (u, delta, A, B, C, D, z, bias)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_selective_scan_across_chunks_grouped_with_dlast(dtype):
    # L > CHUNK: the backward recomputes two chunks from the saved boundary state (saved by the forward kernel)
    L = ss.CHUNK + 6
    inputs = _scan_inputs(1, 4, L, 3, 2, dtype)
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(1, 4, L, generator=g).to(dtype).to(DEVICE)
    dlast = torch.randn(1, 4, 3, generator=g).to(DEVICE)
    out, last = ss.selective_scan_fwd(*inputs, True)
    leaves = [t.detach().cpu().double().requires_grad_() for t in inputs]
    exp_out, exp_last = selective_scan_ref(*leaves, True)
    ((exp_out * dout.cpu().double()).sum() + (exp_last * dlast.cpu().double()).sum()).backward()
    assert out.dtype == dtype and last.dtype == torch.float32
    assert_close_f64(out, exp_out, "out")
    assert_close_f64(last, exp_last, "last_state")
    grads = ss.selective_scan_bwd(dout, dlast, *inputs, True)
    for name, grad, leaf, t in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), grads, leaves, inputs):
        assert grad.dtype == t.dtype and grad.shape == t.shape, name
        assert_close_f64(grad, leaf.grad, f"grad of {name}")


def test_selective_scan_absent_optionals_give_none_and_backward_is_deterministic():
    u, delta, A, B, C, _, _, _ = _scan_inputs(2, 8, 9, 4, 1, torch.float32)
    dout = torch.randn_like(u)
    first = ss.selective_scan_bwd(dout, None, u, delta, A, B, C, None, None, None, False)
    second = ss.selective_scan_bwd(dout, None, u, delta, A, B, C, None, None, None, False)
    assert first[5] is None and first[6] is None and first[7] is None
    for a, b in zip(first[:5], second[:5]):
        assert torch.equal(a, b)


def test_selective_scan_empty_sequence():
    u, delta, A, B, C, D, z, bias = _scan_inputs(2, 3, 0, 2, 1, torch.float32)
    out, last = ss.selective_scan_fwd(u, delta, A, B, C, D, z, bias, True)
    assert out.shape == (2, 3, 0) and torch.equal(last, torch.zeros(2, 3, 2, device=DEVICE))


def _ss2d_inputs(batch, dim, h, w, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    u = torch.randn(batch, dim, h, w, generator=g).to(dtype)
    delta = (0.5 * torch.rand(batch, 4, dim, h, w, generator=g)).to(dtype)
    A = -torch.exp(0.5 * torch.randn(4 * dim, n, generator=g)).to(sdt)
    B = torch.randn(batch, 4, n, h, w, generator=g).to(dtype)
    C = torch.randn(batch, 4, n, h, w, generator=g).to(dtype)
    D = torch.randn(4 * dim, generator=g).to(sdt)
    bias = (0.3 * torch.randn(4 * dim, generator=g)).to(sdt)
    return [t.to(DEVICE) for t in (u, delta, A, B, C, D, bias)]


def test_ss2d_across_chunks_non_square():
    # 9 x 8 = 72 pixels > CHUNK, H != W so that the column-major directions differ from a transpose of W x H
    inputs = _ss2d_inputs(1, 2, 9, 8, 2, torch.float32)
    dout = torch.randn(1, 2, 72, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    (out,) = s2.ss2d_scan_fwd(*inputs, True)
    leaves = [t.detach().cpu().double().requires_grad_() for t in inputs]
    exp = ss2d_scan_ref(*leaves, True)
    (exp * dout.cpu().double().reshape(exp.shape)).sum().backward()
    assert out.shape == (1, 2, 72) and out.dtype == torch.float32
    assert_close_f64(out.reshape(exp.shape), exp, "out")
    grads = s2.ss2d_scan_bwd(dout, *inputs, True)
    for name, grad, leaf, t in zip(("u", "delta", "A", "B", "C", "D", "delta_bias"), grads, leaves, inputs):
        assert grad.dtype == t.dtype and grad.shape == t.shape, name
        assert_close_f64(grad, leaf.grad, f"grad of {name}")


@pytest.mark.parametrize("case", ["A-dtype", "u-layout", "B-shape", "z-dtype"])
def test_bad_arguments_raise_naming_them(case):
    u, delta, A, B, C, D, z, bias = _scan_inputs(1, 4, 5, 2, 1, torch.float32)
    if case == "A-dtype":
        A, err, name = A.double(), TypeError, "A"
    elif case == "u-layout":
        u, err, name = u.transpose(1, 2).contiguous().transpose(1, 2), ValueError, "u"
    elif case == "B-shape":
        B, err, name = B[..., :4].contiguous(), ValueError, "B"
    else:
        z, err, name = z.half(), TypeError, "z"
    with pytest.raises(err, match=rf"\b{name}\b"):
        ss.selective_scan_fwd(u, delta, A, B, C, D, z, bias, False)


def test_ss2d_bad_arguments_raise_naming_them():
    u, delta, A, B, C, D, bias = _ss2d_inputs(1, 2, 2, 3, 2, torch.float32)
    with pytest.raises(ValueError, match=r"\bdelta\b"):
        s2.ss2d_scan_fwd(u, delta[:, :3].contiguous(), A, B, C, D, bias, True)
    with pytest.raises(TypeError, match=r"\bD\b"):
        s2.ss2d_scan_fwd(u, delta, A, B, C, D.half(), bias, True)


