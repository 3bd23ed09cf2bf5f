"""Where a network's time goes, by its own modules: ``python -m benchmarks --profile`` (or ``-m benchmarks.profile``).

Each module of the network (Local block, Global block's window attention and MLP, the HFF parts, IRMLP, SS2D,
its projections, ...) gets its *self* time: the wall time while it was the innermost running module, forward
and backward apart, summed over its calls and grouped by the module's class and by its part of the network.
Forward times come from forward pre/post hooks. Backward times come from hooks on the autograd nodes: each node's
run goes to the module that was innermost when the forward created the node, and a parameter's gradient
accumulation to the module owning the parameter; the autograd engine's time between nodes, the loss and the
optimizer step are outside every module. The hooks add a few microseconds a module call and a node; the profile
reports the unhooked step time beside the hooked one.

The rows also name the top ATen operators of one hooked forward (torch.profiler), so a block's time can be
traced to convolutions, GEMMs or copies. Writes ``benchmarks/results/<device>-profile.json`` and ``.md``.
"""
import argparse
import bisect
import contextlib
import json
import os
import re
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
    """Forward: hook events on one clock, each interval to the innermost running module. Backward: each autograd
    node's run goes to the module that was innermost when the forward created it (found by the node's sequence
    number), and each parameter's gradient accumulation to the module that owns the parameter."""

    def __init__(self, model):
        self.root = model
        self.names = {m: name for name, m in model.named_modules()}
        self.self_s = {"forward": defaultdict(float), "backward": defaultdict(float)}  # by module
        self.calls = defaultdict(int)  # by module
        self.stack = []  # forward: the running modules, innermost last
        self.last = None
        self.owner_starts, self.owners = [], []  # sequence numbers from which each module owns new nodes
        self.param_owner = {}
        self.node_start = {}
        self.handles = []
        self._probe = torch.zeros((), requires_grad=True)
        for module in model.modules():
            self.handles.append(module.register_forward_pre_hook(self._pre))
            self.handles.append(module.register_forward_hook(self._post))
            for param in module.parameters(recurse=False):
                self.param_owner[param] = module

    def reset(self):
        self.stack, self.last, self.owner_starts, self.owners, self.node_start = [], None, [], [], {}

    def _tick(self):
        now = time.perf_counter()
        if self.stack and self.last is not None:
            self.self_s["forward"][self.stack[-1]] += now - self.last
        self.last = now

    def _own_nodes_from_now(self):
        """Autograd nodes created from here on belong to the innermost running module (none: outside)."""
        if torch.is_grad_enabled():
            with torch.enable_grad():
                seq = (self._probe * 1.0).grad_fn._sequence_nr() + 1
            self.owner_starts.append(seq)
            self.owners.append(self.stack[-1] if self.stack else None)

    def _pre(self, module, inputs):
        self._tick()
        self.stack.append(module)
        self.calls[module] += 1
        self._own_nodes_from_now()

    def _post(self, module, inputs, output):
        self._tick()
        self.stack.pop()
        self._own_nodes_from_now()
        if module is self.root and torch.is_grad_enabled():
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            self._hook_graph([t.grad_fn for t in outputs if isinstance(t, torch.Tensor) and t.grad_fn is not None])

    def _owner(self, node):
        if type(node).__name__ == "AccumulateGrad":
            return self.param_owner.get(node.variable)
        i = bisect.bisect_right(self.owner_starts, node._sequence_nr()) - 1
        return self.owners[i] if i >= 0 else None

    def _hook_graph(self, roots):
        """Time every node of the network's autograd graph (hooks live as long as the graph)."""
        seen, todo = set(), list(roots)
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            owner = self._owner(node)
            if owner is not None:  # the hooks name the node by a number: holding the node would keep the graph
                key = len(seen)
                node.register_prehook(lambda _g, k=key: self._node_begins(k))
                node.register_hook(lambda _gi, _go, k=key, m=owner: self._node_ends(k, m))
            todo.extend(next_node for next_node, _ in node.next_functions)

    def _node_begins(self, key):
        self.node_start[key] = time.perf_counter()

    def _node_ends(self, key, module):
        start = self.node_start.pop(key, None)
        if start is not None:
            self.self_s["backward"][module] += time.perf_counter() - start

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
    """Run ``step()`` (which runs `model`) `repeats` times with the hooks on; returns (rows by module class, hooked
    ms a step, rows by part): rows of {module class, calls a step, forward_ms, backward_ms} (self times, ms a
    step), largest first; the rows by part also name the part (:func:`part_name`)."""
    timeline = _Timeline(model)
    try:
        start = time.perf_counter()
        for _ in range(repeats):
            step()
            timeline.reset()
        hooked_ms = (time.perf_counter() - start) / repeats * 1e3
    finally:
        timeline.close()
    seen = set(timeline.self_s["forward"]) | set(timeline.self_s["backward"]) | set(timeline.calls)
    by_class = _grouped(seen, timeline, repeats, lambda m: type(m).__name__)
    by_part = _grouped(seen, timeline, repeats, lambda m: (part_name(timeline.names[m]), type(m).__name__))
    for r in by_part:
        r["part"], r["module"] = r.pop("module")
    return by_class, hooked_ms, by_part


def part_name(qualified_name):
    """A module's place in the network with its stage and block indices collapsed: ``layers1.blocks.0.attn`` and
    ``layers3.blocks.1.attn`` are both ``layers*.blocks.*.attn``; the network itself is ``(network)``."""
    if not qualified_name:
        return "(network)"
    parts = qualified_name.split(".")
    # the stage containers of both networks are numbered top-level children (fu1..fu4, layers1..layers4)
    parts[0] = re.sub(r"(?<=[A-Za-z_])\d+$", "*", parts[0])
    return ".".join("*" if p.isdigit() else p for p in parts)


def _grouped(modules, timeline, repeats, key):
    """Rows {module: key, calls, forward_ms, backward_ms} (ms a step) summed over the modules of each key."""
    sums = defaultdict(lambda: [0, 0.0, 0.0])
    for m in modules:
        s = sums[key(m)]
        s[0] += timeline.calls[m]
        s[1] += timeline.self_s["forward"][m]
        s[2] += timeline.self_s["backward"][m]
    rows = [{"module": k, "calls": calls // repeats, "forward_ms": round(fwd / repeats * 1e3, 2),
             "backward_ms": round(bwd / repeats * 1e3, 2)} for k, (calls, fwd, bwd) in sums.items()]
    rows.sort(key=lambda r: -(r["forward_ms"] + r["backward_ms"]))
    return rows


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
        rows, hooked_ms, parts = module_self_times(model, step, repeats)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
    ops = [{"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 2)}
           for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]]
    outside_ms = hooked_ms - sum(r["forward_ms"] + r["backward_ms"] for r in rows)
    return {"network": name, "pass": pass_name, "batch": batch, "size": size, "backend": backend,
            "step_ms": round(plain_ms, 1), "hooked_step_ms": round(hooked_ms, 1),
            "outside_modules_ms": round(outside_ms, 1), "modules": rows, "parts": parts, "aten_ops": ops}


def _table_rows(rows, total, names):
    """Markdown rows (the cells `names(row)`, then calls, forward, backward, share) of the rows of 0.5% or more."""
    out = []
    for r in rows:
        share = (r["forward_ms"] + r["backward_ms"]) / total
        if share >= 0.005:
            cells = names(r) + [r["calls"], r["forward_ms"], r["backward_ms"], f"{share:.1%}"]
            out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return out


def markdown(run):
    lines = [f"# Where the time goes, by module ({run['device']['name']}, {run['date']}, commit {run['commit']})", "",
             "Self time of each module (forward: while it was the innermost running module; backward: the autograd "
             "nodes its forward created), ms a step; produced by `python -m benchmarks --profile`.", ""]
    for p in run["profiles"]:
        total = sum(r["forward_ms"] + r["backward_ms"] for r in p["modules"]) or 1.0
        lines += [f"## {p['network']}, {p['pass']}, batch {p['batch']}, {p['size']}x{p['size']}, backend {p['backend']}",
                  "", f"Step: {p['step_ms']} ms unhooked, {p['hooked_step_ms']} ms with the hooks, of which "
                  f"{p['outside_modules_ms']} ms outside every module (the loss, the optimizer step, the autograd "
                  "engine between nodes).", "",
                  "By part of the network (stage and block indices collapsed to `*`; parts under 0.5% left out):", "",
                  "| part | module | calls | forward ms | backward ms | share |", "|---|---|---:|---:|---:|---:|"]
        lines += _table_rows(p.get("parts", []), total, lambda r: [f"`{r['part']}`", r["module"]])
        lines += ["", "By module class:", "", "| module | calls | forward ms | backward ms | share |",
                  "|---|---:|---:|---:|---:|"]
        lines += _table_rows(p["modules"], total, lambda r: [r["module"]])
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
