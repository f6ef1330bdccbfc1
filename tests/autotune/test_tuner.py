"""The tuner: wrong, failing, hanging and crashing configs never win and never stop a
study; grid mode runs the whole space; a tuned entry changes what the op runs."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rewriter
from rewriter.autotune.cache import Cache, current_device
from rewriter.autotune.record import op_calls
from rewriter.autotune.select import cache_key, tuned_config
from rewriter.autotune.tuner import CONFIRM_MARGIN, CONFIRM_ROUNDS, tune
from tests.autotune import fake_kernel


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("REWRITER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _cache(tmp_path):
    return Cache(tmp_path / "kernels.json", device=current_device("cpu"))


def test_wrong_and_failing_configs_never_win(tmp_path):
    x = torch.randn(64)
    result = tune(fake_kernel.tunable([1, 2, 4, 8, 64]), (x,), grid=True, min_time_s=0.02, cache=_cache(tmp_path))
    states = {t.config["BLOCK"]: t.state for t in result.trials}
    assert states == {1: "ok", 2: "ok", 4: "wrong", 8: "failed"}  # 64 is never even proposed in grid mode
    assert result.best_config == {"BLOCK": 2}
    assert result.default_ms is not None and result.best_ms < result.default_ms
    assert result.failures == 2 and result.runs == 4
    reasons = {t.config["BLOCK"]: t.reason for t in result.trials}
    assert "rel_l2" in reasons[4] and "out of resources" in reasons[8]


def test_rejected_configs_do_not_run_and_tpe_finishes(tmp_path):
    x = torch.randn(64)
    result = tune(fake_kernel.tunable([1, 2, 4, 8, 64]), (x,), trials=4, min_time_s=0.02, cache=_cache(tmp_path))
    assert result.runs == 4  # every runnable config, then the study stops by itself
    assert all(t.ms is None for t in result.trials if t.state == "rejected")
    assert result.best_config == {"BLOCK": 2}


def test_hanging_and_crashing_trials_are_isolated(tmp_path):
    x = torch.randn(64)
    result = tune(fake_kernel.tunable([1, 16, 32, 2]), (x,), grid=True, isolate=True, trial_timeout_s=10,
                  min_time_s=0.02, cache=_cache(tmp_path))
    states = {t.config["BLOCK"]: t.state for t in result.trials}
    assert states == {1: "ok", 16: "timeout", 32: "crashed", 2: "ok"}
    assert "exit code 17" in next(t.reason for t in result.trials if t.state == "crashed")
    assert result.best_config == {"BLOCK": 2}


def test_best_config_is_cached_and_read_back(tmp_path):
    x = torch.randn(64)
    cache = _cache(tmp_path)
    result = tune(fake_kernel.tunable([1, 2]), (x,), grid=True, min_time_s=0.02, cache=cache)
    (key_text, entry), = cache.entries().items()
    assert entry["config"] == result.best_config and entry["trials"] == 2
    assert key_text.startswith("fake|test|pow2:n64|float32")


def _scripted(times: dict[int, list[float]], fail_on_rerun: int | None = None):
    """The fake kernel (configs 1 and 2 only) timed from a script: each config's successive
    timings in order (the study's own first, then the confirmation's re-timings)."""
    import dataclasses

    calls = {block: 0 for block in times}

    def measure(config):
        block = config["BLOCK"]
        calls[block] += 1
        if block == fail_on_rerun and calls[block] > 1:
            raise RuntimeError("illegal memory access (simulated)")
        return times[block][min(calls[block], len(times[block])) - 1]

    return dataclasses.replace(fake_kernel.tunable([1, 2]), measure=measure), calls


def test_a_winner_by_one_lucky_timing_is_not_kept(tmp_path):
    # config 2 timed fast once (0.5 ms), then as slow as the default on every re-timing
    t, calls = _scripted({1: [1.0, 1.0, 1.01, 0.99], 2: [0.5, 1.0, 1.02, 1.0]})
    result = tune(t, (torch.randn(64),), grid=True, cache=_cache(tmp_path))
    assert calls == {1: 1 + CONFIRM_ROUNDS, 2: 1 + CONFIRM_ROUNDS}  # interleaved re-timings of both
    assert result.best_config == {"BLOCK": 1} and result.confirmation["kept"] == "default"
    assert result.confirmation["winner"] == {"BLOCK": 2} and len(result.confirmation["winner_ms"]) == 4
    assert result.best_ms == result.default_ms == 1.0  # the medians
    (entry,) = _cache(tmp_path).entries().values()
    assert entry["config"] == {"BLOCK": 1}
    # the report and the CLI's table say the default was kept on purpose
    from rich.console import Console

    from rewriter.autotune import AutotuneReport
    from rewriter.autotune.command import _table

    report = AutotuneReport(results=[result])
    assert report.rows()[0]["unconfirmed"] is True
    console = Console(width=400, record=True)
    console.print(_table(report, "cpu"))
    assert "winner was not faster when timed again" in console.export_text()


def test_a_winner_confirmed_by_its_re_timings_is_kept(tmp_path):
    t, _ = _scripted({1: [1.0, 1.1, 0.9, 1.0], 2: [0.5, 0.6, 0.55, 0.5]})
    result = tune(t, (torch.randn(64),), grid=True, cache=_cache(tmp_path))
    assert result.best_config == {"BLOCK": 2} and result.confirmation["kept"] == "winner"
    assert result.best_ms == 0.525 and result.default_ms == 1.0 and result.speedup == pytest.approx(1.0 / 0.525)


def test_a_winner_within_the_margin_loses_to_the_default(tmp_path):
    t, _ = _scripted({1: [1.0], 2: [1.0 - CONFIRM_MARGIN / 2]})
    result = tune(t, (torch.randn(64),), grid=True, cache=_cache(tmp_path))
    assert result.best_config == {"BLOCK": 1} and result.confirmation["kept"] == "default"


def test_a_winner_that_fails_when_re_run_loses(tmp_path):
    t, calls = _scripted({1: [1.0], 2: [0.1]}, fail_on_rerun=2)
    result = tune(t, (torch.randn(64),), grid=True, cache=_cache(tmp_path))
    assert result.best_config == {"BLOCK": 1} and result.confirmation["kept"] == "default"
    assert calls[2] == 2  # the confirmation stopped at the failure


def _causal_args(n=48):
    q = torch.randn(1, 2, n, 8)
    return (q, q, q, None, "elu", True, "denominator", 3.0, 1e-6)


def test_tuned_entry_changes_the_config_the_op_runs(cache_dir, monkeypatch):
    from rewriter.kernels import attention_ops

    seen = []
    real = attention_ops._linear

    def spy(*args, **kwargs):
        seen.append(kwargs["chunk_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_ops, "_linear", spy)
    args = _causal_args()
    torch.ops.rewriter.linear_attention(*args)
    assert seen == [64]  # the default
    key, _ = cache_key("linear_attention", args, "cpu")
    rewriter.autotune.cache.default_cache("cpu").put(key, {"config": {"chunk_size": 16}, "time_ms": 1.0})
    torch.ops.rewriter.linear_attention(*_causal_args(n=60))  # same bucket (64), another length
    assert seen == [64, 16]
    assert tuned_config("linear_attention", args, "cpu") == {"chunk_size": 16}
    monkeypatch.setenv("REWRITER_AUTOTUNE", "off")
    torch.ops.rewriter.linear_attention(*args)
    assert seen == [64, 16, 64]


def test_a_cached_config_the_shape_cannot_run_is_ignored(cache_dir):
    args = _causal_args(n=20)  # bucket n32: chunk 256 is longer than any sequence in it
    key, _ = cache_key("linear_attention", args, "cpu")
    rewriter.autotune.cache.default_cache("cpu").put(key, {"config": {"chunk_size": 256}, "time_ms": 1.0})
    assert tuned_config("linear_attention", args, "cpu") is None


def test_autotune_a_model_tunes_each_bucket_once(cache_dir):
    from examples.nanogpt import build

    model, inputs = build()
    opt = rewriter.optimize(model, inputs, attention="linear")
    seen = []
    report = rewriter.autotune(opt, inputs, trials=3, min_time_s=0.01,
                               progress=lambda kind, value: seen.append(kind))
    assert [r.kernel for r in report.results] == ["linear_attention"]  # four layers, one bucket
    assert ("rms_norm", "nothing to tune on cpu") in report.skipped
    result = report.results[0]
    assert result.runs == 3 and seen.count("study") == 1 and seen.count("trial") == len(result.trials)
    args = next(c.args for c in op_calls(opt, inputs) if c.kernel == "linear_attention")
    assert tuned_config("linear_attention", args, "cpu") == result.best_config


def test_optimize_autotune_flag(cache_dir):
    from examples.nanogpt import build

    model, inputs = build()
    with pytest.raises(ValueError, match="example_inputs"):
        rewriter.optimize(model, autotune=True)
    opt = rewriter.optimize(model, inputs, attention="sliding_window", window=8, autotune=True)
    rows = opt.autotune_report.rows()
    assert [r["kernel"] for r in rows] == ["sliding_window_attention"] and rows[0]["trials"] >= 1


def test_two_processes_tuning_at_once_lose_nothing(cache_dir):
    script = textwrap.dedent("""
        import sys, torch, rewriter
        from rewriter.autotune.tuner import CONFIRM_MARGIN, CONFIRM_ROUNDS, tune
        n = int(sys.argv[1])
        q = torch.randn(1, 2, n, 8)
        tune("linear_attention", (q, q, q, None, "elu", True, "denominator", 3.0, 1e-6), grid=True, min_time_s=0.01)
    """)
    env = {**os.environ, "REWRITER_CACHE_DIR": str(cache_dir)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(n)], env=env, cwd=os.getcwd()) for n in (40, 100)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    entries = rewriter.autotune.cache.default_cache("cpu").entries()
    assert sorted(k.split("|")[2].split("-n")[-1] for k in entries) == ["128", "64"]


def test_refusals_say_why():
    from rewriter.autotune.space import Space
    from rewriter.autotune.tuner import Tunable, tunable

    with pytest.raises(ValueError, match="nothing to tune on cpu"):
        tunable("rms_norm", "cpu")
    nothing = Space("fake", params={"BLOCK": [1]}, keep=lambda config, shape: False,
                    default=lambda shape: {"BLOCK": 1}, shape_of=fake_kernel.shape_of)
    t = Tunable("fake", "cpu", nothing, run=fake_kernel.run, reference=fake_kernel.reference, source="test")
    with pytest.raises(ValueError, match="no config of its space fits"):
        tune(t, (torch.randn(8),), save=False)
