"""Smoke tests of the benchmark scripts (quick settings: they check the scripts run and
write well-formed results, not the figures)."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attention_speed_quick(tmp_path):
    bench = _load("attention_speed")
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--quick", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # main() sets one thread per core
    files = list(tmp_path.glob("attention_speed-cpu-*.json"))
    assert len(files) == 1, files
    data = json.loads(files[0].read_text())
    assert data == json.loads(json.dumps(result))
    assert data["benchmark"] == "attention_speed"
    assert "attention_speed.py" in data["command"] and "--quick" in data["command"]
    assert set(data["machine"]) >= {"cpu", "cores", "torch", "triton"}
    assert isinstance(data["machine"]["cores"], int) and data["machine"]["cores"] >= 1
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == bench.VARIANTS and len(data["rows"]) == len(bench.VARIANTS)
    for name, row in rows.items():
        assert row["tokens"] == 256 and row.get("error") is None, row
        assert row["median_s"] > 0 and row["speedup"] > 0, row
        assert all(s > 0 for s in row["samples_s"]) and row["rounds"] == 1, row
        assert "fraction_of_attention_free_limit" in row
        assert row["rel_l2"] is not None and math.isfinite(row["rel_l2"]), row
        if name in bench.REWRITES and name != "exact":
            assert row["sites_applied"] == "12/12", row
    assert rows["original"]["rel_l2"] == 0.0 and rows["original"]["speedup"] == 1.0
    assert rows["exact"]["rel_l2"] < 1e-4


def test_tuner_quality_quick(tmp_path):
    bench = _load("tuner_quality")
    result = bench.main(["--quick", "--kernels", "window_attention_2d", "sliding_window_attention",
                         "--out-dir", str(tmp_path)])
    (path,) = tmp_path.glob("tuner_quality-cpu-*-quick.json")
    assert json.loads(path.read_text())["rows"] == result["rows"]
    rows = {r["kernel"]: r for r in result["rows"]}
    assert set(rows) == {"window_attention_2d", "sliding_window_attention"}
    for row in rows.values():
        table = [ms for _, ms in row["exhaustive_table"]]
        assert len(table) == row["space_valid_configs"] and row["exhaustive_best_ms"] == min(table)
        # The mean of equal ratios may differ from them in the last bit; allow for rounding.
        slack = 1e-9
        assert 1.0 - slack <= row["tpe_replay_mean_ratio"] <= row["tpe_replay_worst_ratio"] * (1 + slack)
        assert row["tpe_trials"] <= max(1, math.ceil(0.25 * row["space_valid_configs"]))
