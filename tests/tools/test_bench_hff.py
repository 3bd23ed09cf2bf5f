"""The HFF benchmark harness (no timing is asserted): rows are complete and consistent with the measured times."""
import torch

from benchmarks import hff as bench_hff
from benchmarks.timing import time_call


def test_hff_bench_rows_are_consistent():
    device = torch.device("cpu")
    rows = bench_hff.bench_hff(device, time_call, 0, 2, quick=True, scales=((32, 5),), batch=2)
    providers = set(bench_hff.hff_providers(device))
    assert {r["provider"] for r in rows if r["op"] == "hff_attention_tail"} == providers
    assert {r["provider"] for r in rows if r["op"] == "hff_block"} == providers - {"compile"}
    assert {(r["op"], r["pass"]) for r in rows} == {("hff_attention_tail", "forward"),
                                                     ("hff_attention_tail", "forward+backward"),
                                                     ("hff_block", "forward+backward")}
    for row in rows:
        base = next(r for r in rows if r["op"] == row["op"] and r["pass"] == row["pass"] and r["provider"] == "eager")
        assert row["baseline"] == "eager" and row["speedup"] == base["median_s"] / row["median_s"]
        assert row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["repeats"] == (2 if row["op"] == "hff_attention_tail" else 1)  # quick: the block gets half
        assert row["shape"] == {"batch": 2, "channels": 32, "H": 5, "W": 5, "dtype": "float32"}
        assert row["max_abs_err_vs_ref"] < 1e-4, row


def test_hff_providers_are_timed_interleaved():
    # every timed call is a single one (warm-up 0, repeats 1) made by benchmarks.timing.time_interleaved
    calls = []

    def time_call(fn, device, warmup, repeats):
        calls.append((warmup, repeats))
        fn()
        return {"median_s": 1.0}

    bench_hff.bench_hff(torch.device("cpu"), time_call, 1, 2, quick=True, scales=((16, 4),), batch=2)
    assert calls and set(calls) == {(0, 1)}


def test_hff_rows_join_the_run_json(tmp_path, monkeypatch, capsys):
    """python -m benchmarks --ops hff_attention: the HFF rows land in the run's JSON as op_rows and in the
    Markdown table beside it (the benchmark itself shrunk to one tiny scale)."""
    import functools
    import json

    from benchmarks import cli, registry, report

    tiny = functools.partial(bench_hff.bench_hff, scales=((16, 4),), batch=2)
    monkeypatch.setattr(registry, "OP_BENCHES", {"hff_attention": tiny})
    monkeypatch.setattr(cli, "OP_BENCHES", registry.OP_BENCHES)
    path = tmp_path / "run.json"
    assert cli.main(["--device", "cpu", "--ops", "hff_attention", "--models", "--warmup", "0", "--repeats", "1",
                     "--no-plot", "--no-progress", "--out", str(path)]) == 0
    data = json.loads(path.read_text())
    assert report.check_schema(data) == []
    assert {r["op"] for r in data["op_rows"]} == {"hff_attention_tail", "hff_block"} and not data["model_rows"]
    assert all(r["repeats"] == 1 and r["status"] == "ok" for r in data["op_rows"])
    md = path.with_suffix(".md").read_text()
    assert "| hff_attention_tail | forward |" in md and md.count("| hff_block |") == len(bench_hff.hff_providers(
        torch.device("cpu")))
    assert not list(tmp_path.glob("*.txt"))
