"""The benchmark harness (no timing is asserted): it runs, prints a table and writes consistent JSON."""
import json

from medkernels import bench


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
