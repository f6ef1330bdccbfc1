"""Pre-LN → Pre-RMSNorm (Jiang et al., NeurIPS 2023), exact.

In a Pre-LN transformer every reader of the residual stream is a LayerNorm or a residual
add. LayerNorm(x) = RMSNorm(x - mean(x)), and LayerNorm ignores the stream's mean, so
re-centring everything that *writes* into the stream (embeddings, class tokens, position
embeddings, patch-embedding conv/linear, each branch's output projection) makes the
stream exactly zero-mean and every LayerNorm reading it an RMSNorm with the same gain and
bias. The analysis walks the FX graph's dataflow: no names are read.

A stream is converted only if (1) every reader of every stream node is a LayerNorm over
the channel dim or another stream add, (2) every writer can be re-centred (a parameter,
an embedding, a linear/addmm/conv output, through layout ops and scalar scales), (3) some
residual branch reads the stream through one of its LayerNorms (a Pre-LN stream; Post-LN
streams are written by LayerNorm outputs and refused). Writers get re-centred *copies* of
their parameters, so any other reader of those parameters (a tied LM head) stays exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .. import kernels  # noqa: F401  (registers torch.ops.rewriter)
from ..graph import add_param, call, module_path, param, same_size, val
from ..report import Site
from ._args import args_of, is_number
from ._rules import Rewrite

aten = torch.ops.aten
RMS = torch.ops.rewriter.rms_norm.default
CRMS = torch.ops.rewriter.crms_norm.default

__all__ = ["convert"]

_LAYOUT = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints}
_SAME = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.expand.default,
         aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default}


@dataclass(eq=False)
class _Stream:
    adds: set[fx.Node] = field(default_factory=set)  # stream sums (add / cat)
    leaves: set[fx.Node] = field(default_factory=set)  # writer outputs
    norms: list[fx.Node] = field(default_factory=list)  # LayerNorms reading the stream


def _is_ln(n: fx.Node) -> bool:
    if n.op != "call_function" or n.target != aten.layer_norm.default:
        return False
    shape = args_of(n)["normalized_shape"]
    return len(shape) == 1


def _channels(n: fx.Node):
    v = val(n)
    return v.shape[-1] if isinstance(v, torch.Tensor) and v.dim() else None


def _is_sum(n: fx.Node, d) -> bool:
    if n.op != "call_function":
        return False
    if n.target == aten.add.Tensor:
        a = args_of(n)
        return (isinstance(a["input"], fx.Node) and isinstance(a["other"], fx.Node) and a.get("alpha", 1) == 1
                and same_size(_channels(n), d))
    if n.target == aten.cat.default:
        dim = args_of(n).get("dim", 0)
        nd = val(n).dim()
        return dim % nd != nd - 1
    return False


def _collect(x: fx.Node, d, stream: _Stream, owner: dict) -> None:
    stack = [x]
    while stack:
        n = stack.pop()
        if n in stream.adds or n in stream.leaves:
            continue
        if _is_sum(n, d):
            stream.adds.add(n)
            owner.setdefault(n, stream)
            stack.extend(a for a in n.all_input_nodes)
        else:
            stream.leaves.add(n)


def _find_streams(graph: fx.Graph, claimed: set) -> list[_Stream]:
    streams: list[_Stream] = []
    for ln in graph.nodes:
        if not _is_ln(ln) or ln in claimed:
            continue
        x = ln.args[0]
        s = _Stream()
        _collect(x, _channels(x), s, {})
        s.norms.append(ln)
        for other in list(streams):  # LayerNorms reading the same sums or writers share a stream
            if (other.adds | other.leaves) & (s.adds | s.leaves):
                s.adds |= other.adds
                s.leaves |= other.leaves
                s.norms = other.norms + s.norms
                streams.remove(other)
        streams.append(s)
    for s in streams:
        s.leaves -= s.adds
    return streams


@dataclass
class _Edit:
    readers: list[fx.Node]  # the nodes reading the parameter on the way into the stream
    attr: fx.Node  # the parameter's get_attr node
    dim: int  # the dim of the parameter that maps onto the stream's channels


def _writer_edits(leaf: fx.Node, gm: fx.GraphModule, stream: _Stream) -> tuple[list[_Edit], str | None]:
    """How to re-centre the writer behind `leaf`, following layout ops back to it."""
    node, c = leaf, val(leaf).dim() - 1
    readers = [u for u in leaf.users if u in stream.adds]
    while True:
        t = node.target if node.op == "call_function" else node.op
        v = val(node)
        if node.op == "get_attr":
            if param(gm, node) is None:
                return [], f"stream written by {node.target}, which is not a tensor"
            return [_Edit(readers, node, c)], None
        if t == aten.embedding.default:
            if c != v.dim() - 1:
                return [], "embedding written along a non-channel dim"
            return [_Edit([node], node.args[0], 1)], None
        if t == aten.linear.default:
            if c != v.dim() - 1:
                return [], "linear output written along a non-channel dim"
            edits = [_Edit([node], node.args[1], 0)]
            bias = args_of(node).get("bias")
            return edits + ([_Edit([node], bias, 0)] if isinstance(bias, fx.Node) else []), None
        if t == aten.addmm.default:
            a = args_of(node)
            if c != 1 or a.get("beta", 1) != 1 or a.get("alpha", 1) != 1:
                return [], "addmm writer with scaling or a non-channel dim"
            return [_Edit([node], a["mat2"], 1), _Edit([node], a["input"], val(a["input"]).dim() - 1)], None
        if t in (aten.conv2d.default, aten.conv1d.default, aten.conv3d.default):
            a = args_of(node)
            if c != 1 or a.get("groups", 1) != 1:
                return [], "grouped convolution or non-channel dim"
            edits = [_Edit([node], a["weight"], 0)]
            return edits + ([_Edit([node], a["bias"], 0)] if isinstance(a.get("bias"), fx.Node) else []), None
        if not all(isinstance(p, fx.Node) for p in node.all_input_nodes) or node.op != "call_function":
            return [], f"stream written by {node.op} {node.target}"
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node):
            return [], f"stream written by {t}"
        sv = val(src)
        readers = [node]
        if t in _SAME and sv.dim() == v.dim():
            node = src
        elif t in (aten.mul.Tensor, aten.div.Tensor) and (is_number(node.args[1]) or
                                                          (isinstance(val(node.args[1]), torch.Tensor) and val(node.args[1]).numel() == 1)):
            node = src  # a scalar scale keeps the mean zero
        elif t == aten.transpose.int:
            a, b = (x % v.dim() for x in node.args[1:3])
            c = b if c == a else a if c == b else c
            node = src
        elif t == aten.permute.default:
            c = list(node.args[1])[c] % v.dim()
            node = src
        elif t in (aten.slice.Tensor, aten.select.int) and args_of(node).get("dim", 0) % sv.dim() != c:
            c = c + (1 if t == aten.select.int and args_of(node)["dim"] % sv.dim() <= c else 0)
            node = src
        elif t == aten.unsqueeze.default:
            dim = node.args[1] % v.dim()
            if dim == c:
                return [], "unsqueeze on the channel dim"
            c = c - (1 if dim < c else 0)
            node = src
        elif t in _LAYOUT:
            # the channel dim must survive whole, with everything before it unchanged
            prefix_ok = c < sv.dim() and all(same_size(sv.shape[i], v.shape[i]) for i in range(c + 1))
            if c == v.dim() - 1 and same_size(sv.shape[-1], v.shape[-1]):
                c = sv.dim() - 1
            elif not prefix_ok:
                return [], f"{t} reshapes the channel dim of a writer"
            node = src
        else:
            name = getattr(t, "__name__", str(t))
            return [], f"stream written by `{name}` at {module_path(node)}, which cannot be re-centred"


def _descendants(roots: list[fx.Node]) -> set[fx.Node]:
    seen, stack = set(), list(roots)
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def _plan(stream: _Stream, gm: fx.GraphModule) -> tuple[list[_Edit], str | None]:
    members = stream.adds | set(stream.norms)
    for n in stream.adds | stream.leaves:
        for u in n.users:
            if u in members:
                continue
            if n in stream.leaves and u not in stream.adds:
                continue  # checked below: a writer read elsewhere
            where = "the model output" if u.op == "output" else f"`{getattr(u.target, '__name__', u.target)}` at {module_path(u)}"
            return [], f"the residual stream is read raw by {where}, not only by LayerNorms and residual adds"
    for leaf in stream.leaves:
        if leaf.op == "call_function" and leaf.target in (aten.layer_norm.default, aten.native_layer_norm.default):
            return [], (f"the stream is written by a LayerNorm output ({module_path(leaf)}): Post-LN, "
                        "whose norms see a stream that is not re-centrable")
    for leaf in stream.leaves:
        outside = [u for u in leaf.users if u not in stream.adds and u not in stream.norms]
        if outside:
            return [], (f"a writer's output ({module_path(leaf)}) is also read outside the stream, "
                        f"by {module_path(outside[0])}: the stream is read raw")
    below = _descendants(stream.norms)
    if not any(leaf in below for leaf in stream.leaves):
        return [], "no residual branch reads this stream through its LayerNorms (not a Pre-LN residual stream)"
    edits: list[_Edit] = []
    for leaf in sorted(stream.leaves, key=lambda n: n.name):
        e, reason = _writer_edits(leaf, gm, stream)
        if reason:
            return [], reason
        edits.extend(e)
    dims: dict[str, int] = {}
    for e in edits:
        t = param(gm, e.attr)
        if t is None or not t.is_floating_point():
            return [], f"writer parameter {e.attr.target} is not a floating-point tensor"
        if dims.setdefault(e.attr.target, e.dim) != e.dim:
            return [], f"parameter {e.attr.target} writes into the stream along two different dims"
    return edits, None


class _Group:
    """The edits of one stream: undone together when any of its sites fails."""

    def __init__(self, site: Site):
        self.site = site
        self.rewired: list[tuple[fx.Node, fx.Node, fx.Node]] = []  # (reader, new param, old param)

    def undo(self) -> None:
        for reader, new, old in self.rewired:
            reader.replace_input_with(new, old)
        self.site.roll_back("a LayerNorm of this stream did not match its RMSNorm after re-centring")


def _location(norms: list[fx.Node]) -> str:
    paths = [module_path(n).split(".") for n in norms]
    common = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common) or "<root>"


def _compressed(stream: _Stream, graph: fx.Graph) -> dict[fx.Node, fx.Node]:
    """A D−1-channel copy of the (re-centred) stream: each writer's output sliced to its
    first D−1 channels, each stream sum recomputed on the slices.

    The full-width stream stays in place for the LayerNorms kept for verification; once
    they are verified and removed, nothing reads it and it goes with them.
    """
    comp: dict[fx.Node, fx.Node] = {}
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1:]

    def sliced(n: fx.Node, before: fx.Node) -> fx.Node:
        if n not in comp:
            width = val(n).shape[-1]
            # right after the writer, so the slice comes before every reader of it (a LayerNorm may
            # read a writer directly, ahead of the first stream sum: a model without position embeddings)
            at = last_input[0] if n.op == "placeholder" else n
            with graph.inserting_after(at):  # a per-token constant (width 1) broadcasts as is
                comp[n] = n if width == 1 else call(graph, aten.slice.Tensor, (n, -1, 0, width - 1), like=n)
        return comp[n]

    for n in list(graph.nodes):
        if n in stream.adds:  # its inputs are earlier sums (already compressed) or writers
            args = fx.node.map_arg(n.args, lambda a: comp[a] if a in stream.adds else sliced(a, n))
            with graph.inserting_before(n):
                comp[n] = call(graph, n.target, args, dict(n.kwargs), like=n)
    for ln in stream.norms:
        x = ln.args[0]
        if x not in comp:
            sliced(x, ln)
    return comp


def convert(ctx) -> list:
    """Convert every provable Pre-LN residual stream; refuse the others with a reason.

    ctx.options["norm"] == "crms" gives Pre-CRMSNorm: the stream itself is stored in D−1
    channels and each LayerNorm becomes `rewriter::crms_norm`.
    """
    gm = ctx.gm
    compress = ctx.options.get("norm") == "crms"
    action = "pre_crmsnorm" if compress else "pre_rmsnorm"
    done: list[Rewrite] = []
    for stream in _find_streams(gm.graph, ctx.claimed):
        site = ctx.report.add(Site(_location(stream.norms), "residual_stream", action,
                                   pass_name="pre_rmsnorm", node=stream.norms[0].name))
        if ctx.training:
            site.refuse("train mode: the re-centred writers would be new weights the optimiser does not update "
                        "(gradients must reach the model's own parameters); converted in eval mode only")
            continue
        edits, reason = _plan(stream, gm)
        if reason:
            site.refuse(reason)
            continue
        group = _Group(site)
        centred: dict[str, fx.Node] = {}
        for e in edits:
            if e.attr.target not in centred:
                t = param(gm, e.attr).detach()
                centred[e.attr.target] = add_param(gm, f"{e.attr.target}.centred", t - t.mean(e.dim, keepdim=True), like=e.attr)
            for reader in e.readers:
                reader.replace_input_with(e.attr, centred[e.attr.target])
                group.rewired.append((reader, centred[e.attr.target], e.attr))
        comp = _compressed(stream, gm.graph) if compress else {}
        for ln in stream.norms:
            a = args_of(ln)
            with gm.graph.inserting_after(ln):
                if compress:
                    new = call(gm.graph, CRMS, (comp[a["input"]], a["weight"], a["bias"], float(a["eps"])), like=ln)
                else:
                    new = call(gm.graph, RMS, (a["input"], a["weight"], a["bias"], float(a["eps"]), 0.0), like=ln)
            ln.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
            ctx.claimed |= {ln, new}
            norm_site = ctx.report.add(Site(module_path(ln), "layer_norm", "rewriter." + ("crms_norm" if compress else "rms_norm"),
                                            pass_name="pre_rmsnorm", node=ln.name))
            done.append(Rewrite(norm_site, ln, new, group=group))
    gm.recompile()
    return done
