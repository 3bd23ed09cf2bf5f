"""Call every medkernels GPU kernel forward and backward once at small, odd sizes, for compute-sanitizer.

    compute-sanitizer --tool memcheck python benchmarks/gpu_sanitize.py --backend cuda
    compute-sanitizer --tool racecheck python benchmarks/gpu_sanitize.py --backend cuda

Each op's output and input gradients are also compared with the ``ref`` backend in float64, so a run that the
sanitizer passes still fails (exit status 1) when a kernel computes the wrong thing. Prints one line per op.
"""
import argparse
import sys

import torch

import medkernels
from medkernels import ops

DEVICE = "cuda"


def _rand(*shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).to(DEVICE).requires_grad_()


def _cases(dtype):
    b, d, n, h, w = 2, 6, 5, 5, 7
    L = h * w
    c, hs = 10, 3  # HFF width and MLP hidden size
    yield "selective_scan", lambda t: ops.selective_scan(*t, delta_softplus=True), [
        _rand(b, d, L, dtype=dtype), _rand(b, d, L, scale=0.5, dtype=dtype), -_rand(d, n, dtype=torch.float32).abs(),
        _rand(b, 2, n, L, dtype=dtype), _rand(b, 2, n, L, dtype=dtype), _rand(d), _rand(b, d, L, dtype=dtype),
        _rand(d, scale=0.1)]
    yield "ss2d_scan", lambda t: ops.ss2d_scan(*t), [
        _rand(b, d, h, w, dtype=dtype), _rand(b, 4, d, h, w, scale=0.5, dtype=dtype),
        -_rand(4 * d, n).abs(), _rand(b, 4, n, h, w, dtype=dtype), _rand(b, 4, n, h, w, dtype=dtype),
        _rand(4 * d), _rand(4 * d, scale=0.1)]
    yield "cross_scan", lambda t: ops.cross_scan(*t), [_rand(b, d, h, w, dtype=dtype)]
    yield "cross_merge", lambda t: ops.cross_merge(*t), [_rand(b, 4, d, h, w, dtype=dtype)]
    for act in (None, "silu"):
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = _rand(b, d, h, w, dtype=dtype).detach().contiguous(memory_format=fmt).requires_grad_()
            yield f"depthwise_conv2d[{act},{'cl' if fmt is torch.channels_last else 'nchw'}]", \
                lambda t, act=act: ops.depthwise_conv2d(*t, activation=act), [x, _rand(d, 1, 3, 3, dtype=dtype),
                                                                              _rand(d, dtype=dtype)]
    yield "depthwise_conv2d[k7,s2]", lambda t: ops.depthwise_conv2d(*t, stride=2), [
        _rand(b, d, 9, 11, dtype=dtype), _rand(d, 1, 7, 7, dtype=dtype)]
    yield "depthwise_conv2d_layernorm", lambda t: ops.depthwise_conv2d_layernorm(*t), [
        _rand(b, d, h, w, dtype=dtype), _rand(d, 1, 3, 3, dtype=dtype), _rand(d, dtype=dtype),
        _rand(d, dtype=dtype), _rand(d, dtype=dtype)]
    spatial = lambda: [_rand(1, 2, 7, 7, scale=0.2, dtype=dtype), _rand(1, dtype=dtype), _rand(1, dtype=dtype)]  # noqa: E731
    yield "hff_spatial_attention", lambda t: ops.hff_spatial_attention(*t, None, None, True), [
        _rand(b, c, h, w, dtype=dtype), *spatial()]
    yield "hff_channel_attention", lambda t: ops.hff_channel_attention(*t), [
        _rand(b, c, h, w, dtype=dtype), _rand(hs, c, scale=0.3, dtype=dtype), _rand(c, hs, scale=0.3, dtype=dtype)]
    yield "hff_attention_tail", lambda t: ops.hff_attention_tail(
        t[0], t[1], t[2], t[3], t[4], t[5], None, None, True, t[6], t[7], t[8], t[9]), [
        _rand(b, c, h, w, dtype=dtype), _rand(b, c, h, w, dtype=dtype), _rand(b, c, h, w, dtype=dtype), *spatial(),
        _rand(hs, c, scale=0.3, dtype=dtype), _rand(c, hs, scale=0.3, dtype=dtype), _rand(3 * c, dtype=dtype),
        _rand(3 * c, dtype=dtype)]


def _run(fn, inputs, backend):
    with medkernels.use_backend(backend):
        out = fn(inputs)
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.device, out.dtype))
    if out.is_cuda:
        torch.cuda.synchronize()
    return out, grads


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cuda", choices=["cuda", "triton", "cpu"], help="cpu: a dry run of this script on CPU tensors")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    global DEVICE
    DEVICE = "cpu" if args.backend == "cpu" else "cuda"
    dtype = getattr(torch, args.dtype)
    tol = {"float32": 2e-4, "float16": 2e-2, "bfloat16": 8e-2}[args.dtype]
    torch.manual_seed(0)
    failures = 0
    for name, fn, inputs in _cases(dtype):
        out, grads = _run(fn, inputs, args.backend)
        ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
        ref_out, ref_grads = _run(fn, ref_inputs, "ref")
        errs = [((a.double() - r).norm() / r.norm().clamp_min(1e-30)).item()
                for a, r in zip([out, *grads], [ref_out, *ref_grads])]
        ok = all(e <= tol for e in errs)  # NaN fails too
        failures += not ok
        print(f"{name:34s} {args.backend:6s} {args.dtype:8s} max rel err {max(errs):.2e} {'ok' if ok else 'FAIL'}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
