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
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from ..graph import module_path, val
from ..report import Site
from ..compare import cosine, error
from ..verify import record
from ._args import args_of
from ._masks import MaskPlan, key_mask_node, plan_mask
from .mask_structure import BAND_META
from ._rules import Rewrite
from .policy import POLICY_KEYS, Policy

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default

__all__ = ["AttentionSite", "Form", "FORMS", "form", "run", "new_parameter", "SITE_META"]

# node.meta key of a replacement node: what rewriter.calibrate needs to know about its site
SITE_META = "rewriter_attention_site"


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
    prefix: int = 0  # keys concatenated in front that every query sees (causal after them)

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


# form name -> the module defining it (imported on use: no import-time registration);
# "per_layer" is defined here: each layer names its own form (see `_per_layer`)
FORMS = {
    "linear": "linear_attention",
    "agent": "agent_attention",
    "sliding_window": "window_attention",
    "window2d": "window_attention",
    "neighborhood": "window_attention",
    "per_layer": None,
}
FULL = "full"  # per_layer: this layer keeps softmax attention


def form(name: str) -> Form:
    if name not in FORMS:
        raise ValueError(f"attention must be one of {sorted(FORMS)} (or None for exact rewrites only), not {name!r}")
    if name == "per_layer":
        return _per_layer()
    module = importlib.import_module(f"{__package__}.{FORMS[name]}")
    return module.FORMS[name]


def _per_layer() -> Form:
    """A form that lets every layer pick its own: option `form` ("full" or a form name, one
    per layer as a list or a callable), and the other forms' options, also per layer
    (None = that form's default). This is how a per-layer policy (e.g. the one
    `rewriter.search_policy` finds) is written as optimize() options."""
    forms = {name: form(name) for name in FORMS if name != "per_layer"}
    defaults: dict[str, Any] = {"form": None}
    for f in forms.values():
        defaults.update({k: None for k in f.defaults})

    def build(gm, s, p):
        name = p.get("form")
        if name in (None, FULL):
            return None, f"kept full attention: form={FULL!r} for this layer (per_layer)", {}
        if name not in forms:
            raise ValueError(f"per_layer: form must be {FULL!r} or one of {sorted(forms)}, not {name!r}")
        f = forms[name]
        params = {k: (v if p.get(k) is None else p[k]) for k, v in f.defaults.items()}
        node, reason, used = f.build(gm, s, params)
        return node, reason, ({"form": name, **used} if node is not None else used)

    return Form("per_layer", "per_layer", defaults, build)


def new_parameter(gm: fx.GraphModule, s: "AttentionSite", role: str, value: torch.Tensor) -> fx.Node:
    """Register `value` as a trainable parameter of `gm` that this site's rewrite introduces
    (what `rewriter.calibrate` trains; it saves with `.pt2` and exports to ONNX as an
    initializer) and return a get_attr node for it at the current insert point."""
    base = re.sub(r"\W+", "_", module_path(s.node)).strip("_") or "site"
    name, i = f"{base}_{role}", 1
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{role}_{i}"
    param = nn.Parameter(value.detach().clone())
    gm.register_parameter(name, param)
    node = gm.graph.get_attr(name)
    mode = torch._guards.detect_fake_mode([val(s.q)])
    node.meta["val"] = mode.from_tensor(param, static_shapes=True) if mode is not None else param
    return node


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
    return AttentionSite(node, index, a["query"], a["key"], a["value"], float(scale), plan.causal, km, plan.prefix)


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
        if plan.prefix and f.action != "sliding_window_attention":
            site.refuse(f"causal attention after {plan.prefix} key/value tokens concatenated in front (memory or sink "
                        "tokens): only sliding_window carries them, as its sinks")
            continue
        params = {**f.defaults, **policy.params_for(index)}
        before = set(dict(gm.named_parameters(remove_duplicate=False)))
        with gm.graph.inserting_before(node):
            s = _site(node, index, plan, gm)
            new, reason, used = f.build(gm, s, params)
        if reason:
            site.refuse(reason)
            continue
        learnable = [n for n in dict(gm.named_parameters(remove_duplicate=False)) if n not in before]
        site.params = {**used, "causal": plan.causal, "key_padding_mask": plan.carry}
        if learnable:
            site.params["learnable"] = learnable
        if "form" in used:  # per_layer: the site says what it became
            site.action = form(used["form"]).action
        new.meta[SITE_META] = {"location": site.location, "q": s.q, "k": s.k, "v": s.v, "key_mask": s.key_mask,
                               "scale": s.scale, "causal": s.causal, "learnable": learnable,
                               "action": site.action, "layer": index}
        node.replace_all_uses_with(new)
        done.append(Rewrite(site, node, new))
    for band in [n for n in gm.graph.nodes if BAND_META in n.meta]:  # the exact pass made these local already
        ctx.report.add(Site(module_path(band), "attention", f.action, pass_name=f"approximate:{name}", node=band.name)
                       .refuse(f"already the exact sliding-window op: the model's mask is {band.meta[BAND_META]} "
                               "(rewritten by the exact pass)"))
    for unread in [s for s in ctx.report.sites if s.kind == "attention" and s.pass_name == "canonical_attention"
                   and s.status != "applied"]:  # no canonical node: this pass cannot see the site either
        ctx.report.add(Site(unread.location, "attention", f.action, pass_name=f"approximate:{name}", node=unread.node)
                       .refuse(f"not canonicalised, so not rewritten: {unread.reason}"))
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
