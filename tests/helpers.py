"""One comparison helper and one dtype → tolerance table for the whole suite (and a zip
rewriter for damaged-.pt2 tests)."""
from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from rewriter.compare import TOLERANCE, error, pairs


def rel_l2(actual, expected) -> float:
    """Worst relative L2 error over every float leaf, paired by path (rewriter.compare:
    NaN/Inf on one side only is inf; a different structure raises)."""
    worst = 0.0
    for path, a, e in pairs(actual, expected):
        if isinstance(e, torch.Tensor) and (e.is_floating_point() or e.is_complex()):
            worst = max(worst, error(a, e)["rel_l2"])
        elif isinstance(e, torch.Tensor):
            assert torch.equal(a, e), f"{path}: {e.dtype} output differs"
        else:
            assert a == e, f"{path}: {a!r} != {e!r}"
    return worst


def assert_close(actual, expected, dtype: torch.dtype = torch.float32, tol: float | None = None) -> None:
    err = rel_l2(actual, expected)
    limit = TOLERANCE[dtype] if tol is None else tol
    assert err <= limit, f"relative L2 error {err:.3e} > {limit:.1e}"


def targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def count(gm, target) -> int:
    return sum(1 for t in targets(gm) if t == target)


def run_both(model, opt, inputs):
    """(optimised output, original output), the original called as the graphs compute it
    (a decoder's KV cache off: `OptimizedModule.reference`)."""
    assert opt._original is model
    with torch.no_grad():
        return opt(*inputs), opt.reference(*inputs)


def rewrite_zip(src: Path, dst: Path, edit) -> Path:
    """Copy the zip archive `src` (a .pt2) to `dst` with each member's bytes passed through
    edit(name, data)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info.filename)))
    return dst


def assert_every_softmax_reported(model, inputs, report) -> None:
    """The softmaxes of the model's captured graph (captured again here, independently of the
    report; those written by hand counted from the report's respelling) equal the report rows
    that account for one: attention sites the canonical pass applied or refused, and
    softmaxes reported as not attention."""
    import rewriter
    from rewriter.graph import SOFTMAX, dead_code_elimination, spelled
    from rewriter.hf_calls import prepare_call

    args = inputs if isinstance(inputs, tuple) else (inputs,)
    kwargs, fixed, _ = prepare_call(model, args, {})  # as the optimised module captures it (KV cache off)
    cap = rewriter.capture(model, args, kwargs, fixed_kwargs=fixed)
    dead_code_elimination(cap.module)
    found = sum(1 for n in cap.module.graph.nodes if spelled(n, SOFTMAX))
    found += report.capture.get("respelt", {}).get("hand-written softmax", 0)
    rows = [s for s in report.sites if s.pass_name == "canonical_attention" and s.kind in ("attention", "softmax")
            and s.reason != "already scaled_dot_product_attention"]
    assert len(rows) == found == report.capture["softmax"], \
        f"{found} softmaxes in the graph, {len(rows)} report rows: {[(s.location, s.reason) for s in rows]}"


def fail_the_whole_output_once(monkeypatch) -> None:
    """Make the optimiser's first whole-output check fail (every site still holds on its own),
    to exercise the restore of the whole graph."""
    import sys

    optimize_module = sys.modules["rewriter.optimize"]  # the package's `optimize` names the function
    real, calls = optimize_module.compare_outputs, []

    def fail_first(actual, expected):
        calls.append(1)
        out = real(actual, expected)
        return {**out, "ok": False, "rel_l2": 1.0} if len(calls) == 1 else out

    monkeypatch.setattr(optimize_module, "compare_outputs", fail_first)
