"""What a benchmark run leaves behind: the environment record, the JSON (and its schema check), the stdout
tables and the README blocks written from a JSON."""
import json
import math
import os
import platform
import re
import subprocess
import time

import torch

SCHEMA = "medkernels-bench/1"
ROW_KEYS = {"op": str, "pass": str, "provider": str, "shape": dict, "label": str, "status": str,
            "median_s": (float, type(None)), "min_s": (float, type(None)), "max_s": (float, type(None)),
            "repeats": int}
STATUSES = ("ok", "skipped", "failed")
TOP_KEYS = {"schema": str, "mode": str, "device": dict, "environment": dict, "settings": dict, "started": str,
            "duration_s": float, "op_rows": list, "model_rows": list, "unavailable": list}
ERR_PREFIX = "max_abs_err_vs_"


def cpu_name():
    """/proc/cpuinfo's model name; where a VM hides the model number ("AMD EPYC"), with the family and model, which
    tell CPU generations apart (AMD family 25 model 17 is Zen 4, family 26 Zen 5)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name")
    if not name:
        return platform.processor() or platform.machine()
    if not re.search(r"\d", name) and fields.get("cpu family") and fields.get("model"):
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def device_info(device):
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        slug = slugify(name)
    else:
        name = cpu_name()
        slug = f"cpu-{slugify(name)}-{torch.get_num_threads()}t"
    return {"type": device.type, "name": name, "slug": slug, "threads": torch.get_num_threads()}


def slugify(name):
    name = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|\b\d+-core\b|@.*$", " ", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown"


def git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return res.stdout.strip() + ("-dirty" if dirty else "") if res.returncode == 0 else "unknown"


def _version(module):
    try:
        return __import__(module).__version__
    except Exception:
        return None


def environment(device):
    from medkernels.info import info

    env = info()
    env.update({"cpu": cpu_name(), "machine": platform.machine(), "os": platform.platform(),
                "threads": torch.get_num_threads(), "git_commit": git_commit(),
                "mambapy": _version("mambapy"), "mamba_ssm": _version("mamba_ssm")})
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def normalize_row(row):
    """Fill the keys every row must have, for rows from op modules that leave some out."""
    row.setdefault("note", None)
    row.setdefault("status", "ok" if row.get("median_s") is not None else "failed")
    row.setdefault("shape", {})
    row.setdefault("label", " ".join(f"{k}={v}" for k, v in row["shape"].items()))
    for key in ("median_s", "min_s", "max_s"):
        row[key] = None if row.get(key) is None else float(row[key])
    row["repeats"] = int(row.get("repeats") or 0)
    return row


def check_schema(data):
    """Problems with a run's JSON, as a list of sentences (empty when it is well formed)."""
    problems = []
    for key, kind in TOP_KEYS.items():
        if not isinstance(data.get(key), kind):
            problems.append(f"top-level {key!r} missing or not {kind}")
    if data.get("schema") != SCHEMA:
        problems.append(f"schema is {data.get('schema')!r}, expected {SCHEMA!r}")
    for where in ("op_rows", "model_rows"):
        for i, row in enumerate(data.get(where) or []):
            for key, kind in ROW_KEYS.items():
                if not isinstance(row.get(key), kind):
                    problems.append(f"{where}[{i}] {key!r} missing or not {kind}")
            if row.get("status") not in STATUSES:
                problems.append(f"{where}[{i}] status {row.get('status')!r} not in {STATUSES}")
            elif row["status"] == "ok":
                if not all(isinstance(row.get(k), float) for k in ("median_s", "min_s", "max_s")):
                    problems.append(f"{where}[{i}] ran but has no times")
                elif not row["min_s"] <= row["median_s"] <= row["max_s"]:
                    problems.append(f"{where}[{i}] median outside its spread")
            elif not row.get("note"):
                problems.append(f"{where}[{i}] is {row['status']} without a note saying why")
    return problems


def error_of(row):
    """(value, what it was compared with) of a row's error column, or (None, None)."""
    for key, value in row.items():
        if key.startswith(ERR_PREFIX) and value is not None:
            return value, key[len(ERR_PREFIX):]
    return None, None


def _ms(v, scale=None):
    """Milliseconds with the decimals that suit `scale` (default: the value itself)."""
    if v is None:
        return "-"
    ms, ref = 1e3 * v, 1e3 * (v if scale is None else scale)
    return f"{ms:.3f}" if ref < 1 else f"{ms:.1f}" if ref < 1e4 else f"{ms:.0f}"


def _cells(row, model):
    ok = row["status"] == "ok"
    err, vs = error_of(row)
    speed = f"{row['speedup']:.2f}x vs {row['baseline']}" if ok and row.get("speedup") is not None else "-"
    note = row.get("note") or ""
    if ok and row.get("first_call_s") is not None and row["provider"].endswith("-compiled"):
        note = (note + "; " if note else "") + f"compile+first call {row['first_call_s']:.1f} s"
    cells = [row["op"], row["pass"], row.get("label", ""), row["provider"]]
    if ok:
        cells += [_ms(row["median_s"]), f"{_ms(row['min_s'], row['max_s'])}-{_ms(row['max_s'])}"]
    else:
        cells += [row["status"], ""]
    if model:
        cells.append(f"{row['images_per_s']:.2f}" if ok and row.get("images_per_s") else "-")
    cells += [speed, f"{row['peak_mem_mb']:.0f}" if row.get("peak_mem_mb") is not None else "-",
              f"{err:.1e}" if err is not None else "-"]
    if model:
        rel = row.get("rel_err_vs_float32")
        cells.append(f"{rel:.1e}" if ok and rel is not None else "-")
    cells.append(note)
    return cells


def format_table(rows, model=False, markdown=False):
    """One line per row, aligned (or a Markdown table), skipped and failed rows with their reason."""
    head = ["model" if model else "op", "pass", "shape", "provider", "median ms", "spread ms"]
    head += (["img/s"] if model else []) + ["speed-up", "peak MB", "max|err|"]
    head += (["rel err vs fp32"] if model else []) + ["note"]
    body = [_cells(r, model) for r in rows]
    if markdown:
        md = lambda cells: "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"  # noqa: E731
        return "\n".join([md(head), "|" + "---|" * len(head)] + [md(c) for c in body])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    numeric = {"median ms", "spread ms", "img/s", "peak MB", "max|err|", "speed-up", "rel err vs fp32"}

    def line(cells):
        out = [str(c).rjust(w) if h in numeric else str(c).ljust(w) for c, w, h in zip(cells, widths, head)]
        return "  ".join(out).rstrip()

    return "\n".join([line(head), "-" * len(line(head))] + [line(c) for c in body])


def format_run(data, markdown=False):
    parts = []
    if data["op_rows"]:
        parts.append(format_table(data["op_rows"], markdown=markdown))
    if data["model_rows"]:
        parts.append(format_table(data["model_rows"], model=True, markdown=markdown))
    for item in data["unavailable"]:
        parts.append(f"not run: {item['kind']} `{item['name']}`: {item['reason']}" if markdown else
                     f"not run: {item['kind']} {item['name']}: {item['reason']}")
    return "\n\n".join(parts)


def write_json(data, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def load_json(path):
    with open(path) as f:
        data = json.load(f)
    problems = check_schema(data)
    if problems:
        raise ValueError(f"{path} is not a medkernels benchmark JSON ({SCHEMA}): " + "; ".join(problems[:5]))
    return data


def run_header(data):
    """One sentence: when, where, which commit and which command."""
    dev, env = data["device"], data["environment"]
    commit = str(env.get("git_commit", "unknown"))
    commit = commit[:12] + (" with local changes" if commit.endswith("-dirty") else "")
    load = (env.get("load_average") or {}).get("start")
    busy = f", load average {load[0]:g} at the start" if load else ""
    return (f"Measured {data['started'][:10]} on {dev['name']} ({dev['threads']} threads{busy}), torch "
            f"{env.get('torch')}, commit {commit}, `python -m benchmarks --{data['mode']}`")


def markdown_report(data, source=None):
    """The whole run as Markdown: the header, the notes and a table of every row (``<device>.md``)."""
    dev = data["device"]
    notes = "".join(f"- {n}\n" for n in data["settings"].get("notes", []))
    src = f" Generated from `{source}` by `python -m benchmarks`; do not edit." if source else ""
    return (f"# medkernels benchmarks: {dev['name']} ({dev['type']})\n\n{run_header(data)}.{src}\n\n"
            f"{notes}\n{format_run(data, markdown=True)}\n")


# the providers that are medkernels' own kernels (every other op provider is a baseline)
KERNEL_PROVIDERS = ("cpu", "cuda", "triton")
SUMMARY_MAX_ROWS = 14


def main_provider(data):
    """The medkernels provider a user of the device gets: the ``cuda`` kernels on a GPU, else ``cpu``."""
    return "cuda" if data["device"]["type"] == "cuda" else "cpu"


def _is_op_baseline(provider):
    return provider.split("-")[0] not in KERNEL_PROVIDERS


def _geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def headline_speedups(data):
    """The speed-ups a reader looks for, as [{"kind": "op"|"network", "name", "pass", "baseline", "geomean",
    "min", "max", "n", "what"}]: each op's main medkernels provider against each baseline over the stage shapes
    it ran at (both passes), and each network's ``medkernels`` float32 rows against each float32 baseline (the
    largest inference batch and the training step). Only rows where both sides ran count."""
    out = []
    main = main_provider(data)
    groups = {}  # (op, pass) -> {label: {provider: row}}
    for row in data["op_rows"]:
        if row["status"] == "ok":
            groups.setdefault((row["op"], row["pass"]), {}).setdefault(row["label"], {})[row["provider"]] = row
    for (op, pass_name), by_label in groups.items():
        baselines = sorted({p for rows in by_label.values() for p in rows if _is_op_baseline(p)})
        for base in baselines:
            ratios = [rows[base]["median_s"] / rows[main]["median_s"] for rows in by_label.values()
                      if main in rows and base in rows]
            if ratios:
                out.append({"kind": "op", "name": op, "pass": pass_name, "provider": main, "baseline": base,
                            "geomean": _geomean(ratios), "min": min(ratios), "max": max(ratios), "n": len(ratios),
                            "what": f"{len(ratios)} stage shape{'s' if len(ratios) > 1 else ''}"})
    for name, pass_name, batch, rows in network_groups(data):
        mk = rows.get("medkernels")
        for base, row in rows.items():
            if " " in base or base == "medkernels" or mk is None or mk["status"] != "ok" or row["status"] != "ok":
                continue
            ratio = row["median_s"] / mk["median_s"]
            out.append({"kind": "network", "name": name, "pass": pass_name, "provider": "medkernels", "baseline": base,
                        "geomean": ratio, "min": ratio, "max": ratio, "n": 1, "what": f"batch {batch}"})
    return out


def network_groups(data):
    """[(network, pass, batch, {provider: row})] for the largest inference batch and the training step."""
    groups = {}
    for row in data["model_rows"]:
        groups.setdefault((row["op"], row["pass"], row.get("batch")), {})[row["provider"]] = row
    largest = {}
    for (name, pass_name, batch) in groups:
        key = (name, pass_name)
        if batch is not None and (key not in largest or batch > largest[key]):
            largest[key] = batch
    return [(name, pass_name, batch, groups[(name, pass_name, batch)])
            for (name, pass_name), batch in largest.items()]


def _why(row):
    note = (row.get("note") or "").split(":")[0] if row["status"] == "failed" else "skipped"
    return f"{row['status']}" + (f" ({note})" if row["status"] == "failed" and note else "")


def summary_table(data):
    """At most SUMMARY_MAX_ROWS Markdown rows: the networks (medkernels against its main baseline, inference and
    training), then each op's forward+backward speed-up of the main medkernels provider (op_headlines)."""
    head = ["", "pass", "shape", "medkernels", "baseline", "speed-up"]
    lines = []
    for name, pass_name, batch, rows in network_groups(data):
        mk = rows.get("medkernels")
        base_name = next((b for b in ("ref", "mambapy", "official") if b in rows and rows[b]["status"] == "ok"),
                         next((b for b in ("ref", "mambapy", "official") if b in rows), None))
        base = rows.get(base_name) if base_name else None
        size = (mk or base or {}).get("size")

        def cell(row, label):
            if row is None:
                return "-"
            if row["status"] != "ok":
                return f"{label}: {_why(row)}"
            rate = f", {row['images_per_s']:.1f} img/s" if row.get("images_per_s") else ""
            return f"{label}: {_ms(row['median_s'])} ms{rate}"

        ok = mk is not None and base is not None and mk["status"] == "ok" and base["status"] == "ok"
        lines.append([f"**{name}**", pass_name, f"batch {batch}" + (f", {size}x{size}" if size else ""),
                      cell(mk, "medkernels"), cell(base, base_name) if base_name else "-",
                      f"**{base['median_s'] / mk['median_s']:.2f}x**" if ok else "-"])
        for other in ("ref-compiled", "mambapy"):  # the other baselines a user could run instead
            row = rows.get(other)
            if other != base_name and row is not None and row["status"] == "ok" and mk is not None and mk["status"] == "ok":
                lines.append([f"**{name}**", pass_name, f"batch {batch}" + (f", {size}x{size}" if size else ""),
                              cell(mk, "medkernels"), cell(row, other), f"**{row['median_s'] / mk['median_s']:.2f}x**"])
    for h in op_headlines(data):
        spread = f" ({h['min']:.2f}x-{h['max']:.2f}x)" if h["n"] > 1 else ""
        lines.append([f"`{h['name']}`", h["pass"], h["what"], h["provider"], h["baseline"],
                      f"**{h['geomean']:.2f}x**{spread}"])
    lines = lines[:SUMMARY_MAX_ROWS]
    md = lambda cells: "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"  # noqa: E731
    return "\n".join([md(head), "|" + "---|" * len(head)] + [md(c) for c in lines])


FWD_BWD_PASS = "forward+backward"
# which baseline an op's headline is against, when several ran at as many shapes
BASELINE_PREFERENCE = ("mambapy", "mamba_ssm", "pytorch", "eager", "ref", "compile", "ref-compiled")


def op_headlines(data):
    """One headline per op: forward+backward of the main medkernels provider against the baseline that ran at
    the most stage shapes (ties: BASELINE_PREFERENCE), geometric mean over those shapes."""
    best = {}
    for h in headline_speedups(data):
        if h["kind"] != "op" or h["pass"] != FWD_BWD_PASS:
            continue
        rank = BASELINE_PREFERENCE.index(h["baseline"]) if h["baseline"] in BASELINE_PREFERENCE else 99
        key = (-h["n"], rank)
        if h["name"] not in best or key < best[h["name"]][0]:
            best[h["name"]] = (key, h)
    return [h for _, h in best.values()]


def readme_block(data, source=None):
    """The text between a device's README markers, written from a run's JSON: the headline rows and a link
    to the generated table of every row (``<device>.md`` beside the JSON `source`)."""
    head = run_header(data) + ":"
    table = summary_table(data)
    ops_missing = not data["op_rows"]
    notes = []
    if ops_missing:
        notes.append("the ops were not timed in this run (`--ops` given no name)")
    if source:
        md = source[: -len(".json")] + ".md" if source.endswith(".json") else source + ".md"
        png = md[: -len(".md")] + ".png"
        notes.append(f"every row (all providers, precisions, batches, errors): [`{md}`]({md}); plot: "
                     f"[`{png}`]({png}); figures in `{source}`")
    notes += data["settings"].get("notes", [])
    return f"{head}\n\n{table}\n\n" + "".join(f"- {n}\n" for n in notes).rstrip("\n")


def update_readme(path, data, source=None, kind=None, block=None):
    """Replace what lies between ``<!-- bench:<type> -->`` and ``<!-- /bench:<type> -->``, nothing else: with
    the block of the run `data`, or (data None) with `block` for device type `kind`."""
    kind = kind or data["device"]["type"]
    begin, end = f"<!-- bench:{kind} -->", f"<!-- /bench:{kind} -->"
    with open(path) as f:
        text = f.read()
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"{path} needs exactly one {begin} ... {end} pair")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(f"{head}{begin}\n{readme_block(data, source) if data is not None else block}\n{end}{tail}")
