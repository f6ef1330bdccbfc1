"""The one comparison of tensors and model outputs, for everything that checks numbers:
verification, the ONNX check, calibration, policy search, benchmarks and the tests.

A NaN or Inf in one tensor and not at the same place in the other is a failure (error
inf), never dropped by a reduction; non-finite values both sides share are counted in
`nonfinite`, so a reported error is never silently finite when an output is not. Outputs
are paired by their path in the pytree (a ModelOutput's field names, dict keys, tuple
positions), so every field is compared and two different structures never pass.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["TOLERANCE", "StructureMismatch", "error", "within_tolerance", "cosine", "pairs", "compare_outputs",
           "squared_error", "sample_cosines"]

# relative L2 error allowed for an exact rewrite, by dtype
TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}
_INF = float("inf")


class StructureMismatch(ValueError):
    """Two outputs do not have the same structure (fields, keys, lengths)."""


def _as_real(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_complex():  # .double() would drop the imaginary part
        return torch.view_as_real(t.resolve_conj().contiguous()).double()
    return t.double()


def _same_nonfinite(a: torch.Tensor, e: torch.Tensor) -> bool:
    return torch.equal(torch.isnan(a), torch.isnan(e)) and torch.equal(
        torch.where(torch.isinf(e), e, 0), torch.where(torch.isinf(a), a, 0))


def error(actual: torch.Tensor, expected: torch.Tensor) -> dict[str, float]:
    """max abs and relative L2 error of `actual` against `expected`, in fp64 (complex as
    real and imaginary parts): inf where shapes differ or the non-finite values do not
    match; `nonfinite` counts the non-finite values both share, when there are any."""
    a, e = _as_real(actual.to(expected.device)), _as_real(expected)
    if a.shape != e.shape or not _same_nonfinite(a, e):
        return {"max_abs": _INF, "rel_l2": _INF}
    finite = torch.isfinite(e)
    shared = int((~finite).sum())
    out: dict[str, float] = {"max_abs": 0.0, "rel_l2": 0.0}
    if shared:
        a, e = a[finite], e[finite]
        out["nonfinite"] = shared
    if a.numel():
        diff = a - e
        denom = e.norm().item()
        out["max_abs"] = diff.abs().max().item()
        out["rel_l2"] = diff.norm().item() / denom if denom > 0 else diff.norm().item()
    return out


def within_tolerance(err: dict[str, float], dtype: torch.dtype, tol: float | None = None) -> bool:
    return err["rel_l2"] <= (TOLERANCE.get(dtype, 1e-5) if tol is None else tol)


def cosine(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Mean cosine similarity of the last-dim vectors (e.g. per token and head), in fp64;
    nan when either side is not finite."""
    a, e = actual.detach().double(), expected.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        return float("nan")
    return torch.nn.functional.cosine_similarity(a, e, dim=-1, eps=1e-12).mean().item()


def _is_leaf(x) -> bool:
    return x is None or isinstance(x, torch.Tensor)


def pairs(actual, expected) -> list[tuple[str, Any, Any]]:
    """(path, actual leaf, expected leaf) for every leaf of two outputs of one structure;
    StructureMismatch, naming the fields, when the structures differ."""
    if isinstance(actual, (list, tuple)) and isinstance(expected, (list, tuple)) and \
            not _registered(actual) and not _registered(expected):
        actual, expected = list(actual), list(expected)  # a flat list of outputs (e.g. onnxruntime's) vs a tuple
    a, a_spec = pytree.tree_flatten_with_path(actual)
    e, e_spec = pytree.tree_flatten_with_path(expected)
    a_paths = [pytree.keystr(p) for p, _ in a]
    e_paths = [pytree.keystr(p) for p, _ in e]
    if a_paths != e_paths or a_spec.type != e_spec.type:
        only_a = [p for p in a_paths if p not in e_paths]
        only_e = [p for p in e_paths if p not in a_paths]
        detail = "; ".join(x for x in (
            f"{type(actual).__name__} vs {type(expected).__name__}" if a_spec.type != e_spec.type else "",
            f"only in the result: {', '.join(only_a[:5]) or '-'}" if only_a or only_e else "",
            f"only in the original: {', '.join(only_e[:5]) or '-'}" if only_a or only_e else "",
            f"{len(a_paths)} vs {len(e_paths)} outputs" if not (only_a or only_e) and len(a_paths) != len(e_paths) else "",
        ) if x) or "the outputs are ordered differently"
        raise StructureMismatch(f"the outputs differ in structure: {detail}")
    return [(p or "output", x, y) for p, (_, x), (_, y) in zip(a_paths, a, e)]


def _registered(x) -> bool:
    """A tuple subclass pytree knows by its type (a namedtuple, a torch.return_types)."""
    return type(x) not in (list, tuple)


def compare_outputs(actual, expected, tol: float | None = None) -> dict[str, Any]:
    """Worst error over every floating-point leaf (relative L2 against each dtype's
    tolerance, or `tol`); exact equality and the same dtype for every other leaf.
    Returns {ok, rel_l2, max_abs, worst (the leaf's path), [reason], [nonfinite]}."""
    try:
        leaves = pairs(actual, expected)
    except StructureMismatch as e:
        return {"rel_l2": _INF, "max_abs": _INF, "ok": False, "reason": str(e)}
    worst: dict[str, Any] = {"rel_l2": 0.0, "max_abs": 0.0, "ok": True}
    nonfinite = 0
    for path, x, y in leaves:
        if isinstance(y, torch.Tensor) and isinstance(x, torch.Tensor):
            if x.dtype != y.dtype:
                err, ok = {"rel_l2": _INF, "max_abs": _INF}, False
                worst.setdefault("reason", f"{path}: dtype {x.dtype} instead of {y.dtype}")
            elif y.is_floating_point() or y.is_complex():
                err = error(x, y)
                ok = within_tolerance(err, y.dtype, tol)
                nonfinite += int(err.get("nonfinite", 0))
            else:
                ok = x.shape == y.shape and torch.equal(x.to(y.device), y)
                err = {"rel_l2": 0.0 if ok else _INF, "max_abs": 0.0 if ok else _INF}
        else:
            ok = type(x) is type(y) and x == y
            err = {"rel_l2": 0.0 if ok else _INF, "max_abs": 0.0 if ok else _INF}
        if err["rel_l2"] > worst["rel_l2"] or "worst" not in worst:
            worst["worst"] = path
        worst["rel_l2"] = max(worst["rel_l2"], err["rel_l2"])
        worst["max_abs"] = max(worst["max_abs"], err["max_abs"])
        if not ok:
            worst["ok"] = False
            if err["rel_l2"] == _INF:
                worst.setdefault("reason", f"{path}: shapes, values or NaN/Inf positions differ")
    if nonfinite:
        worst["nonfinite"] = nonfinite
    return worst


def _float_pairs(actual, expected) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x, y) for _, x, y in pairs(actual, expected)
            if isinstance(y, torch.Tensor) and y.is_floating_point() and isinstance(x, torch.Tensor)]


def squared_error(actual, expected) -> tuple[float, float]:
    """(sum of squared errors, sum of squared reference values) over every float leaf, in
    fp64, to pool a relative error over many batches; inf error when NaN/Inf differ."""
    sq_err = sq_ref = 0.0
    for x, y in _float_pairs(actual, expected):
        a, e = _as_real(x), _as_real(y)
        if a.shape != e.shape or not _same_nonfinite(a, e):
            return _INF, sq_ref + float(e[torch.isfinite(e)].pow(2).sum())
        finite = torch.isfinite(e)
        sq_err += float((a[finite] - e[finite]).pow(2).sum())
        sq_ref += float(e[finite].pow(2).sum())
    return sq_err, sq_ref


def sample_cosines(actual, expected) -> torch.Tensor:
    """The cosine to the original per sample (dim 0 of each float leaf), fp64; nan where
    either side is not finite."""
    cos = []
    for x, y in _float_pairs(actual, expected):
        x2 = x.detach().double().reshape(x.shape[0], -1) if x.dim() else x.detach().double().reshape(1, 1)
        y2 = y.detach().double().reshape(y.shape[0], -1) if y.dim() else y.detach().double().reshape(1, 1)
        c = torch.nn.functional.cosine_similarity(x2, y2, dim=1)
        bad = ~(torch.isfinite(x2).all(1) & torch.isfinite(y2).all(1))
        cos.append(torch.where(bad, torch.nan, c))
    return torch.cat(cos) if cos else torch.ones(0, dtype=torch.float64)
