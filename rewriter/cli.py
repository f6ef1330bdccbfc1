"""The `rewriter` command line: inspect, optimise, export a model; tune its kernels.

Exit codes: 0 success, 1 a verification failed, 2 usage or input error.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

from ._model_source import SPEC_HELP, ModelSource, UsageError, check_writable, load_factory, load_model

__all__ = ["main", "build_parser", "COMMANDS", "UsageError", "load_factory", "load_model"]

MAIN_EXAMPLES = """examples:
  rewriter inspect examples/nanogpt.py:build
  rewriter optimize examples/nanogpt.py:build --save gpt.pt2
  rewriter export examples/nanogpt.py:build gpt.onnx
  rewriter inspect gpt.pt2 --json
  rewriter autotune examples/nanogpt.py:build --attention linear
  rewriter cache show
  rewriter search examples/nanogpt.py:build --min-fidelity 0.95

MODEL is path/to/file.py:factory or package.module:factory (a callable returning
(model, example_inputs)), or a .pt2 saved by torch.export.save with its example inputs.
Exit codes: 0 success, 1 a verification failed (a rewrite rolled back, or the output or
ONNX check failed), 2 usage or input error.
"""


# ----------------------------------------------------------------------------- output helpers

def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


@contextlib.contextmanager
def _progress(text: str):
    """A spinner on stderr while long work runs (only on a terminal: pipes and logs stay clean)."""
    console = _console(stderr=True)
    if not console.is_terminal:
        yield
        return
    with console.status(text):
        yield


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def _temp_beside(path: Path) -> Path:
    """An empty temporary file next to `path` (same file system, so moving it there is atomic),
    with the permissions a new file would get."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    return Path(tmp)


@contextlib.contextmanager
def _staged():
    """Collects (temporary, final) paths; moves every one into place only if the block succeeds,
    and removes them all otherwise: no partial outputs."""
    staged: list[tuple[Path, Path]] = []
    try:
        yield lambda final: staged.append((_temp_beside(final), final)) or staged[-1][0]
        for tmp, final in staged:
            os.replace(tmp, final)
        staged.clear()
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)


# ----------------------------------------------------------------------------- shared arguments

FORMS = ["linear", "agent", "sliding_window", "window2d", "neighborhood"]


def _subcommand(sub, name: str, help: str, description: str, epilog: str) -> argparse.ArgumentParser:
    import textwrap

    return sub.add_parser(name, help=help, description=textwrap.fill(description, 88), epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=SPEC_HELP)


def _common_arguments(p: argparse.ArgumentParser, json_help: str) -> None:
    p.add_argument("--json", action="store_true", help=json_help)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks and warnings")


def _rewrite_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rewrites")
    g.add_argument("--norm", default="auto", choices=["auto", "crms", "keep"],
                   help="auto: Pre-LN → Pre-RMSNorm where provably exact; crms: Pre-CRMSNorm (D-1 stream); keep")
    g.add_argument("--attention", choices=FORMS, help="an approximate attention rewrite (error measured and reported)")
    g.add_argument("-o", "--option", action="append", metavar="NAME=VALUE",
                   help="a parameter of the attention rewrite, e.g. window=256, feature_map=focused (repeatable)")
    g.add_argument("--layers", help="attention layers to rewrite: indices and module-path globs, comma-separated")
    g.add_argument("--keep-first", type=int, default=0, help="keep the first K attention layers full")
    g.add_argument("--keep-last", type=int, default=0, help="keep the last K attention layers full")


def _option(text: str) -> tuple[str, object]:
    """`name=value` with value read as a Python literal where it is one (7, 0.5, (7, 7), True)."""
    import ast

    if "=" not in text:
        raise UsageError(f"--option takes name=value, got {text!r}")
    name, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return name.strip(), value


def _rewrite_options(args) -> dict:
    """The optimize() keyword arguments the rewrite flags ask for, validated before any work."""
    import torch

    import rewriter

    options = dict(_option(o) for o in args.option or [])
    for name in ("keep_first", "keep_last"):
        if getattr(args, name):
            options[name] = getattr(args, name)
    layers = [int(x) if x.isdigit() else x for x in args.layers.split(",")] if args.layers else None
    if (options or layers) and not args.attention:
        raise UsageError("--option/--layers/--keep-* need --attention")
    kw = {"norm": args.norm, "attention": args.attention, "layers": layers, **options}
    try:  # validates every option now; without example inputs nothing is captured
        rewriter.optimize(torch.nn.Identity(), None, **kw)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e).splitlines()[0]) from e
    return kw


def _load(spec: str) -> ModelSource:
    with _progress(f"loading {spec}"):
        return load_model(spec)


def _optimize_model(source: ModelSource, kw: dict):
    import rewriter

    with _progress("capturing, rewriting and verifying"):
        try:
            return rewriter.optimize(source.model, source.args, example_kwargs=source.kwargs or None, **kw)
        except rewriter.CaptureError as e:
            raise UsageError(" ".join(line.strip() for line in str(e).splitlines()[:2])) from e


def _failed_checks(report) -> list[str]:
    """What a verification found wrong; empty when every check held."""
    out, output = [], report.verification.get("output", {})
    if output.get("ok") is False:
        out.append(f"the rewritten model's output differs (rel_l2 {output.get('rel_l2', float('nan')):.1e})")
    rolled = {id(s): s for s in report.sites if s.status == "rolled_back"}
    if rolled:
        out.append(f"{len(rolled)} rewrite(s) rolled back after failing verification (see the report)")
    return out


def _verdict(report) -> int:
    problems = _failed_checks(report)
    for p in problems:
        print(f"rewriter: verification failed: {p}", file=sys.stderr)
    return 1 if problems else 0


# ----------------------------------------------------------------------------- optimize

OPTIMIZE_EXAMPLES = """examples:
  rewriter optimize examples/nanogpt.py:build
  rewriter optimize examples/nanogpt.py:build --norm keep --json
  rewriter optimize examples/nanogpt.py:build --attention sliding_window -o window=16 -o sinks=4 --keep-last 1
  rewriter optimize mypkg.models:make_model --save out.pt2 --export out.onnx --report report.json
"""


def add_optimize(sub) -> None:
    p = _subcommand(sub, "optimize", "apply the exact rewrites, verify them, print the report",
                    "Capture MODEL, apply the exact rewrites (and an approximate attention rewrite if asked), "
                    "verify them on the example inputs and print the report.", OPTIMIZE_EXAMPLES)
    _model_argument(p)
    _rewrite_arguments(p)
    g = p.add_argument_group("outputs")
    g.add_argument("--save", help="write the rewritten program as .pt2")
    g.add_argument("--export", help="write the rewritten model as ONNX (checked in onnxruntime)")
    g.add_argument("--opset", type=int, default=18, help="ONNX opset for --export (default 18)")
    g.add_argument("--report", help="write the report as JSON")
    _common_arguments(p, "print the report as JSON")
    p.set_defaults(run=run_optimize)


def run_optimize(args) -> int:
    import torch

    kw = _rewrite_options(args)
    if args.export:
        _check_opset(args.opset)
    outputs = {flag: check_writable(getattr(args, flag), f"--{flag}") for flag in ("save", "export", "report")
               if getattr(args, flag)}
    source = _load(args.model)
    opt = _optimize_model(source, kw)
    report = opt.report
    with _progress("writing outputs"), _staged() as temp_for:
        if "save" in outputs:
            torch.export.save(opt.export(*source.args, **source.kwargs), temp_for(outputs["save"]))
        if "export" in outputs:  # export_onnx moves its file into place only once it passed
            report.verification["onnx"] = _export_onnx(opt, outputs["export"], source, args.opset)
        if "report" in outputs:
            temp_for(outputs["report"]).write_text(report.to_json(indent=2))
    if args.json:
        print(report.to_json(indent=2))
    else:
        console = _console()
        console.print(report.table())
        console.print(report.summary())
        if "save" in outputs:
            console.print(f"saved {args.save}")
        if "export" in outputs:
            console.print(f"exported {args.export} (onnxruntime max abs error "
                          f"{report.verification['onnx']['max_abs_error']:.1e})")
    return _verdict(report)


def _export_onnx(opt, path: Path, source: ModelSource, opset: int) -> dict:
    import rewriter
    from rewriter.export import ExportError

    try:
        r = rewriter.export_onnx(opt, path, source.args, opset=opset, example_kwargs=source.kwargs or None)
    except (ExportError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        if "differs from PyTorch" in first:  # it ran in onnxruntime, and disagreed: a failed verification
            raise _OnnxCheckFailed(first) from e
        raise UsageError(first) from e
    return {"path": r.path, "opset": r.opset, "max_abs_error": r.max_abs_error,
            "dynamic_axes": r.dynamic_axes, "fixed_axes": r.fixed_axes}


def _check_opset(opset: int) -> None:
    if opset < 18:
        raise UsageError(f"--opset must be >= 18 (the translations use opset-18 ops), not {opset}")


class _OnnxCheckFailed(Exception):
    """onnxruntime ran the file and its outputs differed from PyTorch (exit 1)."""


# ----------------------------------------------------------------------------- export

EXPORT_EXAMPLES = """examples:
  rewriter export examples/nanogpt.py:build gpt.onnx
  rewriter export examples/nanogpt.py:build gpt.onnx --opset 23 --json
  rewriter export examples/nanogpt.py:build gpt.onnx --attention sliding_window -o window=16
"""


def add_export(sub) -> None:
    p = _subcommand(sub, "export", "optimise, then write ONNX checked in onnxruntime",
                    "Optimise MODEL (exact rewrites, plus an approximate attention rewrite if asked), export it to "
                    "ONNX, run the file in onnxruntime on the example inputs and report the max abs error and "
                    "which axes stayed dynamic.", EXPORT_EXAMPLES)
    _model_argument(p)
    p.add_argument("output", metavar="OUT.onnx", help="where to write the ONNX file (written only once it passed)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18; 23 uses RMSNormalization)")
    _rewrite_arguments(p)
    _common_arguments(p, "print the result and the rewrite report as JSON")
    p.set_defaults(run=run_export)


def run_export(args) -> int:
    kw = _rewrite_options(args)
    _check_opset(args.opset)
    out = check_writable(args.output, "ONNX output")
    source = _load(args.model)
    opt = _optimize_model(source, kw)
    with _progress(f"exporting {args.output} and checking it in onnxruntime"):
        result = _export_onnx(opt, out, source, args.opset)
    report = opt.report
    report.verification["onnx"] = result
    if args.json:
        _print_json({"onnx": result, "report": report.to_dict()})
    else:
        from rich.table import Table

        console = _console()
        t = Table(title=f"{result['path']} (opset {result['opset']})")
        for col in ("input", "axis", "shape", "why"):
            t.add_column(col, overflow="fold")
        for name, dims in result["dynamic_axes"].items():
            for d in dims:
                t.add_row(name, str(d), "dynamic", "")
        for where, why in result["fixed_axes"].items():
            name, _, d = where.partition("[")
            t.add_row(name, d.rstrip("]"), "fixed", why)
        console.print(t)
        console.print(f"onnxruntime max abs error {result['max_abs_error']:.1e} (vs PyTorch on the example inputs)")
        console.print(f"rewrites: {report.summary()}")
    return _verdict(report)


# ----------------------------------------------------------------------------- inspect

INSPECT_EXAMPLES = """examples:
  rewriter inspect examples/nanogpt.py:build
  rewriter inspect examples/nanogpt.py:build --norm keep
  rewriter inspect examples/nanogpt.py:build --attention linear --keep-first 1 --json
  rewriter inspect gpt.pt2
"""


def add_inspect(sub) -> None:
    p = _subcommand(sub, "inspect", "show what would be rewritten, and why not where not (writes nothing)",
                    "Run the rewrite pipeline on MODEL as a dry run and show what it found: attention sites by "
                    "form and module path, norms, the residual-stream analysis (which LayerNorms convert to "
                    "RMSNorm exactly, which not and why) and each pass. Changes nothing and writes nothing.",
                    INSPECT_EXAMPLES)
    _model_argument(p)
    _rewrite_arguments(p)
    _common_arguments(p, "print the findings as JSON")
    p.set_defaults(run=run_inspect)


def run_inspect(args) -> int:
    kw = _rewrite_options(args)
    source = _load(args.model)
    from .inspection import inspect_model, render

    with _progress("capturing and analysing (dry run)"):
        found = inspect_model(source, kw, _failed_checks)
    if args.json:
        _print_json(found)
    else:
        render(found, _console())
    return 1 if found["failed_checks"] else 0


# ----------------------------------------------------------------------------- search

SEARCH_EXAMPLES = """examples:
  rewriter search examples/nanogpt.py:build --min-fidelity 0.95
  rewriter search MODEL --trials 60 --latency estimate --save chosen.pt2 --json

Fidelity is the mean cosine of the outputs to the original's on MODEL's example inputs; for
your own data (and calibration), use rewriter.search_policy / rewriter.calibrate in Python.
"""


def add_search(sub) -> None:
    p = _subcommand(sub, "search", "search per-layer attention replacements on the latency/fidelity Pareto front",
                    "An Optuna multi-objective study over per-layer choices (keep full attention, linear, window "
                    "sizes, neighbourhood kernels, agent counts) measuring latency on this machine and fidelity on "
                    "the example inputs; prints the Pareto front and applies the fastest point that keeps "
                    "--min-fidelity.", SEARCH_EXAMPLES)
    _model_argument(p)
    g = p.add_argument_group("search")
    g.add_argument("--min-fidelity", type=float, default=0.95, help="fidelity the chosen point keeps (default 0.95)")
    g.add_argument("--trials", type=int, default=30, help="policies tried beyond the uniform ones (default 30)")
    g.add_argument("--latency", choices=["measure", "estimate"], default="measure",
                   help="measure on this machine, or estimate from attention multiply-adds (deterministic)")
    g.add_argument("--save", help="write the chosen point's rewritten program as .pt2")
    _common_arguments(p, "print the front and the chosen point as JSON")
    p.set_defaults(run=run_search)


def run_search(args) -> int:
    import torch

    import rewriter

    if not 0.0 <= args.min_fidelity <= 1.0:
        raise UsageError("--min-fidelity must be between 0 and 1")
    if args.trials < 0:
        raise UsageError("--trials must be 0 or more")
    save = check_writable(args.save, "--save") if args.save else None
    source = _load(args.model)
    with _progress("searching per-layer policies"):
        try:
            result = rewriter.search_policy(source.model, source.args, [(source.args, source.kwargs)],
                                            example_kwargs=source.kwargs or None, min_fidelity=args.min_fidelity,
                                            n_trials=args.trials, latency=args.latency, progress=False)
        except rewriter.CaptureError as e:
            raise UsageError(" ".join(line.strip() for line in str(e).splitlines()[:2])) from e
    if save is not None and result.module is not None:
        with _staged() as temp_for:
            torch.export.save(result.module.export(*source.args, **source.kwargs), temp_for(save))
    if args.json:
        _print_json(result.to_dict())
    else:
        console = _console()
        console.print(result.table())
        if result.chosen is None:
            console.print(f"no point keeps fidelity >= {args.min_fidelity}; nothing applied")
        elif save is not None:
            console.print(f"saved the chosen point as {args.save}")
    return 0


# ----------------------------------------------------------------------------- main

# One function per subcommand: each adds its parser and sets `run`. Add new ones here.
def _tuning_commands() -> list[Callable]:
    from .autotune.command import add_autotune, add_cache

    return [add_autotune, add_cache]


COMMANDS: list[Callable] = [add_inspect, add_optimize, add_export, add_search, *_tuning_commands()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rewriter", description=__doc__.splitlines()[0],
                                     epilog=MAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", default=False, help="show tracebacks and warnings")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return e.code if isinstance(e.code, int) else 2
    if args.debug:
        return args.run(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation chatter; --debug shows it
        try:
            return args.run(args)
        except UsageError as e:
            print(f"rewriter: error: {e}", file=sys.stderr)
            return 2
        except _OnnxCheckFailed as e:
            print(f"rewriter: verification failed: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("rewriter: interrupted", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001 - one line; --debug shows the traceback
            text = str(e).strip().splitlines()
            print(f"rewriter: error: {type(e).__name__}: {text[0] if text else ''} "
                  "(run with --debug for the traceback)", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
