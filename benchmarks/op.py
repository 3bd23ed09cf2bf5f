"""Side-by-side timing of one op at one shape: every provider, forward and forward+backward, with its error
against the reference on the same inputs and its speed-up over the baseline measured in the same run.

A provider is a function of the input dict returning the output tensor. A provider that cannot run is kept
as a row with ``status`` "skipped" (and the reason in ``note``); one that raises is kept as "failed".
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

from .timing import repeats_within, timed_first_call

FORWARD, FWD_BWD = "forward", "forward+backward"
ERR_PREFIX = "max_abs_err_vs_"


@dataclass
class Case:
    """One op at one shape for the pytest-benchmark suite: its inputs (built once, on first use), its providers
    ({name: fn(inputs) -> output}, ``ref`` among them), the (provider, pass) pairs not run with the reason, and
    how a forward+backward is run (default forward_backward below)."""
    op: str
    label: str
    make_inputs: Callable[[], dict]
    providers: Dict[str, Callable]
    skip: Dict[Tuple[str, str], str] = field(default_factory=dict)
    fwd_bwd: Optional[Callable] = None  # fn(provider fn, inputs, output gradient) -> tensors
    _inputs: dict = None

    def inputs(self):
        if self._inputs is None:
            self._inputs = self.make_inputs()
        return self._inputs

    def forward_backward(self, fn, inputs, grad):
        return (self.fwd_bwd or forward_backward)(fn, inputs, grad)


def status_row(op, pass_name, provider, shape, status, note, label=None):
    return {"op": op, "pass": pass_name, "provider": provider, "shape": dict(shape), "label": label or shape_label(shape),
            "status": status, "note": note, "median_s": None, "min_s": None, "max_s": None, "repeats": 0}


def shape_label(shape):
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _short(exc):
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= 200 else text[:197] + "..."


def _with_grad(inputs):
    return {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}


def forward_backward(fn, inputs, grad_out):
    """One forward+backward on fresh leaf copies; returns the output and every input's gradient."""
    leaves = _with_grad(inputs)
    out = fn(leaves)
    out.backward(grad_out)
    return [out.detach()] + [v.grad for v in leaves.values() if v.grad is not None]


def max_abs_diff(a, b):
    if isinstance(a, torch.Tensor):
        a, b = [a], [b]
    return max(float((x.detach().double() - y.detach().double()).abs().max()) if x.numel() else 0.0
               for x, y in zip(a, b))


def run_op_bench(op, shape, inputs, providers, device, time_call, warmup, repeats, *, skip=None, label=None,
                 baselines=("ref",), memory=None, budget_s=None):
    """Rows for both passes of every provider.

    providers: {name: fn(inputs) -> output}. skip: {(name, pass): reason} for pairs known to be unworkable.
    baselines: the providers to compare against, first that ran wins (its name lands in ``baseline`` and in
    the error key ``max_abs_err_vs_<name>``). memory: fn(name, call) -> MB or None, for forward+backward rows.
    The first call of each provider is timed apart (``first_call_s``: for a torch.compile'd provider, the
    compilation) and also serves as a warm-up call. budget_s: see timing.repeats_within.
    """
    skip = skip or {}
    label = label or shape_label(shape)
    g = torch.Generator().manual_seed(1)
    rows, results = [], {}
    for pass_name in (FORWARD, FWD_BWD):
        for name, fn in providers.items():
            reason = skip.get((name, pass_name))
            if reason:
                rows.append(status_row(op, pass_name, name, shape, "skipped", reason, label))
                continue
            row = {"op": op, "pass": pass_name, "provider": name, "shape": dict(shape), "label": label,
                   "status": "ok", "note": None}
            try:
                if pass_name == FORWARD:
                    def call(fn=fn):
                        with torch.no_grad():
                            return fn(inputs)
                else:
                    if "grad_out" not in results:
                        with torch.no_grad():
                            out = fn(inputs)
                        results["grad_out"] = torch.randn(out.shape, generator=g).to(out.device, out.dtype)

                    def call(fn=fn):
                        return forward_backward(fn, inputs, results["grad_out"])
                first = {}
                row["first_call_s"] = timed_first_call(lambda: first.setdefault("out", call()), device)
                results[(name, pass_name)] = first["out"]
                reps = repeats_within(row["first_call_s"], repeats, budget_s)
                row.update(time_call(call, device, max(0, warmup - 1), reps))
                if memory is not None and pass_name == FWD_BWD:
                    mb = memory(name, call)
                    if mb is not None:
                        row["peak_mem_mb"] = mb
            except Exception as exc:  # a provider that breaks is a row, never the end of the run
                row = status_row(op, pass_name, name, shape, "failed", _short(exc), label)
            rows.append(row)
    add_errors_and_ratios(rows, results, baselines)
    return rows


def add_errors_and_ratios(rows, results, baselines):
    for pass_name in (FORWARD, FWD_BWD):
        ran = [r for r in rows if r["pass"] == pass_name and r["status"] == "ok"]
        base = next((r for b in baselines for r in ran if r["provider"] == b), None)
        if base is None:
            for r in ran:
                r["baseline"], r["speedup"] = None, None
                r["note"] = r["note"] or f"no baseline ran ({', '.join(baselines)})"
            continue
        reference = results[(base["provider"], pass_name)]
        for r in ran:
            r["baseline"] = base["provider"]
            r["speedup"] = base["median_s"] / r["median_s"]
            r[ERR_PREFIX + base["provider"]] = max_abs_diff(results[(r["provider"], pass_name)], reference)
