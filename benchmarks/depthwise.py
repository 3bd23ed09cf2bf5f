"""Benchmarks of the depthwise-convolution kernels at the HiFuse / MedMamba stage shapes, providers side by side.

* ``depthwise_conv2d``: 3x3 + bias + SiLU at (C, H) = (96, 56), (192, 28), (384, 14), (768, 7) — MedMamba-T's SS2D
  convolutions and HiFuse-T's Local-block stages. Layouts: ``channels_last`` in and out, ``nchw`` in and out, and
  ``ss2d``: the channels-last half of SS2D's in_proj output read in place, NCHW written (what the scan reads;
  PyTorch needs a ``permute(...).contiguous()`` copy first).
* ``depthwise_conv2d_layernorm``: HiFuse's Local block, 3x3 + bias then LayerNorm over channels, NCHW in,
  (B, H, W, C) out; PyTorch: conv, permute, ``F.layer_norm``.

Providers: ``pytorch`` (eager PyTorch: ``F.conv2d(groups=C)`` then the activation or permute + LayerNorm — the
baseline of every speed-up), ``ref`` (medkernels' reference backend) and each kernel backend that runs on the
device (``cpu``; ``cuda`` and ``triton`` on a GPU). Batch 8 on CPU, float32; batch 64 on a GPU, channels_last
float16 (and bfloat16 unless ``quick``). ``max_abs_err_vs_ref`` is the largest difference from the ``ref``
provider: of the output for forward rows, of any gradient (x, weight, bias, and the LayerNorm's) for
forward+backward rows.
"""
import torch
import torch.nn.functional as F

from medkernels import _backend, ops

from .common import kernel_backends
from .op import Case
from .timing import time_interleaved

STAGES = ((96, 56), (192, 28), (384, 14), (768, 7))
KERNEL = 3
LN_EPS = 1e-6


def _inputs(op, layout, batch, channels, size, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    if layout == "ss2d":
        x = rnd(batch, size, size, 2 * channels)  # in_proj's output; the conv reads its first half
    else:
        x = rnd(batch, channels, size, size)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    t = {"x": x, "weight": 0.3 * rnd(channels, 1, KERNEL, KERNEL), "bias": 0.1 * rnd(channels)}
    if op == "depthwise_conv2d_layernorm":
        t["ln_weight"] = 1 + 0.1 * rnd(channels)
        t["ln_bias"] = 0.1 * rnd(channels)
        t["grad"] = rnd(batch, size, size, channels)
    else:
        fmt = torch.contiguous_format if layout in ("nchw", "ss2d") else torch.channels_last
        t["grad"] = rnd(batch, channels, size, size).contiguous(memory_format=fmt)
    return t


def _conv_input(t, channels, layout):
    return t["x"][..., :channels].permute(0, 3, 1, 2) if layout == "ss2d" else t["x"]


def _call(op, provider, t, layout):
    """One forward of `provider` on the tensors t (leaves that may require grad)."""
    channels = t["weight"].shape[0]
    x = _conv_input(t, channels, layout)
    if provider == "pytorch":
        if layout == "ss2d":
            x = x.contiguous()
        y = F.conv2d(x, t["weight"], t["bias"], 1, KERNEL // 2, groups=channels)
        if op == "depthwise_conv2d_layernorm":
            return F.layer_norm(y.permute(0, 2, 3, 1), (channels,), t["ln_weight"], t["ln_bias"], LN_EPS)
        return F.silu(y)
    with _backend.use_backend(provider):
        if op == "depthwise_conv2d_layernorm":
            return ops.depthwise_conv2d_layernorm(x, t["weight"], t["bias"], t["ln_weight"], t["ln_bias"], LN_EPS)
        fmt = torch.contiguous_format if layout == "ss2d" else None
        return ops.depthwise_conv2d(x, t["weight"], t["bias"], activation="silu", memory_format=fmt)


def _leaves(t):
    return {k: (v if k == "grad" else v.detach().requires_grad_(True)) for k, v in t.items()}


def _forward_backward(op, provider, t, layout):
    """Forward and backward from fresh leaves; returns the leaves' gradients."""
    leaves = _leaves(t)
    _call(op, provider, leaves, layout).backward(leaves["grad"])
    return [v.grad for k, v in leaves.items() if k != "grad"]


def _max_err(a, b):
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))


def _set_speedups(rows):
    for r in rows:
        base = next((b for b in rows if b["provider"] == "pytorch" and b["op"] == r["op"] and b["pass"] == r["pass"]
                     and b["shape"] == r["shape"]), None)
        if base is not None:
            r["baseline"] = "pytorch"
            r["speedup"] = base["median_s"] / r["median_s"]


def _cases(device, quick):
    """(op, layout, dtype, batch) combinations timed on `device`."""
    if device.type == "cuda":
        dtypes = (torch.float16,) if quick else (torch.float16, torch.bfloat16)
        return [(op, "channels_last", dt, 64) for dt in dtypes
                for op in ("depthwise_conv2d", "depthwise_conv2d_layernorm")]
    layouts = ("channels_last", "ss2d") if quick else ("channels_last", "nchw", "ss2d")
    return ([("depthwise_conv2d", lay, torch.float32, 8) for lay in layouts]
            + [("depthwise_conv2d_layernorm", "nchw", torch.float32, 8)])


def bench_depthwise_conv(device, time_call, warmup, repeats, quick=True):
    """Rows of {"op", "pass", "provider", "shape", "max_abs_err_vs_ref", "median_s", "min_s", "max_s", "repeats",
    "baseline", "speedup"} for every case, stage and provider; `time_call` is timing.time_call. The
    providers of a case and pass are timed interleaved (timing.time_interleaved)."""
    device = torch.device(device)
    providers = ["pytorch", "ref"] + kernel_backends(device)
    rows = []
    for op, layout, dtype, batch in _cases(device, quick):
        for channels, size in STAGES:
            shape = {"batch": batch, "channels": channels, "H": size, "W": size, "k": KERNEL, "layout": layout,
                     "dtype": str(dtype).replace("torch.", ""),
                     "epilogue": "layernorm" if op == "depthwise_conv2d_layernorm" else "silu"}
            t = _inputs(op, layout, batch, channels, size, dtype, device)
            with torch.no_grad():
                reference = _call(op, "ref", t, layout)
                fwd_err = {p: _max_err([_call(op, p, t, layout)], [reference]) for p in providers}

                def forward_only(p):
                    return lambda: _call(op, p, t, layout)

                fwd = time_interleaved(time_call, device, {p: forward_only(p) for p in providers}, warmup, repeats)
            ref_grads = _forward_backward(op, "ref", t, layout)
            bwd_err = {p: _max_err(_forward_backward(op, p, t, layout), ref_grads) for p in providers}

            def both(p):
                return lambda: _forward_backward(op, p, t, layout)

            fwd_bwd = time_interleaved(time_call, device, {p: both(p) for p in providers}, warmup, repeats)
            for provider in providers:
                rows.append({"op": op, "pass": "forward", "provider": provider, "shape": shape,
                             "max_abs_err_vs_ref": fwd_err[provider], **fwd[provider]})
                rows.append({"op": op, "pass": "forward+backward", "provider": provider, "shape": shape,
                             "max_abs_err_vs_ref": bwd_err[provider], **fwd_bwd[provider]})
    _set_speedups(rows)
    return rows


def depthwise_cases(device, stages, quick):
    """The pytest-benchmark cases (registry.OPS): the CLI's cases, stage shapes and providers."""
    device = torch.device(device)
    providers = ["pytorch", "ref"] + kernel_backends(device)
    cases = []
    for op, layout, dtype, batch in _cases(device, quick):
        for stage, (channels, size) in enumerate(STAGES, 1):
            if stage not in stages:
                continue
            dt = str(dtype).replace("torch.", "")
            label = f"stage{stage}-{layout}" + ("" if dt == "float32" else f"-{dt}")
            fns = {p: (lambda t, op=op, p=p, layout=layout: _call(op, p, t, layout)) for p in providers}
            cases.append(Case(op, label, lambda op=op, layout=layout, batch=batch, c=channels, n=size, dtype=dtype:
                              _inputs(op, layout, batch, c, n, dtype, device), fns))
    return cases
