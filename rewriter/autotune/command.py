"""`rewriter autotune` and `rewriter cache`: the tuner and the per-device cache on the
command line (registered in `rewriter/cli.py`, whose helpers and exit codes they share)."""
from __future__ import annotations

import argparse

__all__ = ["add_autotune", "add_cache"]

AUTOTUNE_EXAMPLES = """examples:
  rewriter autotune                                   # standard shapes of every kernel on this device
  rewriter autotune examples/nanogpt.py:build --attention sliding_window -o window=8
  rewriter autotune MODEL --kernels linear_attention --trials 40 --budget 300
  rewriter autotune MODEL --grid                      # run the whole space (the exhaustive baseline)
  rewriter autotune MODEL --storage postgresql://user@db/optuna   # several machines, one study

On a GPU the Triton kernels' tile configs are tuned; on a CPU, the reference
implementations' own chunk and tile sizes. Results go to this device's cache
(`rewriter cache show`), which every later run reads.
"""

CACHE_EXAMPLES = """examples:
  rewriter cache show
  rewriter cache export tuned-h100.json
  rewriter cache import tuned-h100.json      # on another machine with the same device
  rewriter cache clear
"""


def add_autotune(sub) -> None:
    from .. import cli

    p = sub.add_parser("autotune", help="tune the kernels a model uses (or standard shapes) and cache the configs",
                       description="Tune every rewriter kernel MODEL calls (after its rewrites) on this machine, "
                                   "and store the best configs in this device's cache.",
                       epilog=AUTOTUNE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", nargs="?", help=cli.SPEC_HELP + " Omitted: standard shapes.")
    cli._rewrite_arguments(p)
    g = p.add_argument_group("tuning")
    g.add_argument("--kernels", nargs="+", metavar="NAME", help="only these kernels (e.g. linear_attention)")
    g.add_argument("--trials", type=int, default=30, help="configs to run per kernel and shape (default 30)")
    g.add_argument("--budget", type=float, metavar="SECONDS", help="wall-clock cap for the whole run")
    g.add_argument("--grid", action="store_true", help="run every valid config (exhaustive) instead of TPE")
    g.add_argument("--storage", metavar="URL", help="Optuna storage shared by several machines (e.g. postgresql://…)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to tune (auto: CUDA if available); a MODEL's inputs are moved there")
    cli._common_arguments(p, "print the results as JSON")
    p.set_defaults(run=run_autotune)


def _device(choice: str) -> str:
    import torch

    from ..cli import UsageError

    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    return ("cuda" if torch.cuda.is_available() else "cpu") if choice == "auto" else choice


def _check_storage(url: str | None) -> None:
    from ..cli import UsageError

    if url is None:
        return
    try:
        from sqlalchemy.engine import make_url

        make_url(url)
    except Exception as e:  # noqa: BLE001 - sqlalchemy raises several kinds for a bad URL
        raise UsageError(f"--storage {url!r} is not a database URL ({e}); e.g. postgresql://user@host/db") from e


def run_autotune(args) -> int:
    import torch
    from torch.utils import _pytree as pytree

    from .. import cli
    from . import autotune
    from .workloads import standard_calls

    if args.trials < 1:
        raise cli.UsageError("--trials must be at least 1")
    if args.budget is not None and args.budget <= 0:
        raise cli.UsageError("--budget must be a positive number of seconds")
    _check_storage(args.storage)
    device = _device(args.device)
    if args.model:
        kw = cli._rewrite_options(args)
        source = cli._load(args.model)
        move = lambda t: t.to(device)  # noqa: E731
        source.model.to(device)
        source.args = pytree.tree_map_only(torch.Tensor, move, source.args)
        source.kwargs = pytree.tree_map_only(torch.Tensor, move, source.kwargs)
        model, inputs = cli._optimize_model(source, kw), source.args
    else:
        model, inputs = None, standard_calls(device, args.kernels)
    report = _tune_with_progress(autotune, model, inputs, args, device)
    if args.json:
        cli._print_json(report.to_dict())
        return 0
    console = cli._console()
    console.print(_table(report, device))
    for kernel, why in report.skipped:
        console.print(f"[dim]{kernel}: not tuned ({why})[/dim]")
    if not report.results:
        console.print("nothing was tuned")
    return 0


def _tune_with_progress(autotune, model, inputs, args, device):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .. import cli

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=cli._console(stderr=True), transient=True,
                  disable=args.json or not cli._console(stderr=True).is_terminal) as bar:
        state = {}

        def progress(kind, value):
            if kind == "study":
                kernel, i, total = value
                if "task" in state:
                    bar.remove_task(state["task"])
                state["task"] = bar.add_task(f"{kernel} ({i + 1}/{total})", total=args.trials)
            elif "task" in state and value.state != "rejected":
                bar.advance(state["task"])

        return autotune(model, inputs, kernels=args.kernels, trials=args.trials, budget_s=args.budget,
                        grid=args.grid, storage=args.storage, progress=progress)


def _ms(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def _table(report, device: str):
    from rich.table import Table

    table = Table(title=f"autotune on {device} ({report.wall_s:.0f} s)")
    for col in ("kernel", "shape", "dtype", "default ms", "best ms", "speedup", "trials", "failures", "best config"):
        table.add_column(col, overflow="fold",
                         justify="right" if col in ("default ms", "best ms", "speedup", "trials", "failures") else "left")
    for row in report.rows():
        speed = f"{row['speedup']:.2f}x" if row["speedup"] else "—"
        config = ", ".join(f"{k}={v}" for k, v in (row["best_config"] or {}).items())
        if row["unconfirmed"]:
            config += " (the default: the study's winner was not faster when timed again)"
        table.add_row(row["kernel"], row["bucket"].split(":", 1)[-1], row["dtype"], _ms(row["default_ms"]),
                      _ms(row["best_ms"]), speed, str(row["trials"]), str(row["failures"]), config)
    return table


# ----------------------------------------------------------------------------- cache


def add_cache(sub) -> None:
    from .. import cli

    p = sub.add_parser("cache", help="show, clear, export or import this device's tuned kernel configs",
                       description="The per-device store of tuned kernel configs that the rewriter ops read.",
                       epilog=CACHE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["show", "clear", "export", "import"])
    p.add_argument("file", nargs="?", metavar="FILE", help="the JSON file to export to / import from")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="whose cache (default: auto)")
    cli._common_arguments(p, "print as JSON")
    p.set_defaults(run=run_cache)


def run_cache(args) -> int:
    from .. import cli
    from .cache import default_cache

    if args.action in ("export", "import") and not args.file:
        raise cli.UsageError(f"cache {args.action} needs a FILE")
    if args.action == "show" or args.action == "clear":
        if args.file:
            raise cli.UsageError(f"cache {args.action} takes no FILE")
    cache = default_cache(_device(args.device))
    console = cli._console()
    if args.action == "show":
        entries = cache.entries()
        if args.json:
            cli._print_json({"path": str(cache.path), "device": cache.device.header(), "entries": entries,
                             "invalid": _invalid_entries(cache, entries)})
            return 0
        console.print(_cache_table(cache, entries))
        return 0
    if args.action == "clear":
        removed = cache.clear()
        _say(args, console, {"path": str(cache.path), "removed": removed}, f"removed {removed} entries from {cache.path}")
        return 0
    if args.action == "export":
        path = cli.check_writable(args.file, "FILE")
        count = cache.export(path)
        _say(args, console, {"path": str(path), "exported": count}, f"exported {count} entries to {path}")
        return 0
    from pathlib import Path

    path = Path(args.file)
    if not path.is_file():
        raise cli.UsageError(f"{args.file}: no such file")
    try:
        count = cache.import_(path)
    except ValueError as e:
        raise cli.UsageError(str(e).splitlines()[0]) from e
    _say(args, console, {"path": str(cache.path), "imported": count}, f"imported {count} entries into {cache.path}")
    return 0


def _say(args, console, data: dict, text: str) -> None:
    from .. import cli

    if args.json:
        cli._print_json(data)
    else:
        console.print(text)


def _invalid_entries(cache, entries: dict) -> dict[str, str]:
    """Stored key -> why its config cannot run (ops skip these with a warning and run the default)."""
    from .select import config_problem

    kind = "cpu" if cache.device.capability == "cpu" else "cuda"
    found = {}
    for key, entry in entries.items():
        problem = config_problem(key.split("|")[0], entry.get("config"), kind)
        if problem:
            found[key] = problem
    return found


def _cache_table(cache, entries: dict):
    from rich.table import Table

    table = Table(title=f"{cache.device.name} [{cache.device.capability}] — {cache.path}")
    for col in ("kernel", "shape", "dtype", "config", "ms", "speedup", "tuned at", "valid"):
        table.add_column(col, overflow="fold")
    invalid = _invalid_entries(cache, entries)
    for key, entry in sorted(entries.items()):
        kernel, _source, bucket, dtype = key.split("|")[:4]
        default, best = entry.get("default_ms"), entry.get("time_ms")
        speed = f"{default / best:.2f}x" if default and best else "—"
        config = ", ".join(f"{k}={v}" for k, v in entry["config"].items())
        table.add_row(kernel, bucket.split(":", 1)[-1], dtype, config, _ms(best), speed, str(entry.get("tuned_at", "")),
                      f"no: {invalid[key]}" if key in invalid else "yes")
    if invalid:
        table.caption = f"{len(invalid)} invalid entries: the ops skip them (with a warning) and run their defaults"
    if not entries:
        table.caption = "empty: run `rewriter autotune` to fill it"
    return table
