"""Whole-network benchmarks: HiFuse-T and MedMamba-T inference throughput and one training step.

Providers, side by side: ``medkernels`` (the ``auto`` backend, what a user gets), ``ref`` (the same model on
the pure-PyTorch ``ref`` backend), ``ref-compiled`` (``torch.compile`` of the model on ``ref``; the medkernels
ops stay opaque custom ops inside the compiled graph, compile time is the row's ``first_call_s``), and for
MedMamba-T ``mambapy`` (CPU: the official SS2D formulation around mambapy's parallel scan) and ``official``
(GPU: the official SS2D formulation around mamba_ssm's ``selective_scan_fn``, when installed).
A training step is forward, cross-entropy, backward and an AdamW step (``fused=True`` for every provider: on a CPU
PyTorch's default per-parameter loop took 385 ms a step for HiFuse-T's 120M parameters, the fused one 79 ms). The providers of one pass and batch are
timed interleaved (one call of each per round), after each one's first call.

Mixed precision: ``medkernels`` and ``ref`` also run under bfloat16 autocast (``<provider> bf16-autocast``: the
forward and the loss inside ``torch.autocast``, float32 weights) and with the weights cast to bfloat16
(``<provider> bf16-weights``: ``model.to(torch.bfloat16)``, bfloat16 images). Each row's ``rel_err_vs_float32``
is ``||logits - logits_32|| / ||logits_32||`` against the float32 ``ref`` row of its group (where that row cannot
run, the first of ``mambapy``, ``official``, ``medkernels`` that did).
"""
import contextlib
import copy

import torch
import torch.nn.functional as F

from medkernels import _backend

from .common import importable
from .op import _short, max_abs_diff
from .scan import MEDMAMBA_T_STAGES, N, mamba_ssm_scan, mambapy_scan, ref_backward_skip_reason
from .timing import (QUICK_ROW_BUDGET_S, child_peak_mb, cuda_peak_mb, repeats_within, time_interleaved,
                     timed_first_call)

NUM_CLASSES = 7
INFERENCE, TRAIN = "inference", "train step"
FLOAT32, AUTOCAST, HALF_WEIGHTS = "float32", "bf16-autocast", "bf16-weights"

# (device type, quick) -> sizes and batches. "compile" is a bool or the inference batches torch.compile is timed at
# (on a small CPU, compiling a network takes minutes: the quick run compiles once, for the goal batch).
CONFIG = {
    ("cpu", True): {"size": 224, "infer_batches": (1, 8), "train_batch": 4, "compile": (8,),
                    "mambapy_inference": (8,)},
    ("cpu", False): {"size": 224, "infer_batches": (1, 8), "train_batch": 8, "compile": True},
    ("cuda", True): {"size": 224, "infer_batches": (1, 32), "train_batch": 32, "compile": True},
    ("cuda", False): {"size": 224, "infer_batches": (1, 64), "train_batch": 64, "compile": True},
}
QUICK_CPU_COMPILE_NOTE = ("skipped: --quick on CPU compiles only the inference at the goal batch (compiling each "
                          "network takes minutes on a small CPU; run --full)")


def _compiles(cfg, pass_name, batch):
    """Whether the configuration times torch.compile for this pass and batch."""
    chosen = cfg["compile"]
    if isinstance(chosen, bool):
        return chosen
    return pass_name == INFERENCE and batch in tuple(chosen)


def _mambapy_infers(cfg, batch):
    """Whether the configuration times mambapy's inference at this batch (a bool, or the batches)."""
    chosen = cfg.get("mambapy_inference", True)
    return chosen if isinstance(chosen, bool) else batch in tuple(chosen)


OVERRIDES = {}  # the CLI's --batches / --train-batch


def config(device, quick):
    cfg = dict(CONFIG[(torch.device(device).type if torch.device(device).type == "cuda" else "cpu", bool(quick))])
    cfg.update(OVERRIDES)
    return cfg


def build_model(name, device):
    """The network with deterministic weights; drop-path is off so every provider computes the same step."""
    from medkernels import models

    torch.manual_seed(0)
    kwargs = {"drop_path_rate": 0.0} if name.startswith("medmamba") else {}
    return getattr(models, name)(num_classes=NUM_CLASSES, **kwargs).to(device)


def batch_inputs(batch, size, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    return x.to(device), y.to(device)


def _official_forward_core(scan):
    """SS2D.forward_core as the official MedMamba computes it: materialise the four scan orders, project
    each, scan them with `scan`, and merge the four outputs back to row-major order in PyTorch."""
    from medkernels.ops.cross_scan_ref import cross_merge_ref, cross_scan_ref

    def forward_core(self, x):
        b, d, h, w = x.shape
        k, length = self.K, h * w
        xs = cross_scan_ref(x)  # (b, 4, d, L), each direction in its scan order
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, bs, cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        y = scan(xs.float().reshape(b, k * d, length), dts.float().reshape(b, k * d, length),
                 -torch.exp(self.A_logs.float()), bs.float(), cs.float(), self.Ds.float(),
                 self.dt_projs_bias.float().reshape(-1))
        return cross_merge_ref(y.reshape(b, k, d, h, w))

    return forward_core


class _Provider:
    """How one provider runs a model: the backend and, for the official formulations, SS2D's scan core."""

    def __init__(self, name, backend, scan=None, compiled=False, precision=FLOAT32):
        self.name, self.backend, self.scan, self.compiled = name, backend, scan, compiled
        self.precision = precision

    def autocast(self, device):
        """The autocast context of this provider's forward (bfloat16 for bf16-autocast, else none)."""
        if self.precision == AUTOCAST:
            return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __enter__(self):
        from medkernels.nn.ss2d import SS2D

        self._ctx = _backend.use_backend(self.backend)
        self._ctx.__enter__()
        self._saved = SS2D.forward_core
        if self.scan is not None:
            SS2D.forward_core = _official_forward_core(self.scan)
        return self

    def __exit__(self, *exc):
        from medkernels.nn.ss2d import SS2D

        SS2D.forward_core = self._saved
        return self._ctx.__exit__(*exc)


def providers_for(name, device):
    """[(provider name, _Provider or reason it is skipped)]."""
    device = torch.device(device)
    compiled = _Provider("ref-compiled", "ref", compiled=True)
    if name.startswith("medmamba") and device.type == "cpu":
        compiled = ("skipped: the ref backend's scan is a Python loop over the sequence, which torch.compile would "
                    "unroll (3136 steps a direction at stage 1); MedMamba's CPU baseline is mambapy")
    out = [("medkernels", _Provider("medkernels", "auto")), ("ref", _Provider("ref", "ref")), ("ref-compiled", compiled)]
    for base, backend in (("medkernels", "auto"), ("ref", "ref")):
        for precision in (AUTOCAST, HALF_WEIGHTS):
            label = f"{base} {precision}"
            out.append((label, _Provider(label, backend, precision=precision)))
    if name.startswith("medmamba"):
        if device.type == "cpu":
            out.append(("mambapy", _Provider("mambapy", "ref", scan=mambapy_scan) if importable("mambapy.pscan")
                        else "skipped: mambapy is not installed (pip install -r requirements-bench.txt)"))
        else:
            ok = importable("mamba_ssm.ops.selective_scan_interface")
            out.append(("official", _Provider("official", "ref", scan=mamba_ssm_scan) if ok
                        else "skipped: mamba_ssm is not installed"))
    return out


def _train_step(model, optimizer, x, y, autocast):
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    optimizer.step()
    return logits, grads


def _medmamba_ref_backward_reason(name, device, batch, size):
    """The ref backend's scan backward is quadratic in L (see scan.py); at stage 1 it is by far the largest."""
    if not name.startswith("medmamba"):
        return None
    stage, d_inner, side = MEDMAMBA_T_STAGES[0]
    side = side * size // 224
    return ref_backward_skip_reason(torch.device(device), batch, 4 * d_inner, side * side, N)


def _make_call(model, provider, pass_name, batch, size, device):
    """The measured call of one provider on its own copy of the model (training steps change the weights)."""
    model = copy.deepcopy(model)
    model.train(pass_name == TRAIN)
    x, y = batch_inputs(batch, size, device)
    if provider.precision == HALF_WEIGHTS:
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    run = torch.compile(model, dynamic=False) if provider.compiled else model
    if pass_name == INFERENCE:
        def call():
            with provider, torch.no_grad(), provider.autocast(device):
                return run(x), []
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def call():
            with provider:
                return _train_step(run, optimizer, x, y, provider.autocast(device))
    return call


def model_memory_step(name, provider, pass_name, batch, size):
    """The child side of a CPU peak-memory measurement (see timing.child_peak_mb)."""
    device = torch.device("cpu")
    prov = dict(providers_for(name, device))[provider]
    call = _make_call(build_model(name, device), prov, pass_name, batch, size, device)
    return call


def _memory(name, provider, pass_name, batch, size, device, call):
    if device.type == "cuda":
        return cuda_peak_mb(call, device)
    if provider.compiled:
        return None  # the child would have to compile the network again
    return child_peak_mb("benchmarks.networks:model_memory_step",
                         {"name": name, "provider": provider.name, "pass_name": pass_name, "batch": batch,
                          "size": size})


def _row(name, pass_name, provider, batch, size, status="ok", note=None):
    return {"model": name, "op": name, "pass": pass_name, "provider": provider, "batch": batch, "size": size,
            "shape": {"batch": batch, "size": size}, "label": f"batch {batch} {size}x{size}", "status": status,
            "note": note, "median_s": None, "min_s": None, "max_s": None, "repeats": 0}


def bench_model(name, device, time_call, warmup, repeats, quick=True, cfg=None, build=None):
    """Rows of every provider for each inference batch and the training step. `cfg` and `build` (a function
    of the device returning the network) replace the mode's sizes and the real network, for tests."""
    device = torch.device(device)
    cfg = cfg or config(device, quick)
    model = build(device) if build else build_model(name, device)
    plans = [(INFERENCE, b) for b in cfg["infer_batches"]] + [(TRAIN, cfg["train_batch"])]
    rows = []
    for pass_name, batch in plans:
        group, outputs, calls, first_s, runnable = [], {}, {}, {}, {}
        for pname, provider in providers_for(name, device):
            row = _row(name, pass_name, pname, batch, cfg["size"])
            row["precision"] = provider.precision if not isinstance(provider, str) else FLOAT32
            group.append(row)
            reason = provider if isinstance(provider, str) else None
            if reason is None and provider.compiled and not _compiles(cfg, pass_name, batch):
                reason = QUICK_CPU_COMPILE_NOTE if quick and device.type == "cpu" else "skipped: not compiled here"
            if reason is None and pname == "mambapy" and pass_name == INFERENCE and not _mambapy_infers(cfg, batch):
                reason = "skipped: --quick on CPU times mambapy's inference at the goal batch only (--full: every batch)"
            if (reason is None and provider.precision != FLOAT32 and not cfg.get("precisions", True)):
                reason = "skipped: mixed-precision rows are off in this configuration"
            if reason is None and provider.backend == "ref" and provider.scan is None and pass_name == TRAIN:
                reason = _medmamba_ref_backward_reason(name, device, batch, cfg["size"])
            if reason:
                row.update(status="skipped", note=reason)
                continue
            try:
                call = _make_call(model, provider, pass_name, batch, cfg["size"], device)
                first = {}
                row["first_call_s"] = timed_first_call(lambda: first.setdefault("out", call()), device)
                outputs[pname] = first["out"]
                calls[pname], runnable[pname] = call, provider
                first_s[pname] = row["first_call_s"] if not provider.compiled else None
            except Exception as exc:  # a provider that breaks is a row, never the end of the run
                row.update(status="failed", note=_short(exc), median_s=None, min_s=None, max_s=None, repeats=0)
        _time_group(group, calls, first_s, time_call, device, warmup, repeats, quick)
        for row in group:
            if row["status"] != "ok" or row["median_s"] is None:
                continue
            provider = runnable[row["provider"]]
            # on CPU each figure is a fresh process, so quick mode measures the training step only
            if cfg.get("memory", True) and (pass_name == TRAIN or not quick or device.type == "cuda"):
                try:
                    mb = _memory(name, provider, pass_name, batch, cfg["size"], device, calls[row["provider"]])
                except Exception as exc:
                    row["note"] = f"peak memory not measured: {_short(exc)}"
                    mb = None
                if mb is not None:
                    row["peak_mem_mb"] = mb
        _compare(group, outputs)
        rows += group
    return rows


def _time_group(group, calls, first_s, time_call, device, warmup, repeats, quick):
    """Time the providers of one pass and batch interleaved (one call of each per round: timing.time_interleaved),
    one set per precision, so that the machine's drift falls on all of them alike; in quick CPU runs the rounds are
    capped so that the slowest uncompiled provider stays near the row budget."""
    if not calls:
        return
    budget = QUICK_ROW_BUDGET_S if quick and device.type == "cpu" else None
    precision = {row["provider"]: row["precision"] for row in group}
    stats = {}
    # one interleaved set per precision: the float32 providers (the goal comparisons) alternate only with each other,
    # so their rounds do not also carry the mixed-precision models' memory (a 2 GB working set each for HiFuse-T's
    # training step; mixing all seven made the float32 rows' spread several times larger)
    for kind in dict.fromkeys(precision[p] for p in calls):
        subset = {p: c for p, c in calls.items() if precision[p] == kind}
        slowest = max([first_s[p] for p in subset if first_s[p] is not None] or [0.0])
        reps = repeats_within(slowest, repeats, budget)
        if kind == FLOAT32:  # the goal comparisons: every round asked for (--repeats), even past the quick budget
            reps = repeats
        try:
            stats.update(time_interleaved(time_call, device, subset, max(0, warmup - 1), reps))
        except Exception as exc:
            for row in group:
                if row["provider"] in subset:
                    row.update(status="failed", note=_short(exc))
    for row in group:
        if row["provider"] not in stats:
            continue
        row.update(stats[row["provider"]])
        row["images_per_s"] = row["shape"]["batch"] / row["median_s"]
        if row["pass"] == TRAIN:
            row["steps_per_s"] = 1.0 / row["median_s"]


def _compare(group, outputs):
    """Speed-up over ``ref`` (else ``mambapy``/``official``) and the error of logits and gradients against it,
    and every row's relative error of logits against the float32 logits."""
    ran = [r for r in group if r["status"] == "ok"]
    base = next((r for b in ("ref", "mambapy", "official") for r in ran if r["provider"] == b), None)
    # the float32 logits: ref's, or where the ref row cannot run (MedMamba's training step) the first float32
    # provider that ran
    float32 = next((outputs[b][0] for b in ("ref", "mambapy", "official", "medkernels") if b in outputs), None)
    for r in ran:
        r["baseline"] = base["provider"] if base else None
        r["speedup"] = base["median_s"] / r["median_s"] if base else None
        logits, grads = outputs[r["provider"]]
        if float32 is not None:
            r["rel_err_vs_float32"] = float((logits.detach().double() - float32.detach().double()).norm()
                                            / float32.detach().double().norm())
        if base:
            ref_logits, ref_grads = outputs[base["provider"]]
            r["max_abs_err_vs_" + base["provider"]] = max_abs_diff([logits] + grads, [ref_logits] + ref_grads)


def bench_hifuse_tiny(device, time_call, warmup, repeats, quick=True):
    return bench_model("hifuse_tiny", device, time_call, warmup, repeats, quick)


def bench_medmamba_t(device, time_call, warmup, repeats, quick=True):
    return bench_model("medmamba_t", device, time_call, warmup, repeats, quick)
