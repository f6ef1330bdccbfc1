"""What the fuzzing (tests/fuzz/test_exactness.py) found, each minimised to a named test.

Every test here failed before its fix; the generated Spec that first showed it is kept
beside the hand-minimised model, so the fuzzer's own path to the bug stays covered.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rewriter
from tests.fuzz.invariants import check
from tests.helpers import assert_close, count
from tests.models.generated import LayerSpec, Spec

SDPA = torch.ops.aten.scaled_dot_product_attention.default
CRMS = torch.ops.rewriter.crms_norm.default
RMS = torch.ops.rewriter.rms_norm.default


def _run(model, inputs, **kw):
    opt = rewriter.optimize(model, inputs, **kw)
    with torch.no_grad():
        assert_close(opt(*inputs), model(*inputs))
    return opt


# ---------------------------------------------------------------------------------------------
# 1. baddbmm attention + a boolean mask anywhere in the model crashed optimize().
#    The pattern variant "baddbmm + masked_fill/where" fed the *boolean* mask to baddbmm as its
#    additive input, so tracing it raised "Input dtypes must be the same" out of optimize().
#    Fix (passes/attention.py): baddbmm has its own `bias` input; the mask is applied after.

class BloomLikeAttention(nn.Module):
    """ALiBi-style bias through baddbmm, then a boolean mask with masked_fill (as HF Bloom)."""

    def __init__(self, value=float("-inf")):
        super().__init__()
        self.alibi = nn.Parameter(torch.randn(4, 6, 6))
        self.value = value

    def forward(self, q, k, v, keep):
        s = torch.baddbmm(self.alibi, q * 8 ** -0.5, k.transpose(1, 2))
        s = s.masked_fill(~keep, self.value)
        return torch.bmm(F.softmax(s, dim=-1), v)


def _bloom_inputs():
    torch.manual_seed(0)
    keep = torch.ones(6, 6, dtype=torch.bool).tril().expand(4, 6, 6)
    return tuple(torch.randn(4, 6, 8) for _ in range(3)) + (keep,)


@pytest.mark.parametrize("value", [float("-inf"), torch.finfo(torch.float32).min])
def test_baddbmm_bias_with_a_boolean_mask_is_canonicalised(value):
    opt = _run(BloomLikeAttention(value).eval(), _bloom_inputs())
    [site] = opt.report.select(kind="attention")
    assert site.status == "applied"
    assert count(opt.graph_module, SDPA) == 1


def test_generated_baddbmm_with_a_causal_mask():
    check(Spec(layers=(LayerSpec(attn="baddbmm_bias", mask_op="fill"),), mask="causal", final_norm="none"))


# ---------------------------------------------------------------------------------------------
# 2. baddbmm(bias, q, kᵀ) / √d: the rewrite left the bias unscaled, (bias + q·kᵀ)·c became
#    q·kᵀ·c + bias. With verify=True the site was rolled back (a lost rewrite); with
#    verify=False the optimised model was silently wrong (max abs error 1.1 on this model).
#    Fix (passes/attention.py): the bias is scaled with the scores.

class ScaledBaddbmm(nn.Module):
    def __init__(self, op: str):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(4, 6, 6))
        self.op = op

    def forward(self, q, k, v):
        s = torch.baddbmm(self.bias, q, k.transpose(1, 2))
        s = s / math.sqrt(8) if self.op == "div" else s * 8 ** -0.5
        return torch.bmm(F.softmax(s, dim=-1), v)


@pytest.mark.parametrize("op", ["div", "mul"])
@pytest.mark.parametrize("verify", [True, False])
def test_baddbmm_bias_is_scaled_with_the_scores(op, verify):
    torch.manual_seed(0)
    model, x = ScaledBaddbmm(op).eval(), tuple(torch.randn(4, 6, 8) for _ in range(3))
    opt = _run(model, x, verify=verify)
    [site] = opt.report.select(kind="attention")
    assert site.status == "applied", site.reason


# ---------------------------------------------------------------------------------------------
# 3. A GQA site was reported twice: the fold `extends` the canonical-attention site, and
#    apply_rules added the extended site to the report again ("attention→sdpa: 2 applied" for
#    one attention). Fix (passes/_rules.py): a site already in the report is not added again.

@pytest.mark.parametrize("attn", ["matmul_mul", "sdpa"])
def test_a_gqa_site_is_reported_once(attn):
    opt = check(Spec(layers=(LayerSpec(attn=attn),), heads=4, kv_heads=2, head_dim=6))
    sites = opt.report.select(kind="attention")
    assert len(sites) == 1 and len({id(s) for s in opt.report.sites}) == len(opt.report.sites)
    assert opt.report.passes["gqa_fold"] == 1


# ---------------------------------------------------------------------------------------------
# 4. A Llama-style RMSNorm (`h.pow(2)`) in a model captured by symbolic_trace crashed
#    optimize() with "AssertionError: target_for_analysis must be callable": the check read the
#    exponent through torch's argument normaliser, which has no schema for a Tensor-method node
#    (string target). Fix (passes/norms.py): the exponent, mean dims and epsilon are read from
#    the node's arguments directly, in ATen and torch-level spellings alike.

@torch.fx.wrap
def _opaque(x):
    return x if bool(x.sum() != 12345) else x + 1  # fatal to torch.export, opaque to symbolic_trace


class LlamaRMSNormUnderFx(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        x = _opaque(x)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(x.dtype)


def test_llama_rmsnorm_under_symbolic_trace():
    torch.manual_seed(0)
    opt = _run(LlamaRMSNormUnderFx().eval(), (torch.randn(2, 5, 16),))
    assert opt.report.capture["method"] == "symbolic_trace"
    [site] = opt.report.select(kind="rms_norm")
    assert site.status == "applied"
    assert count(opt.graph_module, RMS) == 1


def test_generated_llama_norm_under_symbolic_trace():
    check(Spec(layers=(LayerSpec(norm="rms:llama"),), final_norm="rms:nn_rmsnorm", capture="fx"))


# ---------------------------------------------------------------------------------------------
# 5. norm="crms" on a Pre-LN model without position embeddings (Llama-like: RoPE, or none)
#    crashed optimize() with "Node crms_norm_default referenced nonexistent value slice_tensor":
#    the first LayerNorm reads the embedding directly, and its D−1 slice was inserted before
#    the first residual add, after that LayerNorm. Fix (passes/pre_rmsnorm.py): a writer's
#    slice goes right after the writer.

class NoPositionPreLN(nn.Module):
    def __init__(self, d=12):
        super().__init__()
        self.emb = nn.Embedding(10, d)
        self.ln1, self.ln_f = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, idx):
        x = self.emb(idx)
        x = x + self.fc(self.ln1(x))
        return self.ln_f(x)


def test_pre_crmsnorm_when_a_layer_norm_reads_the_embedding_directly():
    torch.manual_seed(0)
    model = NoPositionPreLN().eval()
    with torch.no_grad():
        model.emb.weight.add_(2.0)
    opt = _run(model, (torch.randint(0, 10, (2, 5)),), norm="crms")
    [stream] = opt.report.select(kind="residual_stream")
    assert stream.status == "applied" and stream.action == "pre_crmsnorm"
    assert count(opt.graph_module, CRMS) == 2


def test_generated_pre_crmsnorm_without_position_embeddings():
    check(Spec(layers=(LayerSpec(),), heads=1, kv_heads=1, head_dim=24, input="features", pos="none",
               batch=1, seq=5), norm="crms", dynamic=False)


# ---------------------------------------------------------------------------------------------
# 6. Under the symbolic_trace fallback, hand-written attention was neither canonicalised nor
#    reported: torch-level graphs spell it `F.softmax(..., _stacklevel=3)`, `torch.matmul`,
#    `Tensor.softmax` (the patterns are traced as `torch.softmax` and `@`), and the report of
#    unmatched softmax attention (passes/__init__.py) looked for ATen softmax only. The model
#    stayed exact; the site was just missing from the report. Fix: symbolic_trace graphs are
#    respelt before matching (graph.normalise_torch_spellings: `@`, torch.bmm, torch.softmax),
#    a run-time scale such as math.sqrt(x.shape[-1]) is accepted, and what still matches no
#    pattern is reported as left as written, with the reason.

def test_hand_written_attention_under_symbolic_trace_is_reported():
    opt = check(Spec(layers=(LayerSpec(attn="div_sqrt"),), capture="fx"))
    sites = opt.report.select(kind="attention")
    assert sites, opt.report
    for s in sites:
        assert s.status == "applied" or "symbolic_trace" in s.reason, (s.status, s.reason)
