"""Rule = pattern + check + rewrite; a Pass is an ordered list of rules.

A pattern is an ordinary PyTorch function traced through the same capture path as the
model (so it is made of the same ops); variants are keyword parameters whose product
is traced once per process. Matching uses torch.fx's SubgraphMatcher with literals as
wildcards: the rule's `check` reads the real literals, shapes and dtypes from the
matched nodes (`node.meta["val"]`) and returns a reason when it refuses.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx.passes.utils.matcher_utils import SubgraphMatcher

from ..graph import module_path, op_targets
from ..report import RewriteReport, Site

__all__ = ["Match", "Rule", "Rewrite", "apply_rules"]


@dataclass
class Match:
    """One place in the graph where a pattern matched."""

    inputs: dict[str, Any]  # pattern input name -> graph node or literal
    nodes: dict[fx.Node, fx.Node]  # pattern node -> graph node
    output: fx.Node  # the graph node the rewrite replaces
    variant: dict[str, Any]

    def find(self, *targets) -> list[fx.Node]:
        """Graph nodes of the match whose op is one of `targets` (overloads or packets)."""
        out = []
        for pn, gn in self.nodes.items():
            if pn.op in ("call_function", "call_method"):
                t = pn.target
                packet = getattr(t, "overloadpacket", None)
                if t in targets or (packet is not None and packet in targets):
                    out.append(gn)
        return out

    def one(self, *targets) -> fx.Node | None:
        found = self.find(*targets)
        return found[0] if found else None


@dataclass(eq=False)
class Rewrite:
    """What a pass did at one site: enough to verify it and to undo it.

    `old` stays in the graph (unused) until verification, so both can be computed from
    the same inputs. Rewrites sharing a `group` are undone together (`group.undo()`
    restores what they changed besides the graph, such as parameters).
    """

    site: Site
    old: fx.Node
    new: fx.Node
    group: Any = None  # an object with .undo(), shared by rewrites that stand or fall together

    def roll_back(self) -> None:
        self.new.replace_all_uses_with(self.old)


@dataclass(eq=False)
class Rule:
    name: str
    kind: str  # the report's `kind` of a site this rule finds
    action: str  # the report's `action` when it applies
    pattern: Callable[..., Any]
    example_inputs: Callable[[dict], dict[str, torch.Tensor]]  # variant -> named example tensors
    check: Callable[[Match], str | None]
    rewrite: Callable[[Match, fx.GraphModule], fx.Node]  # inserts and returns the replacement
    variants: dict[str, list] = field(default_factory=dict)
    # op names (ATen packet names) a variant needs; variants needing absent ops are not traced
    needs: Callable[[dict], set[str]] | None = None
    # True when this rule completes a site an earlier rule made (the report keeps one record)
    extends: bool = False

    def variant_list(self) -> list[dict]:
        keys = list(self.variants)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.variants[k] for k in keys))]

    def patterns(self, method: str, graph_ops: set) -> list[tuple[dict, list[str], fx.Graph]]:
        """The traced variants that could match a graph containing `graph_ops`."""
        names = {_op_name(t) for t in graph_ops}
        out = []
        for variant in self.variant_list():
            if method == "export" and self.needs is not None and not self.needs(variant) <= names:
                continue
            traced = _trace(self, method, tuple(sorted(variant.items())))
            if traced[2] <= graph_ops:
                out.append((variant, traced[0], traced[1]))
        # largest patterns first: a variant that is part of another must not take its nodes
        return sorted(out, key=lambda t: -len(t[2].nodes))


def _op_name(target) -> str:
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return target[1] if isinstance(target, tuple) else getattr(target, "__name__", str(target))


@functools.lru_cache(maxsize=None)
def _trace(rule: Rule, method: str, variant_items: tuple) -> tuple[list[str], fx.Graph, frozenset]:
    """Trace one variant of a rule's pattern through the capture path (once per process)."""
    from ..capture import trace_pattern

    variant = dict(variant_items)
    named = rule.example_inputs(variant)
    names = list(named)
    fn = functools.partial(rule.pattern, **variant)
    graph = trace_pattern(lambda *a: fn(**dict(zip(names, a))), tuple(named.values()), method)
    graph.eliminate_dead_code()
    kept = []
    for name, node in zip(names, [n for n in graph.nodes if n.op == "placeholder"]):
        if node.users:
            kept.append(name)
        else:  # inputs this variant does not use (the matcher needs every placeholder bound)
            graph.erase_node(node)
    return kept, graph, frozenset(op_targets(graph))


class _Matcher(SubgraphMatcher):
    """SubgraphMatcher whose literals are wildcards, but only for literals.

    torch's `ignore_literals=True` also lets a pattern *node* match a graph literal, which
    leaves that pattern node's inputs unbound; here a pattern node never matches a literal,
    and a pattern literal matches a graph literal or a symbolic size (the rule's check
    reads the real values).
    """

    def __init__(self, pattern: fx.Graph):
        super().__init__(pattern, match_output=False, match_placeholder=False,
                         remove_overlapping_matches=True, ignore_literals=False)

    def _match_literals(self, pn, gn, match) -> bool:
        if isinstance(pn, fx.Node):
            return super()._match_literals(pn, gn, match)
        if isinstance(gn, fx.Node):
            return isinstance(gn.meta.get("val"), (int, torch.SymInt)) and isinstance(pn, int)
        return True


def _placeholder_names(graph: fx.Graph, names: list[str]) -> dict[fx.Node, str]:
    return dict(zip([n for n in graph.nodes if n.op == "placeholder"], names))


def apply_rules(
    rules: list[Rule], gm: fx.GraphModule, method: str, report: RewriteReport, pass_name: str,
    claimed: set[fx.Node] | None = None, site_of: dict[fx.Node, Site] | None = None,
) -> list[Rewrite]:
    """Run `rules` in order over `gm`; record every site in `report`; return what changed.

    Replaced nodes stay in the graph (unused) until verification, so each site can be
    compared with what it replaced on the same inputs and undone on its own. A rule that
    `extends` completes the site recorded in `site_of` for a node it matches.
    """
    done: list[Rewrite] = []
    refused: dict[fx.Node, Site] = {}
    refused_inner: dict[fx.Node, set[fx.Node]] = {}  # a refused match's nodes: one row per site, not per variant
    site_of = {} if site_of is None else site_of  # node -> the site it stands for, for rules that extend one
    claimed = set() if claimed is None else claimed
    for rule in rules:
        for variant, names, pattern in rule.patterns(method, op_targets(gm.graph)):
            matcher = _Matcher(pattern)
            ph = _placeholder_names(pattern, names)
            for im in matcher.match(gm.graph):
                inner = {gn for pn, gn in im.nodes_map.items() if pn.op not in ("placeholder", "output")}
                if inner & claimed or len(im.returning_nodes) != 1:
                    continue
                out = im.returning_nodes[0]
                if out in refused:
                    continue
                m = Match({ph[p]: im.nodes_map[p] for p in ph if p in im.nodes_map}, dict(im.nodes_map), out, variant)
                extended = next((site_of[n] for n in [out, *inner] if n in site_of), None) if rule.extends else None
                site = extended or Site(module_path(out), rule.kind, rule.action, pass_name=pass_name, node=out.name)
                reason = rule.check(m)
                if reason:
                    # a smaller variant inside a refused larger one: the larger one's row stands for the site
                    if extended is None and not any(out in nodes for nodes in refused_inner.values()):
                        refused[out] = site.refuse(reason)
                        refused_inner[out] = inner
                    continue
                with gm.graph.inserting_before(out.next):
                    new = rule.rewrite(m, gm)
                out.replace_all_uses_with(new)
                claimed |= inner
                site_of[new] = site
                done.append(Rewrite(site, out, new))
    for out, site in refused.items():
        if not refused_inner[out] & claimed:  # a smaller variant inside it applied: that row stands for the site
            report.add(site)
    for site in dict.fromkeys(rw.site for rw in done):
        if site not in report.sites:  # a site this rule extended is already recorded: one record per site
            report.add(site)
    gm.recompile()
    return done

