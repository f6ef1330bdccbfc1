"""Kernel autotuning: search spaces as data (`space`), timing (`bench`), Optuna studies
(`tuner`), shape buckets (`buckets`), the per-device cache (`cache`) and the lookup the
ops' dispatch does on every call (`select`).

`rewriter.autotune(model, example_inputs)` tunes every kernel call a model makes. This
package is also that function: the module is callable, so `rewriter.autotune(...)` (the
public API) and `rewriter.autotune.cache` (the subpackage) are both what they say. Nothing
here imports Triton or Optuna until tuning starts.
"""
from __future__ import annotations

import sys
import time
import types
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["autotune", "AutotuneReport"]


@dataclass
class AutotuneReport:
    """One `TuneResult` per distinct (kernel, shape bucket, dtype) the model called."""

    results: list = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (kernel, why not tuned)
    wall_s: float = 0.0

    def rows(self) -> list[dict[str, Any]]:
        """One plain row per study: what the CLI prints and `--json` emits."""
        return [{"kernel": r.kernel, "bucket": r.bucket, "dtype": r.dtype, "default_ms": r.default_ms,
                 "best_ms": r.best_ms, "speedup": r.speedup, "trials": r.runs, "failures": r.failures,
                 "best_config": r.best_config,
                 "unconfirmed": (r.confirmation or {}).get("kept") == "default"} for r in self.results]

    def to_dict(self) -> dict[str, Any]:
        return {"results": [r.to_dict() for r in self.results],
                "skipped": [{"kernel": k, "reason": why} for k, why in self.skipped], "wall_s": self.wall_s}


def autotune(model, example_inputs: tuple = (), *, kernels: list[str] | None = None, trials: int = 30,
             budget_s: float | None = None, grid: bool = False, storage: str | None = None, sampler=None,
             cache=None, isolate: bool | None = None, min_time_s: float = 0.1,
             progress: Callable[[str, Any], None] | None = None) -> AutotuneReport:
    """Tune every `rewriter::` kernel call `model` makes on `example_inputs`, on the device
    they live on, and store the best configs in the device's cache (which the ops read).

    model: an `OptimizedModule` (from `rewriter.optimize`) or any module whose graph calls
    `rewriter::` ops; a plain `nn.Module` is optimised first with the default (exact) passes.
    model=None: `example_inputs` is a list of `OpCall`s to tune instead (e.g.
    `rewriter.autotune.workloads.standard_calls()`).
    kernels: only these kernel names. trials / grid / storage / sampler / isolate /
    min_time_s: see `rewriter.autotune.tuner.tune`. budget_s: wall-clock cap for the whole
    run, shared out among the studies still to run. progress(kind, value): called with
    ("study", (kernel, bucket)) when a study starts and ("trial", Trial) after each trial.
    """
    from ..optimize import OptimizedModule, optimize
    from .record import op_calls
    from .select import cache_key, choices, device_kind
    from .tuner import tune

    started = time.perf_counter()
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if model is not None and not isinstance(model, OptimizedModule) and not hasattr(model, "graph"):
        model = optimize(model, args)
    report = AutotuneReport()
    todo, seen = [], set()
    calls = op_calls(model, args) if model is not None else list(example_inputs)
    for call in calls:
        if kernels is not None and call.kernel not in kernels:
            continue
        kind = device_kind(next(a.device for a in call.args if hasattr(a, "device")))
        found = cache_key(call.kernel, call.args, kind)
        if found is None or choices(call.kernel, call.args, kind) < 2:
            why = f"nothing to tune on {kind}" if found is None else "one config fits this shape"
            if (call.kernel, why) not in seen:
                seen.add((call.kernel, why))
                report.skipped.append((call.kernel, why))
            continue
        key = (kind, found[0])
        if key not in seen:
            seen.add(key)
            todo.append(call)
    for i, call in enumerate(todo):
        left = None
        if budget_s is not None:
            left = (budget_s - (time.perf_counter() - started)) / (len(todo) - i)
            if left <= 0:
                report.skipped.append((call.kernel, "the time budget ran out"))
                continue
        if progress is not None:
            progress("study", (call.kernel, i, len(todo)))
        report.results.append(tune(
            call.kernel, call.args, trials=trials, budget_s=left, grid=grid, sampler=sampler, storage=storage,
            cache=cache, isolate=isolate, min_time_s=min_time_s,
            progress=(lambda trial: progress("trial", trial)) if progress is not None else None))
    report.wall_s = time.perf_counter() - started
    return report


class _CallableModule(types.ModuleType):
    """`rewriter.autotune(...)` calls `autotune`; attribute access stays the package's."""

    def __call__(self, *args, **kwargs):
        return autotune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
