"""Benchmarks of the selective scan and the fused SS2D scan at MedMamba-T's stage-1 shapes.

Providers are measured side by side in one run: each medkernels backend that runs on the device (``ref`` is
the plain PyTorch loop), and on CPU mambapy's pure-PyTorch parallel scan (``mambapy.pscan``, optional).
Each row carries its error against the reference on the same inputs. Peak memory (CPU) is the growth of
the resident set of a fresh child process over one forward+backward call.
"""
import argparse
import contextlib
import json
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F

from . import _backend, ops

# MedMamba-T stage 1 at 224x224: SS2D's scan runs on (batch, 4 * 96, 56 * 56) with N = 16 and B, C
# grouped by direction (G = 4), delta_bias, softplus and D.
SCAN_SHAPE = {"batch": 2, "dim": 384, "L": 3136, "N": 16, "G": 4}
SS2D_SHAPE = {"batch": 2, "dim": 96, "H": 56, "W": 56, "N": 16}
REF_BACKWARD_LIMIT = 200_000  # batch * dim * L above which the loop reference's autograd backward is not run


def scan_inputs(device, batch, dim, L, N, G, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {
        "u": torch.randn(batch, dim, L, generator=g),
        "delta": 0.5 * torch.randn(batch, dim, L, generator=g),
        "A": -torch.exp(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand(dim, N)
                        + 0.1 * torch.randn(dim, N, generator=g)),
        "B": torch.randn(batch, G, N, L, generator=g),
        "C": torch.randn(batch, G, N, L, generator=g),
        "D": 1 + 0.1 * torch.randn(dim, generator=g),
        "delta_bias": 0.1 * torch.randn(dim, generator=g),
    }
    return {k: v.to(device) for k, v in t.items()}


def mambapy_scan(u, delta, A, B, C, D, delta_bias):
    """The same scan through mambapy's parallel (Blelloch) scan: the best pure-PyTorch CPU alternative."""
    from mambapy.pscan import pscan

    dim = u.shape[1]
    dt = F.softplus(delta + delta_bias[:, None]).transpose(1, 2)  # (b, L, d)
    per_channel = lambda M: M.repeat_interleave(dim // M.shape[1], dim=1).permute(0, 3, 1, 2)  # noqa: E731
    decay = torch.exp(dt.unsqueeze(-1) * A)  # (b, L, d, N)
    drive = dt.unsqueeze(-1) * per_channel(B) * u.transpose(1, 2).unsqueeze(-1)
    hs = pscan(decay, drive)
    y = (hs * per_channel(C)).sum(-1) + D * u.transpose(1, 2)
    return y.transpose(1, 2)


def mamba_ssm_scan(u, delta, A, B, C, D, delta_bias):
    """mamba_ssm's CUDA selective_scan_fn (the GPU peer), grouped B/C as medkernels takes them."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn(u, delta, A, B, C, D, None, delta_bias, delta_softplus=True)


@contextlib.contextmanager
def _triton_forward_method(name):
    from .kernels import selective_scan as triton_scan

    previous = triton_scan.set_forward_method(name)
    try:
        yield
    finally:
        triton_scan.set_forward_method(previous)


def _scan_call(provider, t):
    if provider == "mambapy":
        return mambapy_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["delta_bias"])
    if provider == "mamba_ssm":
        return mamba_ssm_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["delta_bias"])
    if provider == "triton-assoc":  # the Triton backend with its associative-scan forward walk
        with _triton_forward_method("assoc"), _backend.use_backend("triton"):
            return ops.selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"],
                                      delta_bias=t["delta_bias"], delta_softplus=True)
    with _backend.use_backend(provider):
        return ops.selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], delta_bias=t["delta_bias"],
                                  delta_softplus=True)


def _with_grad(t):
    return {k: v.detach().clone().requires_grad_(True) for k, v in t.items()}


def _fwd_bwd(provider, t, grad):
    out = _scan_call(provider, t)
    out.backward(grad)
    return out


def scan_providers(device):
    from .bench import _backends_for

    providers = _backends_for(device)
    if device.type == "cpu":
        try:
            import mambapy.pscan  # noqa: F401

            providers.append("mambapy")
        except ImportError:
            pass
    if device.type == "cuda":
        if "triton" in providers:
            providers.append("triton-assoc")
        try:
            import mamba_ssm.ops.selective_scan_interface  # noqa: F401

            providers.append("mamba_ssm")
        except ImportError:
            pass
    return providers


def peak_memory_mb(provider, shape):
    """Resident-set growth (MB) of a fresh process over one forward+backward of `provider` at `shape`."""
    code = (
        "import json, sys; from medkernels.bench_scan import _child_peak; "
        f"print(json.dumps(_child_peak({provider!r}, {shape!r})))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"peak-memory child for {provider} failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _high_water_kb():
    # VmHWM is this process's own peak; ru_maxrss would carry the parent's peak across fork and exec.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child_peak(provider, shape):
    t = _with_grad(scan_inputs(torch.device("cpu"), **shape))
    grad = torch.ones(shape["batch"], shape["dim"], shape["L"])
    before = _high_water_kb()
    _fwd_bwd(provider, t, grad)
    return (_high_water_kb() - before) / 1024.0


def bench_selective_scan(device, time_call, warmup, repeats, shape=SCAN_SHAPE, memory=True):
    t = scan_inputs(device, **shape)
    providers = scan_providers(device)
    rows = []
    with torch.no_grad():
        reference = _scan_call("ref", t).double()
    big = shape["batch"] * shape["dim"] * shape["L"] > REF_BACKWARD_LIMIT
    grad = torch.randn(shape["batch"], shape["dim"], shape["L"], generator=torch.Generator().manual_seed(1)).to(device)
    grads = {}
    for provider in providers:
        with torch.no_grad():
            err = float((_scan_call(provider, t).double() - reference).abs().max())
            stats = time_call(lambda: _scan_call(provider, t), device, warmup, repeats)
        rows.append({"op": "selective_scan", "pass": "forward", "provider": provider, "max_abs_err_vs_ref": err, **stats})
        if provider == "ref" and big:
            continue  # its autograd backward through an L-step loop takes many minutes at this size
        tg = _with_grad(t)
        _fwd_bwd(provider, tg, grad)
        grads[provider] = tg["u"].grad.double()
        stats = time_call(lambda: _fwd_bwd(provider, _with_grad(t), grad), device, warmup, repeats)
        row = {"op": "selective_scan", "pass": "forward+backward", "provider": provider, **stats}
        if memory and device.type == "cpu":
            row["peak_mem_mb"] = peak_memory_mb(provider, shape)
        rows.append(row)
    # gradients against an autograd-exact pure-PyTorch provider at the same size
    exact = grads.get("ref", grads.get("mambapy"))
    for row in rows:
        if row["pass"] == "forward+backward" and exact is not None:
            row["max_abs_grad_u_err"] = float((grads[row["provider"]] - exact).abs().max())
    _ratios(rows, "forward", "ref")
    _ratios(rows, "forward+backward", "mambapy" if "mambapy" in providers else "ref")
    for row in rows:
        row["shape"] = dict(shape)
    return rows


def _ratios(rows, pass_name, baseline):
    base = next((r for r in rows if r["pass"] == pass_name and r["provider"] == baseline), None)
    for r in rows:
        if r["pass"] == pass_name and base is not None:
            r["baseline"] = baseline
            r["speedup"] = base["median_s"] / r["median_s"]
            if "peak_mem_mb" in r and "peak_mem_mb" in base and base["peak_mem_mb"] > 0:
                r["mem_ratio"] = r["peak_mem_mb"] / base["peak_mem_mb"]


def ss2d_inputs(device, batch, dim, H, W, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {
        "u": torch.randn(batch, dim, H, W, generator=g),
        "delta": 0.5 * torch.randn(batch, 4, dim, H, W, generator=g),
        "A": -torch.exp(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand(4 * dim, N)),
        "B": torch.randn(batch, 4, N, H, W, generator=g),
        "C": torch.randn(batch, 4, N, H, W, generator=g),
        "D": torch.ones(4 * dim),
        "delta_bias": 0.1 * torch.randn(4 * dim, generator=g),
    }
    return {k: v.to(device) for k, v in t.items()}


def _unfused_ss2d(t):
    """What SS2D does without the fused op: materialise the four scan orders, scan, merge back."""
    b, dim, h, w = t["u"].shape
    in_order = lambda x: torch.stack([ops.cross_scan(x[:, k])[:, k] for k in range(4)], 1)  # noqa: E731
    y = ops.selective_scan(ops.cross_scan(t["u"]).reshape(b, 4 * dim, h * w), in_order(t["delta"]).reshape(b, 4 * dim, h * w),
                           t["A"], in_order(t["B"]), in_order(t["C"]), D=t["D"], delta_bias=t["delta_bias"],
                           delta_softplus=True)
    return ops.cross_merge(y.reshape(b, 4, dim, h, w)).reshape(b, dim, h, w)


def _fused_ss2d(t):
    return ops.ss2d_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], delta_bias=t["delta_bias"])


def bench_ss2d(device, time_call, warmup, repeats, shape=SS2D_SHAPE):
    t = ss2d_inputs(device, **shape)
    rows = []
    for backend in [p for p in scan_providers(device) if p not in ("mambapy", "ref")]:
        with _backend.use_backend(backend), torch.no_grad():
            ref = _fused_ss2d(t)
            for name, fn in (("unfused", _unfused_ss2d), ("fused", _fused_ss2d)):
                err = float((fn(t) - ref).abs().max())
                stats = time_call(lambda: fn(t), device, warmup, repeats)
                rows.append({"op": "ss2d_scan", "pass": "forward", "provider": f"{backend}-{name}",
                             "max_abs_err_vs_fused": err, "shape": dict(shape), **stats})
        base = next(r for r in rows if r["provider"] == f"{backend}-unfused")
        for r in rows:
            if r["provider"].startswith(backend + "-"):
                r["baseline"], r["speedup"] = base["provider"], base["median_s"] / r["median_s"]
    return rows


def format_rows(rows):
    header = (f"{'op':15s} {'pass':17s} {'provider':16s} {'median ms':>10s} {'spread ms':>17s} {'speed-up':>18s} "
              f"{'peak MB':>8s} {'max|err|':>9s}")
    lines = [header, "-" * len(header)]
    for r in rows:
        ratio = f"{r['speedup']:.1f}x vs {r['baseline']}" if "speedup" in r else "-"
        mem = f"{r['peak_mem_mb']:.0f}" if "peak_mem_mb" in r else "-"
        err = r.get("max_abs_err_vs_ref", r.get("max_abs_grad_u_err", r.get("max_abs_err_vs_fused")))
        err = f"{err:.1e}" if err is not None else "-"
        spread = f"{1e3 * r['min_s']:.1f}-{1e3 * r['max_s']:.1f}"
        lines.append(f"{r['op']:15s} {r['pass']:17s} {r['provider']:16s} {1e3 * r['median_s']:10.1f} {spread:>17s} "
                     f"{ratio:>18s} {mem:>8s} {err:>9s}")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="selective scan benchmarks alone")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from .bench import time_call

    result = bench_selective_scan(torch.device(args.device), time_call, 1, 3) + bench_ss2d(torch.device(args.device), time_call, 1, 3)
    print(format_rows(result))
