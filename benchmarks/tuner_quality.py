"""How good is the tuner's TPE search against running the whole space?

For each kernel and shape: (1) the exhaustive baseline — every valid config of the space
run and timed (`tune(grid=True)`), twice, keeping each config's faster time; (2) one live TPE study with a quarter of those trials,
whose pick is scored by the exhaustive table's time for it (so re-measurement noise does not
flatter or punish it); (3) the same TPE budget replayed on the measured table for many
seeds (`Tunable.measure`: the recorded times instead of timing), which gives the spread of
outcomes rather than one draw. Ratios are best-found / exhaustive-best (1.0 = found the best).

On a CPU-only machine the kernels are the references' own knobs (`CPU_SPACE(S)`: chunk,
tile and score-block sizes); with CUDA, the Triton kernels' spaces.

    python benchmarks/tuner_quality.py            # writes benchmarks/results/tuner_quality-<machine>.json
    python benchmarks/tuner_quality.py --quick    # tiny shapes, a smoke test

Target (issue 5): within 3% of exhaustive using <= 25% of its trials.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks import as modules
import rewriter  # noqa: E402,F401  (registers the ops)
from rewriter.autotune.cache import Cache, current_device  # noqa: E402
from rewriter.autotune.tuner import Tunable, tunable, tune  # noqa: E402
from attention_speed import machine, slug  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FRACTION = 0.25  # TPE's trials as a share of the exhaustive run's


def cases(quick: bool, device: str) -> list[tuple[str, str, tuple]]:
    """(kernel, label, op arguments) to tune."""
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def qkv(b, h, n, d):
        return [torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype) for _ in range(3)]

    if quick:
        n, grid, h = 256, (12, 12), 2
    else:
        n, grid, h = (16384, (96, 96), 16) if device == "cuda" else (4096, (48, 48), 6)
    out = []
    q, k, v = qkv(1, h, n, 64)
    out.append(("linear_attention", f"causal elu n={n}", (q, k, v, None, "elu", True, "denominator", 3.0, 1e-6)))
    out.append(("sliding_window_attention", f"causal window 256 n={n}",
                (q, k, v, None, 256, True, 1, 4, False, 0.125)))
    q, k, v = qkv(1, h, grid[0] * grid[1], 64)
    out.append(("neighborhood_attention_2d", f"{grid[0]}x{grid[1]} kernel 7",
                (q, k, v, None, list(grid), [7, 7], [1, 1], 0, 0.125)))
    out.append(("window_attention_2d", f"{grid[0]}x{grid[1]} window 8 shift 4",
                (q, k, v, None, list(grid), [8, 8], [4, 4], 0, 0.125)))
    return out


def replay(t: Tunable, table: dict[tuple, float], args: tuple, trials: int, seeds: int) -> list[float]:
    """TPE with `trials` runs on the recorded table, once per seed: the ratio of its pick's
    recorded time to the table's best."""
    best = min(table.values())
    ratios = []
    for seed in range(seeds):
        fake = Tunable(kernel=t.kernel, kind=t.kind, space=t.space, run=lambda a, c: a[0], reference=lambda a: a[0],
                       source=t.source, measure=lambda config: table[tuple(sorted(config.items()))])
        result = tune(fake, (args[0],) + args[1:], trials=trials, seed=seed, save=False)
        ratios.append(table[tuple(sorted(result.best_config.items()))] / best)
    return ratios


def run_case(kernel: str, label: str, args: tuple, seeds: int, min_time_s: float, passes: int, log) -> dict:
    device = args[0].device.type
    t = tunable(kernel, "cuda" if device == "cuda" else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        cache = Cache(Path(tmp) / "cache.json", device=current_device(device))
        # the table: each config's fastest time over `passes` full sweeps (a busy machine
        # slows some measurements down, never speeds them up)
        table: dict[tuple, float] = {}
        for _ in range(passes):
            exhaustive = tune(t, args, grid=True, min_time_s=min_time_s, cache=cache, save=False)
            for tr in exhaustive.trials:
                if tr.state == "ok":
                    key = tuple(sorted(tr.config.items()))
                    table[key] = min(tr.ms, table.get(key, float("inf")))
        if not table:
            return {"kernel": kernel, "case": label, "error": "no config ran", "exhaustive_runs": exhaustive.runs}
        best_ms = min(table.values())
        default_ms = table.get(tuple(sorted(exhaustive.default_config.items())))
        budget = max(1, math.ceil(FRACTION * exhaustive.runs))
        live = tune(t, args, trials=budget, min_time_s=min_time_s, cache=cache, save=False, seed=1)
    live_ratio = table.get(tuple(sorted(live.best_config.items())), float("nan")) / best_ms
    ratios = replay(t, table, args, budget, seeds) if budget < len(table) else [1.0] * seeds
    row = {
        "kernel": kernel, "case": label, "dtype": str(args[0].dtype).removeprefix("torch."),
        "space_valid_configs": exhaustive.runs, "exhaustive_failures": exhaustive.failures,
        "exhaustive_passes": passes, "exhaustive_best_ms": best_ms,
        "exhaustive_best_config": dict(min(table, key=table.get)),
        "exhaustive_wall_s_per_pass": exhaustive.wall_s, "default_config": exhaustive.default_config,
        "default_ms": default_ms, "default_over_best": default_ms / best_ms if default_ms else None,
        "tpe_trials": budget, "tpe_share_of_exhaustive": budget / exhaustive.runs,
        "tpe_live_best_config": live.best_config, "tpe_live_measured_ms": live.best_ms,
        "tpe_live_ratio": live_ratio, "tpe_live_wall_s": live.wall_s,
        "exhaustive_table": [[dict(config), ms] for config, ms in sorted(table.items(), key=lambda kv: kv[1])],
        "tpe_replay_seeds": seeds, "tpe_replay_mean_ratio": statistics.fmean(ratios),
        "tpe_replay_worst_ratio": max(ratios), "tpe_replay_within_3pct": sum(r <= 1.03 for r in ratios) / len(ratios),
    }
    log(f"{kernel:26s} {label:28s} space {exhaustive.runs:3d}  TPE {budget:2d} trials: live x{live_ratio:.3f}, "
        f"replay mean x{row['tpe_replay_mean_ratio']:.3f} worst x{row['tpe_replay_worst_ratio']:.3f}  "
        f"(default x{row['default_over_best'] or float('nan'):.2f} of best)")
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test; nothing to quote)")
    parser.add_argument("--seeds", type=int, default=20, help="replays of TPE on the measured table")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds of timing per config")
    parser.add_argument("--passes", type=int, default=2, help="full sweeps for the exhaustive table (fastest kept)")
    parser.add_argument("--kernels", nargs="*", help="only these kernels")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = machine()
    if device == "cuda":
        m["gpu"] = torch.cuda.get_device_name()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    rows = []
    started = time.perf_counter()
    for kernel, label, op_args in cases(args.quick, device):
        if args.kernels and kernel not in args.kernels:
            continue
        rows.append(run_case(kernel, label, op_args, args.seeds if not args.quick else 3,
                             args.min_time if not args.quick else 0.01, args.passes if not args.quick else 1, log))
    result = {
        "benchmark": "tuner_quality",
        "command": "python benchmarks/tuner_quality.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": m, "device": device, "wall_s": time.perf_counter() - started, "rows": rows,
    }
    name = slug(m) if device == "cpu" else "gpu-" + current_device("cuda").slug
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"tuner_quality-{name}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
