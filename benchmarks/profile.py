"""Where a network's time goes, by its own modules: ``python -m benchmarks --profile`` (or ``-m benchmarks.profile``).

Each module of the network (Local block, Global block's window attention and MLP, the HFF parts, IRMLP, SS2D,
its projections, ...) gets its *self* time: the wall time while it was the innermost running module, forward
and backward apart, summed over its calls and grouped by the module's class. Forward times come from forward
pre/post hooks. Backward times come from tensor hooks: a module's backward starts when the gradient of its
output arrives and ends when the gradient of its input is complete; between events, the time goes to the
innermost module whose backward is running (a residual input's gradient completes only after both branches,
so the outer block keeps what its branches do not claim). The hooks add a few microseconds a module call; the
profile reports the unhooked step time beside the hooked one.

The rows also name the top ATen operators of one hooked forward (torch.profiler), so a block's time can be
traced to convolutions, GEMMs or copies. Writes ``benchmarks/results/<device>-profile.json`` and ``.md``.
"""
import argparse
import contextlib
import json
import os
import time
from collections import defaultdict

import torch

from medkernels import _backend

from .networks import INFERENCE, NUM_CLASSES, TRAIN, _train_step, batch_inputs, build_model
from .registry import MODEL_BENCHES
from .report import device_info, environment, now_iso

RESULTS_DIR = "benchmarks/results"
PASSES = {"inference": INFERENCE, "train": TRAIN}


class _Timeline:
    """Hook events on one clock; each interval goes to the innermost open module of its phase."""

    def __init__(self, model):
        self.names = {m: type(m).__name__ for m in model.modules()}
        self.depth = {m: name.count(".") + 1 if name else 0 for name, m in model.named_modules()}
        self.self_s = {"forward": defaultdict(float), "backward": defaultdict(float)}
        self.calls = defaultdict(int)
        self.stack = []  # forward: the running modules, innermost last
        self.active = []  # backward: the modules whose backward is running; the deepest one is innermost
        self.last = None
        self.handles = []
        for module in model.modules():
            self.handles.append(module.register_forward_pre_hook(self._pre))
            self.handles.append(module.register_forward_hook(self._post))

    def _tick(self, phase):
        now = time.perf_counter()
        if phase == "forward":
            inner = self.stack[-1] if self.stack else None
        else:  # a block and its last layer receive their output gradient at once: depth, not arrival, decides
            inner = max(self.active, key=self.depth.get) if self.active else None
        if inner is not None and self.last is not None:
            self.self_s[phase][self.names[inner]] += now - self.last
        self.last = now

    def _pre(self, module, inputs):
        self._tick("forward")
        self.stack.append(module)
        self.calls[self.names[module]] += 1
        if torch.is_grad_enabled():
            for t in inputs:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(lambda grad, m=module: self._backward_end(m))

    def _post(self, module, inputs, output):
        self._tick("forward")
        self.stack.pop()
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        if torch.is_grad_enabled():
            for t in outputs:
                # a module that hands an input through (Identity, Dropout in eval) has no backward of its own
                if isinstance(t, torch.Tensor) and t.requires_grad and not any(t is i for i in inputs):
                    t.register_hook(lambda grad, m=module: self._backward_start(m))

    def _backward_start(self, module):
        self._tick("backward")
        if module not in self.active:
            self.active.append(module)

    def _backward_end(self, module):
        self._tick("backward")
        if module in self.active:
            self.active.remove(module)

    def close(self):
        for h in self.handles:
            h.remove()


def _step(model, optimizer, x, y, pass_name):
    """One step as the network benchmark times it (networks._train_step for training), in float32."""
    if pass_name == INFERENCE:
        with torch.no_grad():
            return model(x)
    return _train_step(model, optimizer, x, y, contextlib.nullcontext())


def module_self_times(model, step, repeats):
    """Run ``step()`` (which runs `model`) `repeats` times with the hooks on; returns (rows, hooked ms a step):
    rows of {module class, calls a step, forward_ms, backward_ms} (self times, ms a step), largest first."""
    timeline = _Timeline(model)
    try:
        start = time.perf_counter()
        for _ in range(repeats):
            step()
            timeline.stack, timeline.active, timeline.last = [], [], None
        hooked_ms = (time.perf_counter() - start) / repeats * 1e3
    finally:
        timeline.close()
    rows = []
    for cls in set(timeline.self_s["forward"]) | set(timeline.self_s["backward"]) | set(timeline.calls):
        rows.append({"module": cls, "calls": timeline.calls[cls] // repeats,
                     "forward_ms": round(timeline.self_s["forward"][cls] / repeats * 1e3, 2),
                     "backward_ms": round(timeline.self_s["backward"][cls] / repeats * 1e3, 2)})
    rows.sort(key=lambda r: -(r["forward_ms"] + r["backward_ms"]))
    return rows, hooked_ms


def profile_network(name, pass_name, batch, size=224, device="cpu", repeats=3, backend="auto"):
    """A network's module self times (module_self_times) for one pass, after one warm-up step, with the
    unhooked step time and the top ATen operators of one more step."""
    model = build_model(name, device)
    model.train(pass_name == TRAIN)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True) if pass_name == TRAIN else None
    x, y = batch_inputs(batch, size, device)

    def step():
        return _step(model, optimizer, x, y, pass_name)

    with _backend.use_backend(backend):
        step()  # warm-up: first-call costs, allocator
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        plain_ms = (time.perf_counter() - start) / repeats * 1e3
        rows, hooked_ms = module_self_times(model, step, repeats)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
    ops = [{"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 2)}
           for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]]
    outside_ms = hooked_ms - sum(r["forward_ms"] + r["backward_ms"] for r in rows)
    return {"network": name, "pass": pass_name, "batch": batch, "size": size, "backend": backend,
            "step_ms": round(plain_ms, 1), "hooked_step_ms": round(hooked_ms, 1),
            "outside_modules_ms": round(outside_ms, 1), "modules": rows, "aten_ops": ops}


def markdown(run):
    lines = [f"# Where the time goes, by module ({run['device']['name']}, {run['date']}, commit {run['commit']})", "",
             "Self time of each module class (the time while it was the innermost running module), ms a step; "
             "produced by `python -m benchmarks --profile`.", ""]
    for p in run["profiles"]:
        total = sum(r["forward_ms"] + r["backward_ms"] for r in p["modules"]) or 1.0
        lines += [f"## {p['network']}, {p['pass']}, batch {p['batch']}, {p['size']}x{p['size']}, backend {p['backend']}",
                  "", f"Step: {p['step_ms']} ms unhooked, {p['hooked_step_ms']} ms with the hooks, of which "
                  f"{p['outside_modules_ms']} ms outside every module (the loss, the optimizer step, autograd's own "
                  "work before the first module's backward).", "",
                  "| module | calls | forward ms | backward ms | share |", "|---|---:|---:|---:|---:|"]
        for r in p["modules"]:
            share = (r["forward_ms"] + r["backward_ms"]) / total
            if share >= 0.005:
                lines.append(f"| {r['module']} | {r['calls']} | {r['forward_ms']} | {r['backward_ms']} | "
                             f"{share:.1%} |")
        lines += ["", "Top ATen operators of one hooked step (self CPU time):", "", "| op | calls | self ms |",
                  "|---|---:|---:|"]
        lines += [f"| `{o['op']}` | {o['calls']} | {o['self_ms']} |" for o in p["aten_ops"]]
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks --profile", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(MODEL_BENCHES), default=list(MODEL_BENCHES))
    p.add_argument("--passes", nargs="+", choices=list(PASSES), default=list(PASSES))
    p.add_argument("--batch", type=int, default=8, help="inference batch (default 8)")
    p.add_argument("--train-batch", type=int, default=4, help="training batch (default 4)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="auto", help="medkernels backend (default auto; ref for eager PyTorch)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help=f"JSON path (default {RESULTS_DIR}/<device>-profile.json); the .md beside it")
    args = p.parse_args(argv)
    info = device_info(args.device)
    profiles = []
    for name in args.models:
        for pass_name in (PASSES[p] for p in args.passes):
            batch = args.batch if pass_name == INFERENCE else args.train_batch
            profiles.append(profile_network(name, pass_name, batch, args.size, args.device, args.repeats,
                                            args.backend))
    env = environment(args.device)
    run = {"date": now_iso(), "device": info, "commit": str(env.get("git_commit", "unknown"))[:12], "environment": env,
           "num_classes": NUM_CLASSES, "profiles": profiles}
    out = args.out or os.path.join(RESULTS_DIR, f"{info['slug']}-profile.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(run, f, indent=1)
    md = markdown(run)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    main()
