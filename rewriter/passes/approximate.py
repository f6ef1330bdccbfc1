"""The approximate-attention pass: canonical attention nodes → an efficient form, per policy.

Runs after the exact pipeline, so every softmax attention is one SDPA node. For each
node (a "layer", in graph order) the policy says whether to rewrite it and with which
parameters; its mask is classified (causal, key padding, or refused); the form builds
the replacement. Each site's error (relative L2, cosine) against the softmax attention
it replaced is measured on the example inputs and reported; approximate sites are not
rolled back for being approximate, only for producing non-finite values.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from ..graph import module_path, val
from ..report import Site
from ..verify import cosine, error, record
from ._args import args_of
from ._masks import MaskPlan, key_mask_node, plan_mask
from ._rules import Rewrite
from .policy import POLICY_KEYS, Policy

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default

__all__ = ["AttentionSite", "Form", "FORMS", "form", "run"]


@dataclass
class AttentionSite:
    """One canonical attention node, as the forms need it."""

    node: fx.Node
    index: int  # layer index: position among the graph's attention nodes
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float
    causal: bool
    key_mask: fx.Node | None

    @property
    def same_tokens(self) -> bool:  # self-attention: queries and keys are the same positions
        return str(val(self.q).shape[-2]) == str(val(self.k).shape[-2])

    @property
    def n_tokens(self):
        return val(self.q).shape[-2]


@dataclass
class Form:
    name: str  # the value of optimize(attention=...)
    action: str  # the report's action
    defaults: dict[str, Any]
    # (graph module, site, parameters) -> (replacement node, None, parameters used) or (None, reason, {})
    build: Callable[[fx.GraphModule, AttentionSite, dict[str, Any]], tuple[fx.Node | None, str | None, dict]]


# form name -> the module defining it (imported on use: no import-time registration)
FORMS = {
    "linear": "linear_attention",
    "agent": "agent_attention",
    "sliding_window": "window_attention",
    "window2d": "window_attention",
    "neighborhood": "window_attention",
}


def form(name: str) -> Form:
    if name not in FORMS:
        raise ValueError(f"attention must be one of {sorted(FORMS)} (or None for exact rewrites only), not {name!r}")
    module = importlib.import_module(f"{__package__}.{FORMS[name]}")
    return module.FORMS[name]


def check_options(f: Form, options: dict[str, Any]) -> None:
    unknown = set(options) - set(f.defaults) - set(POLICY_KEYS)
    if unknown:
        raise ValueError(f"attention={f.name!r} takes options {sorted(f.defaults)} and the policy's "
                         f"{list(POLICY_KEYS)}; unknown: {sorted(unknown)}")


def _site(node: fx.Node, index: int, plan: MaskPlan, gm: fx.GraphModule) -> AttentionSite:
    a = args_of(node)
    scale = a.get("scale")
    if scale is None:
        scale = float(val(a["query"]).shape[-1]) ** -0.5
    km = None
    if plan.carry:
        with gm.graph.inserting_before(node):
            km = key_mask_node(gm.graph, node)
    return AttentionSite(node, index, a["query"], a["key"], a["value"], float(scale), plan.causal, km)


def run(ctx, name: str, policy: Policy, flat_inputs: list, measure: bool = True) -> list[Rewrite]:
    """Rewrite the attention nodes the policy selects into form `name`; measure each one."""
    f = form(name)
    gm = ctx.gm
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == SDPA]
    masks = [args_of(n).get("attn_mask") for n in nodes]
    mask_values = record(gm, flat_inputs, [m for m in masks if isinstance(m, fx.Node)], ancestors_only=True)
    done: list[Rewrite] = []
    for index, (node, mask) in enumerate(zip(nodes, masks)):
        site = ctx.report.add(Site(module_path(node), "attention", f.action, pass_name=f"approximate:{name}",
                                   node=node.name))
        kept = policy.why_kept(index, site.location, len(nodes))
        if kept:
            site.refuse(kept)
            continue
        if any(val(t).dim() != 4 for t in args_of(node).values() if isinstance(t, fx.Node) and t is not mask):
            site.refuse("attention over tensors that are not [batch, heads, tokens, dim]")
            continue
        plan = plan_mask(node, mask_values.get(mask) if isinstance(mask, fx.Node) else None)
        if plan.reason:
            site.refuse(plan.reason)
            continue
        params = {**f.defaults, **policy.params_for(index)}
        with gm.graph.inserting_before(node):
            new, reason, used = f.build(gm, _site(node, index, plan, gm), params)
        if reason:
            site.refuse(reason)
            continue
        site.params = {**used, "causal": plan.causal, "key_padding_mask": plan.carry}
        node.replace_all_uses_with(new)
        done.append(Rewrite(site, node, new))
    gm.graph.lint()
    gm.recompile()
    if measure:
        _measure(gm, done, flat_inputs)
    return done


def _measure(gm: fx.GraphModule, done: list[Rewrite], flat_inputs: list) -> None:
    """Each site's error against the softmax attention it replaced, on the example inputs
    (over the real query rows only, where a padding mask says which rows are padding)."""
    if not done:
        return
    masks = {rw: rw.new.args[3] for rw in done if isinstance(rw.new.args[3], fx.Node)}  # every op: (q, k, v, key_mask, ...)
    values = record(gm, flat_inputs, [n for rw in done for n in (rw.old, rw.new)] + list(masks.values()))
    for rw in done:
        new, old = values[rw.new], values[rw.old]
        km = values.get(masks.get(rw))
        if km is not None and km.shape[-1] == new.shape[-2]:  # padded query rows never reach the output
            new, old = new.transpose(1, 2)[km], old.transpose(1, 2)[km]
        rw.site.error = {**error(new, old), "cosine": cosine(new, old)}
        if not torch.isfinite(new).all():
            rw.roll_back()
            rw.site.roll_back("the replacement produced non-finite values on the example inputs")
    gm.recompile()
