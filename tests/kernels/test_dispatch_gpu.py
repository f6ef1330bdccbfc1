"""On CUDA the rewriter:: ops run their Triton kernels forward and backward (not the
references), and agree with the references."""
import pytest
import torch

import rewriter  # noqa: F401
from rewriter import kernels
from tests.helpers import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ops = torch.ops.rewriter


def _spy(monkeypatch, op, suffix):
    """Count calls of the Triton function `triton_impl(op, suffix)` returns."""
    calls = []
    real = kernels.triton_impl(op, suffix)
    assert real is not None, f"no Triton {op}{suffix}"

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    kernels.triton_impl.cache_clear()
    monkeypatch.setattr(kernels, "triton_impl", lambda o, s="": spy if (o, s) == (op, suffix) else _orig(o, s))
    return calls


_orig = kernels.triton_impl


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out.float().square().sum().backward()
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("op", ["rms_norm", "crms_norm", "layer_norm"])
def test_norms_run_triton_forward_and_backward(op, monkeypatch):
    from rewriter.kernels.layer_norm.naive import layer_norm as ln_ref
    from rewriter.kernels.rms_norm.naive import crms_norm as crms_ref, rms_norm as rms_ref

    d = 1024
    x = torch.randn(8, 256, d - (op == "crms_norm"), device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(d, device="cuda", dtype=torch.bfloat16), torch.randn(d, device="cuda", dtype=torch.bfloat16)
    extra = {"rms_norm": (1e-6, 0.0), "crms_norm": (1e-6,), "layer_norm": (1e-5,)}[op]
    ref = {"rms_norm": rms_ref, "crms_norm": crms_ref, "layer_norm": ln_ref}[op]
    fwd, bwd = _spy(monkeypatch, op, ""), None
    got, got_grads = _grads(lambda *t: getattr(ops, op)(*t, *extra), x, w, b)
    want, want_grads = _grads(lambda *t: ref(*t, *extra), x, w, b)
    assert fwd, "the forward did not run the Triton kernel"
    assert_close(got, want, dtype=torch.bfloat16)
    for g, r in zip(got_grads, want_grads):
        assert_close(g, r, dtype=torch.bfloat16, tol=3e-2)
    monkeypatch.undo()
    bwd = _spy(monkeypatch, op, "_backward")
    _grads(lambda *t: getattr(ops, op)(*t, *extra), x, w, b)
    assert bwd, "the backward did not run the Triton kernel"


def test_linear_attention_runs_triton_forward_and_backward(monkeypatch):
    from rewriter.kernels.linear_attention.naive import linear_attention as ref

    q, k, v = (torch.randn(2, 8, 4096, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    bwd = _spy(monkeypatch, "linear_attention", "_backward")
    fn = lambda a, b_, c: ops.linear_attention(a, b_, c, None, "elu", False, "denominator", 3.0, 1e-6)  # noqa: E731
    got, got_grads = _grads(fn, q, k, v)
    want, want_grads = _grads(lambda a, b_, c: ref(a, b_, c), q, k, v)
    assert bwd, "the backward did not run the Triton kernel"
    assert_close(got, want, dtype=torch.bfloat16)
    for g, r in zip(got_grads, want_grads):
        assert_close(g, r, dtype=torch.bfloat16, tol=3e-2)


# the window and agent ops: forward through Triton, gradients through the reference
FORWARD_ONLY = {
    "sliding_window_attention": (1, 8, 4096, (None, 512, True, 1, 4, False, 0.125)),
    "window_attention_2d": (1, 8, 1 + 48 * 48, (None, [48, 48], [8, 8], [4, 4], 1, 0.125)),
    "neighborhood_attention_2d": (1, 8, 64 * 64, (None, [64, 64], [7, 7], [2, 2], 0, 0.125)),
    "agent_attention": (1, 8, 1 + 32 * 32, (None, 49, 0.125, [32, 32], 1)),
}


@pytest.mark.parametrize("op", sorted(FORWARD_ONLY))
def test_window_and_agent_ops_run_triton_forward(op, monkeypatch):
    b, h, n, options = FORWARD_ONLY[op]
    q, k, v = (torch.randn(b, h, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fwd = _spy(monkeypatch, op, "")
    got, got_grads = _grads(lambda a, b_, c: getattr(ops, op)(a, b_, c, *options), q, k, v)
    assert fwd, "the forward did not run the Triton kernel"
    reference = kernels.reference(op)
    want, want_grads = _grads(lambda a, b_, c: reference(a, b_, c, *options), q, k, v)
    assert_close(got, want, dtype=torch.bfloat16)
    for g, r in zip(got_grads, want_grads):
        assert_close(g, r, dtype=torch.bfloat16, tol=3e-2)


def test_a_tuned_cache_entry_reaches_the_triton_kernel(monkeypatch, tmp_path):
    from rewriter.autotune.cache import default_cache
    from rewriter.autotune.select import cache_key
    from rewriter.autotune.space import space

    monkeypatch.setenv("REWRITER_CACHE_DIR", str(tmp_path))
    q, k, v = (torch.randn(1, 8, 4096, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    args = (q, k, v, None, "elu", False, "denominator", 3.0, 1e-6)
    key, shape = cache_key("linear_attention", args, "cuda")
    configs = space("linear_attention").configs(shape)
    chosen = next(c for c in configs if c != space("linear_attention").default(shape))
    default_cache(q.device).put(key, {"config": chosen, "time_ms": 0.1})
    seen = []
    real = kernels.triton_impl("linear_attention")
    monkeypatch.setattr(kernels, "triton_impl", lambda o, s="": (lambda *a, **kw: seen.append(kw) or real(*a, **kw))
                        if (o, s) == ("linear_attention", "") else _orig(o, s))
    ops.linear_attention(*args)
    assert seen and seen[0]["config"] == chosen
