"""Smoke test of benchmarks/kernel_speed.py (--quick: tiny shapes; without CUDA the kernels run
under TRITON_INTERPRET=1). It checks the script runs every group, checks every kernel against
its reference and writes well-formed rows; not the figures.

The run is a subprocess: the interpreter must be switched on before anything imports Triton,
and the script resets and reconfigures torch._dynamo, which should not leak into other tests.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.test_benchmarks import BENCHMARKS, _load

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def test_kernel_speed_quick(tmp_path):
    bench = _load("kernel_speed")
    # on a GPU machine keep this a smoke test too: no compile / FlexAttention (the benchmark run does those)
    extra = ["--no-compile", "--no-flex"] if CUDA else []
    env = dict(os.environ)
    if not CUDA:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "kernel_speed.py"), "--quick", "--out-dir", str(tmp_path),
                           "--tune", "2", *extra], cwd=BENCHMARKS.parent, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    files = list(tmp_path.glob("kernel_speed-*.json"))
    assert len(files) == 1, files
    assert files[0].name == f"kernel_speed-{bench.slug(bench.machine())}.json"
    data = json.loads(files[0].read_text())
    assert data["benchmark"] == "kernel_speed" and data["complete"] is True and data["quick"] is True
    assert data["smoke"] is (not CUDA) and data["not_run"] == []
    assert "kernel_speed.py" in data["command"] and "--quick" in data["command"]
    assert set(data["machine"]) >= {"cpu", "cores", "torch", "triton"}
    assert ("gpu" in data["machine"]) is CUDA
    assert data["date"] and data["timing"] and data["groups"] == bench.GROUPS

    rows = data["rows"]
    assert {r["name"] for r in rows} == set(bench.GROUPS)
    common = {"name", "case", "dtype", "kernel_path", "ms", "gbps", "tflops", "check_passed", "max_abs", "rel_l2",
              "checks", "errors", "skipped", "target", "target_metric", "target_value", "meets_target", "flag"}
    copies = [r for r in rows if r["case"].startswith("copy ")]
    kernels = [r for r in rows if not r["case"].startswith("copy ")]
    assert copies and all(r["ms"]["copy"] > 0 and r["gbps"]["copy"] > 0 and r["check_passed"] for r in copies)
    # 2 shapes x (rms_norm, layer_norm) x (fwd, fwd+bwd), 1 sliding, 1 neighbourhood, 2 swin, 1 linear, 1 agent
    assert len(kernels) == 8 + 1 + 1 + 2 + 1 + 1, [r["case"] for r in kernels]
    for r in rows:
        assert common <= set(r), (r["case"], common - set(r))
        assert r["case"][:50] in proc.stdout  # the closing table lists every row
    for r in kernels:
        where = r["case"]
        # our kernel ran (not the reference fallback), matched the fp32 reference, and was timed
        assert r["kernel_path"] == "triton", where
        assert r["check_passed"] is True and r["flag"] is None, (where, r["flag"], r["checks"], r["errors"])
        assert 0 <= r["rel_l2"] <= r["tol_rel_l2"] and math.isfinite(r["max_abs"]), where
        assert r["checks"]["ours"]["passed"] is True and r["ms"]["ours"] > 0, where
        assert r["meets_target"] in (True, False, None), where
        if r["target_value"] is not None:  # the metric the target reads is in the row
            assert r["target_metric"] in r, where
        # every baseline that ran matched the reference too (a FlexAttention mask_mod that differs
        # from the op's semantics would show here), and none failed
        assert all(c["passed"] for c in r["checks"].values()), (where, r["checks"])
        assert r["errors"] == {}, (where, r["errors"])
        # --tune 2: the tuner ran two configs of each forward kernel; its best was checked and timed
        if r["name"] != "norms" or r["pass"] == "fwd":
            assert r["tuned"]["trials_run"] == 2 and r["tuned"]["trials_failed"] == 0, (where, r["tuned"])
            assert r["tuned"]["default_config"] and r["tuned"]["config"], where
            assert r["checks"]["ours_tuned"]["passed"] and r["ms"]["ours_tuned"] > 0, where
        else:
            assert "tuned" not in r and "ours_tuned" not in r["ms"], where
        if r["name"] == "norms":
            assert r["ms"]["torch"] > 0 and r["checks"]["torch"]["passed"], where
            assert r["gbps"]["ours"] > 0 and r["ms"]["copy"] > 0 and r["fraction_of_copy"] is not None, where
            if r["pass"] == "fwd+bwd":
                assert r["ms"]["ours_bwd"] > 0 and r["bwd_fraction_of_copy"] is not None, where
        else:
            assert r["ms"]["sdpa"] > 0 and r["speedup_vs_sdpa"] > 0 and r["sdpa_backend"], where
            assert r["flops"]["ours"] > 0 and r["flops"]["sdpa"] > 0 and r["tflops"]["ours"] > 0, where
        if r["name"] in ("neighborhood", "swin", "sliding_window"):
            assert r["flop_reduction_bound"] > 1 and r["share_of_bound"] is not None, where
            if not CUDA:  # eager FlexAttention checked the mask_mod; the compiled one was skipped, and said so
                assert r["ms"]["flex_eager"] > 0 and r["checks"]["flex"]["passed"] and "flex" in r["skipped"], where
        if r["name"] == "linear_attention":
            assert r["fraction_of_memory_bound"] is not None and r["ms"]["memory_bound"] > 0, where
        if not CUDA and "compiled_reference" not in r["skipped"]:  # dynamo (backend="eager") stands in for inductor
            assert r["compile_backend"] == "eager" and r["ms"]["compiled_reference"] > 0, where
            assert r["checks"]["compiled_reference"]["passed"] and "compiled_reference_inductor" in r["skipped"]
    if not CUDA:  # the norms skip dynamo after their first shape; every attention case runs it
        assert sum("compiled_reference" in r["ms"] for r in kernels) == 4 + 6


def test_kernel_speed_refuses_a_full_cpu_run(tmp_path):
    if CUDA:
        pytest.skip("the refusal is for machines without CUDA")
    bench = _load("kernel_speed")
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench.main(["--out-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())
