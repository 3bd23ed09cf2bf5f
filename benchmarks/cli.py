"""Time every medkernels op and both networks against pure PyTorch, torch.compile and mambapy/mamba_ssm.

``python -m benchmarks`` (from the repository root) runs them side by side in one run, each row with its error against the
reference. Prints the tables, writes ``benchmarks/results/<device>.json`` and beside it every row as a
Markdown table (``<device>.md``) and the summary plot (``<device>.png``); ``--update-readme`` (or
``--readme-from JSON``) writes the README's summary for the device from a run's JSON, ``--plot-from JSON``
redraws a recorded run's Markdown table and plot without timing anything.
"""
import argparse
import glob
import os
import sys
import time

import torch

from .common import backends_for
from .progress import Progress
from .registry import MODEL_BENCHES, NETWORKS, OP_BENCHES, OPS, BenchUnavailable, load
from .report import (SCHEMA, check_schema, device_info, environment, format_run, load_json, markdown_report,
                     normalize_row, now_iso, update_readme, write_json)
from .timing import time_call

RESULTS_DIR = "benchmarks/results"
DEFAULTS = {"quick": {"warmup": 1, "repeats": 3}, "full": {"warmup": 2, "repeats": 5}}


def _parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the default: stage 1 and 4 shapes, small training "
                      "batch, no torch.compile on CPU; a few minutes on a 2-core CPU")
    mode.add_argument("--full", action="store_true", help="all four MedMamba-T stages, larger batches, torch.compile")
    p.add_argument("--ops", nargs="*", choices=list(OP_BENCHES), default=None,
                   help="ops to time (default: all; --ops with no name: none)")
    p.add_argument("--models", nargs="*", choices=list(MODEL_BENCHES), default=None,
                   help="networks to time (default: all; --models with no name: none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, nargs="+", metavar="N", help="the networks' inference batch sizes "
                   "(default: the mode's)")
    p.add_argument("--train-batch", type=int, metavar="N", help="the networks' training batch (default: the mode's)")
    p.add_argument("--warmup", type=int, help="untimed calls before timing (default 1 quick, 2 full; the first "
                   "call, which also gives each row's error, counts as one)")
    p.add_argument("--repeats", type=int, help="timed calls per row (default 3 quick, 5 full)")
    p.add_argument("--out", help=f"JSON path (default {RESULTS_DIR}/<device>.json); the .md and .png go beside it")
    p.add_argument("--no-json", action="store_true", help="print the tables only")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--list", action="store_true", help="list the ops and networks, their shapes and providers")
    p.add_argument("--plot-from", metavar="JSON", nargs="+", help="do not run anything: write the Markdown table "
                   "and the plot beside each of these run JSONs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--update-readme", metavar="README", help="write this device's table into README between "
                   "its <!-- bench:cpu|cuda --> markers")
    p.add_argument("--profile", action="store_true", help="first argument only: where each network's time goes, "
                   "by its modules (python -m benchmarks --profile --help)")
    p.add_argument("--readme-from", metavar="JSON", nargs="+", help="do not run anything: write the README "
                   "tables (--update-readme, default README.md) from these run JSONs")
    return p


def run_suite(device, ops, models, quick, warmup, repeats, progress):
    """Run the benchmarks named; returns (op rows, model rows, [what could not run and why])."""
    op_rows, model_rows, unavailable = [], [], []
    ticking = progress.wrap(time_call)
    for kind, names, table, out in (("op", ops, OP_BENCHES, op_rows), ("model", models, MODEL_BENCHES, model_rows)):
        for name in names:
            progress.begin(f"{kind} {name}")
            status = "done"
            try:
                rows = load(table[name])(device, ticking, warmup, repeats, quick=quick)
                out += [normalize_row(r) for r in rows]
            except BenchUnavailable as exc:
                unavailable.append({"kind": kind, "name": name, "reason": f"skipped: {exc}"})
                progress.note(f"{kind} {name} skipped: {exc}")
                status = "skipped"
            except Exception as exc:  # one broken benchmark must not lose the others' figures
                unavailable.append({"kind": kind, "name": name, "reason": f"failed: {type(exc).__name__}: {exc}"})
                progress.note(f"{kind} {name} failed: {type(exc).__name__}: {exc}")
                status = "failed"
            progress.end(status)
    return op_rows, model_rows, unavailable


def _notes(device, quick):
    from .networks import config

    cfg = config(device, quick)
    notes = [f"networks: inference at {cfg['size']}x{cfg['size']}, batch {' and '.join(map(str, cfg['infer_batches']))}; "
             f"training step (forward, cross-entropy, backward, fused AdamW) at batch {cfg['train_batch']}; "
             "providers interleaved"]
    if quick and torch.device(device).type == "cpu":
        notes.append("--quick on CPU: ops at MedMamba-T stages 1 and 4 only; torch.compile only for HiFuse-T's "
                     "inference at batch 8, training at batch 4 (run --full for the rest)")
    return notes


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--profile"]:  # the per-module profile has its own options (benchmarks/profile.py)
        from .profile import main as profile_main

        return profile_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list:
        for kind, benches in (("ops", OPS), ("networks", NETWORKS)):
            print(f"{kind}:")
            for b in benches:
                print(f"  {b.name}: {b.shapes}\n      providers: {b.providers}")
        return 0
    if args.plot_from:
        for path in args.plot_from:
            data = load_json(path)
            _write_beside(data, path, plot=True)
        if not args.readme_from:
            return 0
    if args.readme_from:
        readme = args.update_readme or "README.md"
        latest = {}  # per device type, the most recent run among the files given
        for path in args.readme_from:
            data = load_json(path)
            kind = data["device"]["type"]
            if kind not in latest or data["started"] > latest[kind][1]["started"]:
                latest[kind] = (path, data)
        for kind, (path, data) in sorted(latest.items()):
            update_readme(readme, data, source=path)
            print(f"wrote the {kind} summary of {readme} from {path}")
        if "cuda" not in latest and not _recorded_cuda_runs():
            try:
                update_readme(readme, None, kind="cuda", block=_no_cuda_run_note())
                print(f"wrote the cuda note of {readme}: no CUDA run is recorded in {RESULTS_DIR}")
            except ValueError as exc:
                print(f"no cuda note: {exc}")
        return 0
    quick = not args.full
    from . import networks

    if any(b < 1 for b in (args.batches or ())) or (args.train_batch is not None and args.train_batch < 1):
        parser.error("--batches and --train-batch take batch sizes of at least 1")
    for key, value in (("infer_batches", tuple(args.batches) if args.batches else None),
                       ("train_batch", args.train_batch)):
        if value is not None:
            networks.OVERRIDES[key] = value
    mode = "quick" if quick else "full"
    warmup = DEFAULTS[mode]["warmup"] if args.warmup is None else args.warmup
    repeats = DEFAULTS[mode]["repeats"] if args.repeats is None else args.repeats
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to torch")
    ops = list(OP_BENCHES) if args.ops is None else args.ops
    models = list(MODEL_BENCHES) if args.models is None else args.models
    dev = device_info(device)
    env = environment(device)
    print(f"medkernels bench --{mode} on {dev['name']} ({device}, {dev['threads']} threads), torch {torch.__version__}; "
          f"backends: {', '.join(backends_for(device))}; warm-up {warmup}, repeats {repeats}", flush=True)
    progress = Progress(len(ops) + len(models), enabled=not args.no_progress)
    started, t0, load_start = now_iso(), time.perf_counter(), _load_average()
    op_rows, model_rows, unavailable = run_suite(device, ops, models, quick, warmup, repeats, progress)
    progress.close()
    # other work on the machine distorts CPU timings; the load average says how much there was
    env["load_average"] = {"start": load_start, "end": _load_average()}
    data = {"schema": SCHEMA, "mode": mode, "device": dev, "environment": env,
            "settings": {"warmup": warmup, "repeats": repeats, "ops": ops, "models": models,
                         "notes": _notes(device, quick)},
            "started": started, "duration_s": time.perf_counter() - t0,
            "op_rows": op_rows, "model_rows": model_rows, "unavailable": unavailable}
    print("\n" + format_run(data) + "\n")
    print("notes: " + " | ".join(data["settings"]["notes"]))
    problems = check_schema(data)
    if problems:
        print("warning: the JSON has problems: " + "; ".join(problems[:5]), file=sys.stderr)
    if not args.no_json:
        path = args.out or f"{RESULTS_DIR}/{dev['slug']}.json"
        write_json(data, path)
        print(f"wrote {path}")
        _write_beside(data, path, plot=not args.no_plot)
    if args.update_readme:
        update_readme(args.update_readme, data, source=None if args.no_json else path)
        print(f"wrote the {dev['type']} table of {args.update_readme}")
    print(f"took {data['duration_s']:.0f} s")
    return 0


def _load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _recorded_cuda_runs():
    """The run JSONs of CUDA devices in RESULTS_DIR."""
    runs = []
    for path in sorted(glob.glob(os.path.join(RESULTS_DIR, "*.json"))):
        try:
            if load_json(path)["device"]["type"] == "cuda":
                runs.append(path)
        except (OSError, ValueError):
            continue
    return runs


def _no_cuda_run_note():
    """The cuda block's line while no CUDA run is recorded as JSON: where the archived GPU records are."""
    archived = sorted(glob.glob(os.path.join(RESULTS_DIR, "archive", "nvidia-*")))
    where = ", ".join(f"`{p}`" for p in archived) or "none"
    return (f"No CUDA run is recorded as JSON yet (`bash benchmarks/gpu_session.sh build bench` on a GPU writes "
            f"one); the archived GPU record: {where}.")


def _beside(path, suffix):
    return (path[: -len(".json")] if path.endswith(".json") else path) + suffix


def _write_beside(data, path, plot):
    """The Markdown table of every row (and the plot) next to the run's JSON at `path`."""
    md = _beside(path, ".md")
    with open(md, "w") as f:
        f.write(markdown_report(data, source=os.path.basename(path)))
    print(f"wrote {md}")
    if plot:
        _plot(data, _beside(path, ".png"))


def _plot(data, path):
    from .plot import write_plot

    try:
        write_plot(data, path)
        print(f"wrote {path}")
    except ImportError:
        print("no plot: matplotlib is not installed (pip install -r requirements-bench.txt)")
    except ValueError as exc:
        print(f"no plot: {exc}")


if __name__ == "__main__":
    sys.exit(main())
