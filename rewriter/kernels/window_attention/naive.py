"""Reference local attention: the specification of the `rewriter::` window-attention ops
and their CPU path.

Three ops, one engine (`_tiles.run_tiles`): each op only builds a gather plan — which
queries form a tile, which keys that tile gathers, and a small dense mask of who sees
whom — so memory is linear in N (no N×N tensor) and the work is a few batched matmuls.

- `sliding_window_attention`: 1-D band (causal or not), dilation, attention sinks /
  Longformer global tokens.
- `window_attention_2d`: Swin windows with the shifted-window mask, on a token grid with
  optional CLS/register prefix tokens.
- `neighborhood_attention_2d`: NAT/DiNAT neighbourhoods (NATTEN semantics), same grid.

Common conventions: q [B, H, N, D]; k [B, Hk, N, D]; v [B, Hk, N, Dv] with Hk dividing H
(grouped-query: each k/v head serves H // Hk consecutive q heads); returns [B, H, N, Dv]
in q's dtype (fp16/bf16 computed in fp32). `scale` defaults to D**-0.5. `key_mask`:
optional bool [B, N], False = padding key with zero weight; a query that sees no real key
returns zeros.
"""
from __future__ import annotations

import torch

from ._tiles import MAX_SCORES, Tiles, check_inputs, dense_rows, inverse, pair, positive, prepare, run_tiles

__all__ = ["sliding_window_attention", "window_attention_2d", "neighborhood_attention_2d", "check_sliding_arguments"]


def _ceil_div(a, b):
    return -(-a // b)


# --------------------------------------------------------------------------- 1-D sliding


def _band_tiles(n, window, causal, dilation, sinks, block_size, device) -> Tiles:
    """Plan for the 1-D band. Tokens are split into `dilation` groups (i % dilation); within a
    group the band is undilated, so each block of `block_size` group-mates gathers one
    contiguous run of group-mates plus the sink tokens.
    """
    d = dilation
    lmax = _ceil_div(n, d)  # longest group
    bs = min(block_size, lmax)
    nb = _ceil_div(lmax, bs)
    # band in group coordinates: query a' sees key c' iff -hi <= a' - c' <= lo
    if causal:
        lo, hi = min(window, lmax) - 1, 0
    else:
        lo = hi = min(window // 2, lmax - 1)
    span = bs + lo + hi
    ar = lambda m: torch.arange(m, device=device)  # noqa: E731
    g = ar(d)[:, None, None]  # [d, 1, 1]
    a = ar(nb)[:, None] * bs + ar(bs)  # [nb, bs]   query index within the group
    c = ar(nb)[:, None] * bs - lo + ar(span)  # [nb, span] key index within the group
    q_pos = g + d * a  # [d, nb, bs]
    k_pos = g + d * c  # [d, nb, span]
    k_ok = (c >= 0) & (k_pos < n)
    # a' - c' = u - w + lo for slot u of the queries and slot w of the keys: same for all blocks
    rel = ar(bs)[:, None] - ar(span) + lo  # [bs, span]
    # key slots: the `sinks` sink tokens first, then the band; written in place (no cat copy)
    visible = torch.empty(d, nb, bs, sinks + span, dtype=torch.bool, device=device)
    torch.bitwise_and(k_ok[:, :, None, :], (rel <= lo) & (rel >= -hi), out=visible[..., sinks:])
    k_idx = k_pos.clamp(0, n - 1)
    if sinks:
        j = ar(sinks)  # sink positions
        in_band = (j % d == g[..., None]) & ((a[..., None] - j // d) <= lo) & ((a[..., None] - j // d) >= -hi)
        sink_vis = ~in_band  # [d, nb, bs, sinks]; a sink already in the band is counted there only
        if causal:
            sink_vis = sink_vis & (j <= q_pos[..., None])
        visible[..., :sinks] = sink_vis
        k_idx = torch.cat([j.expand(d, nb, sinks), k_idx], dim=-1)
    q_valid = (q_pos < n).reshape(d * nb, bs)
    q_pos = q_pos.reshape(d * nb, bs)
    return Tiles(
        q_idx=q_pos.clamp(max=n - 1),
        k_idx=k_idx.reshape(d * nb, -1),
        visible=visible.reshape(d * nb, bs, -1),
        out_idx=inverse(q_pos, q_valid, n),
    )


def check_sliding_arguments(q, k, v, key_mask, window, causal, dilation, sinks, global_sinks, scale) -> None:
    """The op's argument checks (shared by the reference and the Triton launcher)."""
    op = "sliding_window_attention"
    check_inputs(q, k, v, key_mask, scale, op)
    positive(window, "window", op)
    positive(dilation, "dilation", op)
    if not isinstance(sinks, int) or isinstance(sinks, bool) or sinks < 0:
        raise ValueError(f"{op}: sinks must be an int >= 0 (how many leading tokens everyone sees); got {sinks!r}.")
    if global_sinks and causal:
        raise ValueError(
            f"{op}: global_sinks=True lets the sink tokens see *later* tokens, which a causal model "
            "must not; pass causal=False (Longformer-style) or global_sinks=False."
        )


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    causal: bool = True,
    dilation: int = 1,
    sinks: int = 0,
    global_sinks: bool = False,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    block_size: int = 128,
    max_scores: int = MAX_SCORES,
) -> torch.Tensor:
    """1-D local attention (Mistral/Longformer sliding window, StreamingLLM sinks).

    q: [B, H, N, D]; k: [B, Hk, N, D]; v: [B, Hk, N, Dv]; key_mask: bool [B, N] or None.
    Returns [B, H, N, Dv].

    Query i sees key j when (i - j) % dilation == 0 and
      causal:         0 <= i - j < window * dilation   (exactly `window` keys away from the start)
      bidirectional:  |i - j| <= (window // 2) * dilation
    plus the first `sinks` tokens (j < sinks; and j <= i when causal), which keep long-range
    context alive. `global_sinks=True` (bidirectional only) also lets those first `sinks`
    tokens attend to every key (Longformer global attention). `sinks` larger than N means
    every token is a sink. `block_size`: queries per tile, `max_scores`: elements of one score
    block (tuning knobs, not semantics).
    """
    check_sliding_arguments(q, k, v, key_mask, window, causal, dilation, sinks, global_sinks, scale)
    positive(block_size, "block_size", "sliding_window_attention")
    n = q.shape[2]
    if n == 0:
        return q.new_empty(*q.shape[:3], v.shape[-1])
    sinks = min(sinks, n)
    qs, ks, vs = prepare(q, k, v, scale)
    tiles = _band_tiles(n, window, bool(causal), dilation, sinks, block_size, q.device)
    out = run_tiles(qs, ks, vs, tiles, key_mask, max_scores)
    if global_sinks and sinks:
        out = torch.cat([dense_rows(qs[:, :, :sinks], ks, vs, key_mask), out[:, :, sinks:]], dim=2)
    return out.to(q.dtype)


# --------------------------------------------------------------------------- 2-D grids


def _check_grid(q, grid, prefix, op):
    hg, wg = pair(grid, "grid", op)
    if hg < 1 or wg < 1:
        raise ValueError(f"{op}: grid must be positive (rows, cols); got {grid!r}.")
    if not isinstance(prefix, int) or isinstance(prefix, bool) or prefix < 0:
        raise ValueError(f"{op}: prefix must be an int >= 0 (CLS/register tokens before the grid); got {prefix!r}.")
    n = q.shape[2]
    if prefix + hg * wg != n:
        raise ValueError(
            f"{op}: prefix {prefix} + grid {hg}x{wg} = {prefix + hg * wg} tokens, but q has N = {n}; "
            "the grid must be the last Hg*Wg tokens in row-major order."
        )
    return hg, wg


def _with_prefix(tiles_q, tiles_k, visible, q_valid, prefix, n_grid, device) -> Tiles:
    """Finish a grid plan: shift grid indices past the prefix and let every tile see the prefix.

    tiles_q: [T, M] and tiles_k: [T, K] grid indices; visible: [T, M, K]; q_valid: [T, M].
    """
    T, M = tiles_q.shape
    k_idx, vis = tiles_k + prefix, visible
    if prefix:
        k_idx = torch.cat([torch.arange(prefix, device=device).expand(T, prefix), k_idx], dim=1)
        vis = torch.cat([q_valid[..., None].expand(T, M, prefix), vis], dim=2)
    return Tiles(q_idx=tiles_q + prefix, k_idx=k_idx, visible=vis, out_idx=inverse(tiles_q, q_valid, n_grid))


def _grid_attention(q, k, v, tiles, prefix, scale, key_mask, max_scores=MAX_SCORES):
    """Run a grid plan and the prefix rows (which see every token); returns [B, H, N, Dv]."""
    qs, ks, vs = prepare(q, k, v, scale)
    out = run_tiles(qs, ks, vs, tiles, key_mask, max_scores)
    if prefix:
        out = torch.cat([dense_rows(qs[:, :, :prefix], ks, vs, key_mask), out], dim=2)
    return out.to(q.dtype)


def _swin_tiles(hg, wg, window, shift, prefix, device) -> Tiles:
    """Plan for Swin: one tile per window of the rolled, bottom/right-padded grid."""
    (wh, ww), (sh, sw) = window, shift
    ar = lambda m: torch.arange(m, device=device)  # noqa: E731

    def axis(length, w, s):
        nw = _ceil_div(length, w)
        r = ar(nw)[:, None] * w + ar(w)  # [nw, w] rolled coordinate
        real = r < length
        src = (r + s) % length  # original coordinate: rolling by -s puts token r+s at r
        region = torch.zeros_like(r) if s == 0 else (r >= length - w).long() + (r >= length - s).long()
        return nw, src, real, region

    nh, ry, oky, gy = axis(hg, wh, sh)
    nw, rx, okx, gx = axis(wg, ww, sw)
    pos = (ry[:, None, :, None] * wg + rx[None, :, None, :]).reshape(nh * nw, wh * ww)  # [T, M]
    real = (oky[:, None, :, None] & okx[None, :, None, :]).reshape(nh * nw, wh * ww)
    region = (gy[:, None, :, None] * 3 + gx[None, :, None, :]).reshape(nh * nw, wh * ww)
    visible = real[:, None, :] & (region[:, :, None] == region[:, None, :])  # [T, M, M]
    pos = pos.masked_fill(~real, 0)
    return _with_prefix(pos, pos, visible, real, prefix, hg * wg, device)


def window_attention_2d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: tuple[int, int],
    window: tuple[int, int],
    shift: tuple[int, int] = (0, 0),
    prefix: int = 0,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    max_scores: int = MAX_SCORES,
) -> torch.Tensor:
    """Swin (shifted) window attention on a token grid (Liu et al. 2021).

    q: [B, H, N, D]; k: [B, Hk, N, D]; v: [B, Hk, N, Dv]; key_mask: bool [B, N] or None;
    N = prefix + Hg * Wg with the grid `grid = (Hg, Wg)` row-major in the last tokens.
    Returns [B, H, N, Dv].

    Same as Swin: roll the grid by (-sh, -sw), cut it into `window = (wh, ww)` windows, attend
    within each window, roll back. With a shift, two tokens of one window attend only if they
    share the row region (rolled row r: 0 if r < Hg - wh, 1 if r < Hg - sh, else 2) and the
    column region. A grid not divisible by the window is padded at the bottom/right of the
    rolled grid with keys of zero weight. The `prefix` tokens (CLS, distillation, registers)
    attend to every token and every grid query also attends to them (one softmax over
    window ∪ prefix). The roll is folded into gather indices; nothing is copied to roll.
    """
    op = "window_attention_2d"
    check_inputs(q, k, v, key_mask, scale, op)
    hg, wg = _check_grid(q, grid, prefix, op)
    window, shift = pair(window, "window", op), pair(shift, "shift", op)
    if min(window) < 1:
        raise ValueError(f"{op}: window must be positive (wh, ww); got {window!r}.")
    if not (0 <= shift[0] < window[0] and 0 <= shift[1] < window[1]):
        raise ValueError(
            f"{op}: shift must satisfy 0 <= shift < window per axis; got shift {shift!r} for window {window!r} "
            "(Swin uses shift = window // 2 on every other block, else (0, 0))."
        )
    tiles = _swin_tiles(hg, wg, window, shift, prefix, q.device)
    return _grid_attention(q, k, v, tiles, prefix, scale, key_mask, max_scores)


def _na_axis(length, kernel, dilation, tile, device):
    """One axis of the neighbourhood plan (NATTEN semantics), tiled per dilation group.

    Returns q_pos [Ta, t], q_ok [Ta, t], k_pos [Ta, s], visible [Ta, t, s] where Ta counts
    the axis tiles of every dilation group, t the queries and s the keys of a tile.
    """
    d = dilation
    lmax = _ceil_div(length, d)
    t = min(tile, lmax)
    span = min(t + kernel - 1, lmax)
    nt = _ceil_div(lmax, t)
    ar = lambda m: torch.arange(m, device=device)  # noqa: E731
    g = ar(d)[:, None, None]  # [d, 1, 1] dilation group
    lg = (length - g + d - 1) // d  # [d, 1, 1] group length
    a = ar(nt)[:, None] * t + ar(t)  # [nt, t] query index within the group
    q_ok = a < lg  # [d, nt, t]
    start = torch.minimum((a - kernel // 2).clamp(min=0), lg - kernel)  # [d, nt, t] window start
    c = start[..., :1] + ar(span)  # [d, nt, s] key index within the group (tile starts at its first query's window)
    visible = q_ok[..., None] & (c[..., None, :] >= start[..., None]) & (c[..., None, :] < start[..., None] + kernel)
    q_pos = (g + d * a).clamp(max=length - 1)
    k_pos = (g + d * c).clamp(max=length - 1)
    flat = lambda x: x.reshape(d * nt, *x.shape[2:])  # noqa: E731
    return flat(q_pos), flat(q_ok), flat(k_pos), flat(visible)


def _na_tiles(hg, wg, kernel, dilation, tile, prefix, device) -> Tiles:
    """Plan for neighbourhood attention: a 2-D tile is (row tile) × (column tile) of one group."""
    qy, oky, ky, vy = _na_axis(hg, kernel[0], dilation[0], tile[0], device)
    qx, okx, kx, vx = _na_axis(wg, kernel[1], dilation[1], tile[1], device)
    ty, tx = qy.shape[0], qx.shape[0]
    outer = lambda y, x: (y[:, None, :, None] * wg + x[None, :, None, :]).reshape(ty * tx, -1)  # noqa: E731
    q_pos, k_pos = outer(qy, qx), outer(ky, kx)
    q_ok = (oky[:, None, :, None] & okx[None, :, None, :]).reshape(ty * tx, -1)
    # the neighbourhood is a product of the per-axis sets: [Ty, Tx, ty, tx, sy, sx]
    visible = vy[:, None, :, None, :, None] & vx[None, :, None, :, None, :]
    visible = visible.reshape(ty * tx, q_pos.shape[1], k_pos.shape[1])
    return _with_prefix(q_pos, k_pos, visible, q_ok, prefix, hg * wg, device)


def neighborhood_attention_2d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: tuple[int, int],
    kernel_size: int | tuple[int, int],
    dilation: int | tuple[int, int] = 1,
    prefix: int = 0,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    tile: tuple[int, int] = (8, 8),
    max_scores: int = MAX_SCORES,
) -> torch.Tensor:
    """Neighbourhood attention NAT/DiNAT (Hassani et al.), with NATTEN's border behaviour.

    q: [B, H, N, D]; k: [B, Hk, N, D]; v: [B, Hk, N, Dv]; key_mask: bool [B, N] or None;
    N = prefix + Hg * Wg with `grid = (Hg, Wg)` row-major in the last tokens.
    Returns [B, H, N, Dv].

    Each grid query sees kernel_size × kernel_size keys. Per axis of length L, kernel k,
    dilation δ: query i is in group g = i % δ at index i' = i // δ of the group's
    Lg = ceil((L - g) / δ) members; its window starts at s = min(max(i' - k // 2, 0), Lg - k)
    (shifted inward at the borders, so always k keys) and holds g + δ·(s + t), t < k.
    Needs L >= k·δ per axis. Prefix tokens attend to every token and are seen by every grid
    query (one softmax over neighbourhood ∪ prefix). kernel_size / dilation may be per-axis
    pairs. `tile = (ty, tx)`: queries per tile within one dilation group (a tuning knob).
    """
    op = "neighborhood_attention_2d"
    check_inputs(q, k, v, key_mask, scale, op)
    hg, wg = _check_grid(q, grid, prefix, op)
    kernel, dil, tile = pair(kernel_size, "kernel_size", op), pair(dilation, "dilation", op), pair(tile, "tile", op)
    for name, val in (("kernel_size", kernel), ("dilation", dil), ("tile", tile)):
        if min(val) < 1:
            raise ValueError(f"{op}: {name} must be positive; got {val!r}.")
    for axis, length, kk, dd in (("rows", hg, kernel[0], dil[0]), ("cols", wg, kernel[1], dil[1])):
        if length < kk * dd:
            raise ValueError(
                f"{op}: kernel_size {kk} with dilation {dd} needs at least {kk * dd} grid {axis}, but the grid "
                f"has {length}; use a smaller kernel_size or dilation for this resolution."
            )
    tiles = _na_tiles(hg, wg, kernel, dil, tile, prefix, q.device)
    return _grid_attention(q, k, v, tiles, prefix, scale, key_mask, max_scores)
