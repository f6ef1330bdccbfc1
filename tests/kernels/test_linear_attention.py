"""linear_attention (naive.py + chunk.py) against a direct O(N²) formulation."""
import pytest
import torch
import torch.nn.functional as F

from rewriter.kernels.linear_attention.naive import linear_attention
from tests.helpers import assert_close

TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


def phi(x, kind, power=3.0):
    if kind == "elu":
        return F.elu(x) + 1
    r = x.clamp_min(0)
    if kind == "relu":
        return r
    rp = r**power
    return r.norm(dim=-1, keepdim=True) * rp / rp.norm(dim=-1, keepdim=True).clamp_min(1e-300)


def quadratic(q, k, v, feature_map="elu", causal=False, normalize="denominator", power=3.0, eps=1e-6,
              key_mask=None):
    """The full N×N matrix φ(Q)φ(K)ᵀ, masked, then normalised; in fp64, returned in q.dtype."""
    g = q.shape[1] // k.shape[1]
    qd, kd, vd = q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    a = phi(qd, feature_map, power) @ phi(kd, feature_map, power).transpose(-1, -2)
    if causal:
        a = a.tril()
    if key_mask is not None:
        a = a * key_mask[:, None, None, :]
    o = a @ vd
    if normalize == "denominator":
        o = o / (a.sum(-1, keepdim=True) + eps)
    else:
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + eps)
    return o.to(q.dtype)


def make(B=2, H=4, Hk=2, Nq=123, Nk=123, D=16, Dv=24, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, d, generator=g).to(dtype)
               for h, n, d in ((H, Nq, D), (Hk, Nk, D), (Hk, Nk, Dv)))
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal,chunk_size", [(False, 64), (True, 16), (True, 64)])
@pytest.mark.parametrize("normalize", ["denominator", "output_norm"])
@pytest.mark.parametrize("feature_map", ["elu", "relu", "focused"])
def test_matches_quadratic(feature_map, normalize, causal, chunk_size, dtype):
    q, k, v = make(dtype=dtype)
    opts = dict(feature_map=feature_map, causal=causal, normalize=normalize)
    out = linear_attention(q, k, v, chunk_size=chunk_size, **opts)
    assert out.shape == (2, 4, 123, 24) and out.dtype == dtype
    assert_close(out, quadratic(q, k, v, **opts), dtype=dtype, tol=TOL[dtype])


@pytest.mark.parametrize("normalize", ["denominator", "output_norm"])
@pytest.mark.parametrize("feature_map", ["elu", "relu", "focused"])
def test_cross_attention_nq_ne_nk(feature_map, normalize):
    q, k, v = make(B=1, H=6, Hk=3, Nq=77, Nk=257, D=8, Dv=5)
    opts = dict(feature_map=feature_map, normalize=normalize)
    assert_close(linear_attention(q, k, v, **opts), quadratic(q, k, v, **opts), tol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalize", ["denominator", "output_norm"])
def test_key_mask_gives_padding_zero_weight(causal, normalize):
    q, k, v = make()
    mask = torch.ones(2, 123, dtype=torch.bool)
    mask[0, 100:] = False
    mask[1, ::3] = False
    opts = dict(causal=causal, normalize=normalize, key_mask=mask)
    out = linear_attention(q, k, v, chunk_size=16, **opts)
    assert_close(out, quadratic(q, k, v, **opts), tol=1e-5)
    # padded keys carry no information: changing them changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 100:] = 1e3
    v2[0, :, 100:] = -1e3
    assert_close(linear_attention(q, k2, v2, chunk_size=16, **opts)[0], out[0], tol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 123, 1000])
def test_chunk_size_does_not_change_the_result(chunk_size):
    q, k, v = make(B=1, H=2, Hk=1, Nq=123, Nk=123, D=8, Dv=8, dtype=torch.float64)
    want = quadratic(q, k, v, causal=True)
    assert_close(linear_attention(q, k, v, causal=True, chunk_size=chunk_size), want, dtype=torch.float64)


def test_dtypes_layouts_and_tiny_sizes():
    q, k, v = make(dtype=torch.float16)
    assert linear_attention(q, k, v, causal=True).dtype == torch.float16
    q, k, v = make(dtype=torch.float64)
    assert_close(linear_attention(q, k, v, causal=True, chunk_size=16), quadratic(q, k, v, causal=True),
                 dtype=torch.float64)
    # non-contiguous inputs, as from a [B, N, H, D] projection
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in make())
    assert not q.is_contiguous()
    assert_close(linear_attention(q, k, v, causal=True, chunk_size=16), quadratic(q, k, v, causal=True))
    q, k, v = make(B=1, H=1, Hk=1, Nq=1, Nk=1, D=3, Dv=2)
    assert_close(linear_attention(q, k, v, causal=True), quadratic(q, k, v, causal=True))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalize", ["denominator", "output_norm"])
@pytest.mark.parametrize("feature_map", ["elu", "relu", "focused"])
def test_gradients_match_quadratic(feature_map, causal, normalize):
    q, k, v = make(B=1, H=2, Hk=1, Nq=37, Nk=37, D=4, Dv=3, dtype=torch.float64)
    q[0, 0, 5] = -1.0  # a query and a key whose relu features are all zero
    k[0, 0, 7] = -1.0
    opts = dict(causal=causal, normalize=normalize, feature_map=feature_map)
    grads, w = [], None  # a random linear loss: sum(out²) is nearly constant under output_norm
    for fn in (lambda *t: linear_attention(*t, chunk_size=8, **opts), lambda *t: quadratic(*t, **opts)):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        w = torch.randn_like(out) if w is None else w
        (out * w).sum().backward()
        grads.append([t.grad for t in leaves])
    assert all(torch.isfinite(g).all() for g in grads[0])
    assert_close(grads[0], grads[1], dtype=torch.float64)


@pytest.mark.parametrize("change,message", [
    (dict(feature_map="softmax"), "feature_map must be one of"),
    (dict(normalize="layer"), "normalize must be one of"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(power=0.0), "power must be > 0"),
    (dict(eps=-1.0), "eps must be >= 0"),
    (dict(key_mask=torch.ones(2, 123)), "key_mask must be a bool tensor"),
    (dict(key_mask=torch.ones(2, 7, dtype=torch.bool)), r"key_mask must be a bool tensor \[B, N\]"),
    (dict(k=torch.randn(2, 3, 123, 16), v=torch.randn(2, 3, 123, 24)), "which must divide"),
    (dict(k=torch.randn(2, 2, 123, 8)), "same head dim"),
    (dict(v=torch.randn(2, 2, 99, 24)), "same number of tokens"),
    (dict(v=torch.randn(2, 2, 123, 24, dtype=torch.float64)), "share one dtype"),
    (dict(q=torch.randn(4, 123, 16)), "4-D tensor"),
    (dict(q=torch.randn(2, 4, 100, 16), causal=True), "causal linear attention needs as many queries"),
])
def test_invalid_arguments_raise_value_error(change, message):
    q, k, v = make()
    args = dict(q=q, k=k, v=v)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        linear_attention(**args)
