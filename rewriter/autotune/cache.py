"""The persistent per-device store of tuned kernel configs.

One JSON file per device (`default_path`), shaped

    {"format": 1,
     "device": {"name": ..., "capability": ..., "torch": ..., "triton": ...},
     "entries": {stored_key: entry, ...}}

**What an entry is keyed by.** The design's cache key is (device name, compute capability,
torch and Triton versions, kernel source hash, shape bucket, dtype). The device name and
capability pick the *file* (`Device.slug` names it, and the header must match). The torch
and Triton versions go into the *stored key* of every entry:

    "<kernel>|<source>|<bucket>|<dtype>|torch=<version>|triton=<version or none>"

i.e. `Key.text()` followed by the versions of the process that measured it. So two
environments with different torch/Triton builds on one machine share the file without
moving each other's work aside or reading each other's timings: `get` and `entries` only
ever see entries measured under the current process's versions (and `entries` returns them
keyed by the plain `Key.text()`), and an entry from an upgrade-ago stays inert in the file
until `clear`. The header's versions record the last writer; they are informative only.

**Writes** happen under an inter-process lock (`filelock`, on `<file>.lock` beside the
file). Each `put` re-reads the file under the lock, merges, writes a temporary file in the
same directory, fsyncs it and `os.replace`s it over the old one, so concurrent processes
never lose an entry and a process killed mid-write leaves the previous file whole (its
temporary file is swept by the next writer).

**The merge rule** (`put` and `import_`): a new entry for a key replaces the stored one only
if its `time_ms` is lower, or if it carries `"force": True` (the flag is a directive, not
data: it is not stored).

**Reads** are cheap: the parsed file is kept in memory and re-read only when its
(inode, size, mtime, ctime) changed, so `get` costs one `os.stat` and a dict lookup.

**Trouble is reported, not raised**: a truncated or garbage file, or one with another format
version or another device's header, is moved aside to `<file>.corrupt-<timestamp>` with a
`CacheWarning` and the cache carries on empty; a directory that cannot be written warns
once (`put` keeps the entry in memory for this process) and never raises.
"""
from __future__ import annotations

import datetime
import functools
import glob
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import re
import tempfile
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Device",
    "Key",
    "Cache",
    "CacheWarning",
    "current_device",
    "cache_dir",
    "default_path",
    "default_cache",
    "FORMAT",
]

FORMAT = 1
ENV_VAR = "REWRITER_CACHE_DIR"
LOCK_TIMEOUT_S = 60.0


class CacheWarning(UserWarning):
    """Something is wrong with the kernel cache's file or directory; tuning still works."""


# ---------------------------------------------------------------------------------- device


def _slugify(text: str) -> str:
    text = re.sub(r"\((?:R|TM|tm|r)\)", " ", text)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


_THREADS = re.compile(r"^(.*) \((\d+) threads?\)$")


@functools.lru_cache(maxsize=256)
def _slug(name: str, capability: str) -> str:
    if capability == "cpu":
        m = _THREADS.match(name)
        model, threads = (m.group(1), f"-{m.group(2)}t") if m else (name, "")
        return f"cpu-{_slugify(model) or 'unknown'}{threads}"[:120]
    base = _slugify(name) or "unknown"
    if re.fullmatch(r"\d+\.\d+", capability):
        return f"{base}-sm{capability.replace('.', '')}"[:120]
    return f"{base}-{_slugify(capability) or 'unknown'}"[:120]


@dataclass(frozen=True)
class Device:
    """What the entries were measured on."""

    name: str  # "NVIDIA H200" / "<CPU model name> (<n> threads)"
    capability: str  # "9.0" for CUDA, "cpu" for the CPU
    torch: str  # torch.__version__
    triton: str | None  # Triton's version, or None when it is not installed

    @property
    def slug(self) -> str:
        """Filesystem-safe name: "nvidia-h200-sm90", "cpu-amd-epyc-7b13-2t"."""
        return _slug(self.name, self.capability)

    def header(self) -> dict[str, Any]:
        return {"name": self.name, "capability": self.capability, "torch": self.torch, "triton": self.triton}


@functools.lru_cache(maxsize=None)
def _triton_version() -> str | None:
    # Never imports triton: only asks the installed distributions.
    for dist in ("triton", "pytorch-triton", "pytorch-triton-rocm", "triton-xpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@functools.lru_cache(maxsize=None)
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    if name:
                        return " ".join(name.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def current_device(device: torch.device | str | int | None = None) -> Device:
    """The `Device` that timings taken on `device` belong to.

    `None` means the current CUDA device when CUDA is available, else the CPU; `"cpu"` is
    the CPU (its name carries `torch.get_num_threads()`, which CPU timings depend on);
    `"cuda"`, `"cuda:1"`, an int or a `torch.device` name a GPU.
    """
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif isinstance(device, int):
        device = torch.device("cuda", device)
    elif not isinstance(device, torch.device):
        device = torch.device(device)
    if device.type == "cpu":
        return _device("cpu", torch.get_num_threads())
    if device.type == "cuda":
        return _device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    return _device(device.type, 0)


@functools.lru_cache(maxsize=None)
def _device(kind: str, n: int) -> Device:
    """`n` is the thread count for the CPU, the device index for CUDA."""
    version, triton = torch.__version__, _triton_version()
    if kind == "cpu":
        return Device(name=f"{_cpu_model()} ({n} threads)", capability="cpu", torch=version, triton=triton)
    if kind == "cuda":
        major, minor = torch.cuda.get_device_capability(n)
        name = torch.cuda.get_device_name(n)
        return Device(name=name, capability=f"{major}.{minor}", torch=version, triton=triton)
    # Other accelerators have no tuned kernels yet; give them a stable identity anyway.
    return Device(name=kind, capability=kind, torch=version, triton=triton)


# ------------------------------------------------------------------------------------- key


@dataclass(frozen=True)
class Key:
    """What a tuned config is for, on one device (the device is the cache's)."""

    kernel: str  # "linear_attention"
    source: str  # hash of the kernel's source
    bucket: str  # shape bucket, e.g. "b1-h16-n16384-d64"
    dtype: str  # "bfloat16" ("torch.bfloat16" and torch dtypes are accepted and normalised)

    def __post_init__(self) -> None:
        dtype = str(self.dtype)
        if dtype.startswith("torch."):
            object.__setattr__(self, "dtype", dtype[len("torch."):])
        for field in ("kernel", "source", "bucket", "dtype"):
            value = getattr(self, field)
            if not isinstance(value, str) or "|" in value:  # '|' separates the stored key's parts
                raise ValueError(f"Key.{field} must be a string without '|'; got {value!r}")

    def text(self) -> str:
        """The canonical string for this key: "kernel|source|bucket|dtype"."""
        return f"{self.kernel}|{self.source}|{self.bucket}|{self.dtype}"


def _versions_suffix(device: Device) -> str:
    return f"|torch={device.torch}|triton={device.triton or 'none'}"


# ----------------------------------------------------------------------------------- paths


def cache_dir() -> pathlib.Path:
    """`$REWRITER_CACHE_DIR` when set, else the platform's user cache dir for "rewriter"."""
    return _cache_dir(os.environ.get(ENV_VAR) or None)


@functools.lru_cache(maxsize=16)
def _cache_dir(env: str | None) -> pathlib.Path:
    if env:
        return pathlib.Path(env).expanduser()
    import platformdirs

    return pathlib.Path(platformdirs.user_cache_dir("rewriter"))


def default_path(device: Device) -> pathlib.Path:
    """`cache_dir() / f"kernels-{device.slug}.json"`."""
    return cache_dir() / f"kernels-{device.slug}.json"


# ----------------------------------------------------------------------------------- cache


def _read_file(path: pathlib.Path) -> bytes:
    # One place that reads the file (tests count calls to it).
    with open(path, "rb") as f:
        return f.read()


def _signature(st: os.stat_result) -> tuple:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _copy(value: Any) -> Any:
    """A deep copy of a JSON value (faster than copy.deepcopy on the hot path)."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _time(entry: dict) -> float:
    t = entry.get("time_ms")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t):
        return math.inf
    return float(t)


def _check_entry(entry: Any, where: str) -> dict:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: a cache entry must be a dict, got {type(entry).__name__}")
    if not isinstance(entry.get("config"), dict):
        raise ValueError(f"{where}: a cache entry needs a 'config' dict; got {entry.get('config')!r}")
    t = entry.get("time_ms")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise ValueError(f"{where}: a cache entry needs 'time_ms' as a finite number >= 0; got {t!r}")
    entry = dict(entry)
    force = bool(entry.pop("force", False))
    try:
        entry = json.loads(json.dumps(entry))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: a cache entry must be JSON-serialisable: {e}") from None
    entry["force"] = force  # popped again by _merge
    return entry


def _merge(entries: dict[str, dict], stored_key: str, entry: dict) -> bool:
    """Apply the merge rule in place; True when `entry` was taken."""
    entry = dict(entry)
    force = bool(entry.pop("force", False))
    old = entries.get(stored_key)
    if old is None or force or _time(entry) < _time(old):
        entries[stored_key] = entry
        return True
    return False


class _Invalid(Exception):
    """The file's contents are not a cache this process can use (message says why)."""


def _parse(raw: bytes, device: Device) -> dict[str, dict]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _Invalid(f"it is not valid JSON ({e})") from None
    if not isinstance(data, dict) or "format" not in data:
        raise _Invalid("it is not a rewriter kernel cache (no 'format' field)")
    if data["format"] != FORMAT:
        raise _Invalid(f"it has format version {data['format']!r}, this rewriter reads {FORMAT}")
    header = data.get("device")
    if not isinstance(header, dict):
        raise _Invalid("it has no 'device' header")
    if header.get("name") != device.name or header.get("capability") != device.capability:
        raise _Invalid(
            f"it is for device {header.get('name')!r} (capability {header.get('capability')!r}), "
            f"not {device.name!r} (capability {device.capability!r})"
        )
    entries = data.get("entries")
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise _Invalid("its 'entries' is not a mapping of key to entry")
    return entries


class Cache:
    """A per-device store of tuned kernel configs; see the module docstring.

    `path=None` uses `default_path(device)`; `device=None` is the CPU
    (`current_device("cpu")`). Safe to share between threads and processes.
    """

    def __init__(self, path: str | os.PathLike | None = None, device: Device | None = None):
        self.device: Device = device if device is not None else current_device("cpu")
        self.path: pathlib.Path = pathlib.Path(path) if path is not None else default_path(self.device)
        self._path_str = os.fspath(self.path)
        self._suffix = _versions_suffix(self.device)
        self._mutex = threading.RLock()
        self._sig: tuple | None = None  # signature of the file behind self._stored
        self._stored: dict[str, dict] = {}  # stored key -> entry, as on disk
        self._unsaved: dict[str, dict] = {}  # entries put while the file could not be written
        self._warned_unwritable = False
        self._lock_path = self.path.with_name(self.path.name + ".lock")

    def __repr__(self) -> str:
        return f"Cache({str(self.path)!r}, device={self.device.slug!r})"

    # ------------------------------------------------------------------------ public API

    def get(self, key: Key) -> dict | None:
        """The entry for `key` measured on this device under these torch/Triton versions, or None."""
        stored_key = key.text() + self._suffix
        with self._mutex:
            entry = self._unsaved.get(stored_key) or self._view().get(stored_key)
            return None if entry is None else _copy(entry)

    def put(self, key: Key, entry: dict) -> None:
        """Store `entry` for `key` (see the merge rule in the module docstring).

        `entry` is `{"config": {...}, "time_ms": float, ...}` (plus anything JSON can hold,
        e.g. "default_ms", "trials", "failures", "tuned_at"); a bad entry raises ValueError.
        If the cache's directory cannot be written, warns once and keeps it in memory.
        """
        stored_key = key.text() + self._suffix
        entry = _check_entry(entry, f"put({key.text()!r})")
        with self._mutex:

            def update(entries: dict[str, dict]) -> bool:
                return _merge(entries, stored_key, entry)

            if not self._write(update):
                _merge(self._unsaved, stored_key, entry)

    def entries(self) -> dict[str, dict]:
        """`Key.text()` -> entry, for the entries `get` can return."""
        n = len(self._suffix)
        with self._mutex:
            view = dict(self._view())
            view.update(self._unsaved)
            return {k[:-n]: _copy(v) for k, v in view.items() if k.endswith(self._suffix)}

    def clear(self) -> int:
        """Remove every entry from the file (all torch/Triton versions); returns how many."""
        removed = 0

        def update(entries: dict[str, dict]) -> bool:
            nonlocal removed
            removed = len(entries)
            entries.clear()
            return removed > 0

        with self._mutex:
            removed_unsaved = len(self._unsaved)
            self._unsaved.clear()
            self._write(update)
            return removed + removed_unsaved

    def export(self, path: str | os.PathLike) -> int:
        """Write every entry of this cache (all versions; keys carry theirs) with the device
        header to `path`, atomically; returns how many."""
        with self._mutex:
            entries = dict(self._view())
            entries.update(self._unsaved)
            target = pathlib.Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(target, self._document(entries))
            return len(entries)

    def import_(self, path: str | os.PathLike) -> int:
        """Merge the entries of a file written by `export` (same rule as `put`); returns how
        many were taken. Raises ValueError for a file that is not a cache of this format or
        was measured on another device (name or capability)."""
        path = pathlib.Path(path)
        try:
            incoming = _parse(_read_file(path), self.device)
        except _Invalid as e:
            raise ValueError(
                f"cannot import {str(path)!r} into the kernel cache for {self.device.name!r}: {e}"
            ) from None
        checked = {}
        for stored_key, entry in incoming.items():
            if not isinstance(stored_key, str) or stored_key.count("|") != 5 or "|torch=" not in stored_key:
                raise ValueError(f"cannot import {str(path)!r}: malformed key {stored_key!r}")
            checked[stored_key] = _check_entry(entry, f"import {str(path)!r}, key {stored_key!r}")
        taken = 0

        def update(entries: dict[str, dict]) -> bool:
            nonlocal taken
            taken = sum(_merge(entries, k, e) for k, e in checked.items())
            return taken > 0

        with self._mutex:
            if not self._write(update):
                taken = sum(_merge(self._unsaved, k, e) for k, e in checked.items())
            return taken

    # ---------------------------------------------------------------------- internals

    def _document(self, entries: dict[str, dict]) -> dict[str, Any]:
        return {"format": FORMAT, "device": self.device.header(), "entries": entries}

    def _view(self) -> dict[str, dict]:
        """The stored entries, re-read only when the file changed. Caller holds _mutex."""
        try:
            st = os.stat(self._path_str)
        except OSError:  # missing (or a path that cannot exist): empty
            self._sig, self._stored = None, {}
            return self._stored
        sig = _signature(st)
        if sig != self._sig:
            self._stored = self._load(sig)
            self._sig = sig
        return self._stored

    def _load(self, sig: tuple) -> dict[str, dict]:
        """Read and parse the file; a bad one is set aside (under the lock) and reads empty."""
        try:
            return _parse(_read_file(self.path), self.device)
        except OSError:
            return {}
        except _Invalid as e:
            reason = str(e)
        try:
            with self._file_lock():
                st = os.stat(self.path)
                if _signature(st) != sig:  # replaced meanwhile by a writer: read that one
                    try:
                        return _parse(_read_file(self.path), self.device)
                    except _Invalid as e:
                        reason = str(e)
                self._set_aside(reason)
        except OSError as e:
            warnings.warn(
                f"rewriter: the kernel cache file {str(self.path)!r} is unusable: {reason}; "
                f"it could not be moved aside ({e}), so the cache is treated as empty.",
                CacheWarning,
                stacklevel=4,
            )
        return {}

    def _set_aside(self, reason: str) -> None:
        """Rename the (bad) file to <name>.corrupt-<timestamp> and warn. Caller holds the lock."""
        stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S.%f")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 0
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        os.replace(self.path, target)
        warnings.warn(
            f"rewriter: the kernel cache file {str(self.path)!r} is unusable: {reason}; "
            f"moved it aside to {str(target)!r} and starting with an empty cache.",
            CacheWarning,
            stacklevel=5,
        )

    def _file_lock(self):
        import filelock

        return filelock.FileLock(str(self._lock_path), timeout=LOCK_TIMEOUT_S)

    def _write(self, update) -> bool:
        """Under the file lock: re-read the file, apply `update(entries)` (returns whether it
        changed anything), write atomically. False (after one warning) when the directory
        cannot be written. Caller holds _mutex."""
        import filelock

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._file_lock():
                _sweep_temporaries(self.path)
                try:
                    st = os.stat(self.path)
                except FileNotFoundError:
                    entries, sig = {}, None
                else:
                    sig = _signature(st)
                    try:  # always re-read under the lock: another process may have written
                        entries = _parse(_read_file(self.path), self.device)
                    except _Invalid as e:
                        self._set_aside(str(e))
                        entries, sig = {}, None
                if update(entries):
                    _atomic_write(self.path, self._document(entries))
                    sig = _signature(os.stat(self.path))
                self._stored, self._sig = entries, sig
                return True
        except (OSError, filelock.Timeout) as e:
            if not self._warned_unwritable:
                self._warned_unwritable = True
                what = "timed out waiting for its lock" if isinstance(e, filelock.Timeout) else "is not writable"
                warnings.warn(
                    f"rewriter: the kernel cache directory {str(self.path.parent)!r} {what} ({e}); "
                    f"tuned configs are kept in memory for this process only. Set the "
                    f"{ENV_VAR} environment variable to a writable directory to keep them.",
                    CacheWarning,
                    stacklevel=4,
                )
            return False


def _temp_prefix(path: pathlib.Path) -> str:
    return f".{path.name}."


def _sweep_temporaries(path: pathlib.Path) -> None:
    """Remove temporaries left by writers that died mid-write. Caller holds the lock, so no
    live writer of this file has one open."""
    pattern = os.path.join(glob.escape(str(path.parent)), glob.escape(_temp_prefix(path)) + "*.tmp")
    for stale in glob.glob(pattern):
        try:
            os.unlink(stale)
        except OSError:
            pass


def _serialise(document: dict[str, Any]) -> bytes:
    """JSON with one entry per line: readable and diffable, yet encoded by json's C encoder."""
    head = {k: v for k, v in document.items() if k != "entries"}
    lines = [json.dumps(head, sort_keys=True)[:-1] + ', "entries": {']
    items = sorted(document["entries"].items())
    for i, (k, v) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        lines.append(f" {json.dumps(k)}: {json.dumps(v, sort_keys=True)}{comma}")
    lines.append("}}\n")
    return "\n".join(lines).encode("utf-8")


def _atomic_write(path: pathlib.Path, document: dict[str, Any]) -> None:
    """Write `document` as JSON to `path`: temp file in the same directory, fsync, os.replace.

    A reader (or a process killed at any point) sees the old file or the new one, never a
    mix. The directory is not fsynced: after a power cut the rename may be lost, which
    leaves the previous (still valid) file, fine for a cache and half the cost of a put.
    """
    data = _serialise(document)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ------------------------------------------------------------------------------ defaults

_DEFAULTS: dict[tuple[Device, str | None], Cache] = {}
_DEFAULTS_MUTEX = threading.Lock()


def default_cache(device: torch.device | str | int | None = None) -> Cache:
    """The shared `Cache` for `device` at its default path (memoised per device and path,
    so a changed $REWRITER_CACHE_DIR is honoured)."""
    dev = current_device(device)
    memo = (dev, os.environ.get(ENV_VAR) or None)  # (device, env) determines the path
    cache = _DEFAULTS.get(memo)
    if cache is None:
        with _DEFAULTS_MUTEX:
            cache = _DEFAULTS.get(memo)
            if cache is None:
                cache = _DEFAULTS[memo] = Cache(default_path(dev), dev)
    return cache
