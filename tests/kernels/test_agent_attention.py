"""agent_attention against a direct formulation with explicitly pooled agents."""
import math

import pytest
import torch

from rewriter.kernels.agent_attention.naive import agent_attention
from tests.helpers import assert_close

TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


def windows(size, out):
    """Adaptive-pooling windows: agent i averages [floor(i·size/out), ceil((i+1)·size/out))."""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def pooled_agents(q, n, grid, prefix):
    x = q[:, :, prefix:]
    if grid is None:
        return torch.stack([x[:, :, s:e].mean(2) for s, e in windows(x.shape[2], n)], 2)
    hg, wg = grid
    a = round(math.sqrt(n))
    img = x.reshape(*x.shape[:2], hg, wg, x.shape[-1])
    return torch.stack([img[:, :, r0:r1, c0:c1].mean((2, 3))
                        for r0, r1 in windows(hg, min(a, hg)) for c0, c1 in windows(wg, min(a, wg))], 2)


def direct(q, k, v, num_agents=49, scale=None, grid=None, prefix=0, key_mask=None):
    """softmax(Q Aᵀ s) · softmax(A Kᵀ s) V with repeated kv heads, in fp64, returned in q.dtype."""
    g = q.shape[1] // k.shape[1]
    qd, kd, vd = q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    a = pooled_agents(qd, min(num_agents, q.shape[2] - prefix), grid, prefix)
    logits = a @ kd.transpose(-1, -2) * s
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    agent_v = logits.softmax(-1) @ vd
    return ((qd @ a.transpose(-1, -2) * s).softmax(-1) @ agent_v).to(q.dtype)


def make(B=2, H=4, Hk=2, Nq=123, Nk=123, D=16, Dv=24, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, n, d, generator=g).to(dtype)
                 for h, n, d in ((H, Nq, D), (Hk, Nk, D), (Hk, Nk, Dv)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Nq,Nk,opts", [
    (123, 123, dict()),
    (77, 257, dict(num_agents=16, scale=0.3)),
    (30, 123, dict(num_agents=49)),                      # fewer queries than agents: Nq agents
    (1 + 11 * 13, 123, dict(grid=(11, 13), prefix=1)),   # CLS + 11×13 patches, 7×7 agents
    (3 * 10, 64, dict(grid=(3, 10), num_agents=16)),     # grid narrower than 4×4: 3×4 agents
    (123, 123, dict(num_agents=1)),
])
def test_matches_direct(Nq, Nk, opts, dtype):
    q, k, v = make(Nq=Nq, Nk=Nk, dtype=dtype)
    out = agent_attention(q, k, v, **opts)
    assert out.shape == (2, 4, Nq, 24) and out.dtype == dtype
    assert_close(out, direct(q, k, v, **opts), dtype=dtype, tol=TOL[dtype])


def test_one_agent_per_query_is_two_step_softmax():
    q, k, v = make(Nq=40, Nk=57, dtype=torch.float64)
    g = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = 16**-0.5
    want = (q @ q.transpose(-1, -2) * s).softmax(-1) @ ((q @ kr.transpose(-1, -2) * s).softmax(-1) @ vr)
    assert_close(agent_attention(q, k, v, num_agents=40), want, dtype=torch.float64)


def test_key_mask_excludes_padded_keys():
    q, k, v = make()
    mask = torch.ones(2, 123, dtype=torch.bool)
    mask[0, 90:] = False
    mask[1, ::4] = False
    out = agent_attention(q, k, v, key_mask=mask)
    assert_close(out, direct(q, k, v, key_mask=mask), tol=1e-5)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 90:], v2[0, :, 90:] = 1e3, -1e3
    assert_close(agent_attention(q, k2, v2, key_mask=mask)[0], out[0], tol=1e-6)
    mask[1] = False  # no real key: zero output and finite gradients
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = agent_attention(*leaves, key_mask=mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_gradients_match_direct():
    q, k, v = make(B=1, H=2, Hk=1, Nq=37, Nk=29, D=4, Dv=3, dtype=torch.float64)
    grads, w = [], None  # a random linear loss, the same for both
    for fn in (lambda *t: agent_attention(*t, num_agents=9), lambda *t: direct(*t, num_agents=9)):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        w = torch.randn_like(out) if w is None else w
        (out * w).sum().backward()
        grads.append([t.grad for t in leaves])
    assert_close(grads[0], grads[1], dtype=torch.float64)


def test_dtypes_and_layouts():
    q, k, v = make(dtype=torch.float16)
    assert agent_attention(q, k, v).dtype == torch.float16
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in make())
    assert_close(agent_attention(q, k, v), direct(q, k, v), tol=1e-5)


@pytest.mark.parametrize("change,message", [
    (dict(num_agents=0), "num_agents must be a positive int"),
    (dict(scale=-1.0), "scale must be a positive number or None"),
    (dict(prefix=123), r"prefix must be an int in \[0, Nq\)"),
    (dict(grid=(10, 10)), "covers 100 tokens but q has 123"),
    (dict(grid=(0, 5)), "grid must be"),
    (dict(key_mask=torch.ones(2, 123)), "key_mask must be a bool tensor"),
    (dict(key_mask=torch.ones(1, 123, dtype=torch.bool)), r"key_mask must be a bool tensor \[B, N\]"),
    (dict(k=torch.randn(2, 3, 123, 16), v=torch.randn(2, 3, 123, 24)), "which must divide"),
    (dict(k=torch.randn(2, 2, 123, 8)), "same head dim"),
    (dict(v=torch.randn(2, 2, 99, 24)), "same number of tokens"),
    (dict(q=torch.randn(4, 123, 16)), "4-D tensor"),
])
def test_invalid_arguments_raise_value_error(change, message):
    q, k, v = make()
    args = dict(q=q, k=k, v=v)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        agent_attention(**args)
