"""Shape buckets, cache keys and the dispatch's lookup (which never imports Optuna)."""
import json
import subprocess
import sys
import warnings

import pytest
import torch

from rewriter.autotune.buckets import bucket
from rewriter.autotune.select import cache_key, source_hash


def _linear_args(n, h=4, d=16, causal=True, dtype=torch.float32):
    q = torch.randn(1, h, n, d, dtype=dtype)
    return (q, q, q, None, "elu", causal, "denominator", 3.0, 1e-6)


def test_lengths_share_a_power_of_two_bucket_but_head_sizes_do_not():
    key = lambda *a, **kw: cache_key("linear_attention", _linear_args(*a, **kw), "cpu")[0]  # noqa: E731
    assert key(40) == key(64) != key(65)
    assert key(40).bucket.startswith("pow2:") and "n64" in key(40).bucket
    assert key(40) != key(40, h=8) and key(40) != key(40, d=32) and key(40) != key(40, causal=False)
    assert key(40).dtype == "float32" and key(40, dtype=torch.float64).dtype == "float64"


def test_bucket_text_is_stable_and_typed():
    shape = {"n": 1000, "rows": 3, "grid_h": 7, "causal": True, "dtype": "bfloat16", "window": [8, 8]}
    assert bucket(shape) == "pow2:causal1-grid_h7-n1024-rows4-window8x8"


def test_source_hash_depends_on_kernel_folder_and_device_kind():
    assert source_hash("rms_norm", "cuda") == source_hash("crms_norm", "cuda")  # one folder
    assert source_hash("rms_norm", "cuda") != source_hash("layer_norm", "cuda")
    assert source_hash("linear_attention", "cuda") != source_hash("linear_attention", "cpu")


def test_norms_have_nothing_to_tune_on_cpu():
    x = torch.randn(3, 8)
    assert cache_key("rms_norm", (x, None, None, 1e-6, 0.0), "cpu") is None
    assert cache_key("rms_norm", (x, None, None, 1e-6, 0.0), "cuda") is not None


def test_running_ops_does_not_import_optuna():
    # (Triton cannot be checked here: torch's custom-op machinery imports torch._dynamo on
    # the first call, which imports Triton where it is installed.)
    code = ("import sys, torch, rewriter\n"
            "q = torch.randn(1, 2, 40, 8)\n"
            "torch.ops.rewriter.linear_attention(q, q, q, None, 'elu', True, 'denominator', 3.0, 1e-6)\n"
            "torch.ops.rewriter.sliding_window_attention(q, q, q, None, 8, True, 1, 0, False, 0.3)\n"
            "print('optuna' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "REWRITER_CACHE_DIR": "/nonexistent/x"})
    assert out.stdout.strip() == "False", out.stderr


def test_every_space_default_is_a_config_it_keeps():
    from rewriter.autotune.space import KERNELS, space
    from rewriter.autotune.workloads import standard_calls

    calls = standard_calls("cpu", small=True)
    q = torch.randn(1, 2, 20, 16)
    calls += [type(calls[0])("sliding_window_attention", (q, q, q, None, 4, True, 3, 0, False, 0.25))]
    g = torch.randn(1, 2, 5 * 6, 16)
    calls += [type(calls[0])("neighborhood_attention_2d", (g, g, g, None, [5, 6], [3, 3], [1, 2], 0, 0.25))]
    for call in calls:
        sp = space(call.kernel, "cpu")
        shape = sp.shape_of(*call.args)
        assert sp.default(shape) in sp.configs(shape), (call.kernel, shape)
    assert all(k in KERNELS for k in ("sliding_window_attention", "agent_attention"))


@pytest.mark.parametrize("chunk", [-4, 0, 48, "64", True])
def test_a_bad_cache_entry_is_skipped_with_one_warning(chunk, tmp_path, monkeypatch, capsys):
    """A hand-edited entry (a block size out of the space): the op warns once, naming the
    file and the key, runs its default config, and `cache show` lists the entry as invalid."""
    from rewriter.autotune.cache import default_cache
    from rewriter.cli import main

    monkeypatch.setenv("REWRITER_CACHE_DIR", str(tmp_path))
    args = _linear_args(40)
    key, _ = cache_key("linear_attention", args, "cpu")
    cache = default_cache("cpu")
    cache.put(key, {"config": {"chunk_size": chunk}, "time_ms": 0.1, "force": True})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        first = torch.ops.rewriter.linear_attention(*args)
        second = torch.ops.rewriter.linear_attention(*args)
    messages = [str(w.message) for w in seen if "ignoring the tuned config" in str(w.message)]
    assert len(messages) == 1 and str(cache.path) in messages[0] and key.text() in messages[0], messages
    monkeypatch.setenv("REWRITER_AUTOTUNE", "off")
    default = torch.ops.rewriter.linear_attention(*args)
    torch.testing.assert_close(first, default, rtol=0, atol=0)
    torch.testing.assert_close(second, default, rtol=0, atol=0)
    assert main(["cache", "show", "--device", "cpu", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert len(shown["invalid"]) == 1 and "chunk_size" in next(iter(shown["invalid"].values()))
