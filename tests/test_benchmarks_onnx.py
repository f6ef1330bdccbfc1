"""Smoke test of benchmarks/onnx_speed.py (quick settings: it checks the script runs, every
variant exports and runs in onnxruntime, and the result file is well formed; not the figures)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.test_benchmarks import _load


def test_onnx_speed_quick(tmp_path):
    pytest.importorskip("onnxruntime")
    bench = _load("onnx_speed")
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--quick", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # main() sets one thread per core
    files = list(tmp_path.glob("onnx_speed-cpu-*.json"))
    assert len(files) == 1, files
    assert files[0].name == f"onnx_speed-{bench.slug(bench.machine())}.json"
    data = json.loads(files[0].read_text())
    assert data == json.loads(json.dumps(result))
    assert data["benchmark"] == "onnx_speed" and data["complete"] is True
    assert "onnx_speed.py" in data["command"] and "--quick" in data["command"]
    assert set(data["machine"]) >= {"cpu", "cores", "torch", "triton"}
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == bench.VARIANTS and len(data["rows"]) == len(bench.VARIANTS)
    for name, row in rows.items():
        assert row["tokens"] == 256 and row.get("error") is None and row["note"] is None, row
        assert row["median_s"] > 0 and row["speedup"] > 0 and row["speedup_vs_exact"] > 0, row
        assert row["rounds"] == 1 and all(s > 0 for s in row["samples_s"]), row
        assert 0 <= row["onnx_max_abs_error"] <= 1e-4, row
        if name not in ("original", "exact"):
            assert row["sites_applied"] == "2/2", row  # --quick: 2 blocks
    assert rows["original"]["speedup"] == 1.0 and rows["exact"]["speedup_vs_exact"] == 1.0
