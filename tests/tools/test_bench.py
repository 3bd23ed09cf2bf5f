"""The benchmark harness, on tiny shapes: it runs, writes a well-formed JSON whose ratios are the measured
times' ratios, skips what cannot run with a note, and writes the README block and the plot. No timing is
asserted."""
import io
import json

import pytest
import torch

from benchmarks import cli, networks, registry, report, scan
from benchmarks.op import run_op_bench
from benchmarks.progress import Progress

TINY_SCAN = [{"batch": 1, "dim": 4, "L": 12, "N": 4, "G": 2}]
TINY_SS2D = [{"batch": 1, "dim": 2, "H": 3, "W": 4, "N": 2}]
TINY_MODEL = {"size": 32, "infer_batches": (1,), "train_batch": 2, "compile": False, "memory": False}


def _tiny_scan(device, time_call, warmup, repeats, quick=True):
    return scan.bench_selective_scan(device, time_call, warmup, repeats, quick, shapes=TINY_SCAN, memory=False)


def _tiny_ss2d(device, time_call, warmup, repeats, quick=True):
    return scan.bench_ss2d(device, time_call, warmup, repeats, quick, shapes=TINY_SS2D, memory=False)


def _tiny_network(name, device):
    """A few-channel, one-block-per-stage network of the same class: the harness, not the network, is tested."""
    from medkernels.models import HiFuse, MedMamba

    torch.manual_seed(0)
    if name == "hifuse_tiny":
        return HiFuse(num_classes=networks.NUM_CLASSES, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                      conv_depths=(1, 1, 1, 1), conv_dims=(16, 32, 64, 128)).to(device)
    return MedMamba(num_classes=networks.NUM_CLASSES, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), drop_path_rate=0.0).to(device)


def _tiny_model(name):
    def run(device, time_call, warmup, repeats, quick=True):
        return networks.bench_model(name, device, time_call, warmup, repeats, quick, cfg=TINY_MODEL,
                                        build=lambda d: _tiny_network(name, d))

    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run of the whole CLI: two op benchmarks, a missing op module, both networks."""
    out = tmp_path_factory.mktemp("bench") / "run.json"
    patch = pytest.MonkeyPatch()
    patch.setattr(registry, "OP_BENCHES", {"selective_scan": _tiny_scan, "ss2d_scan": _tiny_ss2d,
                                                 "depthwise_conv2d": "benchmarks.not_here:bench"})
    patch.setattr(registry, "MODEL_BENCHES", {m: _tiny_model(m) for m in ("hifuse_tiny", "medmamba_t")})
    patch.setattr(cli, "OP_BENCHES", registry.OP_BENCHES)
    patch.setattr(cli, "MODEL_BENCHES", registry.MODEL_BENCHES)
    stdout, stderr = io.StringIO(), io.StringIO()
    with patch.context() as p:
        p.setattr("sys.stdout", stdout)
        p.setattr("sys.stderr", stderr)
        code = cli.main(["--quick", "--device", "cpu", "--warmup", "1", "--repeats", "2", "--out", str(out)])
    patch.undo()
    return {"code": code, "path": out, "data": json.loads(out.read_text()), "stdout": stdout.getvalue(),
            "stderr": stderr.getvalue()}


def test_the_json_is_well_formed(run):
    assert run["code"] == 0
    data = run["data"]
    assert report.check_schema(data) == []
    assert report.load_json(str(run["path"]))["schema"] == report.SCHEMA
    env = data["environment"]
    for key in ("torch", "python", "medkernels", "cpu", "threads", "git_commit", "backends", "load_average"):
        assert key in env
    assert data["mode"] == "quick" and data["device"]["type"] == "cpu" and data["device"]["slug"].startswith("cpu-")
    assert {r["op"] for r in data["op_rows"]} == {"selective_scan", "ss2d_scan"}
    assert {r["model"] for r in data["model_rows"]} == {"hifuse_tiny", "medmamba_t"}
    assert {r["pass"] for r in data["model_rows"]} == {networks.INFERENCE, networks.TRAIN}


def test_ratios_are_the_measured_times_ratios(run):
    for rows in (run["data"]["op_rows"], run["data"]["model_rows"]):
        for row in rows:
            if row["status"] != "ok":
                assert row["note"]
                continue
            assert row["min_s"] <= row["median_s"] <= row["max_s"] and row["repeats"] == 2
            base = next(r for r in rows if r["op"] == row["op"] and r["pass"] == row["pass"]
                        and r["label"] == row["label"] and r["provider"] == row["baseline"])
            assert row["speedup"] == pytest.approx(base["median_s"] / row["median_s"], rel=1e-12)
            err, vs = report.error_of(row)
            assert vs == row["baseline"] and err is not None


def test_rows_that_cannot_run_are_reported_not_dropped(run):
    rows = run["data"]["op_rows"] + run["data"]["model_rows"]
    compiled = [r for r in rows if r["provider"] == "ref-compiled"]
    assert compiled and all(r["status"] == "skipped" for r in compiled)
    # MedMamba on CPU is never compiled (the ref scan is a Python loop); the other rows only in --full or
    # at the goal batch
    assert all(("Python loop" in r["note"]) if r.get("model", "").startswith("medmamba") else ("--quick" in r["note"])
               for r in compiled)
    assert "ref-compiled" in run["stdout"] and "skipped" in run["stdout"]


def test_a_missing_op_module_is_skipped_with_a_note(run):
    assert run["data"]["unavailable"] == [{"kind": "op", "name": "depthwise_conv2d",
                                           "reason": "skipped: benchmarks.not_here is not in this checkout"}]
    assert "depthwise_conv2d skipped" in run["stderr"]
    assert "not run: op depthwise_conv2d" in run["stdout"]


def test_registry_load():
    assert registry.load("benchmarks.scan:bench_selective_scan") is scan.bench_selective_scan
    with pytest.raises(registry.BenchUnavailable, match="not in this checkout"):
        registry.load("benchmarks.absent:bench")
    with pytest.raises(registry.BenchUnavailable, match="has no"):
        registry.load("benchmarks.scan:no_such_function")


def test_progress_writes_plain_lines_when_not_a_tty(run):
    assert "\r" not in run["stderr"]
    assert "[1/5] op selective_scan ..." in run["stderr"] and "[5/5] model medmamba_t: done in" in run["stderr"]

    class FakeTTY(io.StringIO):
        def isatty(self):
            return True

    tty = FakeTTY()
    progress = Progress(2, stream=tty)
    progress.begin("op x")
    progress.tick()
    progress.note("something skipped")
    progress.end()
    progress.close()
    assert "\r" in tty.getvalue() and "note: something skipped\n" in tty.getvalue()


def test_every_row_is_in_the_markdown_beside_the_json(run):
    md = run["path"].with_suffix(".md").read_text()
    assert md.count("| selective_scan | ") == len([r for r in run["data"]["op_rows"] if r["op"] == "selective_scan"])
    assert md.count("| medmamba_t | ") == len([r for r in run["data"]["model_rows"] if r["op"] == "medmamba_t"])


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    """(width, height) from the PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_plot_from_redraws_without_timing(run, tmp_path):
    import matplotlib  # noqa: F401  (a dev requirement: missing, this fails instead of skipping)

    copy = tmp_path / "again.json"
    copy.write_text(run["path"].read_text())
    assert cli.main(["--plot-from", str(copy)]) == 0
    assert _png_size(copy.with_suffix(".png")) == _png_size(run["path"].with_suffix(".png"))
    assert copy.with_suffix(".md").read_text() == run["path"].with_suffix(".md").read_text().replace(
        run["path"].name, copy.name)


def test_plot_is_written(run):
    """The run writes a PNG beside its JSON, of a sane size, and says so."""
    import matplotlib  # noqa: F401  (a dev requirement: missing, this fails instead of skipping)

    png = run["path"].with_suffix(".png")
    width, height = _png_size(png)
    assert 800 <= width <= 2000 and 200 <= height <= 2000
    assert f"wrote {png}" in run["stdout"] and "no plot" not in run["stdout"]


def test_plot_draws_one_bar_label_and_note_per_headline(run, tmp_path, monkeypatch):
    """One panel per group (ops, networks); per headline speed-up one bar from 1x to its geometric mean, its
    y label and its "<x>x vs <baseline>" note, first entry on top; a legend entry per baseline; the PNG is that
    figure (same aspect) and not blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.image import imread

    from benchmarks import plot

    groups = plot.plot_groups(run["data"])
    assert [title.split(":")[0] for title, _ in groups] == ["ops", "networks"]
    assert {h["name"] for _, entries in groups for h in entries} == {"selective_scan", "ss2d_scan", "hifuse_tiny",
                                                                     "medmamba_t"}
    close = plt.close
    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    png = tmp_path / "figure.png"
    plot.write_plot(run["data"], png)
    (fig,) = kept
    try:
        assert len(fig.axes) == len(groups)
        for ax, (title, entries) in zip(fig.axes, groups):
            assert ax.get_title(loc="left") == title
            top = len(entries) - 1
            bars = sorted(ax.patches, key=lambda bar: -bar.get_y())
            assert len(bars) == len(entries)
            for i, (bar, h) in enumerate(zip(bars, entries)):
                assert bar.get_y() + bar.get_height() / 2 == pytest.approx(top - i)
                span = (bar.get_x(), bar.get_x() + bar.get_width())
                assert span == pytest.approx((min(h["geomean"], 1.0), max(h["geomean"], 1.0)), abs=1.01e-3)
            labels = {round(t.get_position()[1]): t.get_text() for t in ax.get_yticklabels()}
            assert labels == {top - i: f"{h['name']}  {plot.PASS_SHORT[h['pass']]}  ({h['what']})"
                              for i, h in enumerate(entries)}
            notes = {round(t.xy[1]): t.get_text() for t in ax.texts}
            assert notes == {top - i: f"{h['geomean']:.3g}x vs {h['baseline']}" for i, h in enumerate(entries)}
        baselines = list(dict.fromkeys(h["baseline"] for _, entries in groups for h in entries))
        assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [f"vs {b}" for b in baselines]
        fig_w, fig_h = fig.get_size_inches()
    finally:
        close(fig)
    width, height = _png_size(png)
    assert height / width == pytest.approx(fig_h / fig_w, abs=2 / width)
    pixels = imread(png)
    assert pixels.shape[:2] == (height, width)
    assert len(torch.unique(torch.from_numpy(pixels.reshape(-1, pixels.shape[-1])), dim=0)) > 10


def test_readme_from_json_replaces_only_the_marked_block(run, tmp_path):
    readme = tmp_path / "README.md"
    before = "intro\n<!-- bench:cpu -->\nold table\n<!-- /bench:cpu -->\nmiddle\n<!-- bench:cuda -->\nkeep\n<!-- /bench:cuda -->\n"
    readme.write_text(before)
    assert cli.main(["--readme-from", str(run["path"]), "--update-readme", str(readme)]) == 0
    text = readme.read_text()
    head, block = text.split("<!-- bench:cpu -->\n")
    block, tail = block.split("<!-- /bench:cpu -->")
    assert head == "intro\n" and tail.startswith("\nmiddle\n<!-- bench:cuda -->\n")
    assert "old table" not in block and block.startswith(f"Measured {run['data']['started'][:10]} on ")
    # the summary: the networks' medkernels and baseline rows, each op's headline, a link to every row
    assert "| **medmamba_t** | train step |" in block and "| **hifuse_tiny** | inference |" in block
    assert "| `selective_scan` | forward+backward |" in block and "| `ss2d_scan` | forward+backward |" in block
    assert block.count("\n| ") <= 2 + 12 and str(run["path"].with_suffix(".md")) in block
    if not cli._recorded_cuda_runs():  # no CUDA run recorded: the cuda block says where the GPU records are
        assert "No CUDA run is recorded" in tail and "keep" not in tail
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="bench:cpu"):
        cli.main(["--readme-from", str(run["path"]), "--update-readme", str(readme)])


def test_schema_check_finds_problems(run):
    data = json.loads(json.dumps(run["data"]))
    data["op_rows"][0].update(status="ok", median_s=None)
    data["op_rows"][1].update(status="skipped", note=None)
    del data["environment"]
    problems = report.check_schema(data)
    assert any("environment" in p for p in problems)
    assert any("op_rows[0]" in p for p in problems) and any("op_rows[1]" in p for p in problems)


def test_a_failing_provider_is_a_failed_row():
    def broken(t):
        raise RuntimeError("kernel exploded")

    inputs = {"x": torch.randn(3, 4)}
    rows = run_op_bench("demo", {"n": 3}, inputs, {"ref": lambda t: t["x"] * 2, "broken": broken, "later": lambda t: t["x"]},
                        torch.device("cpu"), cli.time_call, 0, 1, skip={("later", "forward"): "skipped: not today"})
    by = {(r["provider"], r["pass"]): r for r in rows}
    assert by[("broken", "forward")]["status"] == "failed" and "kernel exploded" in by[("broken", "forward")]["note"]
    assert by[("later", "forward")]["status"] == "skipped" and by[("later", "forward+backward")]["status"] == "ok"
    assert by[("later", "forward+backward")]["max_abs_err_vs_ref"] > 0  # x, not 2x: a wrong result shows


def test_stage_shapes_are_medmamba_t_at_224():
    from medkernels.models import medmamba_t
    from medkernels.nn.ss2d import SS2D

    model = medmamba_t(num_classes=2)
    for (stage, d_inner, side), layer in zip(scan.MEDMAMBA_T_STAGES, model.layers):
        ss2d = [m for m in layer.modules() if isinstance(m, SS2D)]
        assert {m.d_inner for m in ss2d} == {d_inner} and side == 224 // 4 // 2 ** (stage - 1)
        assert ss2d[0].d_state == scan.N


def test_official_ss2d_formulation_matches_the_fused_core():
    """The formulation the `official`/`mambapy` model providers patch in computes what SS2D computes."""
    from medkernels.nn.ss2d import SS2D

    torch.manual_seed(0)
    ss2d = SS2D(d_model=8, d_state=4)
    x = torch.randn(2, ss2d.d_inner, 3, 5)
    official = networks._official_forward_core(
        lambda u, delta, A, B, C, D, delta_bias: scan._ref_scan(
            {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "delta_bias": delta_bias}))
    with torch.no_grad():
        assert torch.allclose(official(ss2d, x).reshape(2, ss2d.d_inner, 15), ss2d.forward_core(x), atol=1e-5)


def test_quick_caps_the_repeats_of_slow_rows_only():
    from benchmarks.timing import repeats_within

    assert repeats_within(0.01, 3, budget_s=6.0) == 3
    assert repeats_within(10.0, 3, budget_s=6.0) == 2  # never below two timed calls
    assert repeats_within(10.0, 5, budget_s=None) == 5


def test_skip_rules_name_their_reason():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert "--quick" in scan.compile_skip_reason(cpu, True, 49)
    assert scan.compile_skip_reason(cpu, False, 49) is None
    assert "L = 3136" in scan.compile_skip_reason(cuda, False, 3136)
    assert "L = 3136" in scan.ref_backward_skip_reason(cpu, 2, 384, 3136, 16)
    assert scan.ref_backward_skip_reason(cpu, 2, 3072, 49, 16) is None
    assert scan.ref_backward_skip_reason(cuda, 2, 384, 3136, 16) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_asking_for_cuda_without_a_gpu_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--device", "cuda", "--no-json"])
    assert "no CUDA device" in capsys.readouterr().err


def test_providers_are_timed_round_by_round():
    from benchmarks.timing import time_interleaved

    order = []
    fake_times = {"a": 1.0, "b": 3.0}

    def time_call(fn, device, warmup, repeats):
        assert (warmup, repeats) == (0, 1)  # one timed call per provider and round
        return {"median_s": fake_times[fn()]}

    calls = {name: (lambda name=name: order.append(name) or name) for name in ("a", "b")}
    stats = time_interleaved(time_call, torch.device("cpu"), calls, warmup=1, repeats=3)
    assert order == ["a", "b"] + ["a", "b"] * 3  # the warm-up calls, then alternating rounds
    assert stats["a"]["repeats"] == 3 and stats["a"]["median_s"] == 1.0 and stats["b"]["median_s"] == 3.0


@pytest.mark.parametrize("lines, name", [
    (["model name\t: AMD EPYC", "cpu family\t: 25", "model\t\t: 17"], "AMD EPYC (family 25, model 17)"),
    (["model name\t: AMD EPYC 9B14 96-Core Processor", "cpu family\t: 25", "model\t\t: 17"],
     "AMD EPYC 9B14 96-Core Processor"),
], ids=["masked-model-gets-family", "named-model-kept"])
def test_cpu_name_tells_masked_cpu_generations_apart(monkeypatch, tmp_path, lines, name):
    """A VM that hides the model number still gets a name (and results file) per CPU generation."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\n" + "\n".join(lines) + "\n\nprocessor\t: 1\n" + "\n".join(lines) + "\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(info if path == "/proc/cpuinfo" else path,
                                                                         *a, **k))
    assert report.cpu_name() == name
