"""`opt.train()` / `opt.eval()`: each mode has its own graphs, behaving as the model does in
that mode (dropout active in train mode), and gradients reach the model's own parameters."""
import pytest
import torch

import rewriter
from tests.helpers import assert_close, rel_l2
from tests.models import own


def _nanogpt(dropout: float):
    model, x = own.nanogpt()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = dropout
    return model, x


def test_train_and_eval_switch_the_model_and_the_graphs():
    model, x = _nanogpt(0.1)
    opt = rewriter.optimize(model.eval(), x)
    assert opt.train() is opt and opt.training and model.training
    for _ in range(2):  # the first call captures the train-mode graph; neither may draw from the caller's stream
        torch.manual_seed(3)
        got = opt(*x)
        torch.manual_seed(3)
        want = model(*x)
        assert_close(got, want)
    torch.manual_seed(4)
    assert rel_l2(opt(*x), want) > 1e-3  # dropout is live: another stream, another output
    reasons = [s.reason for s in opt.report.sites if s.kind == "attention"]
    assert reasons and all("dropout" in r for r in reasons), reasons
    assert opt.eval() is opt and not opt.training and not model.training
    with torch.no_grad():
        assert_close(opt(*x), model(*x))
    assert opt.report.count("attention", "applied") == 2  # the eval graph: attention canonicalised
    assert len(opt._entries) == 2


def test_train_mode_gradients_reach_the_models_parameters():
    """Tied embedding included: the Pre-RMSNorm conversion (which would re-centre new
    weights) is refused in train mode with its reason, so every gradient is the original's."""
    model, x = _nanogpt(0.0)  # no dropout: the outputs, hence the gradients, are comparable
    model.train()
    opt = rewriter.optimize(model, x)
    assert opt.training
    [stream] = opt.report.select(kind="residual_stream")
    assert stream.status == "refused" and "train mode" in stream.reason
    assert opt.report.count("attention", "applied") == 2  # dropout of 0 is no dropout
    opt(*x).float().pow(2).mean().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(got) == len(list(model.parameters()))
    model.zero_grad()
    model(*x).float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert rel_l2(got[name], p.grad) <= 1e-4, name


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_optimised_modules_mode_decides_not_the_models(mode):
    """The user flips the model itself after choosing the optimised module's mode: the
    graphs still follow the optimised module's mode."""
    model, x = _nanogpt(0.1)
    opt = rewriter.optimize(model.eval(), x)
    getattr(opt, mode)()
    model.train(mode == "eval")
    torch.manual_seed(0)
    got = opt(*x)
    model.train(mode == "train")
    torch.manual_seed(0)
    assert_close(got, model(*x))


class EinsumAttentionWithDropout(torch.nn.Module):
    """x-transformers' order: einsum scores, softmax, dropout on the probabilities, einsum PV."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = (t.reshape(B, N, 2, 8).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        p = self.drop(torch.einsum("bhid,bhjd->bhij", q, k).softmax(-1))
        return torch.einsum("bhij,bhjd->bhid", p, v).transpose(1, 2).reshape(B, N, 16)


def test_attention_dropout_in_train_mode_is_named_and_eval_is_rewritten():
    model, x = EinsumAttentionWithDropout(), (torch.randn(2, 5, 16),)
    opt = rewriter.optimize(model.train(), x)
    [site] = opt.report.select(kind="attention")
    assert site.status == "refused" and "dropout on its probabilities" in site.reason
    opt.eval()
    with torch.no_grad():
        assert_close(opt(*x), model(*x))
    assert opt.report.count("attention", "applied") == 1
