"""Timing one kernel call: the median of many, on the device the tensors live on.

CUDA: `triton.testing.do_bench` (flushes L2 between calls, median over the repetitions).
CPU: `torch.utils.benchmark.Timer.blocked_autorange` (median of blocks of calls, the
thread count pinned to what the process uses). Both return milliseconds.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["median_ms"]


def median_ms(fn: Callable[[], object], device: torch.device | str = "cpu", *, min_time_s: float = 0.2) -> float:
    """Median wall time of `fn()` in milliseconds, after one untimed warm-up call.

    `min_time_s`: how long to keep measuring (CPU), or the repetition budget (CUDA, where
    do_bench spends about this long); longer is steadier.
    """
    device = torch.device(device)
    fn()  # warm-up: compiles, allocates, fills caches
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=max(5, int(min_time_s * 250)), rep=max(10, int(min_time_s * 1000)),
                                             return_mode="median"))
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    timer.timeit(3)  # the timer's own first calls are slow
    return float(timer.blocked_autorange(min_run_time=min_time_s).median * 1e3)
