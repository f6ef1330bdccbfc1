"""The measuring harness of benchmarks/kernel_speed.py: how a case is timed (do_bench, CUDA-graph
replays, or a wall clock when interpreted), checked against its fp32 reference, turned into a
row with its target, and how a run's budget and baselines are kept. The cases live in
kernel_cases.py, the command line in kernel_speed.py.

Importing this module switches Triton's interpreter on where there is no CUDA, so it must be
imported before anything imports Triton.
"""
from __future__ import annotations

import gc
import importlib
import importlib.util
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read when @triton.jit decorates: before the kernel modules load

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(HERE.parent))

from rewriter.compare import TOLERANCE, error  # noqa: E402

DTYPE = torch.bfloat16

TARGETS = {
    "norms": ("fraction_of_copy", 0.85, "achieved bandwidth >= 85% of the measured device-to-device copy bandwidth"),
    "sliding_window": ("speedup_vs_flex", 1.0, "at least FlexAttention's throughput (speedup_vs_flex >= 1)"),
    "neighborhood": ("share_of_bound", 0.60,
                     "speedup over full SDPA >= 60% of the FLOP-reduction bound N / kernel^2"),
    "swin": ("share_of_bound", 0.60, "speedup over full SDPA >= 60% of the FLOP-reduction bound "
             "(the neighbourhood target, applied to Swin by analogy)"),
    "linear_attention": ("fraction_of_memory_bound", 0.70,
                         ">= 70% of the memory-traffic bound (q, k, v read + o written at copy bandwidth)"),
    "agent_attention": (None, None, None),
}


# ---------------------------------------------------------------- kernels, imported late


def kernel_modules() -> dict:
    """The Triton launcher modules; without CUDA, interpreted (reloaded if something imported
    them before TRITON_INTERPRET was set, e.g. another test in the same process)."""
    import triton
    import triton.language  # noqa: F401

    names = {
        "rms": "rewriter.kernels.rms_norm.triton",
        "ln": "rewriter.kernels.layer_norm.triton",
        "linear": "rewriter.kernels.linear_attention.triton",
        "sliding": "rewriter.kernels.window_attention.sliding_triton",
        "grid": "rewriter.kernels.window_attention.grid_triton",
        "agent": "rewriter.kernels.agent_attention.triton",
    }
    jit = triton.runtime.jit.JITFunction
    if not CUDA and isinstance(getattr(getattr(triton.language, "standard", None), "sum", None), jit):
        # triton's own @jit library (tl.sum, tl.max, ...) was decorated compiled-mode: interpreted
        # kernels that call it fail with "Cannot call @triton.jit'd outside of the scope of a kernel"
        raise RuntimeError(
            "kernel_speed.py: Triton was imported in this process before TRITON_INTERPRET=1 was set, so its "
            "interpreter cannot run the kernels; run the script in a fresh process (python "
            "benchmarks/kernel_speed.py --quick), or set TRITON_INTERPRET=1 before anything imports triton.")
    mods = {}
    for key, name in names.items():
        module = importlib.import_module(name)
        if not CUDA and any(isinstance(v, jit) for v in vars(module).values()):
            module = importlib.reload(module)
            if any(isinstance(v, jit) for v in vars(module).values()):
                raise RuntimeError(f"{name}: kernels still compiled-mode after reload; TRITON_INTERPRET=1 "
                                   "did not take effect (triton.knobs overridden?)")
        mods[key] = module
    return mods


# ---------------------------------------------------------------- timing, checks, rows


def describe_error(exc: BaseException) -> str:
    """The exception's type and the start of its message (first lines joined), for a row."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {' / '.join(lines[:3])}"[:500]


def rounded(x: float | None, digits: int = 6) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def free_memory() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


class Timer:
    """Median milliseconds of fn(): do_bench on CUDA, a wall-clock median on CPU."""

    def __init__(self, warmup_ms: int, rep_ms: int, cpu_reps: int, graph: bool = False):
        self.warmup_ms, self.rep_ms, self.cpu_reps = warmup_ms, rep_ms, cpu_reps
        self.graph = graph and CUDA

    def describe(self) -> str:
        if self.graph:
            return (f"triton.testing.do_bench_cudagraph(rep={self.rep_ms}, return_mode='median'): replays of a CUDA "
                    "graph of back-to-back calls, so no host launch overhead and no L2 flush; milliseconds per call")
        if CUDA:
            return (f"triton.testing.do_bench(warmup={self.warmup_ms}, rep={self.rep_ms}, return_mode='median'), "
                    "L2 flushed before each call; milliseconds")
        return (f"wall-clock median of {self.cpu_reps} call(s) after the check's call (CPU, TRITON_INTERPRET=1: the "
                "interpreter's speed, not the kernels'); milliseconds")

    def __call__(self, fn) -> float:
        if CUDA:
            import triton.testing

            if self.graph:
                return float(triton.testing.do_bench_cudagraph(fn, rep=self.rep_ms, return_mode="median"))
            return float(triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        samples = []  # no warm-up call: the correctness check ran (and warmed) each fn first
        for _ in range(self.cpu_reps):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples) * 1e3


def new_row(name: str, case: str, **fields) -> dict:
    metric, value, text = TARGETS[name]
    return {
        "name": name, "case": case, **fields, "dtype": str(DTYPE).removeprefix("torch."),
        "kernel_path": None,
        "ms": {}, "gbps": {}, "tflops": {},
        "check_passed": None, "max_abs": None, "rel_l2": None, "tol_rel_l2": TOLERANCE[DTYPE], "checks": {},
        "errors": {}, "skipped": {},
        "target": text, "target_metric": metric, "target_value": value, "meets_target": None, "flag": None,
    }


def check(row: dict, label: str, actual, expected) -> bool:
    """Compare (tuples of) tensors; record each in row["checks"][label]; True when all pass."""
    actual = actual if isinstance(actual, (tuple, list)) else (actual,)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    worst = {"max_abs": 0.0, "rel_l2": 0.0}
    if len(actual) != len(expected):
        worst = {"max_abs": float("inf"), "rel_l2": float("inf")}
    for a, e in zip(actual, expected):
        if e is None:
            continue
        err = error(a, e) if a is not None else {"max_abs": float("inf"), "rel_l2": float("inf")}
        worst = {k: max(worst[k], err[k]) for k in worst}
    ok = worst["rel_l2"] <= TOLERANCE[DTYPE]
    row["checks"][label] = {"max_abs": rounded(worst["max_abs"], 4), "rel_l2": rounded(worst["rel_l2"], 4), "passed": ok}
    return ok


def finish(row: dict) -> dict:
    """Flags and meets_target, once every number of the row is in."""
    flags = []
    if row["kernel_path"] != "triton":
        flags.append(f"our kernel did not run (path: {row['kernel_path']})")
    if "ours" in row["checks"]:
        c = row["checks"]["ours"]
        row["max_abs"], row["rel_l2"], row["check_passed"] = c["max_abs"], c["rel_l2"], c["passed"]
    else:
        row["check_passed"] = False
    if not row["check_passed"]:
        flags.append("WRONG OR UNCHECKED RESULT: our output failed (or missed) the check against the fp32 reference")
    if "ours" not in row["ms"]:
        flags.append("our kernel was not timed" + (f" ({row['errors']['ours']})" if "ours" in row["errors"] else ""))
    for other in ("flex", "compiled_reference"):
        c = row["checks"].get(other)
        if c is not None and not c["passed"]:
            flags.append(f"{other} output failed its check: its time is not a like-for-like baseline")
    tuned_ok = row["checks"].get("ours_tuned", {}).get("passed", False)
    if "ours_tuned" in row["checks"] and not tuned_ok:
        flags.append("WRONG RESULT with the tuned config: its time does not count")
    metric, value = row["target_metric"], row["target_value"]
    if value is not None:
        if row["kernel_path"] != "triton" or not row["check_passed"] or "ours" not in row["ms"]:
            row["meets_target"] = False  # a wrong, missing or fallen-back kernel meets nothing
        else:
            # judged on what a user gets: the default config, or the tuned one after `rewriter autotune`
            got = {"default": row.get(metric), "tuned": row.get("tuned_" + metric) if tuned_ok else None}
            got = {k: v for k, v in got.items() if v is not None}
            basis = max(got, key=got.get) if got else None
            row["target_basis"] = basis
            row["meets_target"] = None if basis is None else bool(got[basis] >= value)
    row["flag"] = "; ".join(flags) or None
    return row


def ratio(a: float | None, b: float | None) -> float | None:
    return rounded(a / b, 4) if a is not None and b else None


# ---------------------------------------------------------------- the run's context


class Run:
    def __init__(self, args, timer: Timer, log, emit):
        self.args, self.timer, self.log, self.emit = args, timer, log, emit
        self.device = torch.device("cuda" if CUDA else "cpu")
        self.compile = not args.no_compile
        # without CUDA: dynamo only (backend="eager"), which exercises the compiled paths cheaply
        self.compile_backend = "inductor" if CUDA else "eager"
        self.flex = not args.no_flex
        self.flex_compiled = CUDA
        self.copies: dict[int, float] = {}
        self.mods = kernel_modules()
        # the window references' gather loops, unrolled by dynamo: fewer, larger chunks on a GPU
        self.ref_knobs = {"max_scores": 1 << 28} if CUDA else {}
        self.t_start = time.perf_counter()
        self.not_run: list[str] = []

    def over_budget(self, case: str) -> bool:
        """Whether --budget-s is spent (then `case` is listed in "not_run" and skipped)."""
        budget = self.args.budget_s
        if budget is None or time.perf_counter() - self.t_start < budget:
            return False
        self.not_run.append(case)
        self.log(f"  {case}: not run (--budget-s {budget} spent)")
        return True

    def attempt(self, row: dict, key: str, fn):
        """fn(), or None with the error recorded in row["errors"][key]."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a failing baseline is a result
            row["errors"][key] = describe_error(exc)
            self.log(f"    {key}: FAILED {row['errors'][key]}")
            free_memory()
            return None

    def measure(self, row: dict, key: str, fn, traffic_bytes: float | None = None, flops: float | None = None):
        t = self.attempt(row, key, lambda: self.timer(fn))
        if t is not None:
            row["ms"][key] = rounded(t)
            if traffic_bytes:
                row["gbps"][key] = rounded(traffic_bytes / t / 1e6, 4)
            if flops:
                row["tflops"][key] = rounded(flops / t / 1e9, 4)
            self.log(f"    {key:20s} {t:10.4f} ms")
        return t

    def tuned(self, row: dict, op: str, op_args: tuple, call, expected, traffic_bytes=None, flops=None) -> None:
        """--tune N: the autotuner's study of this call's Triton kernel (N configs, the default
        first, each checked against the reference; trials in a worker process on CUDA, nothing
        written to the cache), then its best config checked and timed here as "ours_tuned"."""
        if not self.args.tune:
            return
        from rewriter.autotune.tuner import tunable, tune

        t0 = time.perf_counter()
        result = self.attempt(row, "tune", lambda: tune(
            tunable(op, "cuda"), op_args, trials=self.args.tune, budget_s=self.args.tune_budget_s, isolate=CUDA,
            save=False, min_time_s=0.05 if CUDA else 0.0))
        if result is None:
            return
        row["tuned"] = {"config": result.best_config, "default_config": result.default_config,
                        "trials_run": result.runs, "trials_failed": result.failures,
                        "tune_s": round(time.perf_counter() - t0, 1),
                        "tuner_ms": {"default": rounded(result.default_ms), "best": rounded(result.best_ms)}}
        self.log(f"    tuned in {row['tuned']['tune_s']} s ({result.runs} configs): {result.best_config}")
        if result.best_config is None:
            row["errors"]["tune"] = "no config ran successfully"
            return
        out = self.attempt(row, "ours_tuned", lambda: call(result.best_config))
        if out is not None and expected is not None:
            check(row, "ours_tuned", out, expected)
        del out
        self.measure(row, "ours_tuned", lambda: call(result.best_config), traffic_bytes=traffic_bytes, flops=flops)

    def compiled(self, fn, row: dict | None = None):
        torch._dynamo.reset()
        if row is not None:
            row["compile_backend"] = self.compile_backend
            if not CUDA:
                row["skipped"]["compiled_reference_inductor"] = (
                    "CPU smoke mode: torch.compile ran with backend='eager' (dynamo tracing only, no inductor); "
                    "its time is not a compiled kernel's")
        return torch.compile(fn, dynamic=False, backend=self.compile_backend)

    def copy_ms(self, nbytes: int, group: str) -> float | None:
        """Median time of dst.copy_(src) for `nbytes` bytes (2 x nbytes of traffic); a row the
        first time a size is measured."""
        if nbytes in self.copies:
            return self.copies[nbytes]
        row = new_row(group, f"copy {nbytes / 2 ** 20:.2f} MiB", bytes=nbytes)
        row["target"] = row["target_metric"] = row["target_value"] = None
        src = torch.randn(nbytes // 2, device=self.device, dtype=DTYPE)
        dst = torch.empty_like(src)
        self.log(f"  {row['case']}")
        t = self.measure(row, "copy", lambda: dst.copy_(src), traffic_bytes=2 * nbytes)
        row["kernel_path"] = "torch copy_"
        row["check_passed"] = bool(torch.equal(dst, src))
        row["flag"] = None if row["check_passed"] and t is not None else "copy failed"
        self.copies[nbytes] = t
        self.emit(row)
        return t
