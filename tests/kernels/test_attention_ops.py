"""The registered approximate-attention ops: they call their references, pass opcheck
(schema, fake tensor, autograd registration), and differentiate (calibration trains through them)."""
import pytest
import torch

import rewriter  # noqa: F401
from rewriter.kernels.window_attention.naive import neighborhood_attention_2d
from tests.helpers import assert_close

ops = torch.ops.rewriter

# op, the options after (q, k, v, key_mask), whether the case takes a key mask
CASES = {
    "linear": (ops.linear_attention, ("elu", False, "denominator", 3.0, 1e-6), True),
    "linear_causal": (ops.linear_attention, ("focused", True, "output_norm", 3.0, 1e-6), False),
    "agent": (ops.agent_attention, (4, 0.5, [], 0), True),
    "sliding": (ops.sliding_window_attention, (3, True, 1, 1, False, 0.5), True),
    "window2d": (ops.window_attention_2d, ([2, 3], [2, 2], [1, 1], 1, 0.5), True),
    "neighborhood": (ops.neighborhood_attention_2d, ([2, 3], [2, 2], [1, 1], 1, 0.5), True),
}


def _inputs(dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 7, 3, dtype=dtype, generator=g).requires_grad_(grad) for _ in range(3))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, -2:] = False
    return q, k, v, mask


@pytest.mark.parametrize("name", CASES)
def test_op_passes_opcheck_and_gradcheck(name):
    op, options, masked = CASES[name]
    q, k, v, mask = _inputs(grad=True)
    mask = mask if masked else None
    torch.library.opcheck(op.default, (q, k, v, mask, *options))
    out = op(q, k, v, mask, *options)
    assert out.shape == (2, 2, 7, 3) and torch.isfinite(out).all()
    assert torch.autograd.gradcheck(lambda a, b, c: op(a, b, c, mask, *options), (q, k, v), atol=1e-6, fast_mode=True)


def test_neighborhood_op_matches_reference():
    q, k, v, mask = _inputs(torch.float32)
    op, options, _ = CASES["neighborhood"]
    got = op(q, k, v, mask, *options)
    want = neighborhood_attention_2d(q, k, v, grid=(2, 3), kernel_size=2, prefix=1, scale=0.5, key_mask=mask)
    assert_close(got, want, tol=0.0)
