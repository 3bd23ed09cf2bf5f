"""The HFF benchmark harness (no timing is asserted): rows are complete and consistent with the measured times."""
import torch

from medkernels import bench, bench_hff


def test_hff_bench_rows_are_consistent():
    device = torch.device("cpu")
    rows = bench_hff.bench_hff(device, bench.time_call, 0, 2, quick=True, scales=((32, 5),), batch=2)
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
    table = bench_hff.format_rows(rows)
    assert table.count("\n") == len(rows) + 1 and "hff_attention_tail  forward" in table


def test_hff_providers_are_timed_interleaved():
    # every timed call is a single one (warm-up 0, repeats 1) made by bench_timing.time_interleaved
    calls = []

    def time_call(fn, device, warmup, repeats):
        calls.append((warmup, repeats))
        fn()
        return {"median_s": 1.0}

    bench_hff.bench_hff(torch.device("cpu"), time_call, 1, 2, quick=True, scales=((16, 4),), batch=2)
    assert calls and set(calls) == {(0, 1)}


def test_hff_bench_main_writes_json(tmp_path, monkeypatch, capsys):
    """python -m medkernels.bench_hff --json FILE: the printed table and the JSON file hold the same rows (the
    benchmark itself shrunk to one tiny scale)."""
    import functools
    import json

    tiny = functools.partial(bench_hff.bench_hff, scales=((16, 4),), batch=2)
    monkeypatch.setattr(bench_hff, "bench_hff", lambda device, time_call, warmup, repeats, quick, dtypes: tiny(
        device, time_call, warmup, repeats, quick=quick, dtypes=dtypes))
    path = tmp_path / "hff.json"
    assert bench_hff.main(["--device", "cpu", "--warmup", "0", "--repeats", "1", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["device"] == "cpu" and record["args"]["repeats"] == 1 and record["threads"] == torch.get_num_threads()
    assert {"op", "pass", "provider", "median_s"} <= set(record["rows"][0])
    assert bench_hff.format_rows(record["rows"]).splitlines()[0] in capsys.readouterr().out
