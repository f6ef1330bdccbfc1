"""`rewriter inspect`: the rewrite pipeline run as a dry run, and what it found — attention
sites with the way each was spelled, norms with whether Pre-LN → RMSNorm holds for them,
residual streams and passes — as data (`inspect_model`) and as tables (`render`)."""
from __future__ import annotations

import re

from ._model_source import ModelSource, UsageError

__all__ = ["inspect_model", "render"]


_SCORES = ("matmul", "bmm", "baddbmm")
_PASSTHROUGH = {"to", "_to_copy", "type_as", "float", "type", "contiguous", "clone", "dropout", "alias"}


def _op_name(n) -> str:
    import torch.fx as fx

    if not isinstance(n, fx.Node):
        return ""
    if n.op == "call_method":
        return str(n.target)
    if n.op != "call_function":
        return n.op
    target = getattr(n.target, "overloadpacket", None) or n.target
    return getattr(target, "__name__", str(target))


def _scores_path(x, depth: int = 6) -> list[str] | None:
    """The steps from the q·kᵀ product to `x` (scale, mask, casts skipped), searched backwards."""
    import torch.fx as fx

    name = _op_name(x)
    if name in _SCORES:
        return [name]
    if depth == 0 or not isinstance(x, fx.Node) or x.op not in ("call_function", "call_method"):
        return None
    for a in x.args:
        path = _scores_path(a, depth - 1) if isinstance(a, fx.Node) else None
        if path is not None:
            return path + ([] if name in _PASSTHROUGH else [name])
    return None


def _attention_form(n) -> str | None:
    """How an attention site is spelled in the captured graph, e.g. `matmul → mul → masked_fill →
    softmax → matmul` (casts left out); None for a node that is no attention output."""
    name = _op_name(n)
    if name in ("scaled_dot_product_attention", "_native_multi_head_attention"):
        return name
    if name in ("softmax", "_softmax"):
        sm, tail = n, []
    elif name in ("matmul", "bmm") and n.args:
        sm = n.args[0]
        while _op_name(sm) in _PASSTHROUGH and sm.args:
            sm = sm.args[0]
        if _op_name(sm) not in ("softmax", "_softmax"):
            return None
        tail = [name]
    else:
        return None
    head = _scores_path(sm.args[0]) if sm.args else None
    return " → ".join((head or ["?"]) + ["softmax"] + tail) if head or tail else None


def _longest_prefix(location: str, streams: list) -> object | None:
    best = None
    for st in streams:
        loc = st.location
        if loc == "<root>" or location == loc or location.startswith(loc + "."):
            if best is None or len(loc) > len(best.location) or best.location == "<root>":
                best = st
    return best


def inspect_model(source: ModelSource, kw: dict, failed_checks) -> dict:
    """The exact pipeline (and the approximate one if asked) run as a dry run on `source`:
    every site found, what it would become or why not, per pass and per residual stream.
    failed_checks(report): what the verification found wrong (the CLI's rule)."""
    import rewriter

    from .capture import capture
    from .graph import module_path
    from .optimize import rewrite_captured
    from .passes import exact_passes

    plan = rewriter.optimize(source.model, None, **kw)  # the options as optimize() takes them; captures nothing
    try:
        cap = capture(source.model, source.args, source.kwargs, dynamic=plan._options.get("dynamic", True))
    except rewriter.CaptureError as e:
        raise UsageError(" ".join(line.strip() for line in str(e).splitlines()[:2])) from e
    forms = {n.name: f for n in cap.module.graph.nodes if (f := _attention_form(n))}  # before anything changes
    gm, report = rewrite_captured(source.model, cap, plan._options, verify=True)
    gqa = {module_path(n) for n in gm.graph.nodes if _op_name(n) == "scaled_dot_product_attention"
           and n.kwargs.get("enable_gqa")}
    sites = list(dict.fromkeys(report.sites))  # a site a later rule extended is recorded twice

    attention, norms, streams, stream_of = [], [], [], {}
    current = None
    for s in sites:
        if s.kind == "residual_stream":
            current = s
            streams.append(s)
        elif s.pass_name == "pre_rmsnorm" and current is not None:
            stream_of[id(s)] = current
    refused_streams = [st for st in streams if st.status != "applied"]
    for s in sites:
        row = {"location": s.location, "kind": s.kind, "pass": s.pass_name, "becomes": s.action, "status": s.status,
               "reason": s.reason, "error": s.error}
        if s.kind == "attention":
            row["form"] = forms.get(s.node, "scaled_dot_product_attention" if s.pass_name.startswith("approximate")
                                    else "")
            if s.action == "sdpa" and s.location in gqa:
                row["becomes"] = "sdpa (GQA: repeat_kv folded)"
            if s.params:
                row["params"] = s.params
            attention.append(row)
        elif s.kind in ("layer_norm", "rms_norm"):
            if s.kind == "rms_norm":
                row["pre_ln_to_rms"] = "already an RMSNorm"
            elif id(s) in stream_of and s.status == "applied":
                row["pre_ln_to_rms"] = "yes"
            elif kw.get("norm") == "keep":
                row["pre_ln_to_rms"] = "not tried (--norm keep)"
            else:
                st = stream_of.get(id(s)) or _longest_prefix(s.location, refused_streams)
                why = (st.reason if st is not None and st.reason else s.reason) or \
                    "not read from a Pre-LN residual stream"
                row["pre_ln_to_rms"] = f"no: {why}"
            norms.append(row)
    stream_rows = [{"location": st.location, "becomes": st.action, "status": st.status, "reason": st.reason,
                    "norms": sum(1 for k, v in stream_of.items() if v is st)} for st in streams]

    names = [p.name for p in exact_passes("auto")]
    if kw.get("attention"):
        names.append(f"approximate:{kw['attention']}")
    passes = []
    for name in names:
        mine = [s for s in sites if s.pass_name == name]
        counts = {st: sum(1 for s in mine if s.status == st) for st in ("applied", "refused", "rolled_back")}
        if name not in report.passes:
            note = "not run (--norm keep)" if name == "pre_rmsnorm" else "not run"
        else:
            parts = ["applies"] if report.passes[name] else \
                ["nothing to rewrite: already in the target form"] if counts["applied"] else []
            for st in ("refused", "rolled_back"):
                why = list(dict.fromkeys(re.sub(r" \([\w.<>]+\)", "", s.reason) for s in mine  # paths left out
                                         if s.status == st and s.reason))
                if why:
                    parts.append(f"{st.replace('_', ' ')}: " + "; ".join(why[:3]) + (" …" if len(why) > 3 else ""))
            note = "; ".join(parts) or "no sites found"
        passes.append({"pass": name, "ran": name in report.passes, "rewrites": report.passes.get(name, 0),
                       **counts, "note": note})
    if not kw.get("attention"):
        passes.append({"pass": "approximate attention", "ran": False, "rewrites": 0, "applied": 0, "refused": 0,
                       "rolled_back": 0, "note": "opt-in: --attention FORM"})
    return {"model": source.spec, "capture": report.capture, "attention": attention, "norms": norms,
            "residual_streams": stream_rows, "passes": passes, "verification": report.verification,
            "summary": report.summary(), "failed_checks": failed_checks(report)}


def render(found: dict, console) -> None:
    from rich.table import Table

    style = {"applied": "green", "refused": "yellow", "rolled_back": "red"}

    def table(title: str, rows: list[dict], cols: dict[str, str]):
        if not rows:
            console.print(f"[bold]{title}[/]: none found")
            return
        cells = [[_cell(key, r.get(key)) for key in cols] for r in rows]
        keep = [i for i in range(len(cols)) if any(c[i] for c in cells)]  # no all-empty columns
        t = Table(title=title, title_justify="left")
        for i in keep:
            t.add_column(list(cols.values())[i], overflow="fold")
        for c in cells:
            t.add_row(*(c[i] for i in keep))
        console.print(t)

    def _cell(key: str, v) -> str:
        if key == "status":
            return f"[{style.get(v, '')}]{v}"
        if key == "error":
            return f"{v['rel_l2']:.1e}" if v and "rel_l2" in v else ""
        return "" if v is None else str(v)

    cap = found["capture"]
    dims = ", ".join(f"{k}{v}" for k, v in cap.get("dynamic_dims", {}).items()) or "none"
    console.print(f"[bold]{found['model']}[/]: captured with {cap.get('method')}; dynamic dims: {dims}")
    for note in cap.get("notes", []):
        console.print(f"  note: {note}")
    table("attention sites", found["attention"], {"location": "location", "form": "form", "becomes": "becomes",
                                                   "status": "status", "error": "error", "reason": "reason"})
    table("norms", found["norms"], {"location": "location", "kind": "kind", "becomes": "becomes", "status": "status",
                                    "pre_ln_to_rms": "Pre-LN → RMSNorm", "reason": "reason"})
    table("residual streams", found["residual_streams"], {"location": "location", "becomes": "conversion",
                                                          "status": "status", "norms": "norms", "reason": "reason"})
    table("passes", found["passes"], {"pass": "pass", "rewrites": "rewrites", "applied": "sites applied",
                                      "refused": "refused", "rolled_back": "rolled back", "note": "note"})
    console.print(found["summary"])
    for problem in found["failed_checks"]:
        console.print(f"[red]verification failed: {problem}")
    console.print("(dry run: nothing was changed or written)")
