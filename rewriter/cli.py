"""The `rewriter` command line: optimise a model from a `file.py:factory` and report.

Exit codes: 0 success, 1 a verification failed, 2 usage or input error.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

EXAMPLES = """examples:
  rewriter optimize examples/nanogpt.py:build
  rewriter optimize examples/nanogpt.py:build --norm keep --json
  rewriter optimize examples/nanogpt.py:build --attention sliding_window -o window=16 -o sinks=4 --keep-last 1
  rewriter optimize mypkg.models:make_model --save out.pt2 --export out.onnx --report report.json
"""


class UsageError(Exception):
    pass


def load_factory(spec: str):
    """`path/to/file.py:factory` or `package.module:factory` → (model, example_inputs)."""
    if ":" not in spec:
        raise UsageError(f"MODEL must look like path/to/file.py:factory or package.module:factory, got {spec!r}")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise UsageError(f"no such file: {where}")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            mod_spec.loader.exec_module(module)
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise UsageError(f"cannot import {where}: {e}") from e
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UsageError(f"{where} has no callable {name!r}")
    try:
        out = factory()
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{spec} raised {type(e).__name__}: {e}") from e
    if not (isinstance(out, tuple) and len(out) == 2):
        raise UsageError(f"{spec} must return (model, example_inputs)")
    model, inputs = out
    return model, inputs if isinstance(inputs, tuple) else (inputs,)


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


def _optimize(args) -> int:
    import torch

    import rewriter

    options = dict(_option(o) for o in args.option or [])
    for name in ("keep_first", "keep_last"):
        if getattr(args, name):
            options[name] = getattr(args, name)
    layers = [int(x) if x.isdigit() else x for x in args.layers.split(",")] if args.layers else None
    if (options or layers) and not args.attention:
        raise UsageError("--option/--layers/--keep-* need --attention")
    model, inputs = load_factory(args.model)
    try:
        opt = rewriter.optimize(model, inputs, norm=args.norm, attention=args.attention, layers=layers, **options)
    except ValueError as e:
        raise UsageError(str(e)) from e
    report = opt.report
    ok = report.verification.get("output", {}).get("ok") is not False
    if args.save:
        tmp = Path(args.save).with_suffix(".tmp.pt2")
        torch.export.save(opt.export(*inputs), tmp)
        tmp.replace(args.save)
    if args.export:
        exported = rewriter.export_onnx(opt, args.export, inputs, opset=args.opset)
        report.verification["onnx"] = {"path": exported.path, "max_abs_error": exported.max_abs_error,
                                       "dynamic_axes": exported.dynamic_axes, "fixed_axes": exported.fixed_axes}
    if args.report:
        Path(args.report).write_text(report.to_json(indent=2))
    if args.json:
        print(report.to_json(indent=2))
    else:
        from rich.console import Console

        console = Console()
        console.print(report.table())
        console.print(report.summary())
        if args.save:
            console.print(f"saved {args.save}")
        if args.export:
            console.print(f"exported {args.export} (onnxruntime max abs error "
                          f"{report.verification['onnx']['max_abs_error']:.1e})")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rewriter", description=__doc__.splitlines()[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("optimize", help="apply the exact rewrites, verify them, print the report",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="path/to/file.py:factory or package.module:factory returning (model, example_inputs)")
    p.add_argument("--norm", default="auto", choices=["auto", "crms", "keep"],
                   help="auto: Pre-LN → Pre-RMSNorm where provably exact; crms: Pre-CRMSNorm (D-1 stream); keep")
    p.add_argument("--attention", choices=["linear", "agent", "sliding_window", "window2d", "neighborhood"],
                   help="an approximate attention rewrite (error measured and reported)")
    p.add_argument("-o", "--option", action="append", metavar="NAME=VALUE",
                   help="a parameter of the attention rewrite, e.g. window=256, feature_map=focused (repeatable)")
    p.add_argument("--layers", help="attention layers to rewrite: indices and module-path globs, comma-separated")
    p.add_argument("--keep-first", type=int, default=0, help="keep the first K attention layers full")
    p.add_argument("--keep-last", type=int, default=0, help="keep the last K attention layers full")
    p.add_argument("--save", help="write the rewritten program as .pt2")
    p.add_argument("--export", help="write the rewritten model as ONNX (checked in onnxruntime)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset for --export (default 18)")
    p.add_argument("--report", help="write the report as JSON")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        return _optimize(args)
    except UsageError as e:
        print(f"rewriter: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001
        if args.debug:
            raise
        print(f"rewriter: error: {type(e).__name__}: {e}".splitlines()[0] + " (run with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
