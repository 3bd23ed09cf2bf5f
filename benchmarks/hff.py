"""Benchmarks of HiFuse's HFF attention and fusion tail, and of the whole HFF block.

"The fused attention + tail" is what medkernels' fused ops replace in HFFBlock: the spatial attention on the
local feature l, the channel attention on the global feature g, the concatenation with the fused feature x_f
and the channels-first LayerNorm (norm3), in training mode (the spatial BatchNorm on batch statistics,
updating its running ones). Providers, side by side in one run, on the same inputs and timed interleaved (one
call of each per round, timing.time_interleaved):

* ``eager``: the same computation in plain eager PyTorch as the official HiFuse code writes it (the baseline);
* ``ref``, ``cpu``, ``cuda``, ``triton``: medkernels' ``hff_attention_tail`` (the spatial and channel gates
  and the fusion tail in one op) on that backend (``ref`` being its pure-PyTorch reference);
* ``compile`` (CUDA): ``torch.compile`` of the eager computation.

Shapes: HiFuse-T's four HFF scales (ch_1 = ch_2 = ch_int = C: 96 at 56x56 down to 768 at 7x7, r = 16), batch 8
in float32 on CPU, batch 64 in float16 and bfloat16 on CUDA. Each row has its speed-up over ``eager`` and its
largest difference from ``ref`` (the output for the forward, the input gradients for forward+backward).
The whole ``HFFBlock`` (its IRMLP included) is timed too: once in quick mode, at every scale otherwise.
"""
import copy

import torch
import torch.nn.functional as F

from medkernels import _backend, ops

from .common import backends_for
from .op import Case
from .timing import time_interleaved

SCALES = ((96, 56), (192, 28), (384, 14), (768, 7))
REDUCTION = 16


def _gpu_dtypes(device):
    return (torch.float16, torch.bfloat16) if device.type == "cuda" else (torch.float32,)


def attention_tail_inputs(device, dtype, batch, channels, size, seed=0):
    """The HFF block's operands of the attention + tail: features, spatial conv/BN, SE weights, norm3."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    c, hidden = channels, channels // REDUCTION
    return {
        "l": randn(batch, c, size, size), "g": randn(batch, c, size, size), "x_f": randn(batch, c, size, size),
        "conv_weight": randn(1, 2, 7, 7, scale=0.2), "bn_weight": 1 + randn(1, scale=0.1), "bn_bias": randn(1, scale=0.1),
        "fc1_weight": randn(hidden, c, 1, 1, scale=0.1), "fc2_weight": randn(c, hidden, 1, 1, scale=0.1),
        "ln_weight": 1 + randn(3 * c, scale=0.1), "ln_bias": randn(3 * c, scale=0.1),
        # buffers: updated in place by the training-mode BatchNorm
        "running_mean": torch.zeros(1, device=device, dtype=dtype), "running_var": torch.ones(1, device=device, dtype=dtype),
    }


def eager_attention_tail(t):
    """The official HFF code's spatial attention, channel attention, concatenation and norm3, eagerly."""
    l, g = t["l"], t["g"]
    pooled = torch.cat([torch.max(l, 1, keepdim=True)[0], torch.mean(l, 1, keepdim=True)], 1)
    s = F.batch_norm(F.conv2d(pooled, t["conv_weight"], padding=3), t["running_mean"], t["running_var"],
                     t["bn_weight"], t["bn_bias"], True, 0.1, 1e-5)
    l = torch.sigmoid(s) * l

    def se(v):
        return F.conv2d(F.relu(F.conv2d(v, t["fc1_weight"])), t["fc2_weight"])

    g = torch.sigmoid(se(F.adaptive_max_pool2d(g, 1)) + se(F.adaptive_avg_pool2d(g, 1))) * g
    x = torch.cat([g, l, t["x_f"]], 1)
    mu = x.mean(1, keepdim=True)
    centred = x - mu
    var = centred.pow(2).mean(1, keepdim=True)
    x = centred / torch.sqrt(var + 1e-6)
    return x * t["ln_weight"][:, None, None] + t["ln_bias"][:, None, None]


def fused_attention_tail(t):
    """The same with medkernels' fused op (on the backend in use)."""
    return ops.hff_attention_tail(t["l"], t["g"], t["x_f"], t["conv_weight"], t["bn_weight"], t["bn_bias"],
                                  t["running_mean"], t["running_var"], True, t["fc1_weight"], t["fc2_weight"],
                                  t["ln_weight"], t["ln_bias"])


_DIFFERENTIABLE = ("l", "g", "x_f", "conv_weight", "bn_weight", "bn_bias", "fc1_weight", "fc2_weight", "ln_weight",
                   "ln_bias")


def _provider_call(provider, compiled):
    """A function of the inputs dict for `provider` (a medkernels backend, "eager" or "compile")."""
    if provider == "eager":
        return eager_attention_tail
    if provider == "compile":
        return compiled

    def call(t):
        with _backend.use_backend(provider):
            return fused_attention_tail(t)

    return call


def _forward_backward(fn, t, grad):
    """One training step's forward and backward; returns the gradients of l, g and x_f."""
    leaves = {k: (v.detach().requires_grad_(True) if k in _DIFFERENTIABLE else v) for k, v in t.items()}
    out = fn(leaves)
    grads = torch.autograd.grad(out, [leaves[k] for k in _DIFFERENTIABLE], grad)
    return grads[:3]


def _max_err(a, b):
    if isinstance(a, (list, tuple)):
        return max(_max_err(x, y) for x, y in zip(a, b))
    return float((a.double() - b.double()).abs().max())


def _ratios(rows, baseline="eager"):
    for row in rows:
        base = next((r for r in rows if r["op"] == row["op"] and r["pass"] == row["pass"] and r["shape"] == row["shape"]
                     and r["provider"] == baseline), None)
        if base is not None:
            row["baseline"], row["speedup"] = baseline, base["median_s"] / row["median_s"]


def hff_providers(device):
    providers = ["eager"] + backends_for(device)
    if device.type == "cuda":
        providers.append("compile")
    return providers


def _bench_attention_tail(device, time_call, warmup, repeats, dtype, batch, channels, size):
    shape = {"batch": batch, "channels": channels, "H": size, "W": size, "dtype": str(dtype).split(".")[-1]}
    t = attention_tail_inputs(device, dtype, batch, channels, size)
    grad = torch.randn(batch, 3 * channels, size, size, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    compiled = torch.compile(eager_attention_tail) if device.type == "cuda" else None
    fns = {provider: _provider_call(provider, compiled) for provider in hff_providers(device)}
    with torch.no_grad():
        outs = {provider: fn(t) for provider, fn in fns.items()}
        fwd = time_interleaved(time_call, device, {p: (lambda fn=fn: fn(t)) for p, fn in fns.items()}, warmup, repeats)
    grads = {provider: _forward_backward(fn, t, grad) for provider, fn in fns.items()}
    both = {p: (lambda fn=fn: _forward_backward(fn, t, grad)) for p, fn in fns.items()}
    fwd_bwd = time_interleaved(time_call, device, both, warmup, repeats)
    rows = []
    for provider in fns:
        rows.append({"op": "hff_attention_tail", "pass": "forward", "provider": provider, "shape": shape,
                     **fwd[provider]})
        rows.append({"op": "hff_attention_tail", "pass": "forward+backward", "provider": provider, "shape": shape,
                     **fwd_bwd[provider]})
    for row in rows:
        got = outs if row["pass"] == "forward" else grads
        row["max_abs_err_vs_ref"] = _max_err(got[row["provider"]], got["ref"])
    return rows


def official_hff_forward(block, l, g, f):
    """HFFBlock's forward as the official HiFuse code writes it, eagerly, with the block's modules."""
    w_local, w_global = block.W_l(l), block.W_g(g)
    w_f = F.avg_pool2d(block.Updim(f), 2, 2)
    x_f = block.gelu(block.W3(block.norm1(torch.cat([w_f, w_local, w_global], 1))))
    pooled = torch.cat([torch.max(l, 1, keepdim=True)[0], torch.mean(l, 1, keepdim=True)], 1)
    l = torch.sigmoid(block.spatial(pooled)) * l
    g = torch.sigmoid(block.se(F.adaptive_max_pool2d(g, 1)) + block.se(F.adaptive_avg_pool2d(g, 1))) * g
    return w_f + block.drop_path(block.residual(block.norm3(torch.cat([g, l, x_f], 1))))


def _bench_block(device, time_call, warmup, repeats, dtype, batch, channels, size):
    from medkernels.nn import HFFBlock

    shape = {"batch": batch, "channels": channels, "H": size, "W": size, "dtype": str(dtype).split(".")[-1]}
    torch.manual_seed(0)
    block = HFFBlock(channels, channels, REDUCTION, channels, channels).to(device=device, dtype=dtype).train()
    gen = torch.Generator().manual_seed(2)
    inputs = [torch.randn(batch, channels, size, size, generator=gen), torch.randn(batch, channels, size, size, generator=gen),
              torch.randn(batch, channels // 2, 2 * size, 2 * size, generator=gen)]
    inputs = [x.to(device=device, dtype=dtype) for x in inputs]
    grad = torch.randn(batch, channels, size, size, generator=gen).to(device=device, dtype=dtype)

    def step_of(provider):
        model = copy.deepcopy(block)

        def step():
            leaves = [x.detach().requires_grad_(True) for x in inputs]
            if provider == "eager":
                out = official_hff_forward(model, *leaves)
            else:
                with _backend.use_backend(provider):
                    out = model(*leaves)
            return torch.autograd.grad(out, leaves + list(model.parameters()), grad, allow_unused=True)[:3]

        return step

    steps = {provider: step_of(provider) for provider in hff_providers(device) if provider != "compile"}
    grads = {provider: step() for provider, step in steps.items()}
    stats = time_interleaved(time_call, device, steps, warmup, repeats)
    rows = [{"op": "hff_block", "pass": "forward+backward", "provider": provider, "shape": shape, **stats[provider]}
            for provider in steps]
    for row in rows:
        row["max_abs_err_vs_ref"] = _max_err(grads[row["provider"]], grads["ref"])
    return rows


def bench_hff(device, time_call, warmup, repeats, quick=True, scales=SCALES, batch=None, dtypes=None):
    """Rows {"op", "pass", "provider", "shape", "max_abs_err_vs_ref", "median_s", "min_s", "max_s", "repeats",
    "baseline", "speedup"}: the fused attention + tail at each (channels, size) of `scales` (HiFuse's four HFF
    scales by default), forward and forward+backward, and the whole HFFBlock forward+backward (at the first
    scale only and with half the repeats when `quick`: it takes seconds a step). `batch` defaults to 8 on CPU,
    64 on CUDA; `dtypes` to float16 and bfloat16 on CUDA, float32 on CPU."""
    batch = batch or (64 if device.type == "cuda" else 8)
    rows = []
    for dtype in dtypes or _gpu_dtypes(device):
        for channels, size in scales:
            rows += _bench_attention_tail(device, time_call, warmup, repeats, dtype, batch, channels, size)
        for channels, size in scales[:1] if quick else scales:
            rows += _bench_block(device, time_call, warmup, max(1, repeats // 2) if quick else repeats, dtype, batch,
                                 channels, size)
    _ratios(rows)
    return rows


def hff_cases(device, stages, quick):
    """The pytest-benchmark cases (registry.OPS): the fused attention + tail at the CLI's scales (stage s: the
    s-th of SCALES), batch and dtypes, with the CLI's providers."""
    device = torch.device(device)
    batch = 64 if device.type == "cuda" else 8
    compiled = torch.compile(eager_attention_tail) if device.type == "cuda" else None
    fns = {provider: _provider_call(provider, compiled) for provider in hff_providers(device)}
    cases = []
    for dtype in _gpu_dtypes(device):
        for stage, (channels, size) in enumerate(SCALES, 1):
            if stage not in stages:
                continue
            dt = str(dtype).split(".")[-1]
            label = f"stage{stage}" + ("" if dt == "float32" else f"-{dt}")
            cases.append(Case("hff_attention_tail", label,
                              lambda dtype=dtype, c=channels, n=size: attention_tail_inputs(device, dtype, batch, c, n),
                              dict(fns), fwd_bwd=_forward_backward))
    return cases
