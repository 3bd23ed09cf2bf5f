"""Timing and memory primitives of the benchmark suite: warm-up plus timed repeats (CUDA events on GPU),
peak memory (GPU allocator peak, or a fresh child process's resident-set high-water mark on CPU)."""
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from .common import REPO_ROOT


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def summarize(times):
    """Median and spread of a list of seconds, as every row carries them."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times)}


def time_call(fn, device, warmup, repeats):
    """Median and spread (min, max) of `repeats` timed calls after `warmup` untimed ones, in seconds."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, repeats)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return summarize(times)


def time_interleaved(time_call, device, calls, warmup, repeats):
    """{name: timing stats} of the zero-argument `calls`, timed round by round (one call of each per round)
    rather than one after the other: the machine's drift over a run (30-50% on the shared 2-core CPU VM these
    numbers come from) then falls on every provider alike instead of on whichever was timed during it.
    `time_call` is time_call above (or a stand-in with its signature)."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in calls}
    for _ in range(max(1, repeats)):
        for name, fn in calls.items():
            samples[name].append(time_call(fn, device, 0, 1)["median_s"])
    return {name: summarize(times) for name, times in samples.items()}


# --quick caps the timed calls of a slow row at about this many seconds (never fewer than two calls)
QUICK_ROW_BUDGET_S = 6.0


def repeats_within(first_call_s, repeats, budget_s=None):
    """`repeats`, lowered so that a row whose first call took `first_call_s` stays near `budget_s`."""
    if budget_s is None or first_call_s * repeats <= budget_s:
        return repeats
    return max(2, min(repeats, int(budget_s / max(first_call_s, 1e-9))))


def timed_first_call(fn, device):
    """Seconds of one call, synchronised (used for the first, compiling call of a torch.compile'd function)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def cuda_peak_mb(fn, device):
    """Allocator peak above the memory already held, over one call of `fn` on a CUDA device, in MB."""
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def high_water_kb():
    # VmHWM is this process's own peak; ru_maxrss would carry the parent's peak across fork and exec.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child_peak_mb(target, kwargs, timeout=900):
    """Resident-set growth (MB) of a fresh process over one call of the step that ``target(**kwargs)`` sets up.

    `target` is "module:function"; the function builds its inputs and returns a no-argument callable (the
    measured step), so that building the model and inputs is not counted.
    """
    code = (
        "import json; from benchmarks.timing import _child_main; "
        f"print(json.dumps(_child_main({target!r}, {json.dumps(kwargs)!r})))"
    )
    # the child imports `benchmarks` (and `target`'s module) from the repository root, wherever it is started
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                         cwd=REPO_ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"peak-memory child for {target} failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _child_main(target, kwargs_json):
    import importlib

    module, name = target.split(":")
    step = getattr(importlib.import_module(module), name)(**json.loads(kwargs_json))
    before = high_water_kb()
    step()
    return (high_water_kb() - before) / 1024.0
