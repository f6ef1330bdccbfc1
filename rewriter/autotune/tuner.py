"""Tuning one kernel call: an Optuna study over the kernel's search space.

One study per (device, kernel, shape bucket, dtype). Each trial proposes a config; a config
the space's `keep` rejects is told to the study as infeasible without running; the others
run once and are checked against the reference (a fast wrong config never wins), then
timed (`bench.median_ms`). Compile errors, out-of-resources, wrong results, timeouts and
crashed workers become failed trials with their reason; the study goes on.

The sampler is TPE by default (constraint-aware: failed and rejected trials inform it),
or any `optuna.samplers.BaseSampler`; `grid=True` runs every valid config (the exhaustive
baseline). Trials count configs *run*: a repeated proposal reuses its measurement and a
rejected one costs no run (it still counts towards `MAX_PROPOSALS`, so a space whose
proposals are nearly all invalid ends).

Before the winner is kept it is timed again against the default, interleaved
(`CONFIRM_ROUNDS` times each, medians with the study's first timings): one lucky or
unlucky measurement (a busy host, a clock still ramping, launch overhead that dwarfs a
short kernel) must not decide, and the default stays unless the winner is at least
`CONFIRM_MARGIN` faster. On an H200 a study of agent attention timed every config near
0.30 ms and kept one that CUDA-graph timing showed 1.9x slower than the default
(benchmarks/results/kernel_speed-nvidia-h200-cudagraph.json): what this guards against.

`isolate=True` (the default on CUDA) runs trials in a worker process, restarted when a
trial hangs past `trial_timeout_s` or kills it. `storage="postgresql://…"` keeps the study
in a database so several machines tune one device type together; the best trial over
everyone's results is what lands in the cache.
"""
from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from .. import kernels
from ..compare import error
from .bench import median_ms
from .select import device_kind, source_hash
from .space import Space, space

__all__ = ["Tunable", "Trial", "TuneResult", "tunable", "tune"]

# relative L2 error a config's output may have against the reference (accumulation order)
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# proposals (run or rejected) after which a study stops even if `trials` runs were not reached
MAX_PROPOSALS = 2000
INFEASIBLE = 1e12  # the value told to Optuna for a config that did not run or was wrong
# re-timings of the winner and of the default before the winner is kept, and how much
# faster (by the medians) the winner must be to displace the default
CONFIRM_ROUNDS = 3
CONFIRM_MARGIN = 0.02


@dataclass
class Tunable:
    """One kernel on one device kind, as the tuner drives it. Module-level callables only
    (a worker process unpickles it)."""

    kernel: str
    kind: str  # "cuda" | "cpu"
    space: Space
    run: Callable[[tuple, dict], torch.Tensor]  # (op args, config) -> output
    reference: Callable[[tuple], torch.Tensor]  # op args -> expected output
    source: str  # hash of the code the timings depend on
    # a recorded time per config instead of timing it (replaying a measured table, e.g. to
    # compare samplers without re-measuring); None: time the run
    measure: Callable[[dict], float] | None = None


@dataclass
class Trial:
    config: dict[str, Any]
    state: str  # "ok" | "rejected" | "failed" | "wrong" | "timeout" | "crashed"
    ms: float | None = None
    reason: str = ""


@dataclass
class TuneResult:
    kernel: str
    device: str
    bucket: str
    dtype: str
    shape: dict[str, Any]
    default_config: dict[str, Any]
    default_ms: float | None
    best_config: dict[str, Any] | None
    best_ms: float | None
    trials: list[Trial] = field(default_factory=list)
    wall_s: float = 0.0
    study: str = ""
    # the interleaved re-timings that confirmed (or overturned) the study's winner:
    # {"winner": config, "winner_ms": [...], "default_ms": [...], "kept": "winner" | "default"}
    confirmation: dict[str, Any] | None = None

    @property
    def runs(self) -> int:
        return sum(t.state != "rejected" for t in self.trials)

    @property
    def failures(self) -> int:
        return sum(t.state not in ("ok", "rejected") for t in self.trials)

    @property
    def speedup(self) -> float | None:
        if self.default_ms and self.best_ms:
            return self.default_ms / self.best_ms
        return None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(runs=self.runs, failures=self.failures, speedup=self.speedup)
        return out


# ------------------------------------------------------------------ what a kernel is


@dataclass
class _TritonRun:
    kernel: str

    def __call__(self, args: tuple, config: dict) -> torch.Tensor:
        fast = kernels.triton_impl(self.kernel)
        if fast is None:
            raise RuntimeError(f"{self.kernel} has no Triton kernel here (is Triton installed?)")
        return fast(*args, config=config)


@dataclass
class _ReferenceRun:
    kernel: str

    def __call__(self, args: tuple, config: dict) -> torch.Tensor:
        return kernels.reference(self.kernel)(*args, **config)


@dataclass
class _Reference:
    kernel: str

    def __call__(self, args: tuple) -> torch.Tensor:
        return kernels.reference(self.kernel)(*args)


def tunable(kernel: str, kind: str) -> Tunable:
    """The built-in kernel `kernel` on device kind "cuda" (its Triton kernel) or "cpu" (its
    reference's own knobs)."""
    sp = space(kernel, kind)
    if sp is None:
        raise ValueError(f"{kernel} has nothing to tune on {kind}: its {'reference' if kind == 'cpu' else 'kernel'} "
                         "takes no configuration.")
    run = _TritonRun(kernel) if kind == "cuda" else _ReferenceRun(kernel)
    return Tunable(kernel=kernel, kind=kind, space=sp, run=run, reference=_Reference(kernel),
                   source=source_hash(kernel, kind))


# ------------------------------------------------------------------ one trial


def _evaluate(run, args: tuple, expected: torch.Tensor, config: dict, min_time_s: float, measure=None) -> Trial:
    """Run `config` once, check it, time it. Never raises for the config's own failures."""
    device = _device_of(args)
    try:
        out = run(args, config)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - compile errors, out of resources, bad launches
        return Trial(config, "failed", reason=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}")
    tol = TOLERANCE.get(expected.dtype, 1e-3)
    err = error(out, expected)["rel_l2"]
    if not (err <= tol):
        return Trial(config, "wrong", reason=f"rel_l2 {err:.2e} against the reference (allowed {tol:.0e})")
    try:
        ms = measure(config) if measure is not None else median_ms(lambda: run(args, config), device,
                                                                    min_time_s=min_time_s)
    except Exception as exc:  # noqa: BLE001
        return Trial(config, "failed", reason=f"{type(exc).__name__} while timing: {exc}")
    return Trial(config, "ok", ms=ms)


def _device_of(args: tuple) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cpu")


class _InProcess:
    def __init__(self, t: Tunable, args: tuple, expected: torch.Tensor, min_time_s: float):
        self.t, self.args, self.expected, self.min_time_s = t, args, expected, min_time_s

    def evaluate(self, config: dict, timeout_s: float) -> Trial:
        return _evaluate(self.t.run, self.args, self.expected, config, self.min_time_s, self.t.measure)

    def close(self) -> None:
        pass


def _worker_main(conn, run, reference, args_path: str, device: str, min_time_s: float) -> None:
    args = torch.load(args_path, weights_only=False)
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    with torch.no_grad():
        expected = reference(args)
        conn.send("ready")
        while True:
            config = conn.recv()
            if config is None:
                return
            conn.send(_evaluate(run, args, expected, config, min_time_s))


class _Worker:
    """Trials in a child process: a hang is killed after the timeout, a crash is reported,
    and the next trial gets a fresh child."""

    def __init__(self, t: Tunable, args: tuple, min_time_s: float):
        self.t, self.min_time_s = t, min_time_s
        self.device = str(_device_of(args))
        fd, self.args_path = tempfile.mkstemp(suffix=".pt", prefix="rewriter-tune-")
        os.close(fd)
        torch.save(tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args), self.args_path)
        self.proc = None

    def _start(self, timeout_s: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, daemon=True,
                                args=(child, self.t.run, self.t.reference, self.args_path, self.device, self.min_time_s))
        try:
            self.proc.start()
        finally:
            child.close()
        if not self.conn.poll(max(timeout_s, 120.0)) or self.conn.recv() != "ready":
            raise RuntimeError("the tuning worker process did not start")

    def _kill(self) -> None:
        if self.proc is not None and self.proc.pid is not None:
            self.proc.kill()
            self.proc.join()
            self.proc = None

    def evaluate(self, config: dict, timeout_s: float) -> Trial:
        try:
            if self.proc is None or not self.proc.is_alive():
                self._start(timeout_s)
            self.conn.send(config)
            if self.conn.poll(timeout_s):
                return self.conn.recv()
        except (EOFError, ConnectionError, OSError, RuntimeError, pickle.PicklingError) as exc:
            code = None
            if self.proc is not None and self.proc.pid is not None:
                self.proc.join(5)  # reap it, for its exit code
                code = self.proc.exitcode
            self._kill()
            return Trial(config, "crashed", reason=f"the worker process died (exit code {code}): {exc}")
        self._kill()
        return Trial(config, "timeout", reason=f"no result within {timeout_s:g} s; the worker was killed")

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(None)
                self.proc.join(5)
            except (OSError, EOFError):
                pass
        self._kill()
        if os.path.exists(self.args_path):
            os.unlink(self.args_path)


# ------------------------------------------------------------------ the study


def _frozen(config: dict) -> tuple:
    return tuple(sorted(config.items()))


def _ordinal(choices: list) -> bool:
    """Numeric choices in increasing order (block sizes, warps, stages): searched as an
    ordered integer index, so the sampler learns that neighbouring values behave alike;
    anything else (strings, unordered lists) is categorical."""
    numeric = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices)
    return numeric and len(choices) > 1 and all(a < b for a, b in zip(choices, choices[1:]))


def _suggest(trial, space: Space) -> dict:
    config = {}
    for name, choices in space.params.items():
        if _ordinal(choices):
            config[name] = choices[trial.suggest_int(name, 0, len(choices) - 1)]
        else:
            config[name] = trial.suggest_categorical(name, choices)
    return config


def _as_params(config: dict, space: Space) -> dict:
    """`config` in the sampler's terms (the index of each ordinal value), for enqueueing."""
    return {name: space.params[name].index(value) if _ordinal(space.params[name]) else value
            for name, value in config.items()}


def _study(name: str, sampler, storage: str | None, seed: int, trials: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if sampler is None:
        # random start-up trials before TPE models the results: a third of a small budget
        startup = max(2, min(8, trials // 3))
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, **_constraints())
    return optuna.create_study(study_name=name, storage=storage, sampler=sampler, direction="minimize",
                               load_if_exists=storage is not None)


def _constraints() -> dict:
    """TPE learns from infeasible trials: through `Trial.set_constraint` (Optuna >= 5), or
    the sampler's `constraints_func` on older releases."""
    import optuna

    if hasattr(optuna.trial.Trial, "set_constraint"):
        return {}
    return {"constraints_func": lambda trial: trial.user_attrs.get("constraint", (0.0,))}


def _measured(study) -> dict[tuple, Trial]:
    """The configs the study already holds results for (with a shared storage, from every
    machine), so they are not run again."""
    import optuna

    out = {}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        config, state = trial.user_attrs.get("config"), trial.user_attrs.get("state")
        if config is not None and state is not None:
            out[_frozen(config)] = Trial(config, state, ms=trial.value if state == "ok" else None,
                                         reason=trial.user_attrs.get("reason", ""))
    return out


def _best_in_study(study, sp: Space, shape: dict) -> tuple[dict | None, float | None]:
    """The fastest feasible trial of the whole study (other machines' too, with a shared storage)."""
    import optuna

    best, best_ms = None, None
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if trial.user_attrs.get("state") != "ok":
            continue
        config = trial.user_attrs.get("config")
        if config is None or not sp.keep(config, shape):
            continue
        if best_ms is None or trial.value < best_ms:
            best, best_ms = dict(config), float(trial.value)
    return best, best_ms


def _confirm(result: TuneResult, runner, default: dict, timeout_s: float) -> None:
    """Time the study's winner and the default again, alternately; keep the winner only if
    its median is at least CONFIRM_MARGIN below the default's (else the default, whose
    median becomes both times). A winner that fails on a re-run loses."""
    import statistics

    winner = result.best_config
    times = {"winner": [result.best_ms], "default": [result.default_ms]}
    winner_failed = False
    for _ in range(CONFIRM_ROUNDS):
        for name, config in (("default", default), ("winner", winner)):
            record = runner.evaluate(config, timeout_s)
            if record.state == "ok":
                times[name].append(record.ms)
            elif name == "winner":
                winner_failed = True
                break
        if winner_failed:
            break
    w = float("inf") if winner_failed else statistics.median(times["winner"])
    d = statistics.median(times["default"])
    kept = "winner" if w < d * (1 - CONFIRM_MARGIN) else "default"
    result.confirmation = {"winner": dict(winner), "winner_ms": times["winner"], "default_ms": times["default"],
                           "kept": kept}
    result.default_ms = d
    if kept == "winner":
        result.best_ms = w
    else:
        result.best_config, result.best_ms = dict(default), d


def tune(kernel: str | Tunable, args: tuple, *, trials: int = 30, budget_s: float | None = None, grid: bool = False,
         sampler=None, storage: str | None = None, cache=None, isolate: bool | None = None,
         trial_timeout_s: float = 60.0, min_time_s: float = 0.1, seed: int = 0,
         progress: Callable[[Trial], None] | None = None, save: bool = True) -> TuneResult:
    """Tune `kernel` (a built-in kernel name, or a `Tunable`) on one call's arguments `args`
    (the op's positional arguments; their device picks CUDA or CPU).

    trials: configs to run (the default config is always the first); budget_s: wall-clock
    cap for the study; grid: run every valid config instead; sampler: an Optuna sampler
    (default TPE, seeded); storage: an Optuna storage URL (e.g. PostgreSQL) shared by several
    machines; cache: the `Cache` to write the best config into (default: this device's);
    isolate: trials in a worker process (default: on CUDA); trial_timeout_s: an isolated trial
    running longer is killed and recorded as a timeout (in-process trials cannot be
    interrupted); min_time_s: timing per config; save: write the best config to the cache.
    """
    started = time.perf_counter()
    device = _device_of(args)
    kind = device_kind(device)
    t = kernel if isinstance(kernel, Tunable) else tunable(kernel, kind)
    sp = t.space
    shape = sp.shape_of(*args)
    from .buckets import bucket
    from .cache import Key, current_device, default_cache

    key = Key(kernel=t.kernel, source=t.source, bucket=bucket(shape), dtype=str(shape.get("dtype", "")))
    dev = current_device(device)
    default = sp.default(shape)
    valid = sp.configs(shape)
    if not valid:
        raise ValueError(f"{t.kernel}: no config of its space fits the shape {shape}.")
    isolate = (kind == "cuda") if isolate is None else isolate
    if isolate:  # the worker computes the reference itself
        runner = _Worker(t, args, min_time_s)
    else:
        with torch.no_grad():
            runner = _InProcess(t, args, t.reference(args), min_time_s)
    study = _study(f"{dev.slug}/{key.text()}", sampler, storage, seed, trials)
    result = TuneResult(kernel=t.kernel, device=dev.name, bucket=key.bucket, dtype=key.dtype, shape=shape,
                        default_config=default, default_ms=None, best_config=None, best_ms=None, study=study.study_name)
    seen = _measured(study)  # configs someone (another machine, an earlier run) already measured
    queue = [default] + (valid if grid else [])
    for config in queue:
        if _frozen(config) not in seen:
            study.enqueue_trial(_as_params(config, sp), skip_if_exists=False)
    wanted = len({_frozen(c) for c in queue} - set(seen)) if grid else max(1, trials)
    ran = 0
    proposals = 0
    try:
        with torch.no_grad():
            while ran < wanted and proposals < MAX_PROPOSALS:
                if budget_s is not None and time.perf_counter() - started > budget_s:
                    break
                if all(_frozen(c) in seen for c in valid):
                    break  # every valid config has run
                proposals += 1
                trial = study.ask()
                config = _suggest(trial, sp)
                frozen = _frozen(config)
                record = seen.get(frozen)
                if record is None:
                    if not sp.keep(config, shape):
                        record = Trial(config, "rejected", reason="outside the kernel's constraints (not run)")
                    else:
                        record = runner.evaluate(config, trial_timeout_s)
                        ran += 1
                    seen[frozen] = record
                    result.trials.append(record)
                    if progress is not None:
                        progress(record)
                if frozen == _frozen(default) and record.state == "ok":
                    result.default_ms = record.ms
                ok = record.state == "ok"
                trial.set_user_attr("state", record.state)
                trial.set_user_attr("config", config)
                if hasattr(trial, "set_constraint"):
                    trial.set_constraint("runs_and_is_right", 0.0 if ok else 1.0)
                else:
                    trial.set_user_attr("constraint", (0.0,) if ok else (1.0,))
                if record.reason:
                    trial.set_user_attr("reason", record.reason[:500])
                study.tell(trial, record.ms if ok else INFEASIBLE)
        if result.default_ms is None and seen.get(_frozen(default)) is not None:
            result.default_ms = seen[_frozen(default)].ms
        result.best_config, result.best_ms = _best_in_study(study, sp, shape)
        if result.best_config is not None and result.default_ms is not None \
                and _frozen(result.best_config) != _frozen(default):
            with torch.no_grad():
                _confirm(result, runner, default, trial_timeout_s)
    finally:
        runner.close()
    result.wall_s = time.perf_counter() - started
    if save and result.best_config is not None:
        cache = cache if cache is not None else default_cache(device)
        cache.put(key, {"config": result.best_config, "time_ms": result.best_ms, "default_ms": result.default_ms,
                        "trials": result.runs, "failures": result.failures, "shape": shape,
                        "tuned_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "study": study.study_name, "force": True})
    return result
