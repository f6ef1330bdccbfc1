"""rewriter.compare: the one comparison. NaN/Inf on one side only fails, every field counts."""
import math

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from rewriter.compare import StructureMismatch, compare_outputs, error, pairs, sample_cosines, squared_error
from tests.helpers import assert_close

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_on_one_side_only_is_a_failure(bad):
    x = torch.randn(3, 5)
    y = x.clone()
    y[1, 2] = bad
    for a, e in ((x, y), (y, x)):
        assert error(a, e)["rel_l2"] == INF and error(a, e)["max_abs"] == INF
        assert not compare_outputs(a, e)["ok"]
        assert squared_error(a, e)[0] == INF
    with pytest.raises(AssertionError):
        assert_close(y, x)


def test_non_finite_on_both_sides_matches_and_is_counted():
    x = torch.randn(4, 4)
    x[0, 0], x[2, 1] = NAN, INF
    y = x.clone()
    y[3, 3] += 1e-9
    err = error(y, x)
    assert err["nonfinite"] == 2 and err["rel_l2"] < 1e-8
    result = compare_outputs(y, x)
    assert result["ok"] and result["nonfinite"] == 2
    x2 = x.clone()
    x2[2, 1] = -INF  # an Inf of the other sign is not the same value
    assert error(x2, x)["rel_l2"] == INF


def test_every_field_of_a_model_output_is_compared():
    a = BaseModelOutputWithPooling(last_hidden_state=torch.ones(2, 3), pooler_output=torch.ones(2))
    b = BaseModelOutputWithPooling(last_hidden_state=torch.ones(2, 3), pooler_output=torch.full((2,), 2.0))
    result = compare_outputs(b, a)
    assert not result["ok"] and result["worst"] == "['pooler_output']"
    assert [p for p, _, _ in pairs(b, a)] == ["['last_hidden_state']", "['pooler_output']"]


def test_different_structures_never_pass():
    t = torch.ones(2)
    assert "only in the original: ['b']" in compare_outputs({"a": t}, {"a": t, "b": t})["reason"]
    assert not compare_outputs((t,), (t, t))["ok"]
    assert not compare_outputs((t, None), (t, t))["ok"]
    with pytest.raises(StructureMismatch):
        pairs(t, (t,))
    # a flat list of outputs (onnxruntime's) pairs with a tuple of the same length
    assert compare_outputs([t, t], (t, t))["ok"]


def test_dtype_and_integer_outputs_compare_exactly():
    ids = torch.arange(6)
    assert compare_outputs(ids.clone(), ids)["ok"]
    assert not compare_outputs(ids + 1, ids)["ok"]
    assert "dtype" in compare_outputs(ids.float(), ids)["reason"]


def test_cosines_flag_non_finite_samples():
    x = torch.randn(3, 8)
    y = x.clone()
    y[1, 0] = NAN
    cos = sample_cosines(y, x)
    assert cos.shape == (3,) and math.isnan(cos[1]) and torch.allclose(cos[[0, 2]], torch.ones(2, dtype=cos.dtype))
