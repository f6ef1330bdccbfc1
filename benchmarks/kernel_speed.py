"""GPU speed of the Triton kernels against torch's own paths, side by side in one process.

Issue 4, item 5. On CUDA, every case is timed with `triton.testing.do_bench` (median, L2
flushed between calls) and every ratio comes from the same run:

  norms             rms_norm and layer_norm at 8192x4096, 32768x768 and 512x65536 bf16,
                    forward and forward+backward: ours, torch's F.rms_norm / F.layer_norm,
                    torch.compile of the reference, and the measured device-to-device copy
                    bandwidth (`dst.copy_(src)` of x's bytes). A norm reads x and writes y
                    (2 x bytes; backward reads x and dy and writes dx: 3 x bytes), so
                    fraction_of_copy = achieved GB/s / copy GB/s. Target >= 0.85.
  sliding_window    1-D band, 32K tokens, window 2K, causal, B=1 H=16 D=128 bf16: ours vs
                    full causal SDPA (flash), FlexAttention (compiled, block mask of the
                    band) and torch.compile of the reference. Target: speedup_vs_flex >= 1.
  neighborhood      2-D NATTEN neighbourhood, 128x128 grid, kernel 13, H=16 D=64: the same
                    baselines (non-causal SDPA); share_of_bound = speedup over SDPA / the
                    FLOP-reduction bound N / kernel^2. Target >= 0.6.
  swin              2-D Swin windows on 128x128, window 8 (shift 4) and 16 (shift 8):
                    likewise (the 0.6 target applied by analogy).
  linear_attention  non-causal, elu, B=1 H=16 N=16384 D=Dv=64: ours vs its memory-traffic
                    bound (bytes of q, k, v read and o written at the measured copy
                    bandwidth); fraction_of_memory_bound target >= 0.7; also vs SDPA.
  agent_attention   49 agents pooled on a 128x128 grid, H=16 D=64: ours vs SDPA.

Before timing, each of our outputs (and FlexAttention's and the compiled reference's) is
checked against the reference computed in fp32 (max abs, relative L2 against
rewriter.verify.TOLERANCE); a failed check or a call that fell back to the reference sets
the row's "flag" and meets_target = false. A baseline that fails (an older torch without
FlexAttention, a torch.compile error, out of memory) records its error string in the row's
"errors" and the run goes on. The JSON is rewritten after every row ("complete": false
until the end), so a run cut short still leaves what it measured.

    python benchmarks/kernel_speed.py                       # full run (CUDA; a few minutes)
    python benchmarks/kernel_speed.py --only norms swin     # some groups
    python benchmarks/kernel_speed.py --only norms --merge  # add/replace groups in the file
    python benchmarks/kernel_speed.py --no-compile          # skip torch.compile baselines
    python benchmarks/kernel_speed.py --budget-s 420        # start no case after 7 minutes
    python benchmarks/kernel_speed.py --quick               # small shapes; CPU smoke test too
    python benchmarks/kernel_speed.py --tune 20             # also the autotuner's best config per case
    python benchmarks/kernel_speed.py --cuda-graph          # graph replays: no host launch overhead

Kernels of a few tens of microseconds are timed as the host launches them (do_bench), so
Python launch overhead and a busy host show in their times (two runs on one H200 differed by
up to 1.7x on the norms); --cuda-graph times the GPU's own work.

With --tune N, each case's kernel call (the norms: their forward) is also tuned by the
autotuner (rewriter.autotune.tuner.tune: N configs of the kernel's space, default first, each
checked against the reference; nothing written to the cache), and its best config is checked
and timed as "ours_tuned". Targets are judged on the better of the default and the tuned
config (the row's "target_basis"): a user who ran `rewriter autotune` gets the tuned one.

Most of a full run's time is compilation (Triton JIT of our kernels, inductor for the compiled
references and FlexAttention: one compile per case), not timing; where device time is short,
run the groups in two commands with --only ... --merge.

Without CUDA only --quick runs: the kernels under TRITON_INTERPRET=1 (set before Triton is
imported) on tiny shapes, timed by a wall-clock median. Compiled FlexAttention is skipped
(eager FlexAttention runs instead, which checks the mask_mods, timed as "flex_eager"), and
torch.compile runs with backend="eager" (dynamo only, no inductor; the norms at their first
shape only); each row says so in "skipped". Those timings mean nothing: the run checks the
script and the kernels' results.

Writes benchmarks/results/kernel_speed-<machine>.json (format: DESIGN.md, "Benchmarks");
<machine> is the GPU name as a slug (e.g. nvidia-h100-80gb-hbm3), or attention_speed.py's
CPU slug.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import importlib.util
import json
import math
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read when @triton.jit decorates: before the kernel modules load

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(HERE.parent))

from rewriter.verify import TOLERANCE, error  # noqa: E402


if str(HERE) not in sys.path:  # the sibling benchmarks import as modules
    sys.path.insert(0, str(HERE))
import attention_speed as AS  # noqa: E402  (its ViT builder and machine description)

GROUPS = ["norms", "sliding_window", "neighborhood", "swin", "linear_attention", "agent_attention"]
DTYPE = torch.bfloat16
NORM_EPS = {"rms_norm": 1e-6, "layer_norm": 1e-5}

# the cases: full run (CUDA) and --quick (tiny; the CPU smoke test runs these interpreted)
FULL = {
    "norms": [(8192, 4096), (32768, 768), (512, 65536)],
    "sliding_window": [dict(B=1, H=16, N=32768, D=128, window=2048, causal=True)],
    "neighborhood": [dict(B=1, H=16, grid=(128, 128), D=64, kernel=13)],
    "swin": [dict(B=1, H=16, grid=(128, 128), D=64, window=8, shift=4),
             dict(B=1, H=16, grid=(128, 128), D=64, window=16, shift=8)],
    "linear_attention": [dict(B=1, H=16, N=16384, D=64, Dv=64, feature_map="elu")],
    "agent_attention": [dict(B=1, H=16, grid=(128, 128), D=64, agents=49)],
}
QUICK = {
    "norms": [(16, 256), (2, 20000)],  # 20000 > the widest block: the walked-row path
    "sliding_window": [dict(B=1, H=1, N=128, D=32, window=32, causal=True)],
    "neighborhood": [dict(B=1, H=1, grid=(8, 8), D=32, kernel=5)],
    "swin": [dict(B=1, H=1, grid=(8, 8), D=32, window=4, shift=2),
             dict(B=1, H=1, grid=(8, 8), D=32, window=8, shift=4)],
    "linear_attention": [dict(B=1, H=1, N=128, D=32, Dv=32, feature_map="elu")],
    "agent_attention": [dict(B=1, H=1, grid=(8, 8), D=32, agents=16)],
}

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


def _err(exc: BaseException) -> str:
    """The exception's type and the start of its message (first lines joined), for a row."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {' / '.join(lines[:3])}"[:500]


def _num(x: float | None, digits: int = 6) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _cleanup() -> None:
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
    row["checks"][label] = {"max_abs": _num(worst["max_abs"], 4), "rel_l2": _num(worst["rel_l2"], 4), "passed": ok}
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
    return _num(a / b, 4) if a is not None and b else None


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
            row["errors"][key] = _err(exc)
            self.log(f"    {key}: FAILED {row['errors'][key]}")
            _cleanup()
            return None

    def measure(self, row: dict, key: str, fn, traffic_bytes: float | None = None, flops: float | None = None):
        t = self.attempt(row, key, lambda: self.timer(fn))
        if t is not None:
            row["ms"][key] = _num(t)
            if traffic_bytes:
                row["gbps"][key] = _num(traffic_bytes / t / 1e6, 4)
            if flops:
                row["tflops"][key] = _num(flops / t / 1e9, 4)
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
                        "tuner_ms": {"default": _num(result.default_ms), "best": _num(result.best_ms)}}
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


# ---------------------------------------------------------------- norms


def bench_norms(run: Run, shapes) -> None:
    for i, (R, D) in enumerate(shapes):
        if not run.over_budget(f"norms {R}x{D}"):
            _norm_shape(run, R, D, first=i == 0)  # a function: its tensors are freed on return
            _cleanup()


def _norm_shape(run: Run, R: int, D: int, first: bool) -> None:
    rms, ln = run.mods["rms"], run.mods["ln"]
    from rewriter.kernels.layer_norm import naive as ln_naive
    from rewriter.kernels.rms_norm import naive as rms_naive

    torch.manual_seed(0)
    dev = run.device
    x = torch.randn(R, D, device=dev, dtype=DTYPE)
    dy = torch.randn(R, D, device=dev, dtype=DTYPE)
    w = (1 + 0.1 * torch.randn(D, device=dev)).to(DTYPE)
    b = (0.1 * torch.randn(D, device=dev)).to(DTYPE)
    nbytes = x.numel() * x.element_size()
    t_copy = run.copy_ms(nbytes, "norms")
    copy_gbps = 2 * nbytes / t_copy / 1e6 if t_copy else None
    for op in ("rms_norm", "layer_norm"):
        eps = NORM_EPS[op]
        if op == "rms_norm":
            params = (w,)
            ours_fwd = lambda: rms.rms_norm(x, w, None, eps)  # noqa: E731
            ours_bwd = lambda: rms.rms_norm_backward(dy, x, w, None, eps)[:2]  # noqa: E731
            reference = lambda x_, w_: rms_naive.rms_norm(x_, w_, None, eps)  # noqa: E731
            torch_fn = lambda x_, w_: F.rms_norm(x_, (D,), w_, eps)  # noqa: E731
            supported = lambda: rms._supported(x)  # noqa: E731
        else:
            params = (w, b)
            ours_fwd = lambda: ln.layer_norm(x, w, b, eps)  # noqa: E731
            ours_bwd = lambda: ln.layer_norm_backward(dy, x, w, b, eps)  # noqa: E731
            reference = lambda x_, w_, b_: ln_naive.layer_norm(x_, w_, b_, eps)  # noqa: E731
            torch_fn = lambda x_, w_, b_: F.layer_norm(x_, (D,), w_, b_, eps)  # noqa: E731
            supported = lambda: x.dtype in ln.DTYPES  # noqa: E731

        # fp32 expectations: y, then grads of (x, *params) for dy
        leaves = [t.detach().float().requires_grad_() for t in (x, *params)]
        with torch.enable_grad():
            y32 = reference(*leaves)
            grads32 = torch.autograd.grad(y32, leaves, dy.float())
        y32 = y32.detach()

        def autograd_step(f):
            xr = x.detach().requires_grad_()
            pr = [p.detach().requires_grad_() for p in params]

            def step():
                with torch.enable_grad():
                    y = f(xr, *pr)
                    return (y, *torch.autograd.grad(y, (xr, *pr), dy))
            return step

        for pas in ("fwd", "fwd+bwd"):
            case = f"{op} {pas} {R}x{D}"
            run.log(f"  {case}")
            row = new_row("norms", case, op=op, **{"pass": pas}, rows=R, d=D, bytes=nbytes)
            traffic = (2 if pas == "fwd" else 5) * nbytes  # fwd: x in, y out; bwd: x, dy in, dx out
            row["traffic_bytes"] = traffic
            row["kernel_path"] = run.attempt(row, "kernel_path", lambda: "triton" if supported()
                                             else "reference fallback (dtype)")
            expected = (y32,) if pas == "fwd" else (y32, *grads32)
            ours = ours_fwd if pas == "fwd" else (lambda: (ours_fwd(), *ours_bwd()))
            t0 = time.perf_counter()
            out = run.attempt(row, "ours", ours)  # the first call JIT-compiles the kernels
            row["ours_first_call_s"] = round(time.perf_counter() - t0, 3)
            if out is not None:
                check(row, "ours", out, expected)
            del out
            run.measure(row, "ours", ours, traffic_bytes=traffic)
            if pas == "fwd":  # the tuner tunes the forward launcher (the backward takes its own config)
                fwd = rms.rms_norm if op == "rms_norm" else ln.layer_norm
                op_args = (x, w, None, eps, 0.0) if op == "rms_norm" else (x, w, b, eps)
                run.tuned(row, op, op_args, lambda config: fwd(*op_args, config=config), expected,
                          traffic_bytes=traffic)
            if pas == "fwd+bwd":
                # the backward launcher alone: 3 x bytes of traffic
                t_b = run.measure(row, "ours_bwd", ours_bwd, traffic_bytes=3 * nbytes)
                row["bwd_fraction_of_copy"] = ratio(3 * nbytes / t_b / 1e6 if t_b else None, copy_gbps)
            if pas == "fwd+bwd" and run.timer.graph:
                # a failed capture of an autograd step broke the CUDA RNG state for the rest of the run (H200)
                row["skipped"]["torch"] = row["skipped"]["compiled_reference"] = (
                    "--cuda-graph: autograd steps are not captured in a CUDA graph")
                tfn = None
            else:
                tfn = (lambda: torch_fn(x, *params)) if pas == "fwd" else autograd_step(torch_fn)
            out = None if tfn is None else run.attempt(row, "torch", tfn)
            if out is not None:
                check(row, "torch", out, expected)
                run.measure(row, "torch", tfn, traffic_bytes=traffic)
            del out
            if tfn is None:
                pass
            elif run.compile and not CUDA and not first:
                row["skipped"]["compiled_reference"] = "CPU smoke mode: dynamo ran at the first shape only"
            elif run.compile:
                cref = run.attempt(row, "compiled_reference", lambda: run.compiled(reference, row))
                if cref is not None:
                    cfn = (lambda: cref(x, *params)) if pas == "fwd" else autograd_step(cref)
                    out = run.attempt(row, "compiled_reference", cfn)  # compiles
                    if out is not None:
                        check(row, "compiled_reference", out, expected)
                        run.measure(row, "compiled_reference", cfn, traffic_bytes=traffic)
                    del out
            else:
                row["skipped"]["compiled_reference"] = "--no-compile"
            if t_copy:
                row["ms"]["copy"] = _num(t_copy)
                row["gbps"]["copy"] = _num(copy_gbps, 4)
            row["fraction_of_copy"] = ratio(row["gbps"].get("ours"), copy_gbps)
            if "ours_tuned" in row["gbps"]:
                row["tuned_fraction_of_copy"] = ratio(row["gbps"]["ours_tuned"], copy_gbps)
            row["speedup_vs_torch"] = ratio(row["ms"].get("torch"), row["ms"].get("ours"))
            row["speedup_vs_compiled_reference"] = ratio(row["ms"].get("compiled_reference"),
                                                         row["ms"].get("ours"))
            run.emit(finish(row))
            _cleanup()


# ---------------------------------------------------------------- attention cases


def _sliding_pairs(n: int, window: int, causal: bool) -> int:
    """(query, key) pairs a 1-D band holds."""
    if causal:
        w = min(window, n)
        return w * (w + 1) // 2 + (n - w) * w
    half = window // 2
    return sum(min(n - 1, i + half) - max(0, i - half) + 1 for i in range(n))


# The mask helpers below touch no module global (only their closures and tensor methods):
# dynamo inlines them into FlexAttention, and a global of a file loaded by path (as the tests
# load benchmarks) cannot be guarded.


def _na_axis(length: int, kernel: int):
    """NATTEN's neighbourhood along one axis, as fn(query coords, key coords) -> bool tensor:
    the key is in the query's window, clamped inside [0, length) (so always `kernel` keys)."""
    def axis(qc, kc):
        start = (qc - kernel // 2).clamp(0, length - kernel)
        return (kc >= start) & (kc < start + kernel)
    return axis


def _swin_axis(length: int, window: int, shift: int):
    """Swin along one axis, as fn(query coords, key coords) -> bool tensor: the same window of the
    grid rolled by -shift and, with a shift, the same region (naive.window_attention_2d)."""
    def region(r):
        return (r >= length - window).int() + (r >= length - shift).int()

    def axis(qc, kc):
        rq, rk = (qc + (length - shift)) % length, (kc + (length - shift)) % length
        same = (rq // window) == (rk // window)
        if shift:
            same = same & (region(rq) == region(rk))
        return same
    return axis


def _grid_mask_mod(fy, fx, wg: int):
    """FlexAttention mask_mod of a row-major grid of width wg from per-axis rules."""
    def mask_mod(b, h, q_idx, kv_idx):
        return fy(q_idx // wg, kv_idx // wg) & fx(q_idx % wg, kv_idx % wg)
    return mask_mod


def _band_mask_mod(window: int, causal: bool):
    """FlexAttention mask_mod of the 1-D band (naive.sliding_window_attention, no dilation/sinks)."""
    half = window // 2

    def causal_band(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx > q_idx - window)

    def band(b, h, q_idx, kv_idx):
        return (kv_idx - q_idx <= half) & (q_idx - kv_idx <= half)
    return causal_band if causal else band


def _axis_pairs(fn, length: int) -> int:
    c = torch.arange(length)
    return int(fn(c[:, None], c[None, :]).sum())


def attention_case(group: str, p: dict, mods: dict, ref_knobs: dict) -> dict:
    """Everything one attention case needs: inputs, our call, the reference, the mask_mod
    for FlexAttention, SDPA's causality, the FLOP counts and where our path ran."""
    from rewriter.kernels.agent_attention import naive as agent_naive
    from rewriter.kernels.linear_attention import naive as linear_naive
    from rewriter.kernels.window_attention import naive as window_naive

    B, H, D = p["B"], p["H"], p["D"]
    Dv = p.get("Dv", D)
    c: dict = {"B": B, "H": H, "D": D, "Dv": Dv}
    if group == "sliding_window":
        N, W, causal = p["N"], p["window"], p["causal"]
        sw = mods["sliding"]
        c.update(N=N, shape=dict(B=B, H=H, N=N, D=D, window=W, causal=causal),
                 case=f"sliding window N={N} window={W} {'causal' if causal else 'bidirectional'} H={H} D={D}",
                 op=(sw.sliding_window_attention, lambda q, k, v: (q, k, v, None, W, causal, 1, 0, False, None)),
                 reference=lambda q, k, v: window_naive.sliding_window_attention(
                     q, k, v, window=W, causal=causal, **ref_knobs),
                 runs_here=lambda q, k, v: sw._runs_here(q, k, v, 1),
                 sdpa_causal=causal, pairs=_sliding_pairs(N, W, causal), knobs=ref_knobs)
        c["mask_mod"] = _band_mask_mod(W, causal)
    elif group in ("neighborhood", "swin"):
        (hg, wg) = p["grid"]
        N = hg * wg
        gt = mods["grid"]
        if group == "neighborhood":
            K = p["kernel"]
            fy, fx = _na_axis(hg, K), _na_axis(wg, K)
            c.update(shape=dict(B=B, H=H, grid=[hg, wg], D=D, kernel=K),
                     case=f"neighborhood {hg}x{wg} kernel={K} H={H} D={D}",
                     op=(gt.neighborhood_attention_2d,
                         lambda q, k, v: (q, k, v, None, [hg, wg], [K, K], [1, 1], 0, None)),
                     reference=lambda q, k, v: window_naive.neighborhood_attention_2d(
                         q, k, v, grid=(hg, wg), kernel_size=K, **ref_knobs))
        else:
            Wn, S = p["window"], p["shift"]
            fy, fx = _swin_axis(hg, Wn, S), _swin_axis(wg, Wn, S)
            c.update(shape=dict(B=B, H=H, grid=[hg, wg], D=D, window=Wn, shift=S),
                     case=f"swin {hg}x{wg} window={Wn} shift={S} H={H} D={D}",
                     op=(gt.window_attention_2d, lambda q, k, v: (q, k, v, None, [hg, wg], [Wn, Wn], [S, S], 0, None)),
                     reference=lambda q, k, v: window_naive.window_attention_2d(
                         q, k, v, grid=(hg, wg), window=(Wn, Wn), shift=(S, S), **ref_knobs))
        c.update(N=N, runs_here=lambda q, k, v: gt._runs_here(q, k, v), sdpa_causal=False, knobs=ref_knobs,
                 pairs=_axis_pairs(fy, hg) * _axis_pairs(fx, wg),
                 mask_mod=_grid_mask_mod(fy, fx, wg))
    elif group == "linear_attention":
        N, fm = p["N"], p["feature_map"]
        la = mods["linear"]
        c.update(N=N, shape=dict(B=B, H=H, N=N, D=D, Dv=Dv, feature_map=fm, causal=False),
                 case=f"linear attention N={N} {fm} H={H} D={D} Dv={Dv}",
                 op=(la.linear_attention, lambda q, k, v: (q, k, v, None, fm, False, "denominator", 3.0, 1e-6)),
                 reference=lambda q, k, v: linear_naive.linear_attention(q, k, v, feature_map=fm),
                 runs_here=lambda q, k, v: la._runs_here(q, k, v), sdpa_causal=False, mask_mod=None,
                 flops=4 * B * H * N * D * (Dv + 1))
    elif group == "agent_attention":
        (hg, wg), n = p["grid"], p["agents"]
        N = hg * wg
        ag = mods["agent"]
        a = max(1, round(math.sqrt(n)))
        n_real = min(a, hg) * min(a, wg)
        c.update(N=N, shape=dict(B=B, H=H, grid=[hg, wg], D=D, agents=n),
                 case=f"agent attention {hg}x{wg} agents={n} H={H} D={D}",
                 op=(ag.agent_attention, lambda q, k, v: (q, k, v, None, n, None, [hg, wg], 0)),
                 reference=lambda q, k, v: agent_naive.agent_attention(q, k, v, num_agents=n, grid=(hg, wg)),
                 runs_here=lambda q, k, v: ag._runs_here(q, k, v, ag.shape_of(q, k, v, None, n, None, [hg, wg], 0)),
                 sdpa_causal=False, mask_mod=None, flops=2 * B * H * N * n_real * (2 * D + 2 * Dv))
    else:
        raise ValueError(group)
    fn, op_args = c["op"]
    c["ours"] = lambda q, k, v, config=None: fn(*op_args(q, k, v), config=config)
    N = c["N"]
    sdpa_pairs = N * (N + 1) // 2 if c["sdpa_causal"] else N * N
    c["sdpa_flops"] = 2 * B * H * sdpa_pairs * (D + Dv)
    if "pairs" in c:
        c["flops"] = 2 * B * H * c["pairs"] * (D + Dv)
    return c


def _sdpa(run: Run, row: dict, q, k, v, causal: bool, flops: float):
    """Time full SDPA, on the flash backend where it takes the call (else the default)."""
    fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            fn()
            row["sdpa_backend"] = "flash"
            run.measure(row, "sdpa", fn, flops=flops)
            return
    except Exception as exc:  # noqa: BLE001 - flash refused (or no sdpa_kernel): the default dispatch
        row["sdpa_backend"] = f"default (flash: {_err(exc)})"
        _cleanup()
    run.measure(row, "sdpa", fn, flops=flops)


def _flex(run: Run, row: dict, c: dict, q, k, v, expected, flops: float):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    t0 = time.perf_counter()
    block_mask = create_block_mask(c["mask_mod"], 1, 1, c["N"], c["N"], device=run.device)
    row["flex_block_mask_s"] = round(time.perf_counter() - t0, 3)
    try:
        sparsity = float(block_mask.sparsity())  # % of blocks skipped (odd below one block: not kept)
        if 0 <= sparsity <= 100:
            row["flex_block_sparsity_pct"] = _num(sparsity, 4)
    except Exception:  # noqa: BLE001 - informational only
        pass
    if run.flex_compiled:
        flex = run.compiled(flex_attention)
        key = "flex"
    else:
        flex = flex_attention
        key = "flex_eager"
        row["skipped"]["flex"] = ("CPU smoke mode: compiled FlexAttention not run; eager (unfused) flex_attention "
                                  "checked the mask_mod and is timed as flex_eager")
    fn = lambda: flex(q, k, v, block_mask=block_mask)  # noqa: E731
    t0 = time.perf_counter()
    out = fn()  # compiles
    row["flex_first_call_s"] = round(time.perf_counter() - t0, 3)
    check(row, "flex", out, expected)
    del out
    run.measure(row, key, fn, flops=flops)


def bench_attention(run: Run, group: str, params: list[dict]) -> None:
    for p in params:
        c = attention_case(group, p, run.mods, run.ref_knobs)
        if not run.over_budget(c["case"]):
            _attention_row(run, group, c)  # a function: its tensors are freed on return
            _cleanup()


def _attention_row(run: Run, group: str, c: dict) -> None:
    B, H, N, D, Dv = c["B"], c["H"], c["N"], c["D"], c["Dv"]
    run.log(f"  {c['case']}")
    row = new_row(group, c["case"], shape=c["shape"])
    if c.get("knobs"):
        row["reference_knobs"] = c["knobs"]
    torch.manual_seed(0)
    q = torch.randn(B, H, N, D, device=run.device, dtype=DTYPE)
    k = torch.randn(B, H, N, D, device=run.device, dtype=DTYPE)
    v = torch.randn(B, H, N, Dv, device=run.device, dtype=DTYPE)
    flops, sdpa_flops = c["flops"], c["sdpa_flops"]
    row["flops"] = {"ours": flops, "sdpa": sdpa_flops}
    io_bytes = sum(t.numel() * t.element_size() for t in (q, k, v)) + B * H * N * Dv * q.element_size()
    row["io_bytes"] = io_bytes
    row["kernel_path"] = run.attempt(row, "kernel_path", lambda: "triton" if c["runs_here"](q, k, v)
                                     else "reference fallback")
    expected = run.attempt(row, "reference_fp32", lambda: c["reference"](q.float(), k.float(), v.float()))
    t0 = time.perf_counter()
    out = run.attempt(row, "ours", lambda: c["ours"](q, k, v))  # the first call JIT-compiles the kernels
    row["ours_first_call_s"] = round(time.perf_counter() - t0, 3)
    if out is not None and expected is not None:
        check(row, "ours", out, expected)
    del out
    ours = lambda: c["ours"](q, k, v)  # noqa: E731
    run.measure(row, "ours", ours, traffic_bytes=io_bytes, flops=flops)
    run.tuned(row, c["op"][0].__name__, c["op"][1](q, k, v), lambda config: c["ours"](q, k, v, config), expected,
              traffic_bytes=io_bytes, flops=flops)
    if run.timer.graph:
        row["skipped"]["reference"] = "--cuda-graph: the eager references synchronise with the host (not capturable)"
    else:
        run.measure(row, "reference", lambda: c["reference"](q, k, v), flops=flops)
    _sdpa(run, row, q, k, v, c["sdpa_causal"], sdpa_flops)
    if c["mask_mod"] is None:
        row["skipped"]["flex"] = "no block mask: this op is not masked softmax attention"
    elif not run.flex:
        row["skipped"]["flex"] = "--no-flex"
    elif expected is None:
        row["skipped"]["flex"] = "no fp32 reference to check FlexAttention's output against"
    else:
        run.attempt(row, "flex", lambda: _flex(run, row, c, q, k, v, expected, flops))
    if run.compile:
        cref = run.attempt(row, "compiled_reference", lambda: run.compiled(c["reference"], row))
        out = None if cref is None else run.attempt(row, "compiled_reference", lambda: cref(q, k, v))
        if out is not None:
            if expected is not None:
                check(row, "compiled_reference", out, expected)
            out = None
            run.measure(row, "compiled_reference", lambda: cref(q, k, v), flops=flops)
        cref = None
        torch._dynamo.reset()
    else:
        row["skipped"]["compiled_reference"] = "--no-compile"
    ms = row["ms"]
    t_copy = None
    if group == "linear_attention":
        t_copy = run.copy_ms(io_bytes // 2, group)  # the copy moves io_bytes: the bound's time
        if t_copy:
            row["ms"]["memory_bound"] = _num(t_copy)
            row["gbps"]["copy"] = _num(io_bytes / t_copy / 1e6, 4)
    for prefix, key in (("", "ours"), ("tuned_", "ours_tuned")):
        t = ms.get(key)
        if t is None:
            continue
        row[prefix + "speedup_vs_sdpa"] = ratio(ms.get("sdpa"), t)
        row[prefix + "speedup_vs_flex"] = ratio(ms.get("flex"), t)
        row[prefix + "speedup_vs_compiled_reference"] = ratio(ms.get("compiled_reference"), t)
        row[prefix + "speedup_vs_reference"] = ratio(ms.get("reference"), t)
        if "pairs" in c:
            bound = sdpa_flops / flops
            row["flop_reduction_bound"] = _num(bound, 4)
            row[prefix + "share_of_bound"] = ratio(row[prefix + "speedup_vs_sdpa"], bound)
        if group == "linear_attention":
            row[prefix + "fraction_of_memory_bound"] = ratio(t_copy, t)
    run.emit(finish(row))


# ---------------------------------------------------------------- machine, output


def machine() -> dict:
    m = AS.machine()
    if CUDA:
        m["gpu"] = torch.cuda.get_device_name()
        m["cuda"] = torch.version.cuda
    return m


def slug(m: dict) -> str:
    if "gpu" in m:
        return re.sub(r"[^a-z0-9]+", "-", m["gpu"].lower()).strip("-")
    return AS.slug(m)


def _fmt(v, spec: str) -> str:
    width = int(re.match(r"\d*", spec).group() or 0)
    return format(v, spec) if isinstance(v, (int, float)) else format("-", f">{width}")


def table(rows: list[dict]) -> str:
    head = (f"{'case':50s} {'ours ms':>9} {'tuned':>9} {'sdpa':>9} {'flex':>9} {'compiled':>9} {'torch':>9}  "
            f"{'metric':26s} {'value':>7} {'tuned':>7} {'target':>6} {'meets':>5} {'rel_l2':>8}  note")
    out = [head, "-" * len(head)]
    for r in rows:
        ms = r["ms"]
        ours = ms.get("ours", ms.get("copy"))
        metric = r.get("target_metric")
        value = r.get(metric) if metric else (r.get("speedup_vs_sdpa") if r["name"] == "agent_attention" else None)
        metric = metric or ("speedup_vs_sdpa" if r["name"] == "agent_attention" else "")
        meets = {True: "yes", False: "NO", None: "-"}[r["meets_target"]]
        notes = [r["flag"]] if r["flag"] else []
        notes += [f"{k}: {v}" for k, v in r["errors"].items()]
        if "copy" in ms and "ours" not in ms:
            notes.append(f"{r['gbps'].get('copy')} GB/s")
        tuned = r.get("tuned_" + metric) if metric else None
        out.append(f"{r['case'][:50]:50s} {_fmt(ours, '9.4f')} {_fmt(ms.get('ours_tuned'), '9.4f')} "
                   f"{_fmt(ms.get('sdpa'), '9.4f')} "
                   f"{_fmt(ms.get('flex', ms.get('flex_eager')), '9.4f')} {_fmt(ms.get('compiled_reference'), '9.4f')} "
                   f"{_fmt(ms.get('torch'), '9.4f')}  {metric:26s} {_fmt(value, '7.3f')} {_fmt(tuned, '7.3f')} "
                   f"{_fmt(r.get('target_value'), '6.2f')} {meets:>5} {_fmt(r.get('rel_l2'), '8.1e')}  "
                   + " | ".join(notes))
    return "\n".join(out)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes (on CPU: the interpreted smoke test)")
    p.add_argument("--only", nargs="+", choices=GROUPS, metavar="NAME",
                   help=f"run only these groups: {' '.join(GROUPS)}")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of groups not run from an existing result file of this machine")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up (CUDA)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time (CUDA)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time replays of a CUDA graph (the GPU's time without host launch overhead); writes "
                        "kernel_speed-<gpu>-cudagraph.json")
    p.add_argument("--cpu-reps", type=int, default=1, help="timed calls per measurement without CUDA")
    p.add_argument("--tune", type=int, default=0, metavar="TRIALS",
                   help="also autotune each kernel call (TRIALS configs, TPE) and time its best config as ours_tuned")
    p.add_argument("--tune-budget-s", type=float, default=60.0, help="wall-clock cap of each --tune study")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new case after this many seconds (those left are listed in 'not_run')")
    args = p.parse_args(argv)
    if args.cpu_reps < 1:
        p.error("--cpu-reps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if not CUDA and not args.quick:
        raise SystemExit(
            "kernel_speed.py: no CUDA device. The full run times the Triton kernels on a GPU and refuses to "
            "run without one; `--quick` runs the CPU smoke test (tiny shapes, TRITON_INTERPRET=1).")
    groups = args.only or GROUPS
    shapes = QUICK if args.quick else FULL
    m = machine()
    path = args.out_dir / f"kernel_speed-{slug(m)}{'-cudagraph' if args.cuda_graph and CUDA else ''}.json"
    command = shlex.join(["python", "benchmarks/kernel_speed.py", *argv])
    kept, commands = [], [command]
    if args.merge and path.exists():
        old = json.loads(path.read_text())
        if old.get("machine", {}).get("gpu") == m.get("gpu") and old.get("quick") == args.quick:
            kept = [r for r in old.get("rows", []) if r.get("name") not in groups]
            commands = [old["command"], command] if kept else [command]
    if not args.no_compile:
        for key, value in (("recompile_limit", 64), ("cache_size_limit", 64), ("accumulated_recompile_limit", 4096),
                           ("accumulated_cache_size_limit", 4096), ("fail_on_recompile_limit_hit", True)):
            if hasattr(torch._dynamo.config, key):  # hitting the limit must raise, not silently run eager
                setattr(torch._dynamo.config, key, value)

    def log(msg):
        print(msg, flush=True)

    timer = Timer(args.warmup_ms, args.rep_ms, args.cpu_reps, graph=args.cuda_graph)
    rows: list[dict] = []
    result = {
        "benchmark": "kernel_speed",
        "command": " ; ".join(commands),
        "date": datetime.date.today().isoformat(),
        "machine": m,
        "quick": args.quick,
        "smoke": not CUDA,
        "complete": False,
        "groups": groups,
        "timing": timer.describe(),
        "rows": kept + rows,
    }

    def write():
        result["rows"] = kept + rows
        args.out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")

    def emit(row):
        rows.append(row)
        write()

    run = Run(args, timer, log, emit)
    log(f"kernel_speed on {m.get('gpu', m['cpu'])}, torch {m['torch']}, triton {m['triton']}; "
        f"{'quick' if args.quick else 'full'}; timing: {timer.describe()}")
    t_all = time.perf_counter()
    for group in groups:
        t0 = time.perf_counter()
        log(f"{group}")
        if group == "norms":
            bench_norms(run, shapes["norms"])
        else:
            bench_attention(run, group, shapes[group])
        log(f"  {group} done in {time.perf_counter() - t0:.1f} s")
    result["complete"] = True
    result["not_run"] = run.not_run
    result["elapsed_s"] = round(time.perf_counter() - t_all, 1)
    write()
    log(table(result["rows"]))
    log(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
