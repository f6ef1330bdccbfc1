"""Property-based fuzzing of the exact pipeline: generated transformer-like models
(tests/models/generated.py) through `rewriter.optimize`.

For every model (tests/fuzz/invariants.py): the rewritten model matches the original within
the dtype's tolerance on the example inputs and on fresh inputs; every site is applied, or
refused / rolled back with a reason; no attention or norm call goes unreported.

Deterministic in CI (derandomize, no example database): 300 models per run, split over four
properties so `pytest -n 2` spreads them. REWRITER_FUZZ_SCALE=10 runs ten times as many;
REWRITER_FUZZ_RANDOM=1 draws new models on every run (for hunting, not for CI). A failure
prints the Spec that reproduces it: minimise it and add it to tests/fuzz/test_found.py.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.invariants import check
from tests.models.generated import specs

SCALE = float(os.environ.get("REWRITER_FUZZ_SCALE", "1"))
RANDOM = os.environ.get("REWRITER_FUZZ_RANDOM", "") not in ("", "0")

# models per property, per CI run (300 in all)
CASES = {"fp32": 120, "bf16": 80, "crms": 60, "dynamic": 40}


def fuzz(n: int):
    return settings(max_examples=max(1, round(n * SCALE)), derandomize=not RANDOM, database=None, deadline=None,
                    print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# Static capture (dynamic=False) for most properties: dynamic-shape export costs about twice as
# much, and the rewrites are the same; `test_dynamic_capture_is_exact` covers the default.

@fuzz(CASES["fp32"])
@given(spec=specs(dtypes=("float32",)))
def test_default_passes_are_exact_fp32(spec):
    check(spec, norm="auto", dynamic=False)


@fuzz(CASES["bf16"])
@given(spec=specs(dtypes=("bfloat16",)))
def test_default_passes_are_exact_bf16(spec):
    check(spec, norm="auto", dynamic=False)


@fuzz(CASES["crms"])
@given(spec=specs())
def test_pre_crmsnorm_is_exact(spec):
    check(spec, norm="crms", dynamic=False)


@fuzz(CASES["dynamic"])
@given(spec=specs(depths=(1, 1, 1, 2, 2, 3)), norm=st.sampled_from(["auto", "auto", "crms"]))
def test_dynamic_capture_is_exact(spec, norm):
    check(spec, norm=norm, dynamic=True)
