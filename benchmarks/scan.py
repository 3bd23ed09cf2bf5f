"""Benchmarks of the selective scan, the fused SS2D scan and the cross-scan at MedMamba-T's stage shapes.

Providers, side by side in one run: ``ref`` (the op's pure-PyTorch reference, eager), each medkernels
backend that runs on the device, ``ref-compiled`` (``torch.compile`` of the reference, where that is
workable, see ``compile_skip_reason``), on CPU mambapy's parallel scan (``mambapy.pscan``, optional) and on
GPU mamba_ssm's ``selective_scan_fn`` (when installed). SS2D also has each backend's unfused path
(cross_scan + selective_scan + cross_merge).
"""
import torch
import torch.nn.functional as F

from medkernels import ops
from medkernels.ops.cross_scan_ref import cross_merge_ref, cross_scan_ref, direction_order
from medkernels.ops.selective_scan_ref import selective_scan_ref
from medkernels.ops.ss2d_scan_ref import ss2d_scan_ref

from .common import compiled, importable, kernel_backends, on_backend
from .op import FWD_BWD, Case, forward_backward, run_op_bench, status_row
from .timing import QUICK_ROW_BUDGET_S, child_peak_mb, cuda_peak_mb

# MedMamba-T at 224x224, per stage: (stage, d_inner of its SS2D, feature map side). SS2D's d_inner is the
# stage's dim (half the channels go to SS2D, which expands them by 2); its scan runs on 4 * d_inner channels.
MEDMAMBA_T_STAGES = ((1, 96, 56), (2, 192, 28), (3, 384, 14), (4, 768, 7))
QUICK_STAGES = (1, 4)
BATCH, N, GROUPS = 2, 16, 4

# The reference's autograd backward writes a full (L, batch, dim, N) gradient for every one of its L steps,
# so its cost grows as L^2 * batch * dim * N; above this it takes minutes (CPU) and is not run.
REF_BACKWARD_LIMIT = {"cpu": 4e9, "cuda": 2e12}
# torch.compile unrolls the reference's L-step Python loop; compiling it at L = 49 took over 5 minutes on a
# 2-core CPU, so it is only tried for short sequences, and on CPU only with --full.
COMPILE_MAX_L = 64


def stages(quick):
    return [s for s in MEDMAMBA_T_STAGES if not quick or s[0] in QUICK_STAGES]


def scan_shape(stage, d_inner, side):
    return {"batch": BATCH, "dim": 4 * d_inner, "L": side * side, "N": N, "G": GROUPS}


def ss2d_shape(stage, d_inner, side):
    return {"batch": BATCH, "dim": d_inner, "H": side, "W": side, "N": N}


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


def mambapy_scan(u, delta, A, B, C, D, delta_bias):
    """The selective scan through mambapy's parallel (Blelloch) scan: the best pure-PyTorch CPU alternative."""
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


def _scan_args(t):
    return t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["delta_bias"]


def _op_scan(t):
    return ops.selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], delta_bias=t["delta_bias"],
                              delta_softplus=True)


def _ref_scan(t):
    return selective_scan_ref(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], None, t["delta_bias"], True)[0]


def _external(device):
    """The non-medkernels scan providers for `device`: name -> reason it cannot run (None when it can)."""
    if device.type == "cpu":
        return {"mambapy": None if importable("mambapy.pscan") else
                "mambapy is not installed (pip install -r requirements-bench.txt)"}
    return {"mamba_ssm": None if importable("mamba_ssm.ops.selective_scan_interface") else
            "mamba_ssm is not installed"}


def compile_skip_reason(device, quick, L):
    if device.type == "cpu" and quick:
        return ("skipped: --quick on CPU; inductor unrolls the reference's L-step loop and compiling it takes "
                "minutes (run --full)")
    if L > COMPILE_MAX_L:
        return f"skipped: L = {L} > {COMPILE_MAX_L}; inductor unrolls the reference's L-step loop (minutes to compile)"
    return None


def ref_backward_skip_reason(device, batch, dim, L, N):
    cost = float(L) * L * batch * dim * N
    if cost > REF_BACKWARD_LIMIT.get(device.type, REF_BACKWARD_LIMIT["cpu"]):
        return (f"skipped: the reference's autograd backward writes an (L, batch, dim, N) gradient per step "
                f"(~{4 * cost / 1e12:.1f} TB at L = {L}); baseline falls back to the next provider")
    return None


def _not_run(t):
    raise RuntimeError("this provider is skipped and never called")


def _skips(providers, device, L, compile_reason, ref_bwd_reason, external):
    """{(provider, pass): reason} for the pairs not run; unavailable external providers get a placeholder."""
    skip = {}
    for name, reason in external.items():
        if reason:
            providers[name] = _not_run
            skip[(name, "forward")] = skip[(name, FWD_BWD)] = "skipped: " + reason
    if compile_reason:
        skip[("ref-compiled", "forward")] = skip[("ref-compiled", FWD_BWD)] = compile_reason
    if ref_bwd_reason:
        skip[("ref", FWD_BWD)] = ref_bwd_reason
    return skip


def _memory(op, shape, device):
    """Peak memory of one forward+backward: a child process's resident-set growth on CPU, the allocator
    peak on GPU. Not measured for compiled providers on CPU (the child would have to compile again)."""

    def measure(name, call):
        if device.type == "cuda":
            return cuda_peak_mb(call, device)
        if name.endswith("-compiled"):
            return None
        return child_peak_mb("benchmarks.scan:memory_step", {"op": op, "provider": name, "shape": shape})

    return measure


def scan_providers(device):
    providers = {"ref": on_backend("ref", _op_scan), "ref-compiled": compiled(_ref_scan)}
    for backend in kernel_backends(device):
        providers[backend] = on_backend(backend, _op_scan)
    for name, reason in _external(device).items():
        if reason is None:
            providers[name] = (lambda t: mambapy_scan(*_scan_args(t))) if name == "mambapy" else \
                (lambda t: mamba_ssm_scan(*_scan_args(t)))
    return providers


def _in_scan_order(x):
    """(b, 4, c, H, W), slice k in pixel order -> (b, 4, c, H*W), slice k in direction k's scan order."""
    return torch.stack([direction_order(x[:, k], k) for k in range(4)], 1)


def _unfused_ss2d(t):
    """SS2D without the fused op: materialise the four scan orders, scan, merge back (the per-direction
    delta, B, C come in pixel order, as SS2D computes them, and are put in scan order in PyTorch)."""
    b, dim, h, w = t["u"].shape
    y = ops.selective_scan(ops.cross_scan(t["u"]).reshape(b, 4 * dim, h * w),
                           _in_scan_order(t["delta"]).reshape(b, 4 * dim, h * w), t["A"], _in_scan_order(t["B"]),
                           _in_scan_order(t["C"]), D=t["D"], delta_bias=t["delta_bias"], delta_softplus=True)
    return ops.cross_merge(y.reshape(b, 4, dim, h, w)).reshape(b, dim, h, w)


def _fused_ss2d(t):
    return ops.ss2d_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], delta_bias=t["delta_bias"])


def _ref_ss2d(t):
    return ss2d_scan_ref(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["delta_bias"], True)


def _external_ss2d(scan):
    """The official SS2D formulation around another scan: PyTorch cross-scan, the scan, PyTorch merge."""

    def call(t):
        b, dim, h, w = t["u"].shape
        y = scan(cross_scan_ref(t["u"]).reshape(b, 4 * dim, h * w), _in_scan_order(t["delta"]).reshape(b, 4 * dim, h * w),
                 t["A"], _in_scan_order(t["B"]), _in_scan_order(t["C"]), t["D"], t["delta_bias"])
        return cross_merge_ref(y.reshape(b, 4, dim, h, w)).reshape(b, dim, h, w)

    return call


def ss2d_providers(device):
    providers = {"ref": on_backend("ref", _fused_ss2d), "ref-compiled": compiled(_ref_ss2d)}
    for backend in kernel_backends(device):
        providers[backend] = on_backend(backend, _fused_ss2d)
        providers[f"{backend}-unfused"] = on_backend(backend, _unfused_ss2d)
    for name, reason in _external(device).items():
        if reason is None:
            providers[name] = _external_ss2d(mambapy_scan if name == "mambapy" else mamba_ssm_scan)
    return providers


def cross_scan_providers(device):
    providers = {"ref": on_backend("ref", lambda t: ops.cross_scan(t["x"])),
                 "ref-compiled": compiled(lambda t: cross_scan_ref(t["x"]))}
    for backend in kernel_backends(device):
        providers[backend] = on_backend(backend, lambda t: ops.cross_scan(t["x"]))
    return providers


def memory_step(op, provider, shape):
    """The child side of a CPU peak-memory measurement: inputs built, one forward+backward returned."""
    device = torch.device("cpu")
    make = {"selective_scan": (scan_providers, scan_inputs), "ss2d_scan": (ss2d_providers, ss2d_inputs),
            "cross_scan": (cross_scan_providers, cross_inputs)}[op]
    fn, inputs = make[0](device)[provider], make[1](device, **shape)
    with torch.no_grad():
        grad = torch.randn_like(fn(inputs))
    return lambda: forward_backward(fn, inputs, grad)


def cross_shape(stage, d_inner, side):
    return {"batch": BATCH, "dim": d_inner, "H": side, "W": side}


def cross_inputs(device, batch, dim, H, W):
    return {"x": torch.randn(batch, dim, H, W, generator=torch.Generator().manual_seed(0)).to(device)}


QUICK_SS2D_MAMBAPY_NOTE = "skipped: --quick (mambapy's scan is timed in the selective_scan rows; --full times it here)"


def _run_stages(op, make_shape, make_inputs, make_providers, device, time_call, warmup, repeats, quick, memory,
                shapes, ref_bwd, compile_reason):
    rows = []
    for i, stage in enumerate(shapes if shapes is not None else stages(quick)):
        shape = make_shape(*stage) if isinstance(stage, tuple) else dict(stage)
        label = (f"stage {stage[0]}: " if isinstance(stage, tuple) else "") + " ".join(f"{k}={v}" for k, v in shape.items())
        providers = make_providers(device)
        L = shape.get("L", shape.get("H", 1) * shape.get("W", 1))
        external = _external(device) if op != "cross_scan" else {}
        skip = _skips(providers, device, L, compile_reason(L), ref_bwd(shape), external)
        if op == "ss2d_scan" and quick and "mambapy" in providers and ("mambapy", "forward") not in skip:
            skip[("mambapy", "forward")] = skip[("mambapy", FWD_BWD)] = QUICK_SS2D_MAMBAPY_NOTE
        try:
            inputs = make_inputs(device, **shape)
        except Exception as exc:  # e.g. out of memory at a full-size shape
            rows += [status_row(op, p, name, shape, "failed", f"inputs: {exc}", label)
                     for p in ("forward", FWD_BWD) for name in providers]
            continue
        # in quick mode peak memory only at the first (largest) shape: on CPU each figure is a fresh process
        mem = _memory(op, shape, device) if memory and (not quick or i == 0) else None
        rows += run_op_bench(op, shape, inputs, providers, device, time_call, warmup, repeats, skip=skip, label=label,
                             baselines=("ref", "mambapy", "mamba_ssm") + tuple(p for p in providers if p.endswith("-unfused")),
                             memory=mem,
                             budget_s=QUICK_ROW_BUDGET_S if quick and device.type == "cpu" else None)
    return rows


def bench_selective_scan(device, time_call, warmup, repeats, quick=True, shapes=None, memory=True):
    device = torch.device(device)
    return _run_stages("selective_scan", scan_shape, scan_inputs, scan_providers, device, time_call, warmup,
                       repeats, quick, memory, shapes,
                       lambda s: ref_backward_skip_reason(device, s["batch"], s["dim"], s["L"], s["N"]),
                       lambda L: compile_skip_reason(device, quick, L))


def bench_ss2d(device, time_call, warmup, repeats, quick=True, shapes=None, memory=True):
    device = torch.device(device)
    return _run_stages("ss2d_scan", ss2d_shape, ss2d_inputs, ss2d_providers, device, time_call, warmup, repeats,
                       quick, memory, shapes,
                       lambda s: ref_backward_skip_reason(device, s["batch"], 4 * s["dim"], s["H"] * s["W"], s["N"]),
                       lambda L: compile_skip_reason(device, quick, L))


def bench_cross_scan(device, time_call, warmup, repeats, quick=True, shapes=None, memory=False):
    device = torch.device(device)
    return _run_stages("cross_scan", cross_shape, cross_inputs, cross_scan_providers, device, time_call, warmup,
                       repeats, quick, memory, shapes, lambda s: None, lambda L: None)


# the pytest-benchmark cases (registry.OPS): the CLI's shapes, providers and skip rules, one Case per stage


def _stage_case(op, stage, make_shape, make_inputs, make_providers, device, quick, ref_bwd):
    shape = make_shape(*stage)
    providers = make_providers(device)
    L = shape.get("L", shape.get("H", 1) * shape.get("W", 1))
    external = _external(device) if op != "cross_scan" else {}
    skip = _skips(providers, device, L, compile_skip_reason(device, quick, L) if op != "cross_scan" else None,
                  ref_bwd(shape), external)
    return Case(op, f"stage{stage[0]}", lambda: make_inputs(device, **shape), providers, skip)


def _selected(stages):
    return [s for s in MEDMAMBA_T_STAGES if s[0] in stages]


def selective_scan_cases(device, stages, quick):
    device = torch.device(device)
    return [_stage_case("selective_scan", st, scan_shape, scan_inputs, scan_providers, device, quick,
                        lambda s: ref_backward_skip_reason(device, s["batch"], s["dim"], s["L"], s["N"]))
            for st in _selected(stages)]


def ss2d_cases(device, stages, quick):
    device = torch.device(device)
    return [_stage_case("ss2d_scan", st, ss2d_shape, ss2d_inputs, ss2d_providers, device, quick,
                        lambda s: ref_backward_skip_reason(device, s["batch"], 4 * s["dim"], s["H"] * s["W"], s["N"]))
            for st in _selected(stages)]


def cross_scan_cases(device, stages, quick):
    device = torch.device(device)
    return [_stage_case("cross_scan", st, cross_shape, cross_inputs, cross_scan_providers, device, quick,
                        lambda s: None) for st in _selected(stages)]
