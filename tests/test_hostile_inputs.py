"""Hostile inputs at the Python API: each gives one clear exception that says what to do,
and leaves no partial output (no file, no half-captured graph). The CLI's handling of the
same inputs is in tests/test_cli.py."""
from __future__ import annotations

import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import rewriter
from rewriter import CaptureError
from rewriter._model_source import UsageError, load_model, load_pt2
from rewriter.capture import ExampleInputsError
from rewriter.export import ExportError
from rewriter.compare import compare_outputs
from tests.helpers import assert_close, rewrite_zip
from tests.models import own


class Block(nn.Module):
    """Linear → LayerNorm: takes float32 [..., 8]."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)

    def forward(self, x):
        return self.ln(self.fc(x))


class NormOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)

    def forward(self, x):
        return self.ln(x)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: neither export nor symbolic_trace
            return self.ln(x) * 2
        return self.ln(x)


def _block():
    torch.manual_seed(0)
    return Block().eval()


# ------------------------------------------------------------------ models that cannot be captured


@pytest.mark.parametrize("lazy", [False, True], ids=["example_inputs", "first_call"])
def test_data_dependent_control_flow_is_one_capture_error(lazy):
    model, x = DataDependent().eval(), torch.randn(2, 8)
    with pytest.raises(CaptureError) as e:
        if lazy:
            rewriter.optimize(model)(x)
        else:
            rewriter.optimize(model, (x,))
    msg = str(e.value)
    assert not isinstance(e.value, ExampleInputsError)  # the inputs are fine: the model is the problem
    assert "could not capture DataDependent" in msg and "if x.sum() > 0" in msg
    assert "torch.where / torch.cond" in msg


def test_a_failed_first_call_leaves_nothing_captured():
    opt = rewriter.optimize(DataDependent().eval())
    with pytest.raises(CaptureError):
        opt(torch.randn(2, 8))
    assert opt._entries == {} and opt._last is None and "not captured" in opt.report.verification["note"]


class _Handle:
    """An object a graph cannot return (not a registered pytree)."""

    def __init__(self, t):
        self.t = t


class OddOutput(nn.Module):
    def forward(self, x):
        return {"y": x * 2, "state": _Handle(x)}


@pytest.mark.parametrize("lazy", [False, True], ids=["example_inputs", "first_call"])
def test_an_output_a_graph_cannot_carry_is_named(lazy):
    with pytest.raises(CaptureError) as e:
        if lazy:
            rewriter.optimize(OddOutput())(torch.randn(2, 8))
        else:
            rewriter.optimize(OddOutput(), (torch.randn(2, 8),))
    msg = str(e.value)
    assert "could not capture OddOutput" in msg and "['state']: _Handle" in msg and "register_dataclass" in msg
    assert "Traceback" not in msg and "treespec" not in msg


class TwoInputs(nn.Module):
    def forward(self, x, *, scale=None, bias=None):
        return x * scale + bias


def test_a_forward_argument_not_given_is_named():
    with pytest.raises(ExampleInputsError) as e:
        rewriter.optimize(TwoInputs(), (torch.randn(2, 8),))
    assert "its forward also takes: scale, bias (pass them with example_kwargs=...)" in str(e.value)


# ------------------------------------------------------------------ example inputs that do not fit


WRONG_INPUTS = {
    "last_dim": ((torch.randn(2, 5),), "float32[2, 5]", "shapes cannot be multiplied"),
    "too_many": ((torch.randn(2, 8), torch.randn(2, 8)), "float32[2, 8], float32[2, 8]", "3 were given"),
    "none": ((), "no inputs", "missing 1 required positional argument"),
    "float64": ((torch.randn(2, 8, dtype=torch.float64),), "float64[2, 8]", "same dtype"),
    "float16": ((torch.randn(2, 8, dtype=torch.float16),), "float16[2, 8]", "same dtype"),
    "int64": ((torch.randint(0, 5, (2, 8)),), "int64[2, 8]", "same dtype"),
    "complex": ((torch.randn(2, 8, dtype=torch.complex64),), "complex64[2, 8]", "ComplexFloat"),
    "bool": ((torch.ones(2, 8, dtype=torch.bool),), "bool[2, 8]", "same dtype"),
    "list": (([1.0] * 8,), "list", "must be Tensor"),
    "numpy": ((np.ones((2, 8), dtype=np.float32),), "ndarray", "must be Tensor"),
    "string": (("hello",), "str", "must be Tensor"),
    "none_value": ((None,), "NoneType", "must be Tensor"),
}


@pytest.mark.parametrize("name", list(WRONG_INPUTS))
def test_example_inputs_the_model_rejects(name):
    args, described, cause = WRONG_INPUTS[name]
    with pytest.raises(ExampleInputsError) as e:
        rewriter.optimize(_block(), args)
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, CaptureError)  # either `except` catches it
    assert "Block raised" in msg and f"on the example inputs ({described})" in msg and cause in msg
    assert "try: pass example inputs the model runs on" in msg


@pytest.mark.parametrize("name", ["int64", "complex", "bool"])
def test_unsupported_dtypes_into_a_norm(name):
    args = {"int64": torch.randint(0, 5, (2, 8)), "complex": torch.randn(2, 8, dtype=torch.complex64),
            "bool": torch.ones(2, 8, dtype=torch.bool)}[name]
    with pytest.raises(ExampleInputsError, match=r"NormOnly raised .* on the example inputs"):
        rewriter.optimize(NormOnly().eval(), (args,))


def test_inputs_that_break_the_model_at_call_time():
    opt = rewriter.optimize(_block(), (torch.randn(2, 8),))
    with pytest.raises(ExampleInputsError, match=r"float32\[2, 5\]"):
        opt(torch.randn(2, 5))
    with pytest.raises(ExampleInputsError, match=r"float64\[2, 8\]"):
        opt(torch.randn(2, 8, dtype=torch.float64))
    assert len(opt._entries) == 1  # the failed calls added nothing
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert_close(opt(x), opt._original(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_dtypes_are_rewritten_exactly(dtype):
    torch.manual_seed(0)
    model, x = NormOnly().eval().to(dtype), torch.randn(2, 5, 8, dtype=dtype)
    opt = rewriter.optimize(model, (x,))
    assert opt.report.count("layer_norm", "applied") == 1 and opt.report.verification["output"]["ok"]
    with torch.no_grad():
        assert_close(opt(x), model(x), dtype)


def test_complex_outputs_are_verified_on_both_parts():
    a = torch.randn(4, 3, dtype=torch.complex64)
    b = a.clone()
    b.imag += 1.0  # the real parts agree: a check on .real alone would pass
    assert not compare_outputs(b, a)["ok"]
    assert compare_outputs(a.clone(), a)["ok"]
    assert not compare_outputs(a.conj(), a)["ok"]


class ComplexRotary(nn.Module):
    """Llama-1 style rotary embedding through complex numbers, then LayerNorm."""

    def __init__(self, d=8):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.register_buffer("freqs", torch.polar(torch.ones(6, d // 2), torch.rand(6, d // 2)))

    def forward(self, x):
        z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * self.freqs[: x.shape[1]]
        return self.ln(torch.view_as_real(z).flatten(-2)), z


def test_complex_intermediates_and_outputs():
    torch.manual_seed(0)
    model, x = ComplexRotary().eval(), torch.randn(2, 6, 8)
    opt = rewriter.optimize(model, (x,))
    assert opt.report.verification["output"]["ok"] and opt.report.count("layer_norm", "applied") == 1
    with torch.no_grad():
        got, want = opt(x), model(x)
    assert torch.allclose(got[1], want[1]) and torch.allclose(got[0], want[0], atol=1e-6)


# ------------------------------------------------------------------ sizes the capture specialised on


def test_batch_of_one_example_then_a_bigger_batch():
    """export specialises a size-1 dim; a bigger batch used to fail export's guard with a bare
    `AssertionError: Guard failed: idx.size()[0] == 1`. Now it is captured for the new size."""
    model, (x,) = own.nanogpt()
    opt = rewriter.optimize(model, (x[:1],))
    assert 0 not in opt.report.capture["dynamic_dims"]["idx"]
    with torch.no_grad():
        assert_close(opt(x), model(x))
        assert_close(opt(x[:1]), model(x[:1]))
        y = torch.randint(0, 97, (3, 5))
        assert_close(opt(y), model(y))
    assert len(opt._entries) == 2  # batch 1, then batch ≥ 2 (dynamic)
    ep = opt.export(x)  # the bigger batch's graph re-exports too
    assert ep.module()(x).shape == model(x).shape


# ------------------------------------------------------------------ what optimize() takes


def test_not_a_module(tmp_path):
    model, x = _block(), torch.randn(2, 8)
    ep = torch.export.export(model, (x,))
    with pytest.raises(TypeError, match=r"got ExportedProgram; for an ExportedProgram pass ep.module\(\)"):
        rewriter.optimize(ep, (x,))
    for path in ("model.pt2", tmp_path / "model.pt2"):
        with pytest.raises(TypeError, match=r"load a saved .pt2 with torch.export.load\(path\).module\(\) first"):
            rewriter.optimize(path)
    with pytest.raises(TypeError, match="got function"):
        rewriter.optimize(lambda t: t, (x,))


# ------------------------------------------------------------------ .pt2 files through the loaders


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("pt2") / "block.pt2"
    model = _block()
    torch.export.save(torch.export.export(model, (torch.randn(2, 8),)), path)
    return path


def _newer_schema(name, data):
    if name.endswith("models/model.json"):
        meta = json.loads(data)
        meta["schema_version"]["major"] += 1
        meta["torch_version"] = "9.0.0"
        return json.dumps(meta).encode()
    return data


def _flip_bytes(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 3: len(b) // 3 + 16] = b"\xff" * 16
    return bytes(b)


BAD_PT2 = {  # name -> (how to make it from a good archive, what the error says)
    "empty": (lambda src, dst: dst.write_bytes(b""), "not a valid .pt2 archive"),
    "not_a_zip": (lambda src, dst: dst.write_bytes(b"PK? not really"), "not a valid .pt2 archive"),
    "truncated": (lambda src, dst: dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2]), "not a valid .pt2 archive"),
    "bit_flips": (lambda src, dst: dst.write_bytes(_flip_bytes(src.read_bytes())), "not a valid .pt2 archive"),
    "empty_zip": (lambda src, dst: zipfile.ZipFile(dst, "w").close(), "not a valid .pt2 archive"),
    "bad_model_json": (lambda src, dst: rewrite_zip(src, dst, lambda n, d: b"{oops" if n.endswith("model.json") else d),
                       "not a valid .pt2 archive"),
    "truncated_weights": (lambda src, dst: rewrite_zip(src, dst, lambda n, d: d[:3] if n.endswith("weight_0") else d),
                          "not a valid .pt2 archive"),
    "bad_sample_inputs": (lambda src, dst: rewrite_zip(src, dst, lambda n, d: b"x" if "sample_inputs" in n else d),
                          "not a valid .pt2 archive"),
    "other_archive_version": (lambda src, dst: rewrite_zip(src, dst, lambda n, d: b"1" if n.endswith("/archive_version") else d),
                              "re-save it with this torch"),
    "other_schema_version": (lambda src, dst: rewrite_zip(src, dst, _newer_schema), "was saved by torch 9.0.0"),
}


@pytest.mark.parametrize("name", list(BAD_PT2))
def test_bad_pt2_through_the_loaders(name, saved, tmp_path):
    make, says = BAD_PT2[name]
    path = tmp_path / f"{name}.pt2"
    make(saved, path)
    logger = logging.getLogger("torch.export")
    before = (list(logger.handlers), logger.propagate)
    for load in (load_model, load_pt2):
        with pytest.raises(UsageError) as e:
            load(str(path))
        msg = str(e.value)
        assert str(path) in msg and says in msg and "\n" not in msg
    assert (list(logger.handlers), logger.propagate) == before  # the loader put torch's logging back
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # nothing written beside it


def test_missing_and_directory_pt2(tmp_path):
    (tmp_path / "dir.pt2").mkdir()
    for path in (tmp_path / "missing.pt2", tmp_path / "dir.pt2"):
        with pytest.raises(UsageError, match="no such file"):
            load_model(str(path))


def test_a_loaded_pt2_optimizes(saved):
    source = load_model(str(saved))
    opt = rewriter.optimize(source.model, source.args)
    assert opt.report.count("layer_norm", "applied") == 1
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert_close(opt(x), _block()(x))
    # saved with static shapes: the loaded program itself refuses another batch, and says so
    with pytest.raises(ExampleInputsError, match=r"GraphModule raised AssertionError: Guard failed: x.size\(\)\[0\] == 2"):
        opt(torch.randn(3, 8))


# ------------------------------------------------------------------ export_onnx destinations


@pytest.fixture(scope="module")
def optimized():
    x = torch.randn(2, 8)
    return rewriter.optimize(_block(), (x,)), x


@pytest.fixture
def no_conversion(monkeypatch):
    """Destination errors must come before any conversion work."""

    def convert(*a, **kw):
        raise AssertionError("the ONNX conversion started before the destination was checked")

    monkeypatch.setattr(torch.onnx, "export", convert)


def _destination(kind: str, tmp_path: Path, monkeypatch) -> tuple[Path, str]:
    if kind == "missing_directory":
        return tmp_path / "missing" / "m.onnx", "does not exist; create it first"
    if kind == "parent_is_a_file":
        (tmp_path / "file").write_text("x")
        return tmp_path / "file" / "m.onnx", "is not a directory"
    if kind == "path_is_a_directory":
        (tmp_path / "m.onnx").mkdir()
        return tmp_path / "m.onnx", "is a directory; give a file name"
    if kind == "unwritable":  # as a read-only directory answers (root ignores chmod)

        def denied(*a, **kw):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", denied)
        return tmp_path / "m.onnx", "permission denied; choose another path"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["missing_directory", "parent_is_a_file", "path_is_a_directory", "unwritable"])
def test_export_onnx_destination_errors(kind, optimized, tmp_path, monkeypatch, no_conversion):
    opt, x = optimized
    before = sorted(os.listdir(tmp_path))
    path, says = _destination(kind, tmp_path, monkeypatch)
    made = sorted(os.listdir(tmp_path))
    with pytest.raises(ExportError, match=says):
        rewriter.export_onnx(opt, path, (x,))
    assert sorted(os.listdir(tmp_path)) == made and set(before) <= set(made)  # nothing new, no temporaries


def test_export_onnx_into_a_read_only_file_system(optimized, no_conversion):
    opt, x = optimized
    target = Path("/sys/rewriter-test.onnx")
    if not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    try:
        fd, probe = tempfile.mkstemp(dir="/sys")
    except OSError:
        pass
    else:  # pragma: no cover - a writable /sys: nothing to test
        os.close(fd)
        os.remove(probe)
        pytest.skip("/sys is writable here")
    with pytest.raises(ExportError, match="cannot write to /sys: .*; choose another path"):
        rewriter.export_onnx(opt, target, (x,))


# ------------------------------------------------------------------ export_onnx inputs and models


def test_export_onnx_of_a_model_torch_export_cannot_take(tmp_path):
    with pytest.raises(ExportError, match=r"torch.export cannot capture DataDependent for ONNX: .*torch.where / torch.cond"):
        rewriter.export_onnx(DataDependent().eval(), tmp_path / "m.onnx", (torch.randn(2, 8),))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("which", ["module", "optimized"])
def test_export_onnx_with_inputs_the_model_rejects(which, optimized, tmp_path):
    model = _block() if which == "module" else optimized[0]
    with pytest.raises(ExampleInputsError, match=r"Block raised RuntimeError: mat1 and mat2 shapes cannot be multiplied"):
        rewriter.export_onnx(model, tmp_path / "m.onnx", (torch.randn(2, 5),))
    assert os.listdir(tmp_path) == []


def test_export_onnx_with_a_dtype_the_weights_do_not_take(tmp_path):
    # torch.export does not check dtypes against the weights: the failure shows when the program runs
    with pytest.raises((ExportError, ExampleInputsError), match=r"float64\[2, 8\]"):
        rewriter.export_onnx(_block(), tmp_path / "m.onnx", (torch.randn(2, 8, dtype=torch.float64),))
    assert os.listdir(tmp_path) == []


def test_export_onnx_of_something_else(tmp_path):
    with pytest.raises(TypeError, match="export_onnx takes an nn.Module, an OptimizedModule or an ExportedProgram"):
        rewriter.export_onnx(lambda t: t, tmp_path / "m.onnx", (torch.randn(2, 8),))
    with pytest.raises(ValueError, match="needs example_inputs"):
        rewriter.export_onnx(rewriter.optimize(_block()), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="opset must be >= 18"):
        rewriter.export_onnx(_block(), tmp_path / "m.onnx", (torch.randn(2, 8),), opset=13)
    assert os.listdir(tmp_path) == []


def test_export_onnx_still_works(optimized, tmp_path):
    opt, x = optimized
    result = rewriter.export_onnx(opt, tmp_path / "m.onnx", (x,))
    assert os.listdir(tmp_path) == ["m.onnx"] and result.max_abs_error < 1e-4
