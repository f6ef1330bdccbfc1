import copy

import pytest
import torch
from torch import nn

import rewriter
from tests.helpers import assert_close, count, run_both
from tests.models import own

RMS = torch.ops.rewriter.rms_norm.default
aten = torch.ops.aten


def _converted(opt):
    return opt.report.count("layer_norm", "applied", action="rewriter.rms_norm")


@pytest.mark.parametrize("build", [own.nanogpt, own.tiny_vit], ids=["nanogpt", "vit"])
def test_pre_ln_models_become_pre_rmsnorm(build):
    model, x = build()
    before = copy.deepcopy(model.state_dict())
    opt = rewriter.optimize(model, x)
    assert opt.report.count("residual_stream", "applied") == 1
    assert _converted(opt) == 5  # 2 blocks x 2 norms + the final norm
    gm = opt.graph_module
    assert count(gm, RMS) == 5 and count(gm, aten.layer_norm.default) == 0
    assert_close(*run_both(model, opt, x))
    for k, v in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, before[k]), k


def test_tied_lm_head_stays_exact():
    model, x = own.nanogpt()
    opt = rewriter.optimize(model, x)
    gm = opt.graph_module
    [head] = [n for n in gm.graph.nodes if n.target == aten.linear.default and any(u.op == "output" for u in n.users)]
    [emb] = [n for n in gm.graph.nodes if n.target == aten.embedding.default and n.args[0].op == "get_attr"
             and gm.get_parameter(n.args[0].target).shape[0] == 97]
    assert torch.equal(gm.get_parameter(head.args[1].target), model.lm_head.weight)  # head reads the original
    centred = gm.get_parameter(emb.args[0].target)  # the embedding reads a re-centred copy
    assert centred.mean(-1).abs().max() < 1e-6 and not torch.equal(centred, model.wte.weight)


def test_norm_keep_leaves_layer_norms():
    model, x = own.nanogpt()
    opt = rewriter.optimize(model, x, norm="keep")
    assert _converted(opt) == 0
    assert opt.report.count("layer_norm", "applied", action="rewriter.layer_norm") == 5


def test_post_ln_is_refused_with_reason():
    model, x = own.post_ln_encoder()
    opt = rewriter.optimize(model, x)
    streams = opt.report.select(kind="residual_stream")
    assert streams and all(s.status == "refused" for s in streams)
    assert any("Post-LN" in s.reason for s in streams)
    assert _converted(opt) == 0


class ReadsRawStream(nn.Module):
    """Pre-LN block whose output also exposes the raw residual stream."""

    def __init__(self, d=16):
        super().__init__()
        self.emb = nn.Embedding(10, d)
        self.ln1, self.ln_f = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, idx):
        x = self.emb(idx)
        x = x + self.fc(self.ln1(x))
        return self.ln_f(x), x.sum(-1)


class LayerScale(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.emb = nn.Embedding(10, d)
        self.ln1, self.ln_f = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.gamma = nn.Parameter(torch.rand(d))

    def forward(self, idx):
        x = self.emb(idx)
        x = x + self.gamma * self.fc(self.ln1(x))
        return self.ln_f(x)


@pytest.mark.parametrize("cls,reason", [(ReadsRawStream, "read raw"), (LayerScale, "cannot be re-centred")])
def test_refuses_when_preconditions_fail(cls, reason):
    torch.manual_seed(0)
    model = cls().eval()
    x = (torch.randint(0, 10, (2, 5)),)
    opt = rewriter.optimize(model, x)
    [stream] = opt.report.select(kind="residual_stream")
    assert stream.status == "refused" and reason in stream.reason
    assert _converted(opt) == 0
    assert_close(*run_both(model, opt, x))


class ParallelBlock(nn.Module):
    """GPT-J style: attention-free parallel branches reading the same norm."""

    def __init__(self, d=16):
        super().__init__()
        self.emb = nn.Embedding(10, d)
        self.ln, self.ln_f = nn.LayerNorm(d), nn.LayerNorm(d)
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d, bias=False)

    def forward(self, idx):
        x = self.emb(idx)
        h = self.ln(x)
        x = x + self.a(h) + self.b(torch.relu(h))
        return self.ln_f(x)


def test_parallel_residual_branches_convert():
    torch.manual_seed(0)
    model = ParallelBlock().eval()
    with torch.no_grad():
        model.emb.weight.add_(3.0)  # a stream far from zero-mean
    x = (torch.randint(0, 10, (2, 5)),)
    opt = rewriter.optimize(model, x)
    assert _converted(opt) == 2
    assert_close(*run_both(model, opt, x))


CRMS = torch.ops.rewriter.crms_norm.default


@pytest.mark.parametrize("build", [own.nanogpt, own.tiny_vit], ids=["nanogpt", "vit"])
def test_pre_crmsnorm_compresses_the_stream(build):
    model, x = build()
    opt = rewriter.optimize(model, x, norm="crms")
    [stream] = opt.report.select(kind="residual_stream")
    assert stream.status == "applied" and stream.action == "pre_crmsnorm"
    assert opt.report.count("layer_norm", "applied", action="rewriter.crms_norm") == 5
    gm = opt.graph_module
    assert count(gm, CRMS) == 5 and count(gm, RMS) == 0 and count(gm, aten.layer_norm.default) == 0
    d = 48
    for n in gm.graph.nodes:  # every norm reads a D-1 stream
        if n.target == CRMS:
            assert n.args[0].meta["val"].shape[-1] == d - 1
    assert_close(*run_both(model, opt, x))
    ep = opt.export(*x)  # the compressed program still exports
    assert any(n.target == CRMS for n in ep.graph.nodes)
