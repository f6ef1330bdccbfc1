"""onnxruntime CPU latency of the original model's ONNX against the rewritten models' ONNX.

The model is attention_speed.py's ViT-S/16-sized encoder (12 layers, width 384, 6 heads,
MLP 1536, 1 CLS token; batch 1, fp32), imported from there. Variants, each exported with
rewriter.export_onnx(..., dynamic=False) (which checks the file in onnxruntime against
PyTorch on the example input; its max abs error is recorded):

  original      the eager model (hand-written softmax attention: N x N scores)
  exact         rewriter.optimize(model, (x,), verify=False): exact passes only
  linear        attention="linear", feature_map="elu"
  window2d      attention="window2d", window=8, shift="alternate"
  neighborhood  attention="neighborhood", kernel_size=7

Timing: one onnxruntime InferenceSession per variant (CPUExecutionProvider,
intra_op_num_threads = cores, ORT_ENABLE_ALL, sequential execution), one warm-up run each,
then rounds interleaved across the variants (each once per round, rotated), medians.
Per size, variants are exported cheapest first (the quadratic original last), and the
JSON file is rewritten after every export and every round, so a run stopped early still
leaves what it measured (rows not reached say so in "note").

    python benchmarks/onnx_speed.py                          # 4096 (3 rounds) and 16384 (1 round)
    python benchmarks/onnx_speed.py --quick                  # smoke test: 256 tokens, 1 round
    python benchmarks/onnx_speed.py --sizes 4096 --rounds 5
    python benchmarks/onnx_speed.py --budget-s 1500          # skip exports started after 1500 s

Writes benchmarks/results/onnx_speed-<machine>.json (format: DESIGN.md, "Benchmarks"; the
machine slug is attention_speed.py's).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(HERE.parent))

import rewriter  # noqa: E402


if str(HERE) not in sys.path:  # the sibling benchmarks import as modules
    sys.path.insert(0, str(HERE))
import attention_speed as AS  # noqa: E402  (its ViT builder and machine description)
build, machine, slug = AS.build, AS.machine, AS.slug


def _build(tokens: int, depth: int):
    """attention_speed.build (ViT-S/16), or with fewer blocks (--depth: the quick smoke test)."""
    model, x = build(tokens)
    if depth != AS.DEPTH:
        model.blocks = model.blocks[:depth]
    return model, x

REWRITES = {
    "exact": {},
    "linear": AS.REWRITES["linear"],
    "window2d": AS.REWRITES["window2d"],
    "neighborhood": AS.REWRITES["neighborhood"],
}
VARIANTS = ["original", *REWRITES]
EXPORT_ORDER = ["linear", "window2d", "neighborhood", "exact", "original"]  # cheapest first
DEFAULT_SIZES = [4096, 16384]
DEFAULT_ROUNDS = {4096: 3, 16384: 1}
QUICK_SIZES = [256]


def _session(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])


def _row(tokens: int, name: str) -> dict:
    return {"tokens": tokens, "seq_len": tokens + 1, "image": math.isqrt(tokens) * AS.PATCH, "variant": name,
            "median_s": None, "speedup": None, "speedup_vs_exact": None, "onnx_max_abs_error": None,
            "rounds": 0, "samples_s": [], "note": "not reached (run stopped before this export)"}


def _ratios(rows: list[dict]) -> None:
    med = {r["variant"]: r["median_s"] for r in rows}
    for r in rows:
        t = r["median_s"]
        r["speedup"] = med["original"] / t if t and med.get("original") else None
        r["speedup_vs_exact"] = med["exact"] / t if t and med.get("exact") else None


QUADRATIC = {"original", "exact"}  # their ONNX graphs materialise N x N scores (opset 18: MatMul-Softmax-MatMul)


def _predict(name: str, tokens: int, rounds: int, warmup: int, prev: dict | None) -> float | None:
    """Seconds this variant will take at `tokens` (export + warm-up + rounds), scaled from the
    previous size's row: x(N/N_prev)^2 for the quadratic graphs, x(N/N_prev) for the others."""
    if not prev or prev.get("export_s") is None or not prev.get("warmup_s"):
        return None
    p = 2 if name in QUADRATIC else 1
    scale = (tokens / prev["tokens"]) ** p
    return (prev["export_s"] + (warmup + rounds) * statistics.median(prev["warmup_s"])) * scale


def _time_size(tokens: int, rounds: int, warmup: int, threads: int, workdir: Path, log, save,
               deadline: float | None, prev_rows: list[dict], depth: int) -> list[dict]:
    rows = {v: _row(tokens, v) for v in VARIANTS}
    ordered = [rows[v] for v in VARIANTS]
    prev = {r["variant"]: r for r in prev_rows}
    model, x = _build(tokens, depth)
    feed_x = x.numpy()
    sessions, feeds = {}, {}
    for name in EXPORT_ORDER:
        row = rows[name]
        if deadline is not None:
            left = deadline - time.perf_counter()
            need = _predict(name, tokens, rounds, warmup, prev.get(name))
            if left <= 0 or (need is not None and need > left):
                row["note"] = (f"skipped: --budget-s left {max(left, 0):.0f} s, this variant predicted to need "
                               + (f"{need:.0f} s (its {prev[name]['tokens']}-token export + runs scaled by "
                                  f"{'(N/N_prev)^2' if name in QUADRATIC else 'N/N_prev'})" if need else "more"))
                log(f"  {name}: {row['note']}")
                save(ordered)
                continue
        row["note"] = None
        module = None
        t0 = time.perf_counter()
        try:
            if name == "original":
                module = model
            else:
                kw = REWRITES[name]
                module = rewriter.optimize(model, (x,), verify=False, **kw)
                row["optimize_s"] = round(time.perf_counter() - t0, 3)
                if kw.get("attention"):
                    applied, found, reasons = AS._applied(module.report)
                    row["sites_applied"] = f"{applied}/{found}"
                    if applied == 0:
                        raise RuntimeError(f"no attention site rewritten: {reasons}")
                    row["params"] = AS._layer_params(module.report)
            path = workdir / f"{name}-{tokens}.onnx"
            t1 = time.perf_counter()
            res = rewriter.export_onnx(module, path, (x,), dynamic=False)
            row["export_s"] = round(time.perf_counter() - t1, 3)  # PyTorch run + ORT check included
            row["onnx_max_abs_error"] = res.max_abs_error
            row["onnx_mb"] = round(path.stat().st_size / 2**20, 1)
            sess = _session(str(path), threads)
            feeds[name] = {sess.get_inputs()[0].name: feed_x}
            for _ in range(warmup):
                t2 = time.perf_counter()
                sess.run(None, feeds[name])
                row.setdefault("warmup_s", []).append(round(time.perf_counter() - t2, 4))
            sessions[name] = sess
            log(f"  {name:13s} exported in {row['export_s']:7.1f} s (max abs err {res.max_abs_error:.2e}), "
                f"warm-up {row.get('warmup_s')}")
        except Exception as exc:  # a variant that fails is a result: report it, time the rest
            row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            row["note"] = "export or warm-up failed"
            log(f"  {name}: {row['error']}")
        del module
        gc.collect()
        save(ordered)
    names = [v for v in VARIANTS if v in sessions]
    samples = {v: [] for v in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for name in order:
            gc.collect()
            t0 = time.perf_counter()
            sessions[name].run(None, feeds[name])
            samples[name].append(time.perf_counter() - t0)
        for name in names:
            rows[name]["samples_s"] = [round(s, 4) for s in samples[name]]
            rows[name]["rounds"] = len(samples[name])
            rows[name]["median_s"] = statistics.median(samples[name])
        _ratios(ordered)
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {samples[n][-1]:.3f}" for n in names))
        save(ordered)
    sessions.clear()
    gc.collect()
    return ordered


def table(rows: list[dict]) -> str:
    head = f"{'tokens':>6} {'variant':13s} {'median s':>10} {'speedup':>8} {'vs exact':>9} {'ort err':>9}  note"
    out = [head, "-" * len(head)]

    def f(v, fmt):
        return format(v, fmt) if v is not None else format("-", ">" + fmt.split(".")[0])

    for r in rows:
        note = r.get("error") or r.get("note") or (f"sites {r['sites_applied']}" if "sites_applied" in r else "")
        out.append(f"{r['tokens']:>6} {r['variant']:13s} {f(r['median_s'], '10.3f')} {f(r['speedup'], '7.2f')}x "
                   f"{f(r['speedup_vs_exact'], '8.2f')}x {f(r['onnx_max_abs_error'], '9.1e')}  {note}")
    return "\n".join(out)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", help="image token counts (squares); default 4096 16384")
    p.add_argument("--rounds", type=int, nargs="+",
                   help="timed rounds per size: one value for all, or one per size (default 3 / 1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 256 tokens, 1 round, 2 blocks (exports dominate: ~20 s each at 12 blocks)")
    p.add_argument("--depth", type=int, default=None, help="transformer blocks (default 12; --quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs per variant (default 1)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget: exports not started by then are skipped (recorded as such)")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--onnx-dir", type=Path, default=None, help="keep the .onnx files here (default: a temp dir)")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: every core)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    rounds = AS.rounds_per_size(args, sizes, DEFAULT_ROUNDS)
    depth = args.depth or (2 if args.quick else AS.DEPTH)
    m = machine()
    threads = args.threads or m["cores"]
    torch.set_num_threads(threads)  # the PyTorch side of each export's check
    import onnxruntime as ort

    start = time.perf_counter()
    deadline = start + args.budget_s if args.budget_s is not None else None

    def log(msg):
        print(msg, flush=True)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"onnx_speed-{slug(m)}.json"
    done: list[dict] = []
    result = {
        "benchmark": "onnx_speed",
        "command": shlex.join(["python", "benchmarks/onnx_speed.py", *argv]),
        "date": datetime.date.today().isoformat(),
        "machine": m,
        "onnxruntime": ort.__version__,
        "session": {"provider": "CPUExecutionProvider", "intra_op_num_threads": threads,
                    "graph_optimization_level": "ORT_ENABLE_ALL", "execution_mode": "ORT_SEQUENTIAL"},
        "warmup_runs": args.warmup,
        "export": "rewriter.export_onnx(..., dynamic=False), opset 18",
        "model": f"ViT-S/16 encoder (benchmarks/attention_speed.py): {depth} layers, width {AS.DIM}, "
                 f"{AS.HEADS} heads, MLP {AS.MLP}, Pre-LN, 1 CLS token; random init (seed 0), eval, fp32, batch 1",
        "budget_s": args.budget_s,
        "complete": False,
        "rows": [],
    }

    def save(current: list[dict] | None = None):
        result["rows"] = done + (current or [])
        result["elapsed_s"] = round(time.perf_counter() - start, 1)
        path.write_text(json.dumps(result, indent=2) + "\n")

    log(f"onnx_speed on {m['cpu']} ({m['cores']} cores, {threads} ORT threads), torch {m['torch']}, "
        f"onnxruntime {ort.__version__}")
    with tempfile.TemporaryDirectory(prefix="onnx_speed-") as tmp:
        workdir = args.onnx_dir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for size, n in zip(sizes, rounds):
            log(f"{size} tokens ({math.isqrt(size) * AS.PATCH}px image), {n} rounds")
            t0 = time.perf_counter()
            done += _time_size(size, n, args.warmup, threads, workdir, log, save, deadline, done, depth)
            save()
            log(f"  {size} tokens done in {time.perf_counter() - t0:.0f} s")
    result["complete"] = True
    save()
    log(table(result["rows"]))
    log(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
