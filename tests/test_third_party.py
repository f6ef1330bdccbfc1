"""Model code the project did not write, passed in unchanged.

x-transformers installs from the registry with the CPU torch and is used as is. vit-pytorch
does not (its package imports torchvision, whose registry wheel fails to load against the CPU
build), so tests/models/vit_style.py reproduces its forms in our own code. For each model:
the exact default matches on the output, every softmax has a report row, and `linear` and a
sliding window either apply with their error or refuse with a reason on every site.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

import rewriter
import x_transformers
from rewriter.cli import main
from rewriter.compare import compare_outputs
from tests.helpers import assert_every_softmax_reported
from tests.models import vit_style


EXACT_TOL = 1e-5


def _x_transformer(layers: str, **attn_kwargs):
    torch.manual_seed(0)
    cls = {"encoder": x_transformers.Encoder, "decoder": x_transformers.Decoder}[layers]
    model = x_transformers.TransformerWrapper(num_tokens=97, max_seq_len=32,
                                              attn_layers=cls(dim=32, depth=2, heads=4, **attn_kwargs)).eval()
    return model, (torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1)),)


MODELS = {  # name -> (factory, what the exact default must do: (attention sites applied, rms norms applied))
    "xt_encoder": (functools.partial(_x_transformer, "encoder"), (2, 0)),
    "xt_decoder": (functools.partial(_x_transformer, "decoder"), (2, 0)),
    "xt_decoder_rmsnorm": (functools.partial(_x_transformer, "decoder", use_rmsnorm=True), (2, 5)),
    "xt_encoder_simple_rmsnorm": (functools.partial(_x_transformer, "encoder", use_simple_rmsnorm=True), (2, 5)),
    "xt_decoder_memory_kv": (functools.partial(_x_transformer, "decoder", attn_num_mem_kv=2), (2, 0)),
    "simple_vit": (vit_style.simple_vit, (2, 0)),
    "cait": (vit_style.cait, (0, 0)),  # talking heads between the matmuls: refused, with the reason
}


@functools.cache
def _optimized(name: str):
    model, x = MODELS[name][0]()
    return model, x, rewriter.optimize(model, x)


@pytest.mark.parametrize("name", MODELS)
def test_exact_default(name):
    model, x, opt = _optimized(name)
    with torch.no_grad():
        result = compare_outputs(opt(*x), model(*x), tol=EXACT_TOL)
    assert result["ok"] and "nonfinite" not in result, result
    attention, rms = MODELS[name][1]
    report = opt.report
    assert report.count("attention", "applied") == attention, [(s.location, s.reason) for s in report.sites]
    assert report.count("rms_norm", "applied") == rms
    assert all(s.reason for s in report.sites if s.status != "applied")
    assert_every_softmax_reported(model, x, report)


@pytest.mark.parametrize("mode, options", [("linear", {}), ("sliding_window", {"window": 4})], ids=["linear", "window"])
@pytest.mark.parametrize("name", MODELS)
def test_approximate_modes_apply_or_refuse_every_site(name, mode, options):
    model, x, exact = _optimized(name)
    opt = rewriter.optimize(model, x, attention=mode, **options)
    sites = opt.report.select(pass_name=f"approximate:{mode}")
    found = [s for s in exact.report.sites if s.kind == "attention" and s.pass_name == "canonical_attention"]
    assert len(sites) == len(found) > 0
    for s in sites:
        assert (s.status == "applied" and s.error["rel_l2"] >= 0) or (s.status == "refused" and s.reason), s


def test_talking_heads_are_named():
    _, _, opt = _optimized("cait")
    reasons = {s.reason for s in opt.report.select(kind="attention")}
    assert reasons and all("talking-heads" in r for r in reasons), reasons


def test_memory_key_values_become_the_windows_sinks():
    """x-transformers' `attn_num_mem_kv`: learned key/values concatenated in front (the
    StreamingLLM sink form) — the sliding window keeps them as its sinks."""
    model, x, _ = _optimized("xt_decoder_memory_kv")
    opt = rewriter.optimize(model, x, attention="sliding_window", window=4)
    sites = opt.report.select(pass_name="approximate:sliding_window")
    assert sites and all(s.status == "applied" and s.params.get("prepended_sinks") == 2 for s in sites), sites
    covering = rewriter.optimize(model, x, attention="sliding_window", window=64, sinks=0)  # sees every key: full attention
    sites = covering.report.select(pass_name="approximate:sliding_window")
    assert all(s.status == "applied" and s.error["rel_l2"] < 1e-4 for s in sites), sites
    linear = rewriter.optimize(model, x, attention="linear").report.select(pass_name="approximate:linear")
    assert all(s.status == "refused" and "concatenated in front" in s.reason for s in linear)


@pytest.mark.parametrize("factory", ["simple_vit", "cait"])
def test_in_place_add_after_a_norm_keeps_the_rewrite(factory, capsys):
    """`x = norm(x); x += pos`: per-site verification must not roll a correct rewrite back,
    so `rewriter optimize` exits 0."""
    path = Path(vit_style.__file__)
    assert main(["optimize", f"{path}:{factory}"]) == 0
    out = capsys.readouterr().out
    assert "rolled_back" not in out and "rolled back" not in out
