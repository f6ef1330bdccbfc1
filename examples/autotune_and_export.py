"""Tune a rewritten model's kernels for this machine, then export it to ONNX.

After `rewriter.optimize`, a model's attention and norms run as `rewriter::` ops. Each op
has knobs whose best value depends on the machine and the shape: on a GPU the Triton tile
sizes; on a CPU the plain-PyTorch references' own chunk, tile and score-block sizes (the
sliding-window reference walks the band in blocks of `block_size` queries, and caps the
scores it materialises at once with `max_scores`). `rewriter.autotune(opt, inputs)` records
every op call the model makes on `inputs`, runs one Optuna study per (kernel, shape bucket,
dtype) in which every trial's output is first checked against the reference (a fast
wrong config never wins), and stores the best configs in a per-device cache that the ops
read on every call. Nothing tunes unless asked; `REWRITER_AUTOTUNE=off` ignores the cache.

`rewriter.export_onnx(opt, path, inputs)` then writes the rewritten model as ONNX (the
`rewriter::` ops translated to standard ONNX ops), checks it with onnx.checker, runs it in
onnxruntime on the inputs and compares with PyTorch before the file appears, and says which
input axes stayed dynamic and why the others are fixed.

The model is the nanoGPT of examples/nanogpt.py at a 1024-token context with
sliding-window attention (window 128, 4 sinks). The cache and the ONNX file go to a
temporary directory unless REWRITER_CACHE_DIR is set.

    python examples/autotune_and_export.py                # 1024 tokens, 12 trials per study
    python examples/autotune_and_export.py --trials 30
    python examples/autotune_and_export.py --small        # 128 tokens, 3 trials: a smoke test
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(HERE.parent))

import rewriter  # noqa: E402


def load_nanogpt():
    """examples/nanogpt.py as a module (its GPT class)."""
    spec = importlib.util.spec_from_file_location("nanogpt_example", HERE / "nanogpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def autotune_env(value: str | None):
    """Set REWRITER_AUTOTUNE for a block (the ops read it on every call), then restore it."""
    old = os.environ.get("REWRITER_AUTOTUNE")
    if value is None:
        os.environ.pop("REWRITER_AUTOTUNE", None)
    else:
        os.environ["REWRITER_AUTOTUNE"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("REWRITER_AUTOTUNE", None)
        else:
            os.environ["REWRITER_AUTOTUNE"] = old


def time_default_vs_tuned(opt, x: torch.Tensor, rounds: int) -> dict[str, float]:
    """The same module with the ops' default configs (cache ignored) and with the tuned ones,
    interleaved: a warm-up call each, then `rounds` rounds; median seconds."""
    modes = {"default configs": "off", "tuned configs": None}
    samples = {name: [] for name in modes}
    with torch.inference_mode():
        for name, env in modes.items():
            with autotune_env(env):
                opt(x)
        for r in range(rounds):
            order = list(modes) if r % 2 == 0 else list(modes)[::-1]
            for name in order:
                with autotune_env(modes[name]):
                    t0 = time.perf_counter()
                    opt(x)
                    samples[name].append(time.perf_counter() - t0)
    return {n: statistics.median(s) for n, s in samples.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024, help="context length; default 1024")
    p.add_argument("--window", type=int, default=128, help="sliding window; default 128")
    p.add_argument("--trials", type=int, default=12, help="configs tried per study; default 12")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, default vs tuned; default 5")
    p.add_argument("--small", action="store_true", help="128 tokens, window 32, 3 trials (a smoke test)")
    args = p.parse_args(argv)
    if args.small:
        args.tokens, args.window, args.trials, args.rounds = 128, 32, 3, 1
    started, cpu_started = time.perf_counter(), time.process_time()

    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rewriter-example-")))
        # The tuned configs go to $REWRITER_CACHE_DIR (default: the user cache directory).
        # This tutorial keeps them in its temporary directory unless you set the variable.
        if not os.environ.get("REWRITER_CACHE_DIR"):
            os.environ["REWRITER_CACHE_DIR"] = str(work / "cache")
            stack.callback(os.environ.pop, "REWRITER_CACHE_DIR", None)
        print(f"kernel cache: {os.environ['REWRITER_CACHE_DIR']}")

        # 1. A model and an approximate rewrite.
        nanogpt = load_nanogpt()
        torch.manual_seed(0)
        model = nanogpt.GPT(vocab=256, block=args.tokens, d=128, h=4, layers=2).eval()
        # Batch 2, not 1: torch.export specialises a size-1 dimension, so a batch-1 example
        # would fix the batch axis of the graph (and of the ONNX file) at 1.
        ids = torch.randint(0, 256, (2, args.tokens), generator=torch.Generator().manual_seed(1))
        opt = rewriter.optimize(model, (ids,), attention="sliding_window", window=args.window, sinks=4)
        print(f"nanoGPT, 2 layers, width 128, {args.tokens} tokens: {opt.report.summary()}")

        # 2. Tune. On this CPU the studies tune the references' knobs; every trial is checked
        # against the reference before it is timed. report.rows() is what `rewriter autotune`
        # prints; report.skipped names the kernels with nothing to tune here and why.
        t0 = time.perf_counter()
        tuned = rewriter.autotune(opt, (ids,), trials=args.trials)
        print(f"\nrewriter.autotune(opt, (ids,), trials={args.trials})  [{time.perf_counter() - t0:.0f} s]")
        rows = tuned.rows()
        head = f"{'kernel':26s} {'default ms':>10} {'best ms':>8} {'speedup':>8} {'trials':>6} {'failed':>6}"
        print(head + "  best config\n" + "-" * (len(head) + 13))

        def ms(v):
            return f"{v:.2f}" if v is not None else "-"

        for r in rows:
            speed = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
            print(f"{r['kernel']:26s} {ms(r['default_ms']):>10} {ms(r['best_ms']):>8} {speed:>8} {r['trials']:6d} "
                  f"{r['failures']:6d}  {r['best_config']}")
            print(f"{'':26s} shape bucket {r['bucket']}, {r['dtype']}")
        for kernel, why in tuned.skipped:
            print(f"{kernel:26s} not tuned: {why}")
        cache_files = sorted(p.name for p in Path(os.environ["REWRITER_CACHE_DIR"]).glob("*.json"))
        print(f"cache files: {cache_files}")

        # The whole model, default configs vs tuned (the ops read the cache on every call).
        # The tuned kernel is one part of the model, so the model-level ratio is smaller.
        seconds = time_default_vs_tuned(opt, ids, args.rounds)
        ratio = seconds["default configs"] / seconds["tuned configs"]
        print(f"model: {1e3 * seconds['default configs']:.1f} ms with default configs, "
              f"{1e3 * seconds['tuned configs']:.1f} ms tuned ({ratio:.2f}x; median of {args.rounds}, interleaved)")

        # 3. Export. The sliding-window translation gathers each query's band with an index
        # plan computed for the example's length, so the sequence axis is fixed (the reason
        # comes with it) while the batch axis stays dynamic.
        path = work / "gpt_sliding_window.onnx"
        t0 = time.perf_counter()
        exported = rewriter.export_onnx(opt, path, (ids,))
        print(f"\nrewriter.export_onnx -> {path.name} ({path.stat().st_size / 1e6:.1f} MB, opset {exported.opset}) "
              f"[{time.perf_counter() - t0:.0f} s]")
        print(f"  onnxruntime vs PyTorch: max abs error {exported.max_abs_error:.2e}")
        print(f"  dynamic axes: {exported.dynamic_axes}")
        for axis, why in exported.fixed_axes.items():
            print(f"  fixed axis {axis}: {why}")

        # Running it yourself is plain onnxruntime:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: ids.numpy()}
        logits = session.run(None, feed)[0]
        with torch.inference_mode():
            ort_err = (torch.from_numpy(logits) - opt(ids)).abs().max().item()
        print(f"  re-run here: {session.get_inputs()[0].name} {list(ids.shape)} -> logits {list(logits.shape)}, "
              f"max abs error {ort_err:.2e}")

    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(f"\ndone in {wall:.0f} s wall, {cpu:.0f} s CPU ({torch.get_num_threads()} threads)")
    return {"rows": rows, "skipped": tuned.skipped, "cache_files": cache_files, "model_seconds": seconds,
            "onnx": {"max_abs_error": exported.max_abs_error, "dynamic_axes": exported.dynamic_axes,
                     "fixed_axes": exported.fixed_axes, "opset": exported.opset, "ort_rerun_error": ort_err},
            "report": opt.report.to_dict(), "wall_s": wall, "cpu_s": cpu}


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's LeafSpec deprecation, per capture
    logging.getLogger("torch._export.non_strict_utils").setLevel(logging.ERROR)
    main()
