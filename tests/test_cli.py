"""The `rewriter` command: inspect / optimize / export, their outputs, and every input error
(one line on stderr, exit code 2, no traceback, nothing written)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rewriter.cli import main
from rewriter.inspection import render
from tests.helpers import fail_the_whole_output_once, rewrite_zip

ROOT = Path(__file__).resolve().parents[1]
NANOGPT = f"{ROOT / 'examples' / 'nanogpt.py'}:build"

FACTORIES = '''
import torch

def raises():
    raise ValueError("weights not found\\nsecond line of the message")

def returns_int():
    return 3

def returns_triple():
    return torch.nn.Linear(2, 2), (torch.ones(1, 2),), {}

def returns_no_module():
    return "model", (torch.ones(1),)

def bad_inputs():
    return torch.nn.Linear(2, 2), 5

def marks():
    open(__file__ + ".called", "w").close()
    return torch.nn.Linear(2, 2), (torch.ones(1, 2),)

not_callable = 3
'''


def error_line(capsys, argv, code=2) -> str:
    """Run the command; it must exit with `code` and say why in exactly one stderr line."""
    assert main(argv) == code
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith("rewriter: ") and "Traceback" not in out.err
    return lines[0]


@pytest.fixture
def factories(tmp_path):
    path = tmp_path / "factories.py"
    path.write_text(FACTORIES)
    return path


@pytest.fixture(scope="module")
def tiny_pt2(tmp_path_factory):
    class Tiny(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.layer_norm(x, (4,))

    path = tmp_path_factory.mktemp("pt2") / "tiny.pt2"
    torch.export.save(torch.export.export(Tiny(), (torch.randn(2, 4),)), path)
    return path


# ------------------------------------------------------------------ MODEL errors

def test_bad_path(capsys):
    assert error_line(capsys, ["inspect", "does/not/exist.py:build"]) == "rewriter: error: no such file: does/not/exist.py"
    assert "no such file: missing.pt2" in error_line(capsys, ["optimize", "missing.pt2"])
    assert "no module named 'no.such.module'" in error_line(capsys, ["export", "no.such.module:build", "x.onnx"])


@pytest.mark.parametrize("spec", ["examples/nanogpt.py", "examples/nanogpt.py:", ":build", "a.py:not-a-name"])
def test_malformed_spec(capsys, spec):
    line = error_line(capsys, ["inspect", spec])
    assert "MODEL must be path/to/file.py:factory, package.module:factory" in line and repr(spec) in line


def test_factory_missing_or_not_callable(capsys, factories):
    line = error_line(capsys, ["inspect", f"{factories}:nope"])
    assert line.startswith(f"rewriter: error: {factories} has no factory named 'nope'") and "marks" in line
    assert f"{factories}:not_callable is not callable (it is int)" in error_line(capsys, ["inspect", f"{factories}:not_callable"])


def test_factory_that_raises_names_the_factory_and_the_message(capsys, factories):
    line = error_line(capsys, ["optimize", f"{factories}:raises"])
    assert line == f"rewriter: error: factory raises in {factories} raised ValueError: weights not found"


@pytest.mark.parametrize("name, says", [
    ("returns_int", "must return (model, example_inputs), got int"),
    ("returns_triple", "must return (model, example_inputs), got a tuple of 3 items"),
    ("returns_no_module", "returned str as the model; expected a torch.nn.Module"),
    ("bad_inputs", "returned int as example_inputs; expected a tensor, a tuple of inputs"),
])
def test_factory_returning_the_wrong_thing(capsys, factories, name, says):
    line = error_line(capsys, ["inspect", f"{factories}:{name}"])
    assert f"factory {name} in {factories}" in line and says in line


def test_file_that_fails_to_import(capsys, tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("import torch\ndef broken(:\n")
    assert f"cannot load {bad}: SyntaxError" in error_line(capsys, ["inspect", f"{bad}:build"])


def test_corrupt_pt2(capsys, tmp_path, tiny_pt2):
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip archive")
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(tiny_pt2.read_bytes()[:400])
    no_inputs = rewrite_zip(tiny_pt2, tmp_path / "no_inputs.pt2",
                             lambda name, data: b"garbage" if "sample_inputs" in name else data)
    for path in (junk, truncated, no_inputs):
        line = error_line(capsys, ["inspect", str(path)])
        assert f"{path} is not a valid .pt2 archive (corrupt, or not written by torch.export.save)" in line


def test_pt2_from_another_torch_version(capsys, tmp_path, tiny_pt2):
    archive = rewrite_zip(tiny_pt2, tmp_path / "archive.pt2",
                           lambda name, data: b"1" if name.endswith("/archive_version") else data)

    def newer_schema(name, data):
        if name.endswith("models/model.json"):
            meta = json.loads(data)
            meta["schema_version"]["major"] += 1
            meta["torch_version"] = "9.0.0"
            return json.dumps(meta).encode()
        return data

    schema = rewrite_zip(tiny_pt2, tmp_path / "schema.pt2", newer_schema)
    line = error_line(capsys, ["inspect", str(archive)])
    assert f"{archive} was saved by torch" in line and "(archive 1," in line and "re-save it with this torch" in line
    line = error_line(capsys, ["inspect", str(schema)])
    assert f"{schema} was saved by torch 9.0.0" in line and "or pass MODEL as file.py:factory" in line


def test_pt2_version_error_raised_by_torch_load(capsys, monkeypatch, tiny_pt2):
    from torch._export.serde.serialize import SerializeError

    def load(path, **kw):  # what torch raises when the saved schema is not this torch's
        raise SerializeError("Serialized schema version SchemaVersion(major=9, minor=0) does not match our "
                             "current schema version (8, 20).")

    monkeypatch.setattr(torch.export, "load", load)
    line = error_line(capsys, ["inspect", str(tiny_pt2)])
    assert f"{tiny_pt2} was saved by a different torch version (Serialized schema version" in line


def test_pt2_without_example_inputs(capsys, tmp_path):
    ep = torch.export.export(torch.nn.Linear(2, 2), (torch.ones(1, 2),))
    ep.example_inputs = None
    torch.export.save(ep, tmp_path / "bare.pt2")
    line = error_line(capsys, ["inspect", str(tmp_path / "bare.pt2")])
    assert "carries no example inputs; pass MODEL as file.py:factory" in line


# ------------------------------------------------------------------ output-path errors: before any work

def _untouched(folder: Path, factories: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == [factories.name]  # no output, no probe, factory not run


@pytest.mark.parametrize("flag", ["--save", "--export", "--report"])
def test_output_into_missing_directory(capsys, tmp_path, factories, flag):
    target = tmp_path / "missing" / "out.file"
    line = error_line(capsys, ["optimize", f"{factories}:marks", flag, str(target)])
    assert line == f"rewriter: error: cannot write {flag} {target}: the directory {target.parent} does not exist; create it first"
    _untouched(tmp_path, factories)
    line = error_line(capsys, ["export", f"{factories}:marks", str(target)])
    assert f"cannot write ONNX output {target}: the directory {target.parent} does not exist" in line
    _untouched(tmp_path, factories)


def test_output_into_unwritable_directory(capsys, tmp_path, factories, monkeypatch):
    import tempfile

    def denied(*args, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)  # as a read-only directory answers (root ignores chmod)
    line = error_line(capsys, ["optimize", f"{factories}:marks", "--save", str(tmp_path / "out.pt2")])
    assert line == f"rewriter: error: cannot write --save {tmp_path / 'out.pt2'}: Permission denied in {tmp_path}; choose another directory"
    line = error_line(capsys, ["export", f"{factories}:marks", str(tmp_path / "out.onnx")])
    assert "cannot write ONNX output" in line and "Permission denied" in line
    _untouched(tmp_path, factories)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories")
def test_output_into_read_only_directory(capsys, tmp_path, factories):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        line = error_line(capsys, ["optimize", f"{factories}:marks", "--save", str(locked / "out.pt2")])
        assert "Permission denied" in line and not list(locked.iterdir())
    finally:
        locked.chmod(0o700)


def test_output_that_is_a_directory_and_bad_options(capsys, tmp_path, factories):
    assert f"--report {tmp_path} is a directory" in error_line(capsys, ["optimize", f"{factories}:marks", "--report", str(tmp_path)])
    assert "--opset must be >= 18" in error_line(capsys, ["export", f"{factories}:marks", str(tmp_path / "x.onnx"), "--opset", "12"])
    assert "need --attention" in error_line(capsys, ["optimize", f"{factories}:marks", "-o", "window=8"])
    assert "unknown: ['window']" in error_line(capsys, ["inspect", f"{factories}:marks", "--attention", "linear", "-o", "window=8"])
    _untouched(tmp_path, factories)


def test_debug_shows_the_traceback(capsys):
    from rewriter.cli import UsageError

    with pytest.raises(UsageError, match="no such file"):
        main(["--debug", "inspect", "does/not/exist.py:build"])
    with pytest.raises(UsageError, match="no such file"):
        main(["inspect", "does/not/exist.py:build", "--debug"])


def test_help_has_examples(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "rewriter inspect examples/nanogpt.py:build" in text and "Exit codes" in text
    for command in ("inspect", "optimize", "export"):
        assert main([command, "--help"]) == 0
        assert f"rewriter {command} examples/nanogpt.py:build" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2  # argparse's own usage error


def test_console_script_error_is_one_line(tmp_path):
    exe = shutil.which("rewriter", path=str(Path(sys.executable).parent)) or shutil.which("rewriter")
    assert exe, "the rewriter console script is not installed (pip install -e .)"
    out = subprocess.run([exe, "optimize", "does/not/exist.py:build", "--save", str(tmp_path / "x.pt2")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == ["rewriter: error: no such file: does/not/exist.py"]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ happy paths

def test_inspect_nanogpt(capsys):
    assert main(["inspect", NANOGPT, "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    att = found["attention"]
    assert [a["location"] for a in att] == [f"blocks.{i}" for i in range(4)]
    assert all(a["form"] == "matmul → mul → masked_fill → softmax → matmul" and a["becomes"] == "sdpa"
               and a["status"] == "applied" for a in att)
    assert len(found["norms"]) == 9 and {n["pre_ln_to_rms"] for n in found["norms"]} == {"yes"}
    assert found["residual_streams"] == [{"location": "<root>", "becomes": "pre_rmsnorm", "status": "applied",
                                          "reason": None, "norms": 9}]
    passes = {p["pass"]: p for p in found["passes"]}
    assert passes["canonical_attention"]["rewrites"] == 4 and passes["pre_rmsnorm"]["rewrites"] == 9
    assert passes["gqa_fold"]["note"] == "no sites found" and not passes["approximate attention"]["ran"]
    assert found["verification"]["output"]["ok"] and found["failed_checks"] == []

    from rich.console import Console

    console = Console(width=200, record=True, color_system=None)
    render(found, console)  # the human view of the same findings
    text = console.export_text()
    for heading in ("attention sites", "norms", "residual streams", "passes", "Pre-LN → RMSNorm", "dry run"):
        assert heading in text


def test_inspect_hf_post_ln_model_says_why_not(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich reads the width from here when stdout is no terminal
    assert main(["inspect", "tests.models.hf:bert"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "encoder.layer.0.attention.self" in text and "matmul → mul → add → softmax → matmul" in text
    assert "Post-LN" in text and "refused" in text and "rewriter.layer_norm" in text


def test_optimize_saves_pt2_and_inspect_reads_it(capsys, tmp_path):
    out = tmp_path / "gpt.pt2"
    assert main(["optimize", NANOGPT, "--json", "--save", str(out)]) == 0
    assert '"pre_rmsnorm"' in capsys.readouterr().out and out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt.pt2"]  # no temporary left behind
    assert main(["inspect", str(out), "--json"]) == 0  # a .pt2 MODEL: example inputs from the archive
    found = json.loads(capsys.readouterr().out)
    assert [a["form"] for a in found["attention"]] == ["scaled_dot_product_attention"] * 4


def test_export_nanogpt(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    out = tmp_path / "gpt.onnx"
    assert main(["export", NANOGPT, str(out)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert out.exists() and "onnxruntime max abs error" in text
    assert "idx │ 0 │ dynamic" in text and "idx │ 1 │ dynamic" in text
    assert "residual_stream→pre_rmsnorm: 1 applied" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt.onnx"]


def test_export_hf_model_json(capsys, tmp_path):
    out = tmp_path / "gpt2.onnx"
    assert main(["export", "tests.models.hf:gpt2", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    onnx = data["onnx"]
    assert onnx["path"] == str(out) and out.exists() and onnx["opset"] == 18
    assert onnx["max_abs_error"] < 1e-4 and onnx["dynamic_axes"] == {"input_ids": [0, 1]} and onnx["fixed_axes"] == {}
    assert data["report"]["passes"]["pre_rmsnorm"] == 5


def test_cli_approximate_attention_and_onnx_export(capsys, tmp_path):
    onnx_path, report = tmp_path / "gpt.onnx", tmp_path / "r.json"
    code = main(["optimize", NANOGPT, "--attention", "sliding_window", "-o", "window=8",
                 "--keep-first", "1", "--export", str(onnx_path), "--report", str(report)])
    assert code == 0 and onnx_path.exists()
    data = json.loads(report.read_text())
    sites = [s for s in data["sites"] if s["pass_name"] == "approximate:sliding_window"]
    assert [s["status"] for s in sites] == ["refused", "applied", "applied", "applied"]
    assert sites[1]["params"]["window"] == 8 and data["verification"]["onnx"]["max_abs_error"] < 1e-4
    assert "with approximate attention" in " ".join(capsys.readouterr().out.split())
    assert main(["optimize", NANOGPT, "-o", "window=8"]) == 2  # options need --attention
    assert main(["optimize", NANOGPT, "--attention", "linear", "-o", "window=8"]) == 2


def test_verification_failure_exits_1(capsys, monkeypatch):
    fail_the_whole_output_once(monkeypatch)
    assert main(["optimize", NANOGPT]) == 1
    out = capsys.readouterr()
    assert "rolled_back" in out.out
    assert out.err.strip() == "rewriter: verification failed: 14 rewrite(s) rolled back after failing verification (see the report)"


def test_search_prints_the_front_and_saves_the_chosen_point(capsys, tmp_path):
    out = tmp_path / "chosen.pt2"
    assert main(["search", "examples/nanogpt.py:build", "--trials", "2", "--latency", "estimate",
                 "--save", str(out), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["chosen"] is not None and found["chosen"]["fidelity"] >= 0.95
    assert found["options"]["attention"] == "per_layer" and found["front"]
    assert out.is_file() and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("argv, message", [
    (["search", "examples/nanogpt.py:build", "--min-fidelity", "1.5"], "--min-fidelity must be between 0 and 1"),
    (["search", "examples/nanogpt.py:build", "--save", "/nonexistent/dir/x.pt2"], "--save"),
])
def test_search_bad_input(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
