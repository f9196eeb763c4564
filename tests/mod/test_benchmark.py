"""The benchmark command writes its results atomically with the documented keys.
(Speed itself is measured by running it, never asserted in tests.)"""

import json

from launch import benchmark


def test_benchmark_cli_writes_results(tmp_path):
    out = tmp_path / "results.json"
    benchmark.main(["--config", "configs/benchmark.py:tiny", "--out", str(out)])
    results = json.loads(out.read_text())
    for phase in ("prefill", "train_step"):
        assert results[phase]["speedup"] > 0
        assert results[phase]["ideal_speedup"] > 1
        assert results[phase]["dense"]["median_s"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left
