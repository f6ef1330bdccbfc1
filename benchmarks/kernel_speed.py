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
rewriter.compare.TOLERANCE); a failed check or a call that fell back to the reference sets
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

The script is the command line and the result file; how a case is timed, checked and turned
into a row is kernel_harness.py, the cases themselves kernel_cases.py.

Writes benchmarks/results/kernel_speed-<machine>.json (format: DESIGN.md, "Benchmarks");
<machine> is the GPU name as a slug (e.g. nvidia-h100-80gb-hbm3), or attention_speed.py's
CPU slug.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the sibling modules and benchmarks import as modules
    sys.path.insert(0, str(HERE))
from kernel_harness import CUDA, Run, Timer  # noqa: E402  (first: it switches the interpreter on)
import attention_speed as AS  # noqa: E402  (its machine description)
from kernel_cases import bench_attention, bench_norms  # noqa: E402

GROUPS = ["norms", "sliding_window", "neighborhood", "swin", "linear_attention", "agent_attention"]

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
