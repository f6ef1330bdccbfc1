"""`rewriter autotune` and `rewriter cache`: results, the cache round trip, and one clear
line with exit code 2 for each bad input."""
import json

import pytest

from rewriter.cli import main


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("REWRITER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps tables to the terminal width
    return tmp_path / "cache"


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_autotune_a_model_then_show_export_clear_import(capsys, tmp_path):
    assert main(["autotune", "examples/nanogpt.py:build", "--attention", "sliding_window", "-o", "window=8",
                 "--trials", "2", "--json"]) == 0
    out = _json(capsys)
    (result,) = out["results"]
    assert result["kernel"] == "sliding_window_attention" and result["runs"] == 2 and result["best_config"]
    assert {"kernel": "rms_norm", "reason": "nothing to tune on cpu"} in out["skipped"]

    assert main(["cache", "show", "--json"]) == 0
    shown = _json(capsys)
    (entry,) = shown["entries"].values()
    assert entry["config"] == result["best_config"]

    exported = tmp_path / "tuned.json"
    assert main(["cache", "export", str(exported), "--json"]) == 0
    assert _json(capsys)["exported"] == 1
    assert main(["cache", "clear", "--json"]) == 0
    assert _json(capsys)["removed"] == 1
    assert main(["cache", "import", str(exported), "--json"]) == 0
    assert _json(capsys)["imported"] == 1
    assert main(["cache", "show"]) == 0
    assert "sliding_window_attention" in capsys.readouterr().out


def test_autotune_standard_shapes_prints_a_table(capsys):
    assert main(["autotune", "--kernels", "window_attention_2d", "--trials", "1"]) == 0
    out = capsys.readouterr().out
    assert "window_attention_2d" in out and "default ms" in out


@pytest.mark.parametrize("argv, message", [
    (["autotune", "--trials", "0"], "--trials must be at least 1"),
    (["autotune", "--budget", "-3"], "--budget must be a positive number"),
    (["autotune", "--storage", "not a url"], "is not a database URL"),
    (["autotune", "missing_file.py:build"], "missing_file.py"),
    (["cache", "export"], "cache export needs a FILE"),
    (["cache", "show", "extra.json"], "cache show takes no FILE"),
    (["cache", "import", "/nonexistent/tuned.json"], "no such file"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_importing_garbage_or_another_device_is_refused(capsys, tmp_path):
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    assert main(["cache", "import", str(garbage)]) == 2
    assert "rewriter: error:" in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": 1, "device": {"name": "NVIDIA H100", "capability": "9.0", "torch": "2.11",
                                                         "triton": "3.6"}, "entries": {}}))
    assert main(["cache", "import", str(other)]) == 2
    assert "H100" in capsys.readouterr().err
