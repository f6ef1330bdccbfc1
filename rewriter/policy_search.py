"""search_policy(): which attention layers to replace, with what, for the best latency at a fidelity.

A multi-objective Optuna study over per-layer choices: each attention layer keeps softmax
attention ("full") or takes one of the approximate forms that apply to it (linear; agent
attention with some number of agents; a sliding window of some width; a 2-D window or
neighbourhood of some size where the tokens form an image grid). Every trial rewrites a
copy of one exact capture (no re-capture per trial), then measures the two objectives:

- latency: the rewritten model's time on `latency_inputs` on this machine (best of a few
  calls after a warm-up, interleaved with the all-full model's and taken as a ratio to it;
  the ops use the autotuner's tuned configs where they exist),
  or a deterministic estimate of the attention cost (`latency="estimate"`), or any
  callable;
- fidelity: agreement of the rewritten model's outputs with the original's on `data`
  (mean cosine per sample by default), or any callable.

The uniform replacements (the same choice at every layer) and the all-full model are
evaluated first, in the same study, so the front is compared with them on equal terms.
The chosen point is the fastest on the Pareto front whose fidelity is at least
`min_fidelity`; it is applied with `rewriter.optimize(..., attention="per_layer", ...)` and
the search is recorded in that module's report (`report.verification["policy_search"]`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch import nn
from .compare import sample_cosines

__all__ = ["search_policy", "PolicySearchResult", "Point", "DEFAULT_CHOICES", "apply_policy"]

FULL = "full"

# form -> candidate options; filtered per model (token count, grid) and per layer
# (causal layers take no agent or 2-D form)
DEFAULT_CHOICES: dict[str, list[dict[str, Any]]] = {
    "linear": [{"feature_map": "focused"}],
    "agent": [{"num_agents": 4}, {"num_agents": 8}, {"num_agents": 16}, {"num_agents": 32}],
    "sliding_window": [{"window": w} for w in (8, 16, 32, 64, 128, 256)],
    "window2d": [{"window": w} for w in (2, 4, 7, 8, 14)],
    "neighborhood": [{"kernel_size": k} for k in (3, 5, 7, 9)],
}


@dataclass
class Point:
    """One evaluated policy: a choice per attention layer and its two objectives."""

    choices: list[str]  # per layer: "full" or a candidate label, e.g. "agent:num_agents=8"
    latency: float  # seconds (or the estimate's units)
    fidelity: float
    trial: int = -1
    uniform: str | None = None  # the candidate, when every layer has the same choice
    dominated_by: list[int] = field(default_factory=list)  # front trials that dominate this point

    def dominates(self, other: "Point") -> bool:
        return (self.latency <= other.latency and self.fidelity >= other.fidelity
                and (self.latency < other.latency or self.fidelity > other.fidelity))

    def to_dict(self) -> dict[str, Any]:
        return {"choices": self.choices, "latency": self.latency, "fidelity": self.fidelity, "trial": self.trial,
                "uniform": self.uniform, "dominated_by": self.dominated_by}


@dataclass
class PolicySearchResult:
    front: list[Point]  # the Pareto front, fastest first
    chosen: Point | None  # fastest front point with fidelity >= min_fidelity
    uniform: list[Point]  # every uniform replacement (and all-full), as evaluated in the study
    points: list[Point]  # every distinct policy evaluated
    layers: list[str]  # attention layers (module paths), in order
    candidates: dict[str, list[str]]  # layer path -> the choices it had
    min_fidelity: float
    latency_kind: str
    options: dict[str, Any] | None  # optimize() options of the chosen point (None: nothing to replace)
    module: nn.Module | None = None  # the chosen point applied (rewriter.optimize), when apply=True
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "candidates": self.candidates, "min_fidelity": self.min_fidelity,
                "latency": self.latency_kind, "front": [p.to_dict() for p in self.front],
                "chosen": self.chosen.to_dict() if self.chosen else None,
                "uniform": [p.to_dict() for p in self.uniform], "trials": len(self.points),
                "options": _jsonable(self.options), "seconds": round(self.seconds, 2)}

    def table(self):
        from rich.table import Table

        t = Table(title=f"policy search: Pareto front (latency: {self.latency_kind}; chosen: fastest with "
                        f"fidelity >= {self.min_fidelity})")
        for col in ("trial", "latency", "fidelity", "per-layer choices", "note"):
            t.add_column(col, overflow="fold")
        for p in self.front:
            note = "chosen" if p is self.chosen else (f"uniform {p.uniform}" if p.uniform else "")
            t.add_row(str(p.trial), f"{p.latency:.4g}", f"{p.fidelity:.4f}", ", ".join(p.choices), note)
        return t

    def __str__(self) -> str:
        import io

        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=160, force_terminal=False, color_system=None).print(self.table())
        beaten = [p for p in self.uniform if p.dominated_by]
        buf.write(f"{len(self.points)} policies evaluated; {len(beaten)} of {len(self.uniform)} uniform "
                  f"replacements are dominated by a front point\n")
        return buf.getvalue()


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _label(form: str, options: dict[str, Any]) -> str:
    return form + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")


def per_layer_options(choices: list[tuple[str, dict] | None]) -> dict[str, Any]:
    """optimize(attention="per_layer", ...) options for a choice per layer (None = full)."""
    keys = list(dict.fromkeys(k for c in choices if c for k in c[1]))
    options: dict[str, Any] = {"form": [c[0] if c else FULL for c in choices]}
    for k in keys:
        options[k] = [c[1].get(k) if c else None for c in choices]
    return options


# ---------------------------------------------------------------------------- graph copies


class _Base:
    """One exact capture of the model; each trial rewrites a copy of its graph."""

    def __init__(self, model, args, kwargs):
        from .optimize import optimize
        from .verify import flat_inputs

        self.optimized = optimize(model, args, example_kwargs=kwargs or None)
        entry = self.optimized._last
        self.model, self.args, self.kwargs = model, args, entry.captured.example_kwargs  # as captured (no KV cache)
        self.gm, self.method = entry.gm, entry.captured.method
        self.flat = flat_inputs(self.gm, args, self.kwargs)
        sdpa = torch.ops.aten.scaled_dot_product_attention.default
        from .graph import module_path

        self.nodes = [n for n in self.gm.graph.nodes if n.op == "call_function" and n.target == sdpa]
        self.layers = [module_path(n) for n in self.nodes]

    def rewrite(self, choices: list[tuple[str, dict] | None]) -> tuple[fx.GraphModule, Any]:
        """A copy of the exact graph with `choices` applied; (graph module, report)."""
        from .graph import dead_code_elimination
        from .optimize import _copy_graph
        from .passes import PassContext, approximate
        from .passes.policy import Policy
        from .report import RewriteReport

        gm = fx.GraphModule(self.gm, _copy_graph(self.gm.graph))  # shares the model's parameters
        report = RewriteReport()
        if any(choices):
            ctx = PassContext(gm, self.method, report, {})
            policy = Policy.from_options(None, per_layer_options(choices))
            approximate.run(ctx, "per_layer", policy, self.flat, measure=False)
            dead_code_elimination(gm)
        return gm, report


def _applicable(base: _Base, candidates: dict[str, list[dict]]) -> dict[int, list[tuple[str, dict]]]:
    """Layer index -> the candidates that apply there (tried on a copy, all layers at once)."""
    out: dict[int, list[tuple[str, dict]]] = {i: [] for i in range(len(base.layers))}
    for form, option_list in candidates.items():
        for options in option_list:
            _, report = base.rewrite([(form, dict(options))] * len(base.layers))
            sites = [s for s in report.sites if s.kind == "attention"]
            for i, s in enumerate(sites):
                if s.status == "applied":
                    out[i].append((form, dict(options)))
    return out


def _token_count(base: _Base, inputs_flat: list) -> dict[fx.Node, tuple]:
    from .verify import record

    wanted = [n.args[0] for n in base.nodes] + [n.args[1] for n in base.nodes]
    values = record(base.gm, inputs_flat, wanted, ancestors_only=True)
    return {n: (tuple(values[n.args[0]].shape), tuple(values[n.args[1]].shape)) for n in base.nodes}


def _area(x) -> int:
    return x * x if isinstance(x, int) else math.prod(x)


def _covers(form: str, options: dict, tokens: int) -> bool:
    """Whether a candidate sees every key anyway at this token count (full attention, only slower)."""
    if form == "sliding_window":
        return options.get("window", 0) >= tokens
    if form == "agent":
        return options.get("num_agents", 0) >= tokens
    if form == "window2d":
        return _area(options.get("window", 0)) >= tokens
    if form == "neighborhood":
        return _area(options.get("kernel_size", 0)) >= tokens
    return False


def _filter_candidates(candidates: dict[str, list[dict]], tokens: int) -> dict[str, list[dict]]:
    out = {}
    for form, option_list in candidates.items():
        kept = [dict(o) for o in option_list if not _covers(form, o, tokens)]
        if kept:
            out[form] = kept
    return out


# ---------------------------------------------------------------------------- objectives


def _as_call(batch) -> tuple[tuple, dict]:
    from .calibrate import _as_call as as_call

    return as_call(batch)


def _outputs(fn, calls) -> list:
    with torch.no_grad():
        return [fn(*a, **kw) for a, kw in calls]


def mean_cosine(outputs: list, reference: list) -> float:
    """Mean over samples (dim 0 of every float output) of the cosine to the original's."""
    if len(outputs) != len(reference):
        raise ValueError(f"{len(outputs)} outputs for {len(reference)} reference outputs")
    cos = [sample_cosines(out, ref) for out, ref in zip(outputs, reference)]
    return float(torch.cat(cos).mean())


def measure_latency(gm, args: tuple, kwargs: dict, repeats: int = 3, warmup: int = 2) -> float:
    """Best of `repeats` timed calls (seconds) after `warmup` calls, no autograd."""
    with torch.no_grad():
        for _ in range(warmup):
            gm(*args, **kwargs)
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            gm(*args, **kwargs)
            best = min(best, time.perf_counter() - t0)
    return best


def relative_latency(gm, reference, args: tuple, kwargs: dict, repeats: int = 3, warmup: int = 2) -> float:
    """Time of `gm` over time of `reference` (the all-full model), their calls interleaved
    and each the best of `repeats`: a ratio that load on a shared machine shifts far less
    than either time."""
    with torch.no_grad():
        for _ in range(warmup):
            gm(*args, **kwargs)
            reference(*args, **kwargs)
        best = [math.inf, math.inf]
        for _ in range(repeats):
            for i, fn in enumerate((gm, reference)):
                t0 = time.perf_counter()
                fn(*args, **kwargs)
                best[i] = min(best[i], time.perf_counter() - t0)
    return best[0] / best[1]


def estimate_cost(choice: tuple[str, dict] | None, q_shape: tuple, k_shape: tuple) -> float:
    """Multiply-adds of one attention layer's score/value products (deterministic):
    full N·M·(D + Dv); linear N·D·Dv·2 (state and read-out); agent 2·n·(N + M)·D; sliding
    window N·(W + sinks)·2D; 2-D window N·w²·2D; neighbourhood N·k²·2D."""
    B, H, N, D = q_shape
    M = k_shape[2]
    bh = B * H
    if choice is None:
        return bh * N * M * 2 * D
    form, o = choice
    if form == "linear":
        width = 2 * (o.get("feature_dim") or D) if o.get("feature_map") == "hedgehog" else D
        return bh * (N + M) * width * D
    if form == "agent":
        n = min(o.get("num_agents") or 49, N)
        return bh * n * (N + M) * D * 2
    if form == "sliding_window":
        return bh * N * min(M, (o.get("window") or 512) + (o.get("sinks") if o.get("sinks") is not None else 4)) * 2 * D
    if form == "window2d":
        w = o.get("window") or 7
        w2 = w * w if isinstance(w, int) else w[0] * w[1]
        return bh * N * min(M, w2) * 2 * D
    if form == "neighborhood":
        k = o.get("kernel_size") or 7
        k2 = k * k if isinstance(k, int) else k[0] * k[1]
        return bh * N * min(M, k2) * 2 * D
    return bh * N * M * 2 * D


# ---------------------------------------------------------------------------- search


def search_policy(
    model: nn.Module,
    example_inputs: Any,
    data: Iterable,
    *,
    min_fidelity: float = 0.95,
    choices: dict[str, list[dict[str, Any]]] | None = None,
    n_trials: int = 30,
    seed: int = 0,
    latency: str | Callable = "measure",
    latency_inputs: Any = None,
    repeats: int = 3,
    fidelity: Callable[[list, list], float] | None = None,
    example_kwargs: dict | None = None,
    timeout: float | None = None,
    apply: bool = True,
    progress: bool = True,
) -> PolicySearchResult:
    """Find per-layer attention replacements on the latency/fidelity Pareto front.

    model, example_inputs (example_kwargs): the model and the inputs it is captured with.
    data: batches for the fidelity (each a tensor, a tuple of inputs, a dict of keyword
      inputs, or (args, kwargs)); the original model's outputs on them are the reference.
    min_fidelity: the chosen point is the fastest front point with at least this fidelity.
    choices: {form: [options, ...]} to search over (default DEFAULT_CHOICES, filtered to the
      model: windows and agent counts below the token count, forms that apply per layer).
    n_trials: trials beyond the uniform replacements and the all-full model, which are
      always evaluated first. seed: the sampler's seed (with latency="estimate" the whole
      search is deterministic). timeout: seconds for the searched trials (None: no limit).
    latency: "measure" (seconds on `latency_inputs`, default the example inputs: the all-full
      model's best of `repeats` calls, times the trial's ratio to it measured with their calls
      interleaved, so that load from other jobs cancels), "estimate" (`estimate_cost`: attention multiply-adds, deterministic), or a
      callable(graph_module, args, kwargs) -> float.
    fidelity: callable(outputs, reference_outputs) -> float over the batches' outputs
      (default `mean_cosine`).
    apply: rewrite the model with the chosen point (rewriter.optimize(..., attention=
      "per_layer", ...)) and return it as `.module`, the search recorded in its report.
    """
    import optuna

    if not 0.0 <= min_fidelity <= 1.0 and fidelity is None:
        raise ValueError(f"min_fidelity must be in [0, 1] for the default fidelity (mean cosine), got {min_fidelity}")
    if n_trials < 0:
        raise ValueError(f"n_trials must be >= 0, got {n_trials}")
    if not (latency in ("measure", "estimate") or callable(latency)):
        raise ValueError(f"latency must be 'measure', 'estimate' or a callable, not {latency!r}")
    t_start = time.perf_counter()
    args = example_inputs if isinstance(example_inputs, tuple) else (() if example_inputs is None else (example_inputs,))
    kwargs = dict(example_kwargs or {})
    calls = [_as_call(b) for b in data]
    if not calls:
        raise ValueError("search_policy needs at least one batch of data for the fidelity")
    lat_args, lat_kwargs = (args, kwargs) if latency_inputs is None else _as_call(latency_inputs)
    fidelity_fn = fidelity or mean_cosine

    base = _Base(model, args, kwargs)
    if not base.layers:
        raise ValueError("the model has no softmax attention site to replace")
    calls = [(a, base.optimized.call_kwargs(a, kw)) for a, kw in calls]  # as the graphs take them (no KV cache)
    lat_kwargs = base.optimized.call_kwargs(lat_args, lat_kwargs)
    from .verify import flat_inputs

    shapes = _token_count(base, flat_inputs(base.gm, lat_args, lat_kwargs))
    tokens = max(s[1][2] for s in shapes.values())
    candidates = _filter_candidates(choices if choices is not None else DEFAULT_CHOICES, tokens)
    per_layer = _applicable(base, candidates)
    labels = {i: [FULL] + [_label(f, o) for f, o in per_layer[i]] for i in per_layer}
    lookup = {_label(f, o): (f, o) for i in per_layer for f, o in per_layer[i]}
    reference = _outputs(base.optimized.reference, calls)

    cache: dict[tuple, Point] = {}
    baseline = [measure_latency(base.gm, lat_args, lat_kwargs, repeats) if latency == "measure" else 1.0]

    def evaluate(chosen: list[str], trial: int) -> Point:
        key = tuple(chosen)
        if key in cache:
            return cache[key]
        config = [None if c == FULL else lookup[c] for c in chosen]
        gm, _ = base.rewrite(config)
        if latency == "estimate":
            lat = float(sum(estimate_cost(c, *shapes[n]) for c, n in zip(config, base.nodes)))
        elif latency == "measure":
            lat = baseline[0] * relative_latency(gm, base.gm, lat_args, lat_kwargs, repeats)
        else:
            lat = float(latency(gm, lat_args, lat_kwargs))
        fid = float(fidelity_fn(_outputs(gm, calls), reference))
        uniform = chosen[0] if len(set(chosen)) == 1 else None
        point = cache[key] = Point(list(chosen), lat, fid, trial, uniform)
        return point

    def objective(trial: "optuna.Trial"):
        chosen = [trial.suggest_categorical(f"layer_{i}", labels[i]) for i in range(len(base.layers))]
        p = evaluate(chosen, trial.number)
        return p.latency, p.fidelity

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=min(10, max(n_trials, 1)))
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=sampler)
    uniform_labels = [FULL] + [lab for lab in dict.fromkeys(lookup) if all(lab in labels[i] for i in labels)]
    for lab in uniform_labels:
        study.enqueue_trial({f"layer_{i}": lab for i in range(len(base.layers))})
    total = len(uniform_labels) + n_trials
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=False)
        bar.start()
        task = bar.add_task("policy search", total=total)
        callbacks = [lambda study, trial: bar.advance(task)]
    else:
        callbacks = []
    try:
        study.optimize(objective, n_trials=len(uniform_labels), callbacks=callbacks)
        if n_trials:
            study.optimize(objective, n_trials=n_trials, timeout=timeout, callbacks=callbacks)
    finally:
        if bar is not None:
            bar.stop()

    points = list({id(p): p for p in cache.values()}.values())
    front = sorted([p for p in points if not any(o.dominates(p) for o in points)], key=lambda p: (p.latency, -p.fidelity))
    feasible = [p for p in front if p.fidelity >= min_fidelity]
    chosen = feasible[0] if feasible else None
    uniform = [cache[tuple([lab] * len(base.layers))] for lab in uniform_labels]
    for u in uniform:
        u.dominated_by = [p.trial for p in front if p.dominates(u)]
    options = None
    if chosen is not None and any(c != FULL for c in chosen.choices):
        options = {"attention": "per_layer",
                   **per_layer_options([None if c == FULL else lookup[c] for c in chosen.choices])}
    result = PolicySearchResult(front, chosen, uniform, points, base.layers,
                                {base.layers[i]: labels[i] for i in labels}, min_fidelity,
                                latency if isinstance(latency, str) else getattr(latency, "__name__", "callable"),
                                options)
    if apply:
        result.module = apply_policy(model, args, options, kwargs) if options else base.optimized
        result.seconds = time.perf_counter() - t_start
        result.module.report.verification["policy_search"] = result.to_dict()
    result.seconds = time.perf_counter() - t_start
    return result


def apply_policy(model: nn.Module, example_inputs: Any, options: dict[str, Any] | None,
                 example_kwargs: dict | None = None, **optimize_options):
    """rewriter.optimize with a searched policy's options (None: exact rewrites only)."""
    from .optimize import optimize

    options = dict(options or {})
    return optimize(model, example_inputs, example_kwargs=example_kwargs, **options, **optimize_options)
