"""Masks as data: a causal mask → `is_causal`, a band mask → the sliding-window op (exact).

A causal mask however it is built (`tril`, `triu`, `arange` comparisons, a buffer slice)
becomes `is_causal=True`, so SDPA's causal kernels run.

Mistral's `sliding_window`, Gemma-2's and Phi-3's local layers write a sliding window as a
dense mask over every key; the band is exactly what `rewriter::sliding_window_attention`
computes (query i sees keys i - w < j <= i), so the banded kernel runs instead of the
dense product. The band is read from the mask's value on the example inputs; a mask that
also reads the inputs' values (a padding mask folded in) may differ on other inputs, so it
stays dense, with that reason.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .. import kernels  # noqa: F401  (registers torch.ops.rewriter)
from ..graph import ancestors, call, in_state_dict, module_path, param, val
from ..report import Site
from ..verify import record
from ._args import args_of
from ._masks import causal_band, learned_from, reads_inputs, visible
from ._rules import Rewrite
from .attention import drop_masked_rows_guard, sdpa

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
SLIDING = torch.ops.rewriter.sliding_window_attention.default
BAND_META = "rewriter_exact_band"  # on a sliding-window node this pass made: the mask it stands for, in words

__all__ = ["convert", "BAND_META"]


def _symmetric_band(m: torch.Tensor) -> int | None:
    """h when the [B, N, N] mask lets each query see exactly the keys with |i - j| <= h (h < N - 1)."""
    n = m.shape[-1]
    i = torch.arange(n)
    d = (i[:, None] - i[None, :]).abs()
    h = int(m[:, n // 2].sum(-1).max()) // 2
    return h if h < n - 1 and torch.equal(m, (d <= h).expand_as(m)) else None


def _band_of(m: torch.Tensor) -> tuple[int, bool] | None:
    """(window, causal) when the mask value (bool, or additive with 0 / masked entries) is a
    band: causal of w keys (window w), or |i - j| <= h (window 2h + 1, bidirectional)."""
    m = visible(m)
    if m is None or m.shape[-1] != m.shape[-2] or not torch.equal(m, m[:, :1].expand_as(m)):
        return None
    w = causal_band(m[:, 0])
    if w:
        return w, True
    h = _symmetric_band(m[:, 0])
    return (2 * h + 1, False) if h is not None else None


def _is_causal(m: torch.Tensor) -> bool:
    m = visible(m)
    n = m.shape[-1] if m is not None else 0
    return m is not None and m.shape[-2] == n and n > 1 and torch.equal(m, torch.ones(n, n, dtype=torch.bool).tril().expand_as(m))


def _state_read(mask: fx.Node, gm) -> str | None:
    """The name of a parameter or persistent buffer of the model the mask is computed from."""
    for n in ancestors([mask]):
        t = param(gm, n)
        if t is not None and in_state_dict(gm, t):
            return n.target
    return None


def convert(ctx) -> list[Rewrite]:
    if ctx.flat_inputs is None:  # verify=False: the band cannot be read from an example
        return []
    gm = ctx.gm
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == SDPA
             and isinstance(args_of(n).get("attn_mask"), fx.Node) and not args_of(n).get("dropout_p")]
    masks = {args_of(n)["attn_mask"] for n in nodes}
    values = record(gm, ctx.flat_inputs, masks, ancestors_only=True) if nodes else {}
    done = []
    for node in nodes:
        a = args_of(node)
        mask = a["attn_mask"]
        value = values.get(mask)
        if not isinstance(value, torch.Tensor) or learned_from(mask):
            continue
        band = (0, True) if _is_causal(value) else _band_of(value)  # window 0: plain causal
        if band is None:
            continue
        w, causal = band
        what = "a causal mask" if w == 0 else f"a causal band of {w} keys" if causal else f"a band of |i - j| <= {w // 2}"
        action = "sdpa(is_causal=True)" if w == 0 else "rewriter.sliding_window_attention"
        site = Site(module_path(node), "attention_mask", action, pass_name="mask_structure", node=node.name)
        state = _state_read(mask, gm)
        if state is not None or reads_inputs(mask):
            ctx.report.add(site.refuse(
                f"{what} read from `{state}`, which is in the model's state dict: kept as a dense mask so that a loaded "
                "or edited state is honoured (register the buffer with persistent=False to let it be recognised)"
                if state is not None else
                f"{what} combined with a mask read from the inputs (padding): kept as a dense mask, which is exact "
                "for every input"))
            continue
        with gm.graph.inserting_before(node.next):
            if w == 0:
                new = sdpa(gm.graph, a["query"], a["key"], a["value"], None, scale=a.get("scale"), is_causal=True,
                           enable_gqa=bool(a.get("enable_gqa")), like=node)
            else:
                scale = a.get("scale")
                scale = float(val(a["query"]).shape[-1]) ** -0.5 if scale is None else float(scale)
                new = call(gm.graph, SLIDING, (a["query"], a["key"], a["value"], None, w, causal, 1, 0, False, scale),
                           like=node)
                new.meta[BAND_META] = what
                site.params = {"window": w, "causal": causal}
        node.replace_all_uses_with(new)
        drop_masked_rows_guard(new)  # causal or a band: every row sees its own key
        site.node = new.name
        done.append(Rewrite(ctx.report.add(site), node, new))
    gm.recompile()
    return done
