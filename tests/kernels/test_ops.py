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


@pytest.mark.parametrize("op,args", [
    ("rms_norm", lambda x, w, b: (x, w, b, 1e-6, 0.0)),
    ("rms_norm", lambda x, w, b: (x, None, None, 1e-6, 0.0)),
    ("layer_norm", lambda x, w, b: (x, w, b, 1e-5)),
])
def test_ops_pass_opcheck_and_gradcheck(op, args):
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    fn = getattr(torch.ops.rewriter, op)
    torch.library.opcheck(fn.default, args(x, w, b))
    used = [t for t in args(x, w, b) if isinstance(t, torch.Tensor)]
    assert torch.autograd.gradcheck(lambda *t: fn(*args(*t, *[None] * (3 - len(t)))) if len(t) < 3 else fn(*args(*t)), tuple(used))
