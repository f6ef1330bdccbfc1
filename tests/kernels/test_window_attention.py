"""window_attention/naive.py against a direct O(N²) formulation: the full boolean N×N
visibility mask built from each op's definition, then dense masked softmax attention."""
import pytest
import torch

from rewriter.kernels.window_attention.naive import (
    neighborhood_attention_2d,
    sliding_window_attention,
    window_attention_2d,
)
from tests.helpers import assert_close

TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


def make(N, B=2, H=4, Hk=2, D=16, Dv=24, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, N, d, generator=g).to(dtype) for h, d in ((H, D), (Hk, D), (Hk, Dv)))


def random_key_mask(B, N, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, N, generator=g) > 0.3
    m[1, :] = True
    m[1, :5] = False  # the first queries of batch 1 see few (or no) real keys
    return m


def dense(q, k, v, visible, scale=None, key_mask=None):
    """Softmax attention under visible [N, N] (query, key), in fp64; all-hidden rows -> 0."""
    g = q.shape[1] // k.shape[1]
    qd, kd, vd = q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    vis = visible[None, None]
    if key_mask is not None:
        vis = vis & key_mask[:, None, None, :]
    s = (qd @ kd.transpose(-1, -2) * scale).masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ vd).to(q.dtype)


# ---------------------------------------------------------------- masks from the definitions


def sliding_mask(N, window, causal, dilation, sinks, global_sinks):
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    diff = i - j
    if causal:
        vis = (diff >= 0) & (diff < window * dilation) & (diff % dilation == 0)
        vis |= (j < sinks) & (j <= i)
    else:
        vis = (diff.abs() <= (window // 2) * dilation) & (diff % dilation == 0)
        vis |= j < sinks
        if global_sinks:
            vis |= i < sinks
    return vis


def with_prefix(grid_vis, prefix):
    """[N, N] mask from the grid's [G, G] mask: prefix rows and columns all visible."""
    vis = torch.ones(prefix + grid_vis.shape[0], prefix + grid_vis.shape[0], dtype=torch.bool)
    vis[prefix:, prefix:] = grid_vis
    return vis


def swin_mask(grid, window, shift, prefix):
    (hg, wg), (wh, ww), (sh, sw) = grid, window, shift

    def rolled(length, w, s):  # per original coordinate: (window index, region) in rolled coordinates
        out = []
        for r in range(length):
            rr = (r - s) % length
            region = 0 if s == 0 else (0 if rr < length - w else 1 if rr < length - s else 2)
            out.append((rr // w, region))
        return torch.tensor(out)

    ry, rx = rolled(hg, wh, sh), rolled(wg, ww, sw)
    same_y = (ry[:, None] == ry[None, :]).all(-1)  # [hg, hg]: same window row and row region
    same_x = (rx[:, None] == rx[None, :]).all(-1)
    return with_prefix(torch.kron(same_y.int(), same_x.int()).bool(), prefix)


def natten_window(i, length, k, d):
    g, ii = i % d, i // d
    lg = -(-(length - g) // d)
    s = min(max(ii - k // 2, 0), lg - k)
    return {g + d * (s + t) for t in range(k)}


def na_mask(grid, kernel, dilation, prefix):
    """Per-axis neighbourhoods from the definition; the 2-D one is their product."""
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    dilation = (dilation, dilation) if isinstance(dilation, int) else dilation
    axes = []
    for length, k, d in zip(grid, kernel, dilation):
        m = torch.zeros(length, length, dtype=torch.int)
        for i in range(length):
            m[i, list(natten_window(i, length, k, d))] = 1
        axes.append(m)
    return with_prefix(torch.kron(*axes).bool(), prefix)


# ---------------------------------------------------------------- 1-D sliding window

SLIDING = [
    # window, causal, dilation, sinks, global_sinks
    (1, True, 1, 0, False),
    (7, True, 1, 0, False),
    (8, True, 2, 4, False),
    (7, True, 3, 4, False),
    (1, False, 1, 0, False),
    (7, False, 1, 4, False),
    (8, False, 3, 0, False),
    (7, False, 2, 4, True),
    (500, True, 1, 4, False),  # window longer than the sequence
]


@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("window,causal,dilation,sinks,global_sinks", SLIDING)
def test_sliding_matches_dense(window, causal, dilation, sinks, global_sinks, block_size):
    q, k, v = make(123)
    opts = dict(window=window, causal=causal, dilation=dilation, sinks=sinks, global_sinks=global_sinks)
    out = sliding_window_attention(q, k, v, block_size=block_size, **opts)
    assert out.shape == (2, 4, 123, 24) and out.dtype == torch.float32
    assert_close(out, dense(q, k, v, sliding_mask(123, **opts)), tol=TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_sliding_key_mask_scale_dtype(causal, dtype):
    q, k, v = make(123, H=4, Hk=4, dtype=dtype)
    km = random_key_mask(2, 123)
    opts = dict(window=8, causal=causal, dilation=2, sinks=4)
    out = sliding_window_attention(q, k, v, scale=0.3, key_mask=km, block_size=16, **opts)
    assert out.dtype == dtype
    want = dense(q, k, v, sliding_mask(123, global_sinks=False, **opts), scale=0.3, key_mask=km)
    assert_close(out, want, dtype=dtype, tol=TOL[dtype])
    if causal:  # query 0 of batch 1 sees only padding -> zeros
        assert out[1, :, 0].abs().max() == 0


def test_sliding_fp64_stays_fp64():
    q, k, v = make(37, dtype=torch.float64)
    out = sliding_window_attention(q, k, v, window=5)
    assert out.dtype == torch.float64
    assert_close(out, dense(q, k, v, sliding_mask(37, 5, True, 1, 0, False)), dtype=torch.float64)


def test_sliding_non_contiguous_inputs():
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in make(50))  # [B, N, H, D] memory
    assert not q.is_contiguous()
    out = sliding_window_attention(q, k, v, window=6, causal=False, sinks=2, block_size=16)
    assert_close(out, dense(q, k, v, sliding_mask(50, 6, False, 1, 2, False)), tol=TOL[torch.float32])


# ---------------------------------------------------------------- 2-D Swin windows

SWIN = [
    # grid, window, shift, prefix
    ((14, 14), (7, 7), (0, 0), 0),
    ((14, 14), (7, 7), (3, 3), 1),
    ((7, 9), (7, 7), (3, 3), 0),  # padded columns
    ((9, 13), (4, 3), (2, 1), 2),  # padded rows
    ((9, 13), (7, 7), (0, 0), 1),
    ((8, 12), (4, 3), (2, 1), 0),
]


@pytest.mark.parametrize("grid,window,shift,prefix", SWIN)
def test_swin_matches_dense(grid, window, shift, prefix):
    q, k, v = make(prefix + grid[0] * grid[1], D=16, Dv=8)
    out = window_attention_2d(q, k, v, grid=grid, window=window, shift=shift, prefix=prefix)
    assert out.shape == (2, 4, q.shape[2], 8)
    assert_close(out, dense(q, k, v, swin_mask(grid, window, shift, prefix)), tol=TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swin_key_mask_gqa_dtype(dtype):
    grid, window, shift, prefix = (9, 13), (4, 3), (2, 1), 1
    q, k, v = make(prefix + 9 * 13, dtype=dtype)
    km = random_key_mask(2, q.shape[2])
    out = window_attention_2d(q, k, v, grid=grid, window=window, shift=shift, prefix=prefix, key_mask=km, scale=0.2)
    assert out.dtype == dtype
    want = dense(q, k, v, swin_mask(grid, window, shift, prefix), key_mask=km, scale=0.2)
    assert_close(out, want, dtype=dtype, tol=TOL[dtype])


def swin_original(q, k, v, grid, window, shift):
    """Swin's own recipe (roll, window_partition, attention mask from img_mask slices, reverse)."""
    (hg, wg), (wh, ww), (sh, sw) = grid, window, shift
    B, H, N, D = q.shape
    g = H // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)

    def partition(x):  # [B, H, N, C] -> [B, H, nW, wh*ww, C]
        x = x.double().unflatten(2, (hg, wg)).roll((-sh, -sw), dims=(2, 3))
        x = x.unflatten(2, (hg // wh, wh)).unflatten(4, (wg // ww, ww))  # B H nh wh nw ww C
        return x.permute(0, 1, 2, 4, 3, 5, 6).flatten(4, 5).flatten(2, 3)

    img = torch.zeros(hg, wg)
    cnt = 0
    for hs in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
        for ws in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
            img[hs, ws] = cnt
            cnt += 1
    lab = img.unflatten(0, (hg // wh, wh)).unflatten(2, (wg // ww, ww)).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    same = lab[:, :, None] == lab[:, None, :]  # [nW, T, T]
    s = partition(q) @ partition(k).transpose(-1, -2) * D**-0.5
    o = torch.softmax(s.masked_fill(~same, float("-inf")), -1) @ partition(v)
    o = o.unflatten(2, (hg // wh, wg // ww)).unflatten(4, (wh, ww)).permute(0, 1, 2, 4, 3, 5, 6)
    o = o.reshape(B, H, hg, wg, -1).roll((sh, sw), dims=(2, 3))
    return o.flatten(2, 3).to(q.dtype)


@pytest.mark.parametrize("shift", [(0, 0), (3, 2), (2, 1)])
def test_swin_matches_swin_recipe(shift):
    grid, window = (12, 12), (4, 6)
    if shift == (0, 0):  # Swin's slices assume shift > 0; with shift 0 it uses no mask
        window = (6, 6)
    q, k, v = make(144)
    out = window_attention_2d(q, k, v, grid=grid, window=window, shift=shift)
    assert_close(out, swin_original(q, k, v, grid, window, shift), tol=TOL[torch.float32])


# ---------------------------------------------------------------- 2-D neighbourhood

NA = [
    # grid, kernel, dilation, prefix, tile
    ((14, 14), 3, 1, 0, (8, 8)),
    ((9, 13), 5, 1, 1, (4, 5)),
    ((9, 13), 7, 1, 2, (8, 8)),
    ((14, 14), 5, 2, 1, (3, 4)),
    ((14, 15), 7, 2, 0, (8, 8)),
    ((7, 9), 3, 2, 0, (2, 3)),
    ((9, 13), (3, 5), (3, 2), 1, (4, 4)),  # per-axis kernel and dilation
]


@pytest.mark.parametrize("grid,kernel,dilation,prefix,tile", NA)
def test_na_matches_dense(grid, kernel, dilation, prefix, tile):
    q, k, v = make(prefix + grid[0] * grid[1], Dv=8)
    out = neighborhood_attention_2d(q, k, v, grid=grid, kernel_size=kernel, dilation=dilation, prefix=prefix,
                                    tile=tile)
    assert out.shape == (2, 4, q.shape[2], 8)
    assert_close(out, dense(q, k, v, na_mask(grid, kernel, dilation, prefix)), tol=TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_na_key_mask_gqa_dtype(dtype):
    grid, prefix = (9, 13), 1
    q, k, v = make(prefix + 9 * 13, dtype=dtype)
    km = random_key_mask(2, q.shape[2])
    out = neighborhood_attention_2d(q, k, v, grid=grid, kernel_size=5, dilation=1, prefix=prefix, key_mask=km,
                                    tile=(3, 5))
    assert out.dtype == dtype
    assert_close(out, dense(q, k, v, na_mask(grid, 5, 1, prefix), key_mask=km), dtype=dtype, tol=TOL[dtype])


def test_na_every_query_sees_kernel_squared_keys():
    vis = na_mask((10, 13), 5, 2, 0)  # the smallest grid that dilation 2 allows on the rows
    assert (vis.sum(1) == 25).all()


# ---------------------------------------------------------------- autograd

def test_gradients_flow_and_match_dense():
    q, k, v = (t.double().requires_grad_() for t in make(1 + 7 * 9, B=1, H=2, Hk=1, D=4, Dv=4))
    km = torch.ones(1, 64, dtype=torch.bool)
    km[0, 3:12] = False  # some queries see no real key: gradients must stay finite
    out = neighborhood_attention_2d(q, k, v, grid=(7, 9), kernel_size=3, prefix=1, key_mask=km)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    want = torch.autograd.grad(dense(q, k, v, na_mask((7, 9), 3, 1, 1), key_mask=km).sum(), (q, k, v))
    assert all(g.isfinite().all() for g in grads)
    assert_close(grads, want, dtype=torch.float64)


# ---------------------------------------------------------------- argument checks

def _qkv(N=20):
    return make(N, B=1, H=2, Hk=1, D=4, Dv=4)


@pytest.mark.parametrize("call,match", [
    (lambda q, k, v: sliding_window_attention(q, k, v, window=0), "window must be a positive int"),
    (lambda q, k, v: sliding_window_attention(q, k, v, window=4, dilation=0), "dilation must be a positive"),
    (lambda q, k, v: sliding_window_attention(q, k, v, window=4, sinks=-1), "sinks must be an int >= 0"),
    (lambda q, k, v: sliding_window_attention(q, k, v, window=4, sinks=2, global_sinks=True), "causal=False"),
    (lambda q, k, v: sliding_window_attention(q, k, v, window=4, block_size=0), "block_size"),
    (lambda q, k, v: sliding_window_attention(q, k[:, :, :10], v[:, :, :10], window=4), "same N"),
    (lambda q, k, v: sliding_window_attention(q, k.repeat(1, 3, 1, 1), v.repeat(1, 3, 1, 1), window=4), "divide"),
    (lambda q, k, v: sliding_window_attention(q, k.double(), v, window=4), "one dtype"),
    (lambda q, k, v: sliding_window_attention(q[0], k, v, window=4), "4-D"),
    (lambda q, k, v: sliding_window_attention(q, k, v, window=4, key_mask=torch.ones(1, 20)), "bool tensor"),
    (lambda q, k, v: window_attention_2d(q, k, v, grid=(4, 4), window=(2, 2)), "the grid must be the last"),
    (lambda q, k, v: window_attention_2d(q, k, v, grid=(4, 5), window=(2, 2), shift=(2, 0)), "shift must"),
    (lambda q, k, v: window_attention_2d(q, k, v, grid=(4, 5), window=(2, 2, 2)), "pair of ints"),
    (lambda q, k, v: window_attention_2d(q, k, v, grid=(4, 5), window=(0, 2)), "window must be positive"),
    (lambda q, k, v: window_attention_2d(q, k, v, grid=(4, 4), window=(2, 2), prefix=-4), "prefix must"),
    (lambda q, k, v: neighborhood_attention_2d(q, k, v, grid=(4, 5), kernel_size=3, dilation=2), "needs at least 6"),
    (lambda q, k, v: neighborhood_attention_2d(q, k, v, grid=(4, 5), kernel_size=0), "kernel_size must be"),
    (lambda q, k, v: neighborhood_attention_2d(q, k, v, grid=(4, 5), kernel_size=3, tile=(0, 4)), "tile must"),
])
def test_invalid_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call(*_qkv())
