"""optimize(): capture → exact passes (verified, rolled back where they fail) → module.

Without example inputs the model is captured on its first call, and again for each new
input signature, as torch.compile does.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils import _pytree as pytree

from .capture import Captured, capture, export_program, run_example
from .graph import (SOFTMAX, common_subexpressions, dead_code_elimination, remove_identities, normalise_torch_spellings, spell_out_arguments,
                    remember_model_state, spelled, strip_export_plumbing)
from .respell import respell_einsum, respell_softmax
from .hf_calls import generate as hf_generate, prepare_call
from .passes import PassContext, Rewrite, exact_passes
from .report import APPLIED, ROLLED_BACK, RewriteReport
from .compare import compare_outputs, error, within_tolerance
from .verify import flat_inputs, record

__all__ = ["optimize", "OptimizedModule", "rewrite_captured"]


def _verify_sites(gm: fx.GraphModule, rewrites: list[Rewrite], flat: list) -> None:
    """Compare each replacement with what it replaced, on the same inputs; undo failures."""
    if not rewrites:
        return
    with _seeded():  # a train-mode graph's dropouts must not draw from the caller's random stream
        values = record(gm, flat, [n for rw in rewrites for n in (rw.old, rw.new)])
    failed_groups = {}
    for rw in rewrites:
        new, old = values.get(rw.new), values.get(rw.old)
        if not (isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor)):
            _roll_back([rw], "the replacement could not be compared with the original (no tensor value)")
            if rw.group is not None:
                failed_groups[id(rw.group)] = rw.group
            continue
        err = error(new, old)
        prev = rw.site.error
        if not prev or err["rel_l2"] >= prev.get("rel_l2", 0.0):
            rw.site.error = err
        if not within_tolerance(err, old.dtype):
            _roll_back([rw], f"replacement differs from the original: rel_l2 {err['rel_l2']:.2e} > {old.dtype} tolerance")
            if rw.group is not None:
                failed_groups[id(rw.group)] = rw.group
    for group in failed_groups.values():
        members = [rw for rw in rewrites if rw.group is group and rw.site.status != ROLLED_BACK]
        _roll_back(members, "another site of the same residual stream failed its check")
        group.undo()


def _capture_hazard(model: nn.Module) -> str:
    """A known reason why a capture differs from the model's eager run, for the message."""
    for path, m in model.named_modules():
        if isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False) and not m.training:
            return (f" (nn.TransformerEncoder at {path or '<root>'} takes its nested-tensor fast path in eval mode with "
                    "a src_key_padding_mask: padded positions come out 0, which torch.export does not capture; build it "
                    "with enable_nested_tensor=False to have it rewritten)")
    return ""


@contextlib.contextmanager
def _seeded(seed: int = 0):
    """The same random stream for each verification run, the caller's stream left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _roll_back(rewrites: list[Rewrite], reason: str) -> None:
    for rw in reversed(rewrites):
        rw.roll_back()
        rw.site.roll_back(reason)


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of `graph` to restore if the rewritten whole fails (keeps export's pytree codegen)."""
    new = fx.Graph(owning_module=graph.owning_module, tracer_cls=graph._tracer_cls)
    new._codegen = copy.copy(graph._codegen)  # its pytree specs are never edited: shared, not deep-copied
    new.output(new.graph_copy(graph, {}))
    return new


def rewrite_captured(model: nn.Module, cap: Captured, options: dict[str, Any], verify: bool = True) -> tuple[fx.GraphModule, RewriteReport]:
    """Run the exact pipeline on a captured graph; verify every site and the outputs."""
    gm = cap.module
    remember_model_state(gm, model)
    untouched = _copy_graph(gm.graph)  # before any cleanup: what a failed whole is restored to
    strip_export_plumbing(gm.graph)
    spell_out_arguments(gm.graph)
    if cap.method == "symbolic_trace":
        normalise_torch_spellings(gm.graph)
    remove_identities(gm.graph)
    common_subexpressions(gm.graph)
    respelt = {"hand-written softmax": respell_softmax(gm.graph) if cap.method == "export" else 0}
    respelt["einsum"] = respell_einsum(gm.graph, cap.method)  # after: an einsum is respelt when next to a softmax
    dead_code_elimination(gm)  # dead reads (e.g. unused attention weights) would hide sites
    report = RewriteReport(capture={"method": cap.method, "dynamic_dims": cap.dynamic_dims, "notes": cap.notes,
                                    "respelt": {k: v for k, v in respelt.items() if v},
                                    # each has a report row: attention applied or refused, or not attention
                                    "softmax": sum(1 for n in gm.graph.nodes if spelled(n, SOFTMAX))})
    args, kwargs = cap.example_args, cap.example_kwargs
    flat = flat_inputs(gm, args, kwargs)
    with _seeded():  # train mode: dropout draws the same masks in the model and in the graph
        expected = run_example(model, args, cap.model_kwargs(kwargs)) if verify else None  # ExampleInputsError if they do not fit
    ctx = PassContext(gm, cap.method, report, dict(options), flat_inputs=flat if verify else None, training=model.training)
    done: list[Rewrite] = []
    for p in exact_passes(options.get("norm", "auto")):
        rewrites = p.run(ctx)
        gm.recompile()
        if verify:
            _verify_sites(gm, rewrites, flat)
        report.passes[p.name] = sum(1 for rw in rewrites if rw.site.status != ROLLED_BACK)
        done.extend(rewrites)
        dead_code_elimination(gm)  # replaced nodes go: the next pass sees one clean graph
    if verify:
        with torch.no_grad(), _seeded():
            result = compare_outputs(gm(*args, **kwargs), expected)
        if not result["ok"]:  # every site held on its own but not together: keep none
            changed = [rw.site for rw in done] + [rw.group.site for rw in done if rw.group is not None]
            for site in dict.fromkeys(changed):
                if site.status == APPLIED:
                    site.roll_back(f"model output differed (rel_l2 {result['rel_l2']:.2e}) with every site applied")
            report.passes = dict.fromkeys(report.passes, 0)  # nothing applied stays
            gm.graph = untouched
            gm.recompile()
            with torch.no_grad(), _seeded():
                result = compare_outputs(gm(*args, **kwargs), expected)
            if not result["ok"]:  # the capture itself is not the model: it will not be used
                result["capture_differs"] = True
                result["reason"] = ("the captured graph, with no rewrite, does not compute what the model does on the "
                                    "example inputs" + _capture_hazard(model))
        report.verification["output"] = result
    else:
        report.verification["output"] = {"ok": None, "reason": "verify=False"}
    if options.get("attention"):
        _approximate(model, gm, ctx, options, flat, args, kwargs, cap.fixed_kwargs, verify)
    dead_code_elimination(gm)
    return gm, report


def _approximate(model, gm, ctx, options, flat, args, kwargs, fixed: dict, verify: bool) -> None:
    """The opt-in approximate attention rewrite, with its end-to-end error measured
    (verify=False skips the measurements: they cost a full-attention forward each)."""
    from .passes import approximate
    from .passes.policy import Policy

    policy = Policy.from_options(options.get("layers"), options.get("attention_options", {}))
    rewrites = approximate.run(ctx, options["attention"], policy, flat, measure=verify)
    ctx.report.passes[f"approximate:{options['attention']}"] = sum(1 for rw in rewrites if rw.site.status == APPLIED)
    dead_code_elimination(gm)
    if not verify:
        ctx.report.verification["approximate_output"] = {"reason": "not measured: verify=False"}
        return
    with torch.no_grad():
        expected = model(*args, **kwargs, **fixed)
        result = compare_outputs(gm(*args, **kwargs), expected)
    ctx.report.verification["approximate_output"] = {k: v for k, v in result.items() if k != "ok"}


def _signature(args, kwargs) -> tuple:
    leaves, spec = pytree.tree_flatten((args, kwargs))
    sig = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            sig.append(("T", x.dtype, x.device.type, x.dim()))
        else:
            sig.append(("V", type(x).__name__, x if isinstance(x, (int, float, bool, str, type(None))) else None))
    return (str(spec), tuple(sig))


@dataclass
class _Entry:
    gm: fx.GraphModule
    report: RewriteReport
    captured: Captured
    _inputs: list | None = None  # the placeholders' example values

    @property
    def fallback(self) -> bool:
        """The capture is not the model (verification of the unrewritten graph failed): call the model."""
        return bool(self.report.verification.get("output", {}).get("capture_differs"))

    def fits(self, args, kwargs) -> bool:
        """Whether the inputs have the sizes this graph was captured for (its static dims:
        export specialises e.g. a batch of 1, symbolic_trace every size)."""
        if self._inputs is None:
            self._inputs = [n.meta.get("val") for n in self.gm.graph.nodes if n.op == "placeholder"]
        try:
            flat = flat_inputs(self.gm, args, kwargs)
        except Exception:  # noqa: BLE001 - another structure: another capture
            return False
        if len(flat) != len(self._inputs):
            return False
        for v, x in zip(self._inputs, flat):
            if isinstance(v, torch.Tensor) and isinstance(x, torch.Tensor):
                if v.dim() != x.dim() or any(is_concrete_int(s) and int(s) != xs for s, xs in zip(v.shape, x.shape)):
                    return False
        return True


class OptimizedModule(nn.Module):
    """The rewritten model. Call it like the original; `.report` says what was done.

    Captures lazily: each new input signature (structure, dtypes, ranks) is captured and
    rewritten on its first call; batch and sequence sizes stay dynamic where the model allows.
    """

    def __init__(self, model: nn.Module, options: dict[str, Any], verify: bool = True):
        super().__init__()
        object.__setattr__(self, "_original", model)  # not a submodule: no duplicate state
        self._options = options
        self._verify = verify
        self._entries: dict[tuple, _Entry] = {}
        self._last: _Entry | None = None
        self.training = model.training  # the mode the graphs are captured in, as the model's

    def train(self, mode: bool = True) -> "OptimizedModule":
        """Set the mode of this module and of the model; each mode has its own graphs (train
        mode keeps dropout active, as the model's forward does), captured on first use."""
        self.training = bool(mode)
        self._original.train(mode)
        return self

    def _find(self, args, kwargs) -> _Entry | None:
        sig = (_signature(args, kwargs), self.training)
        return next((e for (s, _), e in self._entries.items() if s == sig and e.fits(args, kwargs)), None)

    def call_kwargs(self, args: tuple, kwargs: dict) -> dict:
        """The keyword arguments the graphs are captured and called with for a call
        `opt(*args, **kwargs)`: the KV cache off where the model takes one (`hf_calls`)."""
        return prepare_call(self._original, args, kwargs)[0]

    def reference(self, *args, **kwargs):
        """The original model called as the graphs compute it (KV cache off): what the
        optimised model is verified against."""
        graph_kwargs, fixed, _ = prepare_call(self._original, args, kwargs)
        return self._original(*args, **graph_kwargs, **fixed)

    def _entry_for(self, args, kwargs) -> _Entry:
        """The graph for a call whose kwargs went through `call_kwargs` (captured if new)."""
        entry = self._find(args, kwargs)
        if entry is None:  # a new signature, or sizes the graphs captured so far were specialised against
            entry = self._capture(args, kwargs)
        self._last = entry
        return entry

    def _capture(self, args, kwargs) -> _Entry:
        if self._original.training != self.training:  # the model's mode was set directly: this module's decides
            self._original.train(self.training)
        _, fixed, notes = prepare_call(self._original, args, kwargs)
        cap = capture(self._original, args, kwargs, dynamic=self._options.get("dynamic", True), fixed_kwargs=fixed)
        cap.notes.extend(notes)
        gm, report = rewrite_captured(self._original, cap, self._options, self._verify)
        if report.verification["output"].get("capture_differs"):
            warnings.warn(f"rewriter: {report.verification['output']['reason']}; this optimised module calls "
                          f"{type(self._original).__name__} itself for these inputs (nothing is rewritten)",
                          RuntimeWarning, stacklevel=4)
        entry = self._entries[((_signature(args, kwargs), self.training), len(self._entries))] = _Entry(gm, report, cap)
        self.add_module(f"graph_{len(self._entries) - 1}", gm)
        self._last = entry
        return entry

    def forward(self, *args, **kwargs):
        given = kwargs
        kwargs = self.call_kwargs(args, kwargs)
        entry = self._entry_for(args, kwargs)
        if entry.fallback:
            return self.reference(*args, **given)
        try:
            return entry.gm(*args, **kwargs)
        except AssertionError as e:  # export's input guards run first: nothing was computed yet
            if not str(e).startswith("Guard failed"):
                raise
        # the inputs break a condition the graph was captured under (e.g. a relation between sizes):
        # capture for them (ExampleInputsError if the model itself rejects them)
        return self._capture(args, kwargs).gm(*args, **kwargs)

    @property
    def report(self) -> RewriteReport:
        if self._last is None:
            return RewriteReport(verification={"note": "not captured yet: call the module once (or pass example_inputs)"})
        return self._last.report

    @property
    def graph_module(self) -> fx.GraphModule:
        if self._last is None:
            raise RuntimeError("not captured yet: call the module once, or pass example_inputs to optimize()")
        return self._last.gm

    def export(self, *args, **kwargs) -> torch.export.ExportedProgram:
        """Re-export the rewritten graph (e.g. to save it as .pt2 with torch.export.save),
        with the batch and sequence dims dynamic as they were captured."""
        return self._export(args, kwargs, dims=2)

    def generate(self, *args, **kwargs):
        """The original model's `generate()` running this optimised forward, without a KV
        cache: every step re-runs the whole sequence (greedy decoding gives the original's
        tokens under exact rewrites). The report's capture notes say so."""
        return hf_generate(self, self._original, args, kwargs)

    def _export(self, args: tuple, kwargs: dict, dims: int) -> torch.export.ExportedProgram:
        if args or kwargs:
            kwargs = self.call_kwargs(args, kwargs)
        entry = self._find(args, kwargs) if args or kwargs else self._last
        if entry is None:
            entry = self._entry_for(args, kwargs)
        a = args or entry.captured.example_args
        kw = kwargs or entry.captured.example_kwargs
        return export_program(entry.gm, a, kw, dims if entry.captured.dynamic_dims else 0)

    def __repr__(self) -> str:
        return f"OptimizedModule({type(self._original).__name__}, captured={len(self._entries)})"


def optimize(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    norm: str | None = "auto",
    attention: str | None = None,
    layers: Any = None,
    verify: bool = True,
    example_kwargs: dict | None = None,
    dynamic: bool = True,
    autotune: bool = False,
    **attention_options,
) -> OptimizedModule:
    """Rewrite `model`'s attention and normalisation sites; return a module with `.report`.

    example_inputs: a tensor or tuple of positional inputs; None captures on the first call.
    norm: "auto" converts Pre-LN residual streams to Pre-RMSNorm where that is provably
      exact, "crms" to Pre-CRMSNorm, "keep" leaves LayerNorms as LayerNorms.
    attention: an approximate attention rewrite, off unless asked: "linear", "agent",
      "sliding_window", "window2d" or "neighborhood". Each site's error and the model's
      output error are measured on the example inputs and reported.
    layers: which attention layers to rewrite ("all", indices, module-path globs, or a
      callable(index, path)); with keep_first=k, keep_last=k, alternate=k in the options.
    **attention_options: the form's parameters (e.g. window=256, sinks=4,
      feature_map="focused"); a list gives one value per layer, a callable f(layer) computes it.
    verify: check every exact rewrite numerically on the example inputs (roll back failures).
    autotune: tune the kernels the rewritten model calls, on the example inputs' device, and
      store the configs in that device's cache (`rewriter.autotune`; result in
      `.autotune_report`). Off by default: inference never tunes unless asked.
    """
    if not isinstance(model, nn.Module):
        hint = ""
        if isinstance(model, torch.export.ExportedProgram):
            hint = "; for an ExportedProgram pass ep.module() (its example inputs are ep.example_inputs)"
        elif isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            hint = "; load a saved .pt2 with torch.export.load(path).module() first"
        raise TypeError(f"optimize() takes a torch.nn.Module, got {type(model).__name__}{hint}")
    if norm not in ("auto", "crms", "keep", None):
        raise ValueError(f"norm must be 'auto', 'crms' or 'keep', not {norm!r}")
    if attention is not None:
        from .passes import approximate
        from .passes.policy import Policy

        approximate.check_options(approximate.form(attention), attention_options)
        Policy.from_options(layers, attention_options)  # raises on a malformed policy now, not at first call
    elif attention_options or layers is not None:
        raise ValueError(f"options {sorted(attention_options) or ['layers']} need an approximate attention= form")
    options = {"norm": norm, "layers": layers, "dynamic": dynamic, "attention": attention,
               "attention_options": attention_options}
    if autotune and example_inputs is None:
        raise ValueError("autotune=True needs example_inputs: the kernels are tuned on the shapes the model is called with")
    opt = OptimizedModule(model, options, verify)
    if example_inputs is not None or example_kwargs:
        args = example_inputs if isinstance(example_inputs, tuple) else (() if example_inputs is None else (example_inputs,))
        opt._entry_for(args, opt.call_kwargs(args, dict(example_kwargs or {})))
        if autotune:
            from .autotune import autotune as _autotune

            opt.autotune_report = _autotune(opt, args)
    return opt
