"""The benchmark harness (no timing is asserted): it runs, prints a table and writes consistent JSON."""
import json

from medkernels import bench, bench_scan


def test_bench_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--size", "64", "--batch", "1", "--ops", "--warmup", "0", "--repeats", "2",
                       "--json", str(out)]) == 0
    table = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["model"] for r in rows} == set(bench.MODELS)
    assert {r["backend"] for r in rows} == set(bench._backends_for(bench.torch.device("cpu")))
    for row in rows:
        ref = next(r for r in rows if r["model"] == row["model"] and r["backend"] == "ref")
        assert row["speedup_vs_ref"] == ref["median_s"] / row["median_s"]
        assert row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["max_abs_err_vs_ref"] < 1e-3
        assert f"{row['model']:12s} forward  {row['backend']:8s}" in table


def test_update_readme_replaces_only_the_marked_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:cpu -->\nold\n<!-- /bench:cpu -->\noutro\n")
    row = {"model": "medmamba_t", "pass": "forward", "backend": "ref", "batch": 1, "size": 224, "median_s": 2.0,
           "min_s": 1.9, "max_s": 2.1, "images_per_s": 0.5, "speedup_vs_ref": 1.0, "max_abs_err_vs_ref": 0.0}
    bench.update_readme(str(readme), bench.torch.device("cpu"), [row])
    text = readme.read_text()
    assert text.startswith("intro\n<!-- bench:cpu -->\nMeasured ") and text.endswith("<!-- /bench:cpu -->\noutro\n")
    assert "old" not in text and "medmamba_t   forward  ref" in text and "2000.0" in text


def test_scan_bench_ratios_come_from_the_measured_times():
    shape = {"batch": 1, "dim": 4, "L": 16, "N": 4, "G": 2}
    rows = bench_scan.bench_selective_scan(bench.torch.device("cpu"), bench.time_call, 0, 2, shape=shape, memory=True)
    providers = {r["provider"] for r in rows}
    assert {"ref", "cpu"} <= providers or "cpu" not in bench._backends_for(bench.torch.device("cpu"))
    for row in rows:
        base = next(r for r in rows if r["pass"] == row["pass"] and r["provider"] == row["baseline"])
        assert row["speedup"] == base["median_s"] / row["median_s"]
        if row["pass"] == "forward+backward":
            assert row["peak_mem_mb"] >= 0
        else:
            assert row["max_abs_err_vs_ref"] < 1e-4
    ss2d = bench_scan.bench_ss2d(bench.torch.device("cpu"), bench.time_call, 0, 1, shape={"batch": 1, "dim": 2, "H": 3, "W": 4, "N": 2})
    for row in ss2d:
        assert row["max_abs_err_vs_fused"] < 1e-5
        assert row["speedup"] == next(r for r in ss2d if r["provider"] == row["baseline"])["median_s"] / row["median_s"]
