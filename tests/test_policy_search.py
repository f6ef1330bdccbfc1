"""rewriter.search_policy: per-layer choices, a Pareto front over (latency, fidelity) that
beats uniform replacement somewhere, the chosen point applied and recorded; and the
per_layer form it is written in."""
import pytest
import torch

import rewriter
from rewriter.policy_search import FULL, estimate_cost, per_layer_options
from tests.helpers import assert_close
from tests.models import own

CHOICES = {  # small: every trial is a graph copy, a rewrite and a forward on the data
    "linear": [{"feature_map": "focused"}],
    "agent": [{"num_agents": 4}],
    "sliding_window": [{"window": 8, "sinks": 1}],
    "window2d": [{"window": 2}],
    "neighborhood": [{"kernel_size": 3}],
}


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 32, 32, generator=g),) for _ in range(n)]


@pytest.fixture(scope="module")
def vit_search():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    model, x = own.tiny_vit()
    result = rewriter.search_policy(model, x, _images(2, 3), min_fidelity=0.995, choices=CHOICES, n_trials=8,
                                    seed=0, latency="estimate", progress=False)
    torch.set_num_threads(previous)
    return model, x, result


def test_front_is_pareto_and_dominates_a_uniform_replacement(vit_search):
    _, _, r = vit_search
    assert r.layers == ["blocks.0.attn", "blocks.1.attn"]
    assert all(c[0] == FULL and len(c) == 6 for c in r.candidates.values())  # full + every form applies to a ViT
    assert [p.uniform for p in r.uniform] == [FULL] + [c for c in r.candidates["blocks.0.attn"][1:]]
    assert len(r.points) >= len(r.uniform)
    lat = [p.latency for p in r.front]
    assert lat == sorted(lat)
    for p in r.front:
        assert not any(o.dominates(p) for o in r.points)
    beaten = [u for u in r.uniform if u.uniform != FULL and u.dominated_by]
    assert beaten, [(u.uniform, u.latency, u.fidelity) for u in r.uniform]
    for u in beaten:
        front = {p.trial: p for p in r.front}
        assert all(front[t].dominates(u) for t in u.dominated_by)
    # the chosen point: the fastest on the front that meets min_fidelity
    assert r.chosen.fidelity >= 0.995
    assert r.chosen is min((p for p in r.front if p.fidelity >= 0.995), key=lambda p: p.latency)


def test_search_is_deterministic_with_the_estimate(vit_search):
    model, x, r = vit_search
    again = rewriter.search_policy(model, x, _images(2, 3), min_fidelity=0.995, choices=CHOICES, n_trials=8, seed=0,
                                   latency="estimate", progress=False, apply=False)
    assert [(p.choices, p.latency) for p in again.front] == [(p.choices, p.latency) for p in r.front]
    assert again.module is None


def test_chosen_point_is_applied_and_recorded(vit_search):
    model, x, r = vit_search
    opt = r.module
    record = opt.report.verification["policy_search"]
    assert record["chosen"]["choices"] == r.chosen.choices and record["front"]
    sites = opt.report.select(pass_name="approximate:per_layer")
    for site, choice in zip(sites, r.chosen.choices):
        if choice == FULL:
            assert site.status == "refused"
        else:
            assert site.status == "applied" and site.action != "per_layer" and choice.startswith(site.params["form"])
    # the applied module reproduces the fidelity the search measured
    data = _images(2, 3)
    fid = rewriter.policy_search.mean_cosine([opt(*b) for b in data], [model(*b) for b in data])
    assert abs(fid - r.chosen.fidelity) < 1e-5


def test_per_layer_form_and_measured_latency():
    model, x = own.tiny_vit()
    opt = rewriter.optimize(model, x, attention="per_layer", form=["agent", "full"], num_agents=[4, None])
    a, b = opt.report.select(pass_name="approximate:per_layer")
    assert (a.status, a.action, a.params["num_agents"]) == ("applied", "agent_attention", 4)
    assert b.status == "refused" and "per_layer" in b.reason
    with torch.no_grad():
        assert_close(opt(*x), rewriter.optimize(model, x, attention="agent", num_agents=4, layers=[0])(*x), tol=1e-6)
    r = rewriter.search_policy(model, x, _images(1, 4), choices={"window2d": [{"window": 2}]}, n_trials=1,
                               latency="measure", repeats=1, apply=False, progress=False)
    assert all(p.latency > 0 for p in r.points) and {p.uniform for p in r.uniform} == {FULL, "window2d:window=2"}


def test_causal_layers_get_only_causal_forms():
    model, x = own.nanogpt()
    r = rewriter.search_policy(model, x, [x], choices=CHOICES, n_trials=0, latency="estimate", apply=False,
                               progress=False)
    for labels in r.candidates.values():
        assert labels == [FULL, "linear:feature_map=focused", "sliding_window:window=8,sinks=1"]


def test_helpers_and_refusals():
    assert per_layer_options([None, ("agent", {"num_agents": 8})]) == {"form": [FULL, "agent"], "num_agents": [None, 8]}
    shape = (1, 2, 64, 16)
    assert estimate_cost(("sliding_window", {"window": 8, "sinks": 0}), shape, shape) < estimate_cost(None, shape, shape)
    model, x = own.tiny_vit()
    with pytest.raises(ValueError, match="latency"):
        rewriter.search_policy(model, x, [x], latency="fast")
    with pytest.raises(ValueError, match="at least one batch"):
        rewriter.search_policy(model, x, [])
    with pytest.raises(ValueError, match="per_layer: form"):
        rewriter.optimize(model, x, attention="per_layer", form="softmax")
