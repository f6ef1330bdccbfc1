"""Graph cleanup (CSE, identity removal) is sound under in-place writes, dtypes and rollback.

torch.export's graphs keep in-place ops (`add_`, `copy_`), so two equal-looking calls are
not one value when either is written later, and a copy is not its source.
"""
import pytest
import torch
from torch import nn

import rewriter
from rewriter.graph import common_subexpressions, remove_identities
from tests.helpers import assert_close, fail_the_whole_output_once, run_both


class InPlaceBias(nn.Module):
    """ALiBi-style: a bias built with `zeros` and written in place, beside another `zeros`."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.register_buffer("slopes", torch.tensor([0.5, 0.25])[:, None, None])

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = (t.reshape(B, N, 2, 8).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        bias = torch.zeros(2, N, N)
        untouched = torch.zeros(2, N, N)
        i = torch.arange(N)
        bias += self.slopes * (i[None, :] - i[:, None]).abs().neg()
        y = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5 + bias + untouched, -1) @ v
        return y.transpose(1, 2).reshape(B, N, 16)


class CopyThenWrite(nn.Module):
    def forward(self, x):
        y = x.to(torch.float32, copy=True)  # same dtype: a copy all the same
        y.mul_(2.0)
        return x + y


class MixedNumbers(nn.Module):
    def forward(self, ids):
        return ids + 1, ids + 1.0, ids * True


def _captured(model, x):
    return torch.export.export(model, x, strict=False).module()


def test_a_value_written_in_place_is_not_merged():
    model, x = InPlaceBias(), (torch.randn(2, 6, 16),)
    gm = _captured(model, x)
    zeros = [n for n in gm.graph.nodes if n.target == torch.ops.aten.zeros.default]
    assert len(zeros) == 2
    common_subexpressions(gm.graph)
    assert len([n for n in gm.graph.nodes if n.target == torch.ops.aten.zeros.default]) == 2
    opt = rewriter.optimize(model, x)
    assert opt.report.count("attention", "applied") == 1
    assert_close(*run_both(model, opt, x))


def test_a_copy_written_in_place_is_not_its_source():
    model, x = CopyThenWrite(), (torch.randn(3, 4),)
    gm = _captured(model, x)
    remove_identities(gm.graph)
    gm.recompile()
    torch.testing.assert_close(gm(*x), model(*x), rtol=0, atol=0)
    assert_close(*run_both(model, rewriter.optimize(model, x), x), tol=0.0)


def test_numbers_of_different_types_are_not_merged():
    model, x = MixedNumbers(), (torch.arange(6).reshape(2, 3),)
    opt = rewriter.optimize(model, x)
    got, want = run_both(model, opt, x)
    assert [t.dtype for t in got] == [t.dtype for t in want] == [torch.int64, torch.float32, torch.int64]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_failed_whole_is_restored_from_before_any_cleanup(monkeypatch):
    fail_the_whole_output_once(monkeypatch)
    model, x = InPlaceBias(), (torch.randn(2, 6, 16),)
    opt = rewriter.optimize(model, x)
    assert_close(*run_both(model, opt, x), tol=0.0)  # the captured graph, as torch.export gave it
    assert all(s.status != "applied" for s in opt.report.sites if s.reason != "already scaled_dot_product_attention")
    assert set(opt.report.passes.values()) == {0}, opt.report.passes


@pytest.mark.parametrize("model_cls", [InPlaceBias, CopyThenWrite])
def test_the_cleanups_keep_every_in_place_graph_exact(model_cls):
    model = model_cls()
    x = (torch.randn(2, 6, 16),) if model_cls is InPlaceBias else (torch.randn(3, 4),)
    gm = _captured(model, x)
    remove_identities(gm.graph)
    common_subexpressions(gm.graph)
    gm.recompile()
    torch.testing.assert_close(gm(*x), model(*x), rtol=0, atol=0)
