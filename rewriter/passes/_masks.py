"""What an attention mask means, so an approximate rewrite can carry it or refuse.

The replacements understand two things: causality and a per-key padding mask. A
canonical attention node's mask is read on the example inputs (its value) and in the
graph (what it is computed from): it must be, on every valid query row, either
`causal ∧ pad[key]` or `pad[key]`, the same for every head, with additive masks made of
0 and large negatives only (not a position bias). A mask that depends on the inputs'
values is carried at run time: the padding vector is its last query row (the row that,
causal or not, sees every valid key).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph import ancestors, call, val
from ._args import args_of

aten = torch.ops.aten

__all__ = ["MaskPlan", "plan_mask"]

_MASKED = -1e4  # additive entries at or below this are "masked"; above it must be exactly 0


@dataclass
class MaskPlan:
    causal: bool = False
    carry: bool = False  # a key-padding mask must be computed from the mask at run time
    prefix: int = 0  # causal after this many keys every query sees (memory / sink tokens concatenated in front)
    reason: str | None = None


def _reads_inputs(node: fx.Node) -> bool:
    """Whether a tensor depends on a graph input's values (not only on shapes)."""
    return any(n.op == "placeholder" for n in ancestors([node], follow=lambda a: isinstance(val(a), torch.Tensor)))


def _learned_from(node: fx.Node) -> str | None:
    """The name of a trainable parameter the tensor is computed from, if any (a position
    bias table: zero at initialisation in e.g. Swin, so its example value cannot tell)."""
    gm = node.graph.owning_module
    for n in ancestors([node]):
        if n.op == "get_attr":
            try:
                t = gm.get_parameter(n.target)
            except AttributeError:
                continue
            if t.requires_grad:
                return n.target
    return None


def plan_mask(sdpa: fx.Node, mask_value: torch.Tensor | None) -> MaskPlan:
    """Classify the mask of an SDPA node from its example value; a reason where it cannot be carried."""
    a = args_of(sdpa)
    nq, nk = val(a["query"]).shape[-2], val(a["key"]).shape[-2]
    mask = a.get("attn_mask")
    if a.get("dropout_p"):
        return MaskPlan(reason="attention dropout is active (a training-mode graph)")
    if mask is None:
        if a.get("is_causal") and str(nq) != str(nk):
            return MaskPlan(reason="causal attention with different query and key lengths")
        return MaskPlan(causal=bool(a.get("is_causal")))
    if a.get("is_causal"):
        return MaskPlan(reason="both a mask and is_causal")
    learned = _learned_from(mask) if isinstance(mask, fx.Node) else None
    if learned:
        return MaskPlan(reason=f"the mask is a learned bias (computed from the parameter {learned}, e.g. a relative "
                               "position bias table), not a padding or causal mask")
    m = mask_value
    if m is None:
        return MaskPlan(reason="the mask's value could not be read on the example inputs")
    if m.dtype != torch.bool:
        bad = (m != 0) & (m > _MASKED)
        if bad.any():
            return MaskPlan(reason="the mask is an additive bias (e.g. a position bias), not a padding or causal mask")
        m = m == 0
    while m.dim() < 4:
        m = m.unsqueeze(0)
    qn, kn = m.shape[-2], m.shape[-1]  # the example's sizes (qn is 1 when broadcast over queries)
    if not torch.equal(m, m[:, :1].expand_as(m)):
        return MaskPlan(reason="the mask differs between heads")
    m = m[:, 0]  # [B, Nq, Nk]
    prefix = kn - qn
    if qn > 1 and prefix > 0 and m[..., :prefix].all() and not _reads_inputs(mask) \
            and torch.equal(m[..., prefix:], torch.ones(qn, qn, dtype=torch.bool).tril().expand(m.shape[0], -1, -1)):
        return MaskPlan(causal=True, prefix=prefix)  # causal, after tokens concatenated in front of the keys
    pad = m[:, -1, :]  # [B, Nk]: the last query row sees every valid key
    rows = torch.ones(m.shape[:2], dtype=torch.bool) if qn != kn else pad  # valid query rows
    causal = qn == kn and not torch.equal(m, pad[:, None, :].expand_as(m))
    want = pad[:, None, :].expand_as(m)
    if causal:
        want = want & torch.ones(qn, kn, dtype=torch.bool).tril()
    if not torch.equal(m[rows], want[rows]):
        band = _causal_band(m) if qn == kn else None
        if band:
            return MaskPlan(reason=f"the mask is a causal band of {band} keys (a sliding window, as Mistral's "
                                   "sliding_window sets), not plain causal or key padding: a form would drop the band")
        return MaskPlan(reason="the mask is neither causal nor a key-padding mask (e.g. a block or local pattern)")
    carry = not bool(pad.all()) or _reads_inputs(mask)
    return MaskPlan(causal=causal, carry=carry)


def _causal_band(m: torch.Tensor) -> int | None:
    """w when the [B, N, N] mask lets each query see exactly itself and the w - 1 keys before."""
    n = m.shape[-1]
    w = int(m.sum(-1).max())
    i = torch.arange(n)
    d = i[:, None] - i[None, :]
    return w if w < n and torch.equal(m, ((d >= 0) & (d < w)).expand_as(m)) else None


def key_mask_node(g: fx.Graph, sdpa: fx.Node) -> fx.Node:
    """Insert nodes computing the bool key-padding mask [B, Nk] from the SDPA's mask."""
    a = args_of(sdpa)
    m = a["attn_mask"]
    like = sdpa
    for _ in range(4 - val(m).dim()):
        m = call(g, aten.unsqueeze.default, (m, 0), like=like)
    row = call(g, aten.select.int, (call(g, aten.select.int, (m, 1, 0), like=like), 1, -1), like=like)  # [B|1, Nk]
    if val(row).dtype != torch.bool:
        row = call(g, aten.gt.Scalar, (row, _MASKED), like=like)
    q = a["query"]
    b = call(g, aten.sym_size.int, (q, 0), like=like) if not isinstance(val(q).shape[0], int) else val(q).shape[0]
    return call(g, aten.expand.default, (row, [b, -1]), like=like)
