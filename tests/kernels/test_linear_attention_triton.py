"""The linear-attention Triton kernels against the reference (naive.py), outputs and gradients.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before
Triton is imported) on tiny shapes; with one, the same tests run compiled on CUDA, and the
`gpu`-marked tests add model-sized shapes (`pytest -m gpu`).
"""

import pytest
import torch

pytest.importorskip("triton", reason="the kernels need Triton")  # interpreted without a GPU: conftest.py

from rewriter.autotune.space import space  # noqa: E402
from rewriter.kernels.linear_attention import triton as la  # noqa: E402
from rewriter.kernels.linear_attention.naive import linear_attention as reference  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FEATURE_MAPS = ["elu", "relu", "focused"]
NORMALIZATIONS = ["denominator", "output_norm"]
# a small-tile config and a larger one; SPLIT=2 exercises the split key loop
CONFIGS = [
    {"BLOCK_N": 16, "BLOCK_DV": 16, "SPLIT": 2, "CHUNK": 16, "num_warps": 2, "num_stages": 1},
    {"BLOCK_N": 32, "BLOCK_DV": 32, "SPLIT": 1, "CHUNK": 32, "num_warps": 4, "num_stages": 2},
]


def make(B=2, H=4, Hk=2, Nq=45, Nk=45, D=16, Dv=32, dtype=torch.float32, masked=True, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, D, generator=g)
    k = torch.randn(B, Hk, Nk, D, generator=g)
    v = torch.randn(B, Hk, Nk, Dv, generator=g)
    mask = None
    if masked:  # right padding of different lengths, plus a hole
        lengths = torch.tensor([Nk, max(1, Nk - 13)])[:B]
        mask = torch.arange(Nk)[None, :] < lengths[:, None]
        mask[0, Nk // 3] = False
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    return q, k, v, (None if mask is None else mask.to(device))


def ref(q, k, v, mask, feature_map, causal, normalize, power=3.0, eps=1e-6):
    return reference(q, k, v, feature_map=feature_map, causal=causal, normalize=normalize, power=power, eps=eps,
                     key_mask=mask)


def grads(fn, q, k, v, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, grad_out)


# ---------------------------------------------------------------------------- forward


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_forward_fp32(feature_map, normalize, causal):
    q, k, v, mask = make()
    out = la.linear_attention(q, k, v, mask, feature_map, causal, normalize, 3.0, 1e-6)
    assert out.shape == (2, 4, 45, 32) and out.dtype == torch.float32
    assert_close(out, ref(q, k, v, mask, feature_map, causal, normalize))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("feature_map,normalize,causal", [
    ("elu", "denominator", False), ("focused", "output_norm", False),
    ("relu", "denominator", True), ("focused", "output_norm", True),
])
def test_forward_half(feature_map, normalize, causal, dtype):
    q, k, v, mask = make(Nq=77, Nk=77, dtype=dtype)
    out = la.linear_attention(q, k, v, mask, feature_map, causal, normalize, 3.0, 1e-6)
    assert out.dtype == dtype
    assert_close(out, ref(q, k, v, mask, feature_map, causal, normalize), dtype=dtype)


def features(q, k):
    """Non-negative rows, as a learned feature map computed before the op gives them
    (feature_map="identity": the denominator φ(q)·z must stay positive)."""
    return q.float().softmax(-1).to(q.dtype), k.float().softmax(-1).to(k.dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_forward_identity_feature_map(normalize, causal):
    q, k, v, mask = make()
    q, k = features(q, k)
    out = la.linear_attention(q, k, v, mask, "identity", causal, normalize, 3.0, 1e-6)
    assert_close(out, ref(q, k, v, mask, "identity", causal, normalize))


def test_cross_attention_no_mask_other_power():
    """Nq != Nk, no key mask, MHA (H == Hk), a fractional focusing power, Dv not a power of two."""
    q, k, v, _ = make(B=1, H=2, Hk=2, Nq=20, Nk=77, Dv=24, masked=False)
    for normalize in NORMALIZATIONS:
        out = la.linear_attention(q, k, v, None, "focused", False, normalize, 1.5, 1e-5)
        assert_close(out, ref(q, k, v, None, "focused", False, normalize, power=1.5, eps=1e-5))


@pytest.mark.parametrize("config", CONFIGS, ids=["small-split", "large"])
@pytest.mark.parametrize("causal", [False, True])
def test_configs(config, causal):
    q, k, v, mask = make()
    for normalize in NORMALIZATIONS:
        out = la.linear_attention(q, k, v, mask, "elu", causal, normalize, 3.0, 1e-6, config=config)
        assert_close(out, ref(q, k, v, mask, "elu", causal, normalize))


def test_fully_masked_batch_gives_zeros():
    q, k, v, mask = make(B=2, Nq=20, Nk=20)
    mask[1] = False
    for causal in (False, True):
        out = la.linear_attention(q, k, v, mask, "elu", causal, "denominator", 3.0, 1e-6)
        assert torch.all(out[1] == 0)
        assert_close(out, ref(q, k, v, mask, "elu", causal, "denominator"))


def test_unsupported_inputs_run_the_reference():
    q, k, v, mask = make(Nq=20, Nk=20, dtype=torch.float64)
    out = la.linear_attention(q, k, v, mask, "relu", False, "denominator", 3.0, 1e-6)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref(q, k, v, mask, "relu", False, "denominator"), rtol=0, atol=0)


def test_bad_arguments_raise():
    q, k, v, mask = make(Nq=20, Nk=20)
    with pytest.raises(ValueError, match="feature_map"):
        la.linear_attention(q, k, v, mask, "softmax", False, "denominator", 3.0, 1e-6)
    with pytest.raises(ValueError, match="power of two >= 16"):
        la.linear_attention(q, k, v, mask, "elu", False, "denominator", 3.0, 1e-6, config={**CONFIGS[0], "BLOCK_N": 8})
    with pytest.raises(ValueError, match="lacks"):
        la.linear_attention(q, k, v, mask, "elu", False, "denominator", 3.0, 1e-6, config={"BLOCK_N": 16})


# ---------------------------------------------------------------------------- backward


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_backward_fp32(feature_map, normalize):
    q, k, v, mask = make(Nq=20, Nk=45)  # cross-attention: Nq != Nk
    grad_out = torch.randn(2, 4, 20, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out, got = grads(lambda *t: la.linear_attention(*t, mask, feature_map, False, normalize, 3.0, 1e-6), q, k, v,
                     grad_out)
    expected_out, expected = grads(lambda *t: ref(*t, mask, feature_map, False, normalize), q, k, v, grad_out)
    assert_close(out, expected_out)
    for name, a, e in zip("qkv", got, expected):
        assert a.shape == e.shape, name
        assert_close(a, e, tol=2e-5)  # a sum over the group's queries and the keys more than the forward


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_backward_identity_feature_map(normalize):
    q, k, v, mask = make(Nq=20, Nk=45)
    q, k = features(q, k)
    grad_out = torch.randn(2, 4, 20, 32, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    out, got = grads(lambda *t: la.linear_attention(*t, mask, "identity", False, normalize, 3.0, 1e-6), q, k, v,
                     grad_out)
    expected_out, expected = grads(lambda *t: ref(*t, mask, "identity", False, normalize), q, k, v, grad_out)
    assert_close(out, expected_out)
    for a, e in zip(got, expected):
        assert_close(a, e, tol=2e-5)


@pytest.mark.parametrize("config,normalize", zip(CONFIGS, NORMALIZATIONS), ids=["small-split", "large"])
def test_backward_function_and_configs(config, normalize):
    """`linear_attention_backward` (recomputes the state) equals autograd through the reference."""
    q, k, v, mask = make(Nq=20, Nk=45)
    grad_out = torch.randn(2, 4, 20, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    got = la.linear_attention_backward(grad_out, q, k, v, mask, "focused", False, normalize, 3.0, 1e-6,
                                       config=config)
    _, expected = grads(lambda *t: ref(*t, mask, "focused", False, normalize), q, k, v, grad_out)
    for a, e in zip(got, expected):
        assert_close(a, e, tol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_half(dtype):
    q, k, v, mask = make(Nq=45, Nk=45, dtype=dtype)
    grad_out = torch.randn(2, 4, 45, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    for feature_map, normalize in (("elu", "denominator"), ("focused", "output_norm")):
        _, got = grads(lambda *t: la.linear_attention(*t, mask, feature_map, False, normalize, 3.0, 1e-6), q, k, v,
                       grad_out)
        _, expected = grads(lambda *t: ref(*t, mask, feature_map, False, normalize), q, k, v, grad_out)
        for a, e in zip(got, expected):
            assert a.dtype == dtype
            assert_close(a, e, dtype=dtype)


def test_causal_backward_is_not_implemented():
    q, k, v, mask = make(Nq=20, Nk=20)
    with pytest.raises(NotImplementedError, match="causal backward"):
        la.linear_attention_backward(torch.ones(2, 4, 20, 32, device=DEVICE), q, k, v, mask, "elu", True,
                                     "denominator", 3.0, 1e-6)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = la.linear_attention(*leaves, mask, "elu", True, "denominator", 3.0, 1e-6)
    with pytest.raises(NotImplementedError, match="causal backward"):
        out.sum().backward()


# ---------------------------------------------------------------------------- search space


def test_space_default_is_kept():
    sp = space("linear_attention")
    for causal in (False, True):
        for n, d, dv in ((45, 16, 32), (16384, 64, 64), (4096, 128, 128), (1, 16, 16)):
            shape = {"b": 1, "h": 16, "hk": 4, "n": n, "d": d, "dv": dv, "causal": causal, "dtype": "bfloat16"}
            default = sp.default(shape)
            assert set(default) == set(sp.params)
            assert sp.keep(default, shape), (shape, default)
            assert all(default[name] in choices for name, choices in sp.params.items())
            assert default in sp.configs(shape)


# ---------------------------------------------------------------------------- GPU-sized


GPU_SHAPE = dict(B=1, H=16, Hk=16, Nq=16384, Nk=16384, D=64, Dv=64)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("feature_map,normalize", [("elu", "denominator"), ("focused", "output_norm")])
def test_gpu_forward_bf16(feature_map, normalize, causal):
    q, k, v, mask = make(**GPU_SHAPE, dtype=torch.bfloat16, device="cuda")
    out = torch.ops.rewriter.linear_attention(q, k, v, mask, feature_map, causal, normalize, 3.0, 1e-6)
    assert_close(out, ref(q, k, v, mask, feature_map, causal, normalize), dtype=torch.bfloat16)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_forward_precision(dtype, causal):
    """fp32 takes exact dots, fp16 TF32 ones: both within their dtype's tolerance at N = 4096."""
    q, k, v, mask = make(B=2, H=8, Hk=2, Nq=4096, Nk=4096, D=64, Dv=64, dtype=dtype, device="cuda")
    out = la.linear_attention(q, k, v, mask, "elu", causal, "denominator", 3.0, 1e-6)
    assert_close(out, ref(q, k, v, mask, "elu", causal, "denominator"), dtype=dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("feature_map,normalize", [("elu", "denominator"), ("focused", "output_norm")])
def test_gpu_backward_bf16(feature_map, normalize):
    q, k, v, mask = make(**{**GPU_SHAPE, "Hk": 4}, dtype=torch.bfloat16, device="cuda")
    grad_out = torch.randn(1, 16, 16384, 64, device="cuda", dtype=torch.bfloat16)
    _, got = grads(lambda *t: la.linear_attention(*t, mask, feature_map, False, normalize, 3.0, 1e-6), q, k, v,
                   grad_out)
    _, expected = grads(lambda *t: ref(*t, mask, feature_map, False, normalize), q, k, v, grad_out)
    for a, e in zip(got, expected):
        assert_close(a, e, dtype=torch.bfloat16)
