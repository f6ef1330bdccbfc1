"""calibrate(): fit the parameters an approximate attention rewrite introduced (attention transfer).

An approximate rewrite that asks for it (`attention="linear", feature_map="hedgehog"`;
`attention="agent", learnable="temperature" | "projection"`) puts new parameters in the
graph, in plain torch ops before its `rewriter::` op: Hedgehog's per-head feature maps,
per-head temperatures, agent projections. They are ordinary parameters of the rewritten
graph module, so they train with autograd, save with `.pt2` and export to ONNX.

Calibration is layer by layer first, as Hedgehog and LoLCATs do: each rewritten site is fed
the inputs the *original* model gives it (its q, k, v, mask, recorded by running the graph
with every approximate site computing exact softmax attention instead: "teacher forcing"),
and its parameters are trained so that its output matches softmax attention (relative MSE
over the real query rows), plus the KL divergence of its attention weights from softmax's
where those are cheap to form (ops linear in v: the weights are the op applied to v = I).
Sites are independent given teacher-forced inputs, so each trains on its own. An optional
end-to-end stage then trains every introduced parameter together so the model's outputs
match the original's. Only introduced parameters ever change.

    report = rewriter.calibrate(opt, model, batches, steps=200, held_out=other_batches)
    print(report)             # per layer: error before and after, on the held-out batches
"""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn
from .compare import pairs, sample_cosines, squared_error
from .passes.approximate import SITE_META
from .verify import flat_inputs

__all__ = ["calibrate", "CalibrationReport", "LayerCalibration", "softmax_attention"]

TINY = 1e-12


# ---------------------------------------------------------------------------- report


@dataclass
class LayerCalibration:
    """One rewritten attention site: its error against softmax attention before and after.

    Errors are over the real query rows of the evaluation batches, with the site fed the
    original model's inputs: rel_l2 = ‖o - o_softmax‖ / ‖o_softmax‖, cosine, and kl (mean
    KL divergence of the attention weights, per query row) where the op's weights are cheap.
    """

    layer: int
    location: str
    action: str
    params: list[str]
    trainable: int  # number of scalars trained
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    final_loss: float | None = None


@dataclass
class CalibrationReport:
    layers: list[LayerCalibration] = field(default_factory=list)
    output: dict[str, dict[str, float]] = field(default_factory=dict)  # "before", "after_layerwise", "after"
    evaluated_on: str = "held_out"  # or "calibration" when no held-out batches were given
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # wall and CPU (process) time

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [asdict(layer) for layer in self.layers], "output": self.output,
                "evaluated_on": self.evaluated_on, "settings": self.settings, "seconds": self.seconds}

    def table(self):
        from rich.table import Table

        t = Table(title=f"calibration (errors on {self.evaluated_on} batches, vs softmax attention)")
        for col in ("layer", "location", "action", "trained", "rel_l2 before", "rel_l2 after", "kl before", "kl after"):
            t.add_column(col, overflow="fold")

        def f(d, k):
            return f"{d[k]:.3g}" if d.get(k) is not None else "—"

        for r in self.layers:
            t.add_row(str(r.layer), r.location, r.action, str(r.trainable), f(r.before, "rel_l2"), f(r.after, "rel_l2"),
                      f(r.before, "kl"), f(r.after, "kl"))
        return t

    def summary(self) -> str:
        parts = []
        for stage in ("before", "after_layerwise", "after"):
            o = self.output.get(stage)
            if o:
                parts.append(f"output {stage}: rel_l2 {o['rel_l2']:.3g}, cosine {o['cosine']:.4f}")
        s = self.seconds
        if s:
            parts.append(f"{s.get('wall', 0):.1f} s wall, {s.get('cpu', 0):.1f} s CPU")
        return "; ".join(parts)

    def __str__(self) -> str:
        from .report import plain_text

        return plain_text(self.table(), self.summary())


# ---------------------------------------------------------------------------- attention


def softmax_attention(q, k, v, key_mask=None, scale: float | None = None, causal: bool = False):
    """Exact softmax attention and its weights, in fp32: (o [B, H, Nq, Dv], p [B, H, Nq, Nk]).

    The function an approximate site replaced (its mask is at most causal + key padding,
    as the approximate pass accepts no other). Rows with no visible key give zeros."""
    acc = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    visible = None
    if key_mask is not None:
        visible = key_mask.reshape(key_mask.shape[0], 1, 1, -1).to(torch.bool)
    if causal:
        tril = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        visible = tril if visible is None else visible & tril
    if visible is not None:
        s = s.masked_fill(~visible, torch.finfo(acc).min)
    p = s.softmax(-1)
    if visible is not None:
        p = p * visible.any(-1, keepdim=True)
    return p @ v, p


# ---------------------------------------------------------------------------- sites


class _Site:
    """A rewritten site: its replacement node, the subgraph from its inputs to it (the
    introduced parameters' computation, ending in the op), and that subgraph as a module."""

    def __init__(self, gm: fx.GraphModule, node: fx.Node):
        info = node.meta[SITE_META]
        if any(isinstance(a, fx.Node) and a.graph is not node.graph for a in (info["q"], info["k"], info["v"])):
            raise ValueError(f"the site record of {info['location']} points into another graph (a copied graph "
                             "module?): calibrate the module rewriter.optimize() returned")
        self.node, self.info = node, info
        self.learnable = [n for n in info["learnable"] if _has_param(gm, n)]
        owners = {n for n in gm.graph.nodes if n.op == "get_attr" and n.target in self.learnable}
        depends: dict[fx.Node, bool] = {}
        for n in gm.graph.nodes:
            depends[n] = n in owners or any(depends.get(a, False) for a in n.all_input_nodes)
        inside, stack = {node}, [node]
        while stack:  # ancestors of the op computed from an introduced parameter
            for a in stack.pop().all_input_nodes:
                if a not in inside and a not in owners and depends.get(a):
                    inside.add(a)
                    stack.append(a)
        order = [n for n in gm.graph.nodes if n in inside]
        self.inside = set(order)
        self.frontier = list(dict.fromkeys(a for n in order for a in n.all_input_nodes
                                           if a not in self.inside and a not in owners))
        graph = fx.Graph()
        env = {a: graph.placeholder(f"in_{i}") for i, a in enumerate(self.frontier)}
        for o in owners:
            env[o] = graph.get_attr(o.target)
        for n in order:
            env[n] = graph.node_copy(n, lambda a: env[a])
        graph.output(env[node])
        self.module = fx.GraphModule(gm, graph)  # shares the parameters with gm
        self.params = [p for name, p in gm.named_parameters(remove_duplicate=False) if name in self.learnable]
        self.raw = [info["q"], info["k"], info["v"], info["key_mask"]]
        self.v_index = self.frontier.index(info["v"]) if info["v"] in self.frontier else None
        args = node.args
        linear_in_v = info["action"] == "agent_attention" or (
            info["action"] == "linear_attention" and len(args) > 6 and args[6] == "denominator")
        self.has_weights = linear_in_v and self.v_index is not None

    def student(self, inputs: list):
        return self.module(*inputs)

    def weights(self, inputs: list):
        """The op's attention weights [B, H, Nq, Nk]: the op applied to v = I (it is linear in v)."""
        v = inputs[self.v_index]
        B, Hk, Nk = v.shape[0], v.shape[1], v.shape[2]
        eye = torch.eye(Nk, dtype=v.dtype, device=v.device).expand(B, Hk, Nk, Nk)
        return self.module(*[eye if i == self.v_index else x for i, x in enumerate(inputs)])


def _has_param(gm: nn.Module, name: str) -> bool:
    try:
        return isinstance(gm.get_parameter(name), nn.Parameter)
    except AttributeError:
        return False


@dataclass
class _Record:
    inputs: list  # the site's frontier values (teacher-forced)
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_mask: torch.Tensor | None
    target: torch.Tensor  # exact softmax attention [B, H, Nq, Dv]


def _teacher_run(gm: fx.GraphModule, sites: list[_Site], flat: list) -> tuple[Any, dict[_Site, _Record]]:
    """Run the graph with every approximate site computing exact softmax attention (the
    original model's function); record each site's inputs and its softmax output."""
    by_node = {s.node: s for s in sites}
    skip = set().union(*(s.inside for s in sites)) - set(by_node)
    wanted = {a for s in sites for a in (*s.frontier, *s.raw) if isinstance(a, fx.Node)}
    kept: dict[fx.Node, Any] = {}
    records: dict[_Site, _Record] = {}

    class _Teacher(fx.Interpreter):
        def run_node(self, n):
            if n in skip:
                return None
            site = by_node.get(n)
            if site is None:
                out = super().run_node(n)
            else:
                info = site.info
                q, k, v, km = (kept.get(a) if isinstance(a, fx.Node) else a for a in site.raw)
                out, _ = softmax_attention(q, k, v, km, info["scale"], info["causal"])
                out = out.to(q.dtype)
                records[site] = _Record([kept[a] if isinstance(a, fx.Node) else a for a in site.frontier],
                                        q, k, v, km, out)
            if n in wanted:
                kept[n] = out
            return out

    with torch.no_grad():
        result = _Teacher(gm, garbage_collect_values=True).run(*flat)
    return result, records


def _row_mask(r: _Record) -> torch.Tensor | None:
    """[B, Nq] real query rows (padding rows never reach a pooled or masked output)."""
    if r.key_mask is not None and r.key_mask.shape[-1] == r.q.shape[2]:
        return r.key_mask.to(torch.bool)
    return None


def _rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """[B, H, N, X] -> [real rows, H, X]."""
    x = x.transpose(1, 2)
    return x[rows] if rows is not None else x.reshape(-1, *x.shape[2:])


def _site_losses(site: _Site, r: _Record, kl_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    rows = _row_mask(r)
    out = _rows(site.student(r.inputs).float(), rows)
    tgt = _rows(r.target.float(), rows)
    diff = (out - tgt).pow(2).sum()
    norm = tgt.pow(2).sum().clamp_min(TINY)
    parts = {"sq_err": diff, "sq_ref": norm, "dot": (out * tgt).sum(), "sq_out": out.pow(2).sum()}
    loss = diff / norm
    if site.has_weights and kl_weight > 0:
        _, p = softmax_attention(r.q, r.k, r.v, r.key_mask, site.info["scale"], site.info["causal"])
        w = site.weights(r.inputs).float().clamp_min(0)
        p, w = _rows(p, rows), _rows(w, rows)
        kl = (p * (torch.log(p.clamp_min(TINY)) - torch.log(w.clamp_min(TINY)))).sum(-1)  # [rows, H]
        parts["kl_sum"], parts["kl_rows"] = kl.sum(), torch.tensor(float(kl.numel()))
        loss = loss + kl_weight * kl.mean()
    return loss, parts


def _evaluate_site(site: _Site, records: list[_Record]) -> dict[str, float]:
    tot: dict[str, float] = {}
    with torch.no_grad():
        for r in records:
            _, parts = _site_losses(site, r, kl_weight=1.0)
            for key, val in parts.items():
                tot[key] = tot.get(key, 0.0) + float(val)
    out = {"rel_l2": (tot["sq_err"] / max(tot["sq_ref"], TINY)) ** 0.5,
           "cosine": tot["dot"] / max((tot["sq_ref"] * tot["sq_out"]) ** 0.5, TINY)}
    if "kl_sum" in tot:
        out["kl"] = tot["kl_sum"] / max(tot["kl_rows"], 1.0)
    return out


# ---------------------------------------------------------------------------- outputs


def _output_error(actual, expected) -> dict[str, float]:
    """rel_l2 over every float output, and the mean per-sample cosine (dim 0 = batch)."""
    diff, ref = squared_error(actual, expected)
    cos = sample_cosines(actual, expected)
    return {"rel_l2": (diff / max(ref, TINY)) ** 0.5, "cosine": float(cos.mean()) if cos.numel() else 1.0,
            "_sq_err": diff, "_sq_ref": ref}


def _mean_output_error(errs: list[dict[str, float]]) -> dict[str, float]:
    if not errs:
        return {}
    diff, ref = sum(e["_sq_err"] for e in errs), sum(e["_sq_ref"] for e in errs)
    return {"rel_l2": (diff / max(ref, TINY)) ** 0.5, "cosine": sum(e["cosine"] for e in errs) / len(errs)}


def _rel_mse(actual, expected) -> torch.Tensor:
    both = [(x, y) for _, x, y in pairs(actual, expected) if isinstance(y, torch.Tensor) and y.is_floating_point()]
    diff = sum((x.float() - y.float()).pow(2).sum() for x, y in both)
    return diff / sum(y.float().pow(2).sum() for _, y in both).clamp_min(TINY)


# ---------------------------------------------------------------------------- calibrate


def _as_call(batch) -> tuple[tuple, dict]:
    """A batch as (args, kwargs): a tensor, a tuple/list of positional inputs, a dict of
    keyword inputs, or an explicit (args_tuple, kwargs_dict) pair."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, dict):
        return (), dict(batch)
    if (isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], (tuple, list))
            and isinstance(batch[1], dict)):
        return tuple(batch[0]), dict(batch[1])
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    raise TypeError(f"a batch must be a tensor, a tuple of inputs, a dict of keyword inputs or (args, kwargs); "
                    f"got {type(batch).__name__}")


class _Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), transient=False)
            self.bar.__enter__()
        return self

    def task(self, description: str, total: int):
        return self.bar.add_task(description, total=total, loss="—") if self.bar else None

    def advance(self, task, loss: float | None = None):
        if self.bar is not None:
            self.bar.update(task, advance=1, **({"loss": f"{loss:.4g}"} if loss is not None else {}))

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


def calibrate(
    optimized,
    original: nn.Module | None,
    batches: Iterable,
    *,
    steps: int = 200,
    lr: float = 1e-2,
    held_out: Iterable | None = None,
    kl_weight: float = 1.0,
    end_to_end_steps: int = 0,
    end_to_end_lr: float | None = None,
    progress: bool = True,
    seed: int = 0,
    threads: int | None = None,
) -> CalibrationReport:
    """Train the parameters `optimized`'s approximate rewrite introduced; return the errors.

    optimized: a module from `rewriter.optimize(..., attention=...)` whose rewrite introduced
      parameters (feature_map="hedgehog" for linear attention; learnable="temperature" or
      "projection" for agent attention). Its other parameters never change.
    original: the model it was made from, for the end-to-end stage's targets and the output
      errors (None: the rewritten graph with exact softmax attention at every approximate
      site, which is the original up to the verified exact rewrites).
    batches: calibration inputs, each a tensor, a tuple of positional inputs, a dict of
      keyword inputs, or (args, kwargs). held_out: the same, for the before/after errors
      (None: measured on the calibration batches, and the report says so).
    steps, lr: Adam steps and learning rate per site (layer-wise stage; the batches are
      cycled). kl_weight: weight of the attention-weight KL term next to the output's
      relative MSE (sites whose op is linear in v). end_to_end_steps, end_to_end_lr: a
      second stage training every introduced parameter on the model outputs' relative MSE
      against `original` (0 = off; lr defaults to lr / 10).
    progress: show a progress bar (rich). seed: seeds torch's RNG for the run.
    threads: torch's intra-op threads for the run (restored after; None: unchanged). The
      layer-wise stage works on one layer's small tensors, where one thread is often the
      fastest, and much the fastest on a machine other jobs share.

    Returns a CalibrationReport (per-layer errors before and after, output errors, timings);
    it is also stored in `optimized.report.verification["calibration"]`.
    """
    from .optimize import OptimizedModule

    if not isinstance(optimized, OptimizedModule):
        raise TypeError(f"calibrate takes the module rewriter.optimize() returned, not {type(optimized).__name__}")
    if steps < 0 or end_to_end_steps < 0:
        raise ValueError(f"steps and end_to_end_steps must be >= 0 (got {steps}, {end_to_end_steps})")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    calls = [_as_call(b) for b in batches]
    if not calls:
        raise ValueError("calibrate needs at least one calibration batch")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _calibrate(optimized, original, calls, held_out, steps, lr, kl_weight, end_to_end_steps,
                          end_to_end_lr, progress, seed)
    finally:
        torch.set_num_threads(previous)


def _calibrate(optimized, original, calls, held_out, steps, lr, kl_weight, end_to_end_steps, end_to_end_lr,
               progress, seed) -> CalibrationReport:
    evals = [_as_call(b) for b in held_out] if held_out is not None else calls
    calls = [(a, optimized.call_kwargs(a, kw)) for a, kw in calls]  # as the graphs take them (no KV cache)
    evals = [(a, optimized.call_kwargs(a, kw)) for a, kw in evals]
    torch.manual_seed(seed)
    wall0, cpu0 = time.perf_counter(), time.process_time()

    entries = {}
    for args, kwargs in itertools.chain(calls, evals):
        entry = optimized._entry_for(args, kwargs)
        entries.setdefault(id(entry), entry)
    if len(entries) != 1:
        raise ValueError("the calibration and held-out batches must share one input signature (structure, dtypes, "
                         "ranks): each signature is a separate capture with its own parameters")
    entry = next(iter(entries.values()))
    gm = entry.gm
    sites = [_Site(gm, n) for n in gm.graph.nodes if SITE_META in n.meta and n.users]
    if not any(s.learnable for s in sites):
        raise ValueError("this rewrite introduced no parameters to calibrate: use attention='linear' with "
                         "feature_map='hedgehog', or attention='agent' with learnable='temperature' or 'projection'")

    def teacher(pairs):
        outs, recs = [], []
        for args, kwargs in pairs:
            out, rec = _teacher_run(gm, sites, flat_inputs(gm, args, kwargs))
            if original is not None:
                with torch.no_grad():
                    out = original(*args, **entry.captured.model_kwargs(kwargs))
            outs.append(out)
            recs.append(rec)
        return outs, recs

    train_out, train_rec = teacher(calls)
    eval_out, eval_rec = (train_out, train_rec) if evals is calls else teacher(evals)

    def outputs_error():
        with torch.no_grad():
            return _mean_output_error([_output_error(gm(*a, **kw), ref) for (a, kw), ref in zip(evals, eval_out)])

    report = CalibrationReport(evaluated_on="held_out" if held_out is not None else "calibration",
                               settings={"steps": steps, "lr": lr, "kl_weight": kl_weight,
                                         "end_to_end_steps": end_to_end_steps,
                                         "end_to_end_lr": end_to_end_lr if end_to_end_lr is not None else lr / 10,
                                         "threads": torch.get_num_threads(), "batches": len(calls),
                                         "held_out_batches": len(evals) if held_out is not None else 0})
    report.output["before"] = outputs_error()
    layers = {}
    for s in sites:
        layers[s] = LayerCalibration(s.info["layer"], s.info["location"], s.info["action"], list(s.learnable),
                                     sum(p.numel() for p in s.params),
                                     before=_evaluate_site(s, [r[s] for r in eval_rec]))

    with _Progress(progress) as bar:
        for s in sites:
            if not s.params or steps == 0:
                continue
            opt = torch.optim.Adam(s.params, lr=lr)
            task = bar.task(f"layer {s.info['layer']} ({s.info['action']})", steps)
            data = [r[s] for r in train_rec]
            last = None
            for step in range(steps):
                with torch.enable_grad():
                    loss, _ = _site_losses(s, data[step % len(data)], kl_weight)
                    opt.zero_grad(set_to_none=True)
                    loss.backward(inputs=s.params)
                opt.step()
                last = float(loss.detach())
                bar.advance(task, last)
            layers[s].steps, layers[s].final_loss = steps, last
        if end_to_end_steps:
            report.output["after_layerwise"] = outputs_error()
            _end_to_end(gm, sites, calls, train_out, end_to_end_steps,
                        end_to_end_lr if end_to_end_lr is not None else lr / 10, bar)

    for s in sites:
        layers[s].after = _evaluate_site(s, [r[s] for r in eval_rec])
    report.output["after"] = outputs_error()
    report.layers = [layers[s] for s in sites]
    report.seconds = {"wall": round(time.perf_counter() - wall0, 3), "cpu": round(time.process_time() - cpu0, 3)}
    _record(entry, report, original)
    return report


def _end_to_end(gm, sites, calls, targets, steps: int, lr: float, bar) -> None:
    """Every introduced parameter together, on the outputs' relative MSE; the model's own
    parameters are frozen for the duration (they may be the user's model's tensors)."""
    params = [p for s in sites for p in s.params]
    ids = {id(p) for p in params}
    frozen = [p for p in gm.parameters() if id(p) not in ids and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        opt = torch.optim.Adam(params, lr=lr)
        task = bar.task("end to end", steps)
        for step in range(steps):
            i = step % len(calls)
            args, kwargs = calls[i]
            with torch.enable_grad():
                loss = _rel_mse(gm(*args, **kwargs), targets[i])
                opt.zero_grad(set_to_none=True)
                loss.backward(inputs=params)
            opt.step()
            bar.advance(task, float(loss.detach()))
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _record(entry, report: CalibrationReport, original) -> None:
    """Put the calibration into the rewrite report: its summary, each site's new error, and
    the example inputs' output error re-measured."""
    rep = entry.report
    rep.verification["calibration"] = report.to_dict()
    by_location = {(r.location, r.layer): r for r in report.layers}
    for site in rep.sites:
        for (loc, _), r in by_location.items():
            if site.location == loc and site.pass_name.startswith("approximate:") and site.status == "applied":
                site.error = {**site.error, "calibrated": {"before": r.before, "after": r.after,
                                                           "on": report.evaluated_on}}
    if original is not None and "approximate_output" in rep.verification:
        from .compare import compare_outputs

        args, kwargs = entry.captured.example_args, entry.captured.example_kwargs
        with torch.no_grad():
            result = compare_outputs(entry.gm(*args, **kwargs), original(*args, **entry.captured.model_kwargs(kwargs)))
        rep.verification["approximate_output"] = {**{k: v for k, v in result.items() if k != "ok"},
                                                  "after": "calibration"}
