"""``python -m medkernels.bench``: time the ops and the networks on every available backend, side by side.

Ops (``--ops``): the selective scan and the fused SS2D scan at MedMamba-T's stage-1 shapes against the
plain PyTorch loop, mambapy's parallel scan (CPU, when installed) and the unfused SS2D path (see
``medkernels.bench_scan``). Models (``--models``): HiFuse-T and MedMamba-T inference (forward, eval mode) at
each ``--batch``. Every row has its speed-up over its baseline measured in the same run and its error against
the reference output. ``--json PATH`` also writes every figure.
"""
import argparse
import json
import platform
import statistics
import sys
import time

import torch

from . import _backend, bench_scan
from .info import info

MODELS = ("hifuse_tiny", "medmamba_t")
OPS = ("selective_scan", "ss2d_scan")


def _backends_for(device):
    """The backends to time on `device`; Triton's CPU interpreter is a test tool, not a provider."""
    return [b for b in _backend.BACKENDS if _backend.unavailable_reason(b) is None and _backend._runs_on(b, device.type)
            and not (b == "triton" and device.type == "cpu")]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, warmup, repeats):
    """Median and spread (min, max) of `repeats` timed calls after `warmup` untimed ones, in seconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
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
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def bench_model(name, device, backends, batch, size, warmup, repeats):
    from . import models

    model = getattr(models, name)(num_classes=7).to(device).eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    outputs = {}
    for backend in backends:
        with _backend.use_backend(backend), torch.no_grad():
            outputs[backend] = model(x).float().cpu()
            stats = time_call(lambda: model(x), device, warmup, repeats)
        rows.append({"model": name, "pass": "forward", "backend": backend, "batch": batch, "size": size, **stats})
    reference = outputs.get("ref")
    for row in rows:
        ref_row = next((r for r in rows if r["backend"] == "ref"), None)
        row["speedup_vs_ref"] = ref_row["median_s"] / row["median_s"] if ref_row else None
        row["max_abs_err_vs_ref"] = (
            float((outputs[row["backend"]] - reference).abs().max()) if reference is not None else None
        )
        row["images_per_s"] = batch / row["median_s"]
    return rows


def format_table(rows):
    header = f"{'model':12s} {'pass':8s} {'backend':8s} {'batch':>5s} {'median ms':>10s} {'spread ms':>17s} {'img/s':>8s} {'vs ref':>7s} {'max|err|':>9s}"
    lines = [header, "-" * len(header)]
    for r in rows:
        spread = f"{1e3 * r['min_s']:.1f}-{1e3 * r['max_s']:.1f}"
        ratio = f"{r['speedup_vs_ref']:.2f}x" if r["speedup_vs_ref"] is not None else "-"
        err = f"{r['max_abs_err_vs_ref']:.1e}" if r["max_abs_err_vs_ref"] is not None else "-"
        lines.append(
            f"{r['model']:12s} {r['pass']:8s} {r['backend']:8s} {r['batch']:5d} {1e3 * r['median_s']:10.1f} "
            f"{spread:>17s} {r['images_per_s']:8.2f} {ratio:>7s} {err:>9s}"
        )
    return "\n".join(lines)


def update_readme(path, device, rows, op_rows=()):
    """Put this run's table between ``<!-- bench:<device type> -->`` and ``<!-- /bench:<device type> -->``."""
    begin, end = f"<!-- bench:{device.type} -->", f"<!-- /bench:{device.type} -->"
    with open(path) as f:
        text = f.read()
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no {begin} ... {end} markers")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    tables = ([bench_scan.format_rows(op_rows)] if op_rows else []) + ([format_table(rows)] if rows else [])
    body = "\n\n".join(tables)
    block = f"{begin}\nMeasured {stamp} on {name} (`python -m medkernels.bench`):\n\n```\n{body}\n```\n{end}"
    head, rest = text.split(begin, 1)
    with open(path, "w") as f:
        f.write(head + block + rest.split(end, 1)[1])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m medkernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--ops", nargs="*", default=list(OPS), choices=OPS)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write every figure to this JSON file")
    parser.add_argument("--update-readme", metavar="README", help="replace this device's table in README (between bench markers)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backends = _backends_for(device)
    env = info()
    fallbacks = {b: ops for b, ops in env["reference_fallbacks"].items() if b in backends}
    sys.stdout.write(
        f"medkernels bench on {platform.node()} ({device}, torch {torch.__version__}, {torch.get_num_threads()} threads)\n"
        f"backends: {', '.join(backends)}; ops still on their reference there: "
        + "; ".join(f"{b}: {', '.join(o) or '-'}" for b, o in fallbacks.items())
        + "\n\n"
    )
    op_rows = []
    if "selective_scan" in args.ops:
        op_rows += bench_scan.bench_selective_scan(device, time_call, args.warmup, args.repeats)
    if "ss2d_scan" in args.ops:
        op_rows += bench_scan.bench_ss2d(device, time_call, args.warmup, args.repeats)
    if op_rows:
        sys.stdout.write(bench_scan.format_rows(op_rows) + "\n\n")
    rows = []
    for name in args.models:
        for batch in args.batch:
            rows += bench_model(name, device, backends, batch, args.size, args.warmup, args.repeats)
        sys.stdout.write(format_table([r for r in rows if r["model"] == name]) + "\n\n")
    if args.update_readme:
        update_readme(args.update_readme, device, rows, op_rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "device": str(device), "args": vars(args), "rows": rows,
                       "op_rows": op_rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
