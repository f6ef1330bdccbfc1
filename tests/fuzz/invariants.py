"""The exactness invariant every generated model is held to (shared by the fuzz tests and
the regression tests of what the fuzzing found)."""
from __future__ import annotations

import torch

import rewriter
from rewriter.report import APPLIED, REFUSED, ROLLED_BACK
from tests.helpers import assert_close
from tests.models.generated import Built, Spec, build

ATTENTION_KINDS = {"attention"}
NORM_KINDS = {"layer_norm", "rms_norm"}


def check(spec: Spec, norm: str = "auto", dynamic: bool = True) -> rewriter.OptimizedModule:
    """optimize() the model `spec` describes; assert what must hold for an exact rewrite:

    1. the rewritten model matches the original within the dtype's tolerance, on the
       example inputs and on fresh inputs of the same shapes (an exact rewrite holds for
       every input, not only for the ones it was verified on);
    2. every site found is applied, or refused / rolled back with a reason, and the
       end-to-end verification passed;
    3. no attention or norm call of the model goes unreported.
    """
    built = build(spec)
    opt = rewriter.optimize(built.model, built.inputs, norm=norm, dynamic=dynamic)
    _check_outputs(built, opt)
    _check_report(built, opt)
    return opt


def _check_outputs(built: Built, opt) -> None:
    dtype = built.spec.torch_dtype
    for which, inputs in (("example", built.inputs), ("fresh", built.fresh)):
        with torch.no_grad():
            want, got = built.model(*inputs), opt(*inputs)
        try:
            assert_close(got, want, dtype)
        except AssertionError as e:
            raise AssertionError(f"{which} inputs: {e}\n{built.spec.short()}\n{opt.report}") from None


def _check_report(built: Built, opt) -> None:
    report = opt.report
    context = f"\n{built.spec.short()}\n{report}"
    out = report.verification.get("output", {})
    assert out.get("ok") is True, f"end-to-end verification: {out}{context}"
    for s in report.sites:
        assert s.status in (APPLIED, REFUSED, ROLLED_BACK), f"site {s.location} has status {s.status!r}{context}"
        if s.status != APPLIED:
            assert s.reason and s.reason.strip(), f"{s.status} site {s.location} ({s.kind}) has no reason{context}"
    softmax_rows = [s for s in report.sites if s.pass_name == "canonical_attention" and s.kind in ("attention", "softmax")
                    and s.reason != "already scaled_dot_product_attention"]
    assert len(softmax_rows) == report.capture["softmax"], \
        f"{report.capture['softmax']} softmaxes in the graph, {len(softmax_rows)} report rows{context}"
    if report.capture.get("method") != "export":
        return  # symbolic_trace graphs keep opaque leaf modules where tracing into them failed
    attention = {s.node for s in report.sites if s.kind in ATTENTION_KINDS}
    assert len(attention) >= built.attention_sites, \
        f"{built.attention_sites} attention calls, {len(attention)} attention sites reported{context}"
    norms = {s.node for s in report.sites if s.kind in NORM_KINDS}
    assert len(norms) >= built.norm_sites, f"{built.norm_sites} norm calls, {len(norms)} norm sites reported{context}"
