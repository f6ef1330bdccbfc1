"""The rewrite pipelines: one ordered list each, nothing registered at import time.

A pass takes a PassContext and returns the Rewrites it made (each with its report Site);
the optimizer verifies them, rolls back the ones that do not hold, and removes the
replaced nodes before the next pass runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

aten = torch.ops.aten

from ..graph import CAST, MATMUL, SOFTMAX, module_path, spelled
from ..report import RewriteReport, Site
from ._rules import Rewrite, apply_rules

__all__ = ["PassContext", "Pass", "exact_passes", "Rewrite"]


@dataclass
class PassContext:
    gm: fx.GraphModule
    method: str  # how the graph was captured: "export" or "symbolic_trace"
    report: RewriteReport
    options: dict[str, Any] = field(default_factory=dict)
    claimed: set[fx.Node] = field(default_factory=set)  # nodes a rewrite already replaced
    site_of: dict[fx.Node, Site] = field(default_factory=dict)  # node -> the site it stands for
    flat_inputs: list | None = None  # the example inputs, for passes that read a value (None: verify=False)
    training: bool = False  # the model's mode: train-mode graphs must keep gradients on the model's parameters


@dataclass
class Pass:
    name: str
    run: Callable[[PassContext], list[Rewrite]]


def _canonical_attention(ctx: PassContext) -> list[Rewrite]:
    from .attention import ATTENTION_RULES, SDPA

    before = [n for n in ctx.gm.graph.nodes if n.op == "call_function" and n.target == SDPA]
    done = apply_rules(ATTENTION_RULES, ctx.gm, ctx.method, ctx.report, "canonical_attention", ctx.claimed, ctx.site_of)
    for n in before:
        ctx.site_of[n] = ctx.report.add(Site(module_path(n), "attention", "sdpa", reason="already scaled_dot_product_attention",
                                             pass_name="canonical_attention", node=n.name))
    _report_unmatched_softmax(ctx)
    return done


def _gqa_fold(ctx: PassContext) -> list[Rewrite]:
    from .attention import GQA_RULES

    return apply_rules(GQA_RULES, ctx.gm, ctx.method, ctx.report, "gqa_fold", ctx.claimed, ctx.site_of)


def _report_unmatched_softmax(ctx: PassContext) -> None:
    """Every softmax no pattern took gets a row: an attention we could not read, with why,
    or a softmax that is not attention (its probabilities are not contracted with values).

    ATen spellings (torch.export graphs) and torch-level ones (symbolic_trace graphs, where
    `F.softmax(..., _stacklevel=3)`, `Tensor.softmax` and `torch.matmul` stay as written and
    the attention patterns often miss them): either way the site is reported, never skipped."""
    seen = {s.node for s in ctx.report.sites}
    for n in ctx.gm.graph.nodes:
        if n in ctx.claimed or not spelled(n, SOFTMAX) or not n.users:
            continue
        readers, reshaped, dropped = _readers(n)
        if any(u.name in seen for u in readers):
            continue  # a pattern matched this site and its check refused it, with a reason
        einsum = next((u for u in [*readers, *_score_producers(n)] if "not_respelt" in u.meta), None)
        kind = "attention"
        if einsum is not None:
            why = f"softmax attention through an einsum left as written: {einsum.meta['not_respelt']}"
        elif any(spelled(u, MATMUL) for u in readers):
            if dropped:
                why = ("softmax attention with dropout on its probabilities (a train-mode graph); left as written: "
                       "canonical attention is rewritten in eval mode")
            elif ctx.method != "export":
                why = ("softmax attention in a symbolic_trace graph, spelled in a form no pattern covers; left as written "
                       "(a model torch.export can capture is matched on its ATen graph)")
            elif reshaped or _reshaped_scores(n):
                why = ("softmax attention whose scores are reshaped between the matmuls and the softmax (e.g. DeBERTa's "
                       "[batch·heads, L, L] ↔ [batch, heads, L, L] views); no pattern covers it, left as written")
            else:
                why = "softmax attention in a form no pattern covers (e.g. its probabilities are also read elsewhere)"
        else:
            kind, why = "softmax", ("not attention: its probabilities are not contracted with values by a matmul "
                                    "(a classifier's output, a gate or a router); left as written")
        ctx.report.add(Site(module_path(n), kind, "sdpa", pass_name="canonical_attention", node=n.name).refuse(why))


_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
             aten.contiguous.default}


_DROPOUT = {aten.dropout.default, aten.native_dropout.default, torch.nn.functional.dropout}


def _readers(n: fx.Node) -> tuple[list[fx.Node], bool, bool]:
    """The nodes reading `n`'s value past casts, reshapes and dropout; whether a reshape, and
    whether a dropout, was passed."""
    out, reshaped, dropped, todo = [], False, False, list(n.users)
    while todo:
        u = todo.pop()
        if spelled(u, CAST) or (u.op == "call_function" and (u.target in _RESHAPES or u.target in _DROPOUT)):
            reshaped |= u.target in _RESHAPES
            dropped |= u.target in _DROPOUT
            todo.extend(u.users)
        else:
            out.append(u)
    return out, reshaped, dropped


def _score_producers(softmax: fx.Node, steps: int = 6) -> list[fx.Node]:
    """The nodes a softmax's input comes from, following first arguments a few ops back."""
    out, x = [], softmax.args[0]
    for _ in range(steps):
        if not isinstance(x, fx.Node) or x.op != "call_function" or not x.args:
            break
        out.append(x)
        x = x.args[0]
    return out


def _reshaped_scores(softmax: fx.Node) -> bool:
    """Whether the softmax's input was reshaped after its last matmul (a few ops back)."""
    x = softmax.args[0]
    for _ in range(6):
        if not isinstance(x, fx.Node) or x.op != "call_function" or spelled(x, MATMUL):
            return False
        if x.target in _RESHAPES:
            return True
        x = x.args[0]
    return False


def _mask_structure(ctx: PassContext) -> list[Rewrite]:
    from .mask_structure import convert

    return convert(ctx)


def _rms_norm_fusion(ctx: PassContext) -> list[Rewrite]:
    from .norms import RMS_NORM_RULES

    return apply_rules(RMS_NORM_RULES, ctx.gm, ctx.method, ctx.report, "rms_norm_fusion", ctx.claimed)


def _pre_rmsnorm(ctx: PassContext) -> list[Rewrite]:
    from .pre_rmsnorm import convert

    return convert(ctx)


def _norm_ops(ctx: PassContext) -> list[Rewrite]:
    from .norms import NORM_OP_RULES, unmatched_reduction_reason

    done = apply_rules(NORM_OP_RULES, ctx.gm, ctx.method, ctx.report, "norm_ops", ctx.claimed)
    seen = {s.node for s in ctx.report.sites}
    for n in ctx.gm.graph.nodes:  # norms no rule could take, e.g. over several trailing dims
        if n.op == "call_function" and n.target in (torch.ops.aten.layer_norm.default, torch.ops.aten.rms_norm.default) \
                and n not in ctx.claimed and n.name not in seen and n.users:
            dims = len(n.args[1])
            ctx.report.add(Site(module_path(n), "layer_norm" if "layer" in str(n.target) else "rms_norm",
                                "rewriter." + ("layer_norm" if "layer" in str(n.target) else "rms_norm"),
                                pass_name="norm_ops", node=n.name).refuse(
                f"normalises over {dims} trailing dims; rewriter norms cover the last dim only"))
    for n in ctx.gm.graph.nodes:  # a normalisation written in a form no rule reads: reported, not skipped
        found = unmatched_reduction_reason(n) if n.users and n not in ctx.claimed else None
        if found and not _near_reported(n, seen):
            kind, why = found
            ctx.report.add(Site(module_path(n), kind, "rewriter." + kind, pass_name="norm_ops", node=n.name).refuse(why))
    return done


def _near_reported(n: fx.Node, seen: set[str], steps: int = 5) -> bool:
    """Whether a node a few users on already has a report row (a rule matched it and refused)."""
    todo = [(n, 0)]
    while todo:
        u, d = todo.pop()
        if u.name in seen:
            return True
        if d < steps:
            todo.extend((w, d + 1) for w in u.users)
    return False


def exact_passes(norm: str | None = "auto") -> list[Pass]:
    """The exact pipeline, in order. norm: "auto" (Pre-RMSNorm where provable), "crms"
    (Pre-CRMSNorm), or None / "keep" (no residual-stream conversion)."""
    passes = [Pass("canonical_attention", _canonical_attention), Pass("gqa_fold", _gqa_fold),
              Pass("mask_structure", _mask_structure), Pass("rms_norm_fusion", _rms_norm_fusion)]
    if norm in ("auto", "rms", "crms"):
        passes.append(Pass("pre_rmsnorm", _pre_rmsnorm))
    passes.append(Pass("norm_ops", _norm_ops))
    return passes
