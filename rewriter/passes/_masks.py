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

__all__ = ["MaskPlan", "plan_mask", "key_mask_node", "MASKED", "causal_band", "learned_from", "reads_inputs", "visible"]

MASKED = -1e4  # additive entries at or below this are "masked"; above it must be exactly 0


@dataclass
class MaskPlan:
    causal: bool = False
    carry: bool = False  # a key-padding mask must be computed from the mask at run time
    prefix: int = 0  # causal after this many keys every query sees (memory / sink tokens concatenated in front)
    reason: str | None = None


def reads_inputs(node: fx.Node) -> bool:
    """Whether a tensor depends on a graph input's values (not only on shapes: sizes are not followed)."""
    def holds_tensors(a: fx.Node) -> bool:  # a tensor, or the list a chunk/split returns
        v = val(a)
        return isinstance(v, torch.Tensor) or (isinstance(v, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in v))

    return any(n.op == "placeholder" for n in ancestors([node], follow=holds_tensors))


def learned_from(node: fx.Node) -> str | None:
    """The name of a trainable parameter the tensor is computed from, if any (a position
    bias table: zero at initialisation in e.g. Swin, so its example value cannot tell)."""
    found = _learned_param(node)
    return found.target if found is not None else None


def _learned_param(node: fx.Node) -> fx.Node | None:
    gm = node.graph.owning_module
    for n in ancestors([node]):
        if n.op == "get_attr":
            try:
                t = gm.get_parameter(n.target)
            except AttributeError:
                continue
            if t.requires_grad:
                return n
    return None


_EMBEDDING = {aten.embedding.default}
_INDEX = {aten.index.Tensor, aten.index_select.default, aten.gather.default}


def _learned_bias_kind(mask: fx.Node, param: fx.Node) -> str:
    """How a learned bias is read from its parameter: the known position-bias methods by their shape."""
    on_path = set(ancestors([mask]))
    readers = [u for u in param.users if u in on_path]
    for _ in range(3):  # views of the table (Swin: .view(-1, heads)) before it is indexed
        if any(u.op == "call_function" and (u.target in _EMBEDDING or u.target in _INDEX) for u in readers):
            break
        readers = [w for u in readers for w in u.users if w in on_path]
    targets = {u.target for u in readers if u.op == "call_function"}
    if targets & _EMBEDDING:
        return "a relative position bias looked up by bucketed distance (T5-style)"
    if targets & _INDEX:
        return "a relative position bias table indexed by relative position (Swin/BEiT-style)"
    if reads_inputs(mask):
        return "a bias computed from the activations and a parameter (decomposed relative position, as in SAM)"
    return "a learned bias"


def _alibi(m: torch.Tensor) -> bool:
    """Whether an additive mask value is a per-head linear function of the key-query distance
    (ALiBi; a constant per query row is allowed: the softmax does not see it)."""
    if m.dim() < 3 or m.shape[-1] != m.shape[-2] or m.shape[-1] < 3:
        return False
    n = m.shape[-1]
    i = torch.arange(n)
    dist = (i[None, :] - i[:, None]).to(m.dtype)  # j - i
    seen = m > MASKED
    rel = m - torch.diagonal(m, dim1=-2, dim2=-1)[..., :, None]
    for d in (dist, -dist.abs()):
        ok = seen & (d != 0)
        if not ok.any():
            continue
        slope = (rel * d * ok).sum((-1, -2), keepdim=True) / (d * d * ok).sum((-1, -2), keepdim=True)  # least squares
        if torch.allclose((rel * ok), (slope * d * ok), rtol=1e-4, atol=1e-4) and (slope.abs() > 0).all():
            return True
    return False


def visible(m: torch.Tensor) -> torch.Tensor | None:
    """Which keys each query sees, as a bool [B|1, H|1, Nq, Nk] tensor, from a mask's value
    (bool, or additive with entries 0 or masked); None when it is an additive bias."""
    if m.dtype != torch.bool:
        if ((m != 0) & (m > MASKED)).any():
            return None
        m = m == 0
    while m.dim() < 4:
        m = m.unsqueeze(0)
    return m


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
    learned = _learned_param(mask) if isinstance(mask, fx.Node) else None
    if learned is not None:
        return MaskPlan(reason=f"the mask is a learned bias: {_learned_bias_kind(mask, learned)}, from the parameter "
                               f"{learned.target}; no approximate form carries it")
    m = mask_value
    if m is None:
        return MaskPlan(reason="the mask's value could not be read on the example inputs")
    seen = visible(m)
    if seen is None:
        if _alibi(m):
            return MaskPlan(reason="the mask is an additive bias: ALiBi, linear in the key-query distance per head; "
                                   "no approximate form here carries it")
        return MaskPlan(reason="the mask is an additive bias (e.g. a position bias), not a padding or causal mask")
    m = seen
    qn, kn = m.shape[-2], m.shape[-1]  # the example's sizes (qn is 1 when broadcast over queries)
    if not torch.equal(m, m[:, :1].expand_as(m)):
        return MaskPlan(reason="the mask differs between heads")
    m = m[:, 0]  # [B, Nq, Nk]
    prefix = kn - qn
    if qn > 1 and prefix > 0 and m[..., :prefix].all() and not reads_inputs(mask) \
            and torch.equal(m[..., prefix:], torch.ones(qn, qn, dtype=torch.bool).tril().expand(m.shape[0], -1, -1)):
        return MaskPlan(causal=True, prefix=prefix)  # causal, after tokens concatenated in front of the keys
    pad = m[:, -1, :]  # [B, Nk]: the last query row sees every valid key
    rows = torch.ones(m.shape[:2], dtype=torch.bool) if qn != kn else pad  # valid query rows
    causal = qn == kn and not torch.equal(m, pad[:, None, :].expand_as(m))
    want = pad[:, None, :].expand_as(m)
    if causal:
        want = want & torch.ones(qn, kn, dtype=torch.bool).tril()
    if not torch.equal(m[rows], want[rows]):
        band = causal_band(m) if qn == kn else None
        if band:
            return MaskPlan(reason=f"the mask is a causal band of {band} keys (a sliding window, as Mistral's "
                                   "sliding_window sets), not plain causal or key padding: a form would drop the band")
        return MaskPlan(reason="the mask is neither causal nor a key-padding mask (e.g. a block or local pattern)")
    carry = not bool(pad.all()) or reads_inputs(mask)
    return MaskPlan(causal=causal, carry=carry)


def causal_band(m: torch.Tensor) -> int | None:
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
        row = call(g, aten.gt.Scalar, (row, MASKED), like=like)
    q = a["query"]
    b = call(g, aten.sym_size.int, (q, 0), like=like) if not isinstance(val(q).shape[0], int) else val(q).shape[0]
    return call(g, aten.expand.default, (row, [b, -1]), like=like)
