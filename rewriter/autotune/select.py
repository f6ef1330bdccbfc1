"""Which config an op call runs: the cache's tuned entry for its (kernel, shape bucket,
dtype) on this device, else None (the kernel's default).

Called by the `rewriter::` ops' dispatch on every call, so it is cheap: the space, the
kernel's source hash and the device are memoised; the cache re-reads its file only when
the file changed. `REWRITER_AUTOTUNE=off` skips the cache (every op runs its default).
Imports neither Triton nor Optuna.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .buckets import bucket
from .space import KERNELS, Space, space

__all__ = ["tuned_config", "cache_key", "choices", "source_hash", "device_kind", "config_problem"]


def device_kind(device: torch.device | str) -> str:
    return "cuda" if torch.device(device).type == "cuda" else "cpu"


def choices(kernel: str, args: tuple, kind: str) -> int:
    """How many configs of `kernel`'s space fit this call (0: nothing to tune on `kind`)."""
    sp = _space(kernel, kind)
    return len(sp.configs(sp.shape_of(*args))) if sp is not None else 0


@functools.lru_cache(maxsize=None)
def _space(kernel: str, kind: str) -> Space | None:
    if kernel not in KERNELS:
        return None
    found = space(kernel, kind)
    return found if found is not None and found.shape_of is not None else None


@functools.lru_cache(maxsize=None)
def source_hash(kernel: str, kind: str) -> str:
    """Hash of the sources a tuned entry depends on: every .py file of the kernel's folder
    (its Triton kernels, its reference and its space), so an edit there retires old entries."""
    package = KERNELS[kernel].rpartition(".")[0]
    folder = Path(importlib.util.find_spec(package).submodule_search_locations[0])
    digest = hashlib.sha256(kind.encode())
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(kernel: str, args: tuple, kind: str):
    """(Key, shape) of one call of `kernel` with the op's arguments `args`; None where the
    kernel has nothing to tune on this device kind."""
    from .cache import Key

    sp = _space(kernel, kind)
    if sp is None:
        return None
    shape = sp.shape_of(*args)
    return Key(kernel=kernel, source=source_hash(kernel, kind), bucket=bucket(shape), dtype=str(shape.get("dtype", ""))), shape


def tuned_config(kernel: str, args: tuple, device: torch.device | str) -> dict[str, Any] | None:
    """The tuned config for this call, or None (then the kernel uses its default). A tuned
    config that this exact shape cannot run (`keep` says no) is ignored. The cache is an
    optimisation: if looking it up fails, the op warns once and runs its default."""
    if os.environ.get("REWRITER_AUTOTUNE", "").lower() in ("off", "0", "false"):
        return None
    try:
        return _lookup(kernel, args, device)
    except Exception as exc:  # noqa: BLE001 - a broken cache must never break the model
        if kernel not in _warned:
            _warned.add(kernel)
            warnings.warn(f"rewriter: could not read the tuned config of {kernel} ({type(exc).__name__}: {exc}); "
                          "running its default config.", RuntimeWarning, stacklevel=3)
        return None


_warned: set[str] = set()


def _lookup(kernel: str, args: tuple, device: torch.device | str) -> dict[str, Any] | None:
    kind = device_kind(device)
    found = cache_key(kernel, args, kind)
    if found is None:
        return None
    key, shape = found
    device = torch.device(device)
    name = "cpu" if kind == "cpu" else f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    from .cache import default_cache  # memoised per device and cache path

    cache = default_cache(name)
    entry = cache.get(key)
    if not entry:
        return None
    config = entry.get("config")
    problem = _known_problem(kernel, config, kind)
    if problem is None and not _space(kernel, kind).keep(config, shape):
        return None  # a config of this bucket that this exact shape cannot run: the default runs (not an error)
    if problem is not None:
        where = (cache.path, key.text())
        if where not in _warned_entries:
            _warned_entries.add(where)
            warnings.warn(f"rewriter: ignoring the tuned config of {kernel} in {cache.path} (key {key.text()}): "
                          f"{problem}; running its default config (`rewriter cache show` lists bad entries)",
                          RuntimeWarning, stacklevel=4)
        return None
    return dict(config)


_warned_entries: set[tuple] = set()


def _known_problem(kernel: str, config: Any, kind: str) -> str | None:
    """config_problem, memoised: it runs on every op call and a cache holds few distinct configs."""
    try:
        return _memo_problem(kernel, tuple(sorted((k, type(v).__name__, v) for k, v in config.items())), kind)
    except (AttributeError, TypeError):  # not a dict, or unhashable values: no memo
        return config_problem(kernel, config, kind)


@functools.lru_cache(maxsize=1024)
def _memo_problem(kernel: str, items: tuple, kind: str) -> str | None:
    return config_problem(kernel, {k: v for k, _, v in items}, kind)  # typed items: True is not 1 here


def config_problem(kernel: str, config: Any, kind: str) -> str | None:
    """Why a stored config cannot run `kernel` on this device kind (None: it can): every
    parameter of the kernel's space, each with one of the space's values."""
    sp = _space(kernel, kind) if kernel in KERNELS else None
    if sp is None:
        return f"no kernel {kernel!r} with a tuning space on {kind}"
    if not isinstance(config, dict):
        return f"the config is a {type(config).__name__}, not a dict"
    if set(config) != set(sp.params):
        return f"parameters {sorted(config)} are not the space's {sorted(sp.params)}"
    for name, value in config.items():
        if value not in sp.params[name] or isinstance(value, bool) != any(isinstance(c, bool) for c in sp.params[name]):
            return f"{name}={value!r} is not one of the space's values {sp.params[name]}"
    return None
