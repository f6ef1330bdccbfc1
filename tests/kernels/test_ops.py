import pytest
import torch
import torch.nn.functional as F

import rewriter  # noqa: F401
from tests.helpers import assert_close


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 123), (2, 5, 257)])
def test_rms_norm_reference(shape, dtype):
    x = torch.randn(shape, dtype=dtype)
    w, b = torch.randn(shape[-1], dtype=dtype), torch.randn(shape[-1], dtype=dtype)
    y = torch.ops.rewriter.rms_norm(x, w, b, 1e-6, 1.0)
    xf = x.float()
    want = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (w.float() + 1) + b.float()
    assert y.dtype == dtype
    assert_close(y, want.to(dtype), dtype=dtype)


@pytest.mark.parametrize("shape", [(3, 123), (2, 5, 257)])
def test_layer_norm_reference(shape):
    x = torch.randn(shape)
    w, b = torch.randn(shape[-1]), torch.randn(shape[-1])
    assert_close(torch.ops.rewriter.layer_norm(x, w, b, 1e-5), F.layer_norm(x, (shape[-1],), w, b, 1e-5), tol=0.0)


@pytest.mark.parametrize("op,with_affine,extra", [
    ("rms_norm", True, (1e-6, 0.5)),
    ("rms_norm", False, (1e-6, 0.0)),
    ("layer_norm", True, (1e-5,)),
])
def test_ops_pass_opcheck_and_gradcheck(op, with_affine, extra):
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    fn = getattr(torch.ops.rewriter, op)
    if with_affine:
        torch.library.opcheck(fn.default, (x, w, b, *extra))
        assert torch.autograd.gradcheck(lambda *t: fn(*t, *extra), (x, w, b))
    else:
        torch.library.opcheck(fn.default, (x, None, None, *extra))
        assert torch.autograd.gradcheck(lambda t: fn(t, None, None, *extra), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_crms_norm_equals_rms_norm_of_the_full_zero_mean_vector(dtype):
    full = torch.randn(3, 5, 257, dtype=torch.float64)
    full = (full - full.mean(-1, keepdim=True)).to(dtype)
    w, b = torch.randn(257, dtype=dtype), torch.randn(257, dtype=dtype)
    got = torch.ops.rewriter.crms_norm(full[..., :-1], w, b, 1e-6)
    want = torch.ops.rewriter.rms_norm(full.double(), w.double(), b.double(), 1e-6, 0.0)
    assert got.shape == full.shape and got.dtype == dtype
    assert_close(got, want.to(dtype), dtype=dtype)


def test_crms_norm_opcheck_and_gradcheck():
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.rewriter.crms_norm.default, (x, w, b, 1e-6))
    assert torch.autograd.gradcheck(lambda *t: torch.ops.rewriter.crms_norm(*t, 1e-6), (x, w, b))
