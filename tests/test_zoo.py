"""The zoo: Hugging Face architectures built as users build them (tests/models/hf.py ZOO),
through the exact default, every approximate mode that fits, and ONNX.

Each test computes its cell of the README's "Tested models" table and checks it against
the committed table, so the table is this test's results, never typed by hand:
`python -m tests.test_zoo` recomputes every cell and rewrites the table.
"""
from __future__ import annotations

import functools
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import rewriter
from rewriter.compare import compare_outputs
from rewriter.export import ExportError
from tests.helpers import assert_every_softmax_reported
from tests.models import hf

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- zoo:begin (python -m tests.test_zoo) -->", "<!-- zoo:end -->"
MODES = ("linear", "agent", "sliding_window", "window2d", "neighborhood")
COLUMNS = ("exact", *MODES, "onnx")
NOT_FITTING = "–"  # the mode does not fit the model's attention (e.g. a 2-D window over text)
EXACT_TOL = 1e-5
pytestmark = pytest.mark.zoo  # in the default run; `pytest -m zoo` runs it alone


@functools.cache
def _built(name: str):
    return hf.ZOO[name].build()


def _attention_sites(report, pass_name: str):
    return [s for s in report.sites if s.kind == "attention" and s.pass_name == pass_name]


def _short(reason: str, width: int = 100) -> str:
    """A reason's first clause without its examples, cut at a word."""
    text = re.sub(r"\s*\([^()]*\)", "", reason.split(";")[0])
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= width else text[:width].rsplit(" ", 1)[0] + " …"


def _sites_cell(sites) -> str:
    applied = [s for s in sites if s.status == "applied"]
    if len(applied) == len(sites):
        return f"✓ {len(applied)}/{len(sites)}"
    reasons = sorted({_short(s.reason) for s in sites if s.status != "applied"})
    return f"{len(applied)}/{len(sites)}: " + "; ".join(reasons)


def exact_and_onnx(name: str) -> dict[str, str]:
    """The exact default matches on every output field; its ONNX file matches in onnxruntime."""
    model, x = _built(name)
    opt = rewriter.optimize(model, x)
    with torch.no_grad():
        out, ref = opt(*x), opt.reference(*x)
    assert type(out) is type(ref)
    result = compare_outputs(out, ref, tol=EXACT_TOL)
    assert result["ok"] and "nonfinite" not in result, result
    attention = _attention_sites(opt.report, "canonical_attention")
    assert attention, "no attention site reported"
    assert_every_softmax_reported(model, x, opt.report)
    assert all(s.reason for s in attention if s.status != "applied")
    norms = [s for s in opt.report.sites if s.kind in ("layer_norm", "rms_norm")]
    cell = _sites_cell(attention) + (f", norms {sum(s.status == 'applied' for s in norms)}/{len(norms)}" if norms else "")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            exported = rewriter.export_onnx(opt, Path(tmp) / "m.onnx", x)
        except ExportError as e:
            onnx = f"✗ {_short(str(e))}"
        else:
            assert exported.max_abs_error <= 1e-4
            onnx = "✓"
    return {"exact": cell, "onnx": onnx}


def approximate(name: str, mode: str) -> str:
    """The mode runs and reports every canonical attention site: applied with its error, or
    refused / rolled back with a reason."""
    entry = hf.ZOO[name]
    model, x = _built(name)
    opt = rewriter.optimize(model, x, attention=mode, **entry.options.get(mode, {}))
    with torch.no_grad():
        out = opt(*x)
    assert type(out) is type(opt.reference(*x))
    found = _attention_sites(opt.report, "canonical_attention")
    sites = _attention_sites(opt.report, f"approximate:{mode}")
    assert found and len(sites) == len(found), "every attention site found gets a row of this mode"
    for s in sites:
        if s.status == "applied":
            assert s.error["rel_l2"] < float("inf") and "cosine" in s.error
        else:
            assert s.reason and len(s.reason) > 10
    return _sites_cell(sites)


def readme_cells() -> dict[tuple[str, str], str]:
    text = README.read_text()
    if BEGIN not in text:
        return {}
    rows = text.split(BEGIN, 1)[1].split(END, 1)[0].strip().splitlines()[2:]
    cells = {}
    for row in rows:
        parts = [p.strip() for p in row.strip().strip("|").split("|")]
        cells.update({(parts[0].strip("`"), col): cell for col, cell in zip(COLUMNS, parts[1:])})
    return cells


def _check(name: str, column: str, cell: str) -> None:
    committed = readme_cells().get((name, column))
    assert committed == cell.replace("|", "/"), (
        f"README 'Tested models' says {committed!r} for {name} × {column}, the test found {cell!r}: "
        "run `python -m tests.test_zoo` to regenerate the table")


@pytest.mark.parametrize("name", list(hf.ZOO))
def test_exact_default_and_onnx(name):
    cells = exact_and_onnx(name)
    for column, cell in cells.items():
        _check(name, column, cell)
    assert cells["onnx"] == "✓", cells["onnx"]


@pytest.mark.parametrize("name,mode", [(n, m) for n, z in hf.ZOO.items() for m in z.modes])
def test_approximate_mode(name, mode):
    _check(name, mode, approximate(name, mode))


def _or_failure(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - the table shows it; the test fails on it
        return f"✗ {type(e).__name__}: {_short(str(e))}"


def table() -> str:
    """Every cell, computed (minutes on a laptop CPU)."""
    head = "| model | " + " | ".join(COLUMNS) + " |\n|" + "---|" * (len(COLUMNS) + 1)
    lines = [head]
    for name, entry in hf.ZOO.items():
        print(f"zoo: {name}", file=sys.stderr)
        cells = _or_failure(exact_and_onnx, name)
        cells = cells if isinstance(cells, dict) else {"exact": cells, "onnx": cells}
        cells.update({m: _or_failure(approximate, name, m) if m in entry.modes else NOT_FITTING for m in MODES})
        lines.append(f"| `{name}` | " + " | ".join(cells[c].replace("|", "/") for c in COLUMNS) + " |")
    return "\n".join(lines)


def write_readme() -> None:
    if BEGIN not in README.read_text():
        raise SystemExit(f"README.md has no {BEGIN!r} marker")
    rows = table()
    before, rest = README.read_text().split(BEGIN, 1)  # read again: the README may have changed meanwhile
    after = rest.split(END, 1)[1]
    README.write_text(f"{before}{BEGIN}\n{rows}\n{END}{after}")


if __name__ == "__main__":
    write_readme()
