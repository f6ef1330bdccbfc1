"""The per-device kernel-config cache: keys, merge rule, atomic locked writes, recovery."""
from __future__ import annotations

import glob
import importlib.metadata
import json
import multiprocessing
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import time
import warnings

import pytest

from rewriter.autotune import cache as cache_mod
from rewriter.autotune.cache import (
    Cache,
    CacheWarning,
    Device,
    Key,
    cache_dir,
    current_device,
    default_cache,
    default_path,
)

DEV = Device(name="Test CPU 9000 (4 threads)", capability="cpu", torch="2.13.0", triton="3.9.0")
OTHER_DEV = Device(name="NVIDIA H200", capability="9.0", torch="2.13.0", triton="3.9.0")

needs_fork = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)
needs_sigkill = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")


def key(i: int = 0, kernel: str = "linear_attention") -> Key:
    return Key(kernel=kernel, source="src0123abcd", bucket=f"b1-h16-n{1024 * (i + 1)}-d64", dtype="bfloat16")


def entry(time_ms: float, block: int = 64, **extra) -> dict:
    return {
        "config": {"BLOCK_N": block, "num_warps": 4},
        "time_ms": time_ms,
        "default_ms": 2.0,
        "trials": 10,
        "failures": 0,
        "tuned_at": "2025-01-01T00:00:00+00:00",
        **extra,
    }


@pytest.fixture
def path(tmp_path) -> pathlib.Path:
    return tmp_path / "cache" / "kernels-test.json"


@pytest.fixture(autouse=True)
def _fresh_defaults(monkeypatch):
    monkeypatch.setattr(cache_mod, "_DEFAULTS", {})


# ------------------------------------------------------------------------- device and key


def test_current_device_cpu_does_not_import_triton():
    had_triton = "triton" in sys.modules
    dev = current_device("cpu")
    import torch

    assert dev.capability == "cpu"
    assert dev.name.endswith(f" ({torch.get_num_threads()} threads)")
    assert dev.torch == torch.__version__
    try:
        expected = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        expected = dev.triton  # may come from pytorch-triton; None when nothing is installed
    assert dev.triton == expected
    assert ("triton" in sys.modules) == had_triton
    assert current_device(torch.device("cpu")) == dev
    if not torch.cuda.is_available():
        assert current_device(None) == dev


def test_device_slug_is_filesystem_safe():
    assert Device("NVIDIA H200", "9.0", "2.13", None).slug == "nvidia-h200-sm90"
    assert Device("AMD EPYC 7B13 (2 threads)", "cpu", "2.13", None).slug == "cpu-amd-epyc-7b13-2t"
    xeon = Device("Intel(R) Xeon(R) CPU @ 2.20GHz (8 threads)", "cpu", "2.13", None).slug
    assert xeon == "cpu-intel-xeon-cpu-2-20ghz-8t"
    for slug in (xeon, current_device("cpu").slug, Device("a/b\\c:d*?", "x.y", "1", None).slug):
        assert slug and all(c.isalnum() and c.isascii() or c == "-" for c in slug), slug


def test_key_text_is_canonical_and_validated():
    import torch

    k = Key("rms_norm", "abc", "n4096-d768", "bfloat16")
    assert k.text() == "rms_norm|abc|n4096-d768|bfloat16"
    assert Key("rms_norm", "abc", "n4096-d768", "torch.bfloat16") == k
    assert Key("rms_norm", "abc", "n4096-d768", torch.bfloat16).text() == k.text()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bucket"):
        Key("rms_norm", "abc", "n|1", "float32")
    with pytest.raises(ValueError, match="source"):
        Key("rms_norm", 123, "n1", "float32")  # type: ignore[arg-type]


# ----------------------------------------------------------------------- basic behaviour


def test_put_get_and_file_format(path):
    c = Cache(path, DEV)
    assert c.get(key(0)) is None and c.entries() == {}
    assert not path.exists()  # nothing written (or created) until a put
    c.put(key(0), entry(1.5))
    assert c.get(key(0)) == entry(1.5)
    assert c.get(key(1)) is None
    got = c.get(key(0))
    got["config"]["BLOCK_N"] = 1  # callers cannot corrupt the cache through what get returns
    assert c.get(key(0))["config"]["BLOCK_N"] == 64

    data = json.loads(path.read_text())
    assert data["format"] == 1
    assert data["device"] == {"name": DEV.name, "capability": "cpu", "torch": "2.13.0", "triton": "3.9.0"}
    assert data["entries"] == {key(0).text() + "|torch=2.13.0|triton=3.9.0": entry(1.5)}
    # a new Cache object (another process) reads it back
    assert Cache(path, DEV).entries() == {key(0).text(): entry(1.5)}


def test_merge_rule_faster_wins_unless_forced(path):
    c = Cache(path, DEV)
    c.put(key(0), entry(2.0, block=32))
    c.put(key(0), entry(3.0, block=128))  # slower: ignored
    assert c.get(key(0))["config"]["BLOCK_N"] == 32
    c.put(key(0), entry(2.0, block=16))  # equal: ignored
    assert c.get(key(0))["config"]["BLOCK_N"] == 32
    c.put(key(0), entry(1.0, block=64))  # faster: replaces
    assert c.get(key(0))["config"]["BLOCK_N"] == 64
    c.put(key(0), entry(9.0, block=256, force=True))  # forced: replaces; the flag is not stored
    assert c.get(key(0)) == entry(9.0, block=256)
    assert Cache(path, DEV).get(key(0)) == entry(9.0, block=256)


@pytest.mark.parametrize(
    "bad",
    [None, {"time_ms": 1.0}, {"config": {}, "time_ms": float("nan")}, {"config": {}, "time_ms": "1"},
     {"config": {}, "time_ms": 1.0, "x": object()}],
)
def test_put_rejects_bad_entries(path, bad):
    with pytest.raises(ValueError, match="cache entry"):
        Cache(path, DEV).put(key(0), bad)


def test_entries_of_other_torch_or_triton_versions_are_not_returned(path):
    old = Device(DEV.name, DEV.capability, torch="2.12.0", triton=None)
    Cache(path, old).put(key(0), entry(0.5, block=16))
    c = Cache(path, DEV)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)  # another version's header is not an error
        assert c.get(key(0)) is None
        assert c.entries() == {}
        c.put(key(0), entry(1.0))
    assert c.get(key(0)) == entry(1.0)  # not beaten by the faster entry of the other torch
    assert Cache(path, old).get(key(0)) == entry(0.5, block=16)  # which is still there
    assert len(json.loads(path.read_text())["entries"]) == 2


def test_clear(path):
    c = Cache(path, DEV)
    for i in range(3):
        c.put(key(i), entry(1.0 + i))
    assert c.clear() == 3
    assert c.entries() == {} and c.get(key(0)) is None
    assert Cache(path, DEV).entries() == {}
    assert json.loads(path.read_text())["entries"] == {}
    assert c.clear() == 0


def test_export_import_round_trip(path, tmp_path):
    src = Cache(path, DEV)
    for i in range(5):
        src.put(key(i), entry(1.0 + i))
    out = tmp_path / "exported" / "kernels.json"
    assert src.export(out) == 5
    exported = json.loads(out.read_text())
    assert exported["format"] == 1 and exported["device"]["name"] == DEV.name

    dst = Cache(tmp_path / "other" / "kernels.json", DEV)
    dst.put(key(0), entry(0.5, block=16))  # faster than the exported one: kept
    dst.put(key(1), entry(5.0, block=16))  # slower: replaced
    assert dst.import_(out) == 4
    assert dst.get(key(0)) == entry(0.5, block=16)
    assert {k: v for k, v in dst.entries().items() if k != key(0).text()} == {
        k: v for k, v in src.entries().items() if k != key(0).text()
    }
    assert dst.import_(out) == 0  # idempotent
    assert Cache(dst.path, DEV).entries() == dst.entries()


def test_import_refuses_other_device_format_or_garbage(path, tmp_path):
    other = Cache(tmp_path / "gpu.json", OTHER_DEV)
    other.put(key(0), entry(1.0))
    c = Cache(path, DEV)
    with pytest.raises(ValueError, match="NVIDIA H200"):
        c.import_(other.path)
    future = tmp_path / "future.json"
    future.write_text(json.dumps({"format": 2, "device": DEV.header(), "entries": {}}))
    with pytest.raises(ValueError, match="format version 2"):
        c.import_(future)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        c.import_(garbage)
    assert garbage.exists() and future.exists()  # a refused import never moves the user's file
    assert c.entries() == {}


# ---------------------------------------------------------------------------- reads are cheap


def test_reads_are_served_from_memory_until_the_file_changes(path, monkeypatch):
    writer = Cache(path, DEV)
    writer.put(key(0), entry(1.0))
    reads = []
    real_read = cache_mod._read_file
    monkeypatch.setattr(cache_mod, "_read_file", lambda p: reads.append(p) or real_read(p))

    reader = Cache(path, DEV)
    for _ in range(1000):
        assert reader.get(key(0)) == entry(1.0)
        assert reader.get(key(1)) is None
    assert len(reads) == 1

    writer.put(key(1), entry(2.0))  # another writer changes the file (one read under its lock)
    n = len(reads)
    assert reader.get(key(1)) == entry(2.0)
    assert len(reads) == n + 1
    for _ in range(100):
        reader.get(key(1))
    assert len(reads) == n + 1


# ---------------------------------------------------------------------- bad files are set aside


def _valid_bytes(device: Device) -> bytes:
    doc = {"format": 1, "device": device.header(), "entries": {key(0).text() + "|torch=x|triton=y": entry(1.0)}}
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "not valid JSON"),
        (b"\x00\xff garbage \x13", "not valid JSON"),
        (_valid_bytes(DEV)[:-7], "not valid JSON"),  # truncated
        (b"[1, 2, 3]", "not a rewriter kernel cache"),
        (json.dumps({"format": 1, "device": DEV.header(), "entries": [1]}).encode(), "entries"),
        (json.dumps({"format": 99, "device": DEV.header(), "entries": {}}).encode(), "format version 99"),
        (_valid_bytes(OTHER_DEV), "NVIDIA H200"),
    ],
    ids=["empty", "garbage", "truncated", "list", "bad-entries", "other-format", "other-device"],
)
def test_unusable_file_is_moved_aside_with_a_warning(path, content, reason):
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    c = Cache(path, DEV)
    with pytest.warns(CacheWarning) as record:
        assert c.get(key(0)) is None
    (w,) = [r for r in record if issubclass(r.category, CacheWarning)]
    message = str(w.message)
    assert str(path) in message and "moved it aside" in message and reason in message
    aside = glob.glob(str(path) + ".corrupt-*")
    assert len(aside) == 1 and aside[0] in message
    assert pathlib.Path(aside[0]).read_bytes() == content
    assert not path.exists()

    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)  # once set aside, no more warnings
        assert c.entries() == {}
        c.put(key(0), entry(1.0))
    assert Cache(path, DEV).get(key(0)) == entry(1.0)


def test_put_over_a_corrupt_file_sets_it_aside_and_writes(path):
    path.parent.mkdir(parents=True)
    path.write_text('{"format": 1, "dev')
    with pytest.warns(CacheWarning, match="moved it aside"):
        Cache(path, DEV).put(key(0), entry(1.0))
    assert Cache(path, DEV).entries() == {key(0).text(): entry(1.0)}
    assert len(glob.glob(str(path) + ".corrupt-*")) == 1


# ------------------------------------------------------------------------ unwritable directory


def test_unwritable_location_warns_once_and_keeps_working(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    c = Cache(blocker / "kernels.json", DEV)
    assert c.get(key(0)) is None and c.entries() == {}
    with pytest.warns(CacheWarning) as record:
        c.put(key(0), entry(1.0))
        c.put(key(1), entry(2.0))
        assert c.clear() == 2
        c.put(key(2), entry(3.0))
    messages = [str(r.message) for r in record if issubclass(r.category, CacheWarning)]
    assert len(messages) == 1
    assert "not writable" in messages[0] and "REWRITER_CACHE_DIR" in messages[0]
    assert str(blocker) in messages[0]
    assert c.get(key(2)) == entry(3.0)  # kept in memory for this process
    assert blocker.read_text().startswith("a file")


def _readonly_child(directory: str, conn) -> None:
    """Runs in a forked child: drops root (which chmod cannot stop), checks, reports."""
    try:
        if os.geteuid() == 0:
            try:
                os.setgid(65534)
                os.setuid(65534)
            except OSError as e:
                conn.send(("skip", f"running as root and cannot drop privileges ({e})"))
                return
        path = pathlib.Path(directory) / "kernels.json"
        if os.access(directory, os.W_OK):
            conn.send(("skip", "the read-only directory is writable for this user"))
            return
        c = Cache(path, DEV)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            assert c.get(key(0)) == entry(1.0), c.get(key(0))
            assert c.entries() == {key(0).text(): entry(1.0)}
            c.put(key(1), entry(2.0))
            c.put(key(2), entry(3.0))
            assert c.get(key(1)) == entry(2.0)  # in memory
        messages = [str(r.message) for r in record if issubclass(r.category, CacheWarning)]
        assert len(messages) == 1, messages
        assert "not writable" in messages[0] and "REWRITER_CACHE_DIR" in messages[0], messages
        conn.send(("ok", ""))
    except BaseException as e:  # noqa: BLE001 - report everything to the parent
        conn.send(("fail", repr(e)))
    finally:
        conn.close()


@needs_fork
def test_read_only_directory_get_works_put_warns_once():
    # Not tmp_path: pytest's tmp dirs are 0700, and the check may run as an unprivileged user.
    directory = tempfile.mkdtemp(prefix="rewriter-ro-")
    try:
        Cache(pathlib.Path(directory) / "kernels.json", DEV).put(key(0), entry(1.0))
        before = pathlib.Path(directory, "kernels.json").read_bytes()
        os.chmod(directory, 0o555)
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_readonly_child, args=(directory, child))
        proc.start()
        child.close()
        status, detail = parent.recv() if parent.poll(15) else ("fail", "no answer from the child")
        proc.join(5)
        if status == "skip":
            pytest.skip(detail)
        assert status == "ok", detail
        assert pathlib.Path(directory, "kernels.json").read_bytes() == before
    finally:
        os.chmod(directory, 0o755)
        shutil.rmtree(directory, ignore_errors=True)


# ------------------------------------------------------------------- processes: races and kills


def _put_many(path: str, worker: int, n: int, barrier) -> None:
    c = Cache(path, DEV)
    barrier.wait()
    for i in range(n):
        c.put(Key("rms_norm", f"w{worker}", f"i{i}", "float32"), entry(float(worker * 100 + i)))


@needs_fork
def test_concurrent_processes_lose_no_entry(path):
    workers, per = 8, 25
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=_put_many, args=(str(path), w, per, barrier)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * workers
    entries = Cache(path, DEV).entries()
    assert len(entries) == workers * per
    for w in range(workers):
        for i in range(per):
            assert entries[Key("rms_norm", f"w{w}", f"i{i}", "float32").text()]["time_ms"] == w * 100 + i
    assert glob.glob(str(path.parent / ".*.tmp")) == []


def _killed_while_writing(path: str, conn) -> None:
    c = Cache(path, DEV)
    for i in range(5):
        c.put(key(i), entry(1.0 + i))
    conn.send("committed")

    def fsync_forever(fd):  # the temp file is written; stop before it is renamed into place
        conn.send("writing")
        time.sleep(60)

    os.fsync = fsync_forever  # only in this forked child
    c.put(key(5), entry(6.0))


@needs_fork
@needs_sigkill
def test_sigkill_mid_write_leaves_the_previous_file(path):
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_killed_while_writing, args=(str(path), child))
    proc.start()
    child.close()
    assert parent.poll(15) and parent.recv() == "committed"
    before = path.read_bytes()
    assert parent.poll(15) and parent.recv() == "writing"
    temporaries = glob.glob(str(path.parent / ".*.tmp"))
    assert len(temporaries) == 1 and os.path.getsize(temporaries[0]) > 0  # caught mid-write
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL

    assert path.read_bytes() == before
    json.loads(before)
    c = Cache(path, DEV)
    assert set(c.entries()) == {key(i).text() for i in range(5)}
    # The dead writer's lock is released and its temporary swept by the next writer.
    start = time.monotonic()
    c.put(key(6), entry(7.0))
    assert time.monotonic() - start < 5
    assert glob.glob(str(path.parent / ".*.tmp")) == []
    assert len(Cache(path, DEV).entries()) == 6


def _put_forever(path: str, first: int, conn) -> None:
    c = Cache(path, DEV)
    i = first
    while True:
        c.put(Key("layer_norm", "s", f"i{i}", "float16"), entry(1.0))
        conn.send((i, time.monotonic()))  # only after the put returned, i.e. was committed
        i += 1


@needs_fork
@needs_sigkill
def test_sigkill_during_a_loop_of_puts_keeps_every_committed_entry(path):
    # Pre-fill so each write takes a while, then kill writers at points spread over one put.
    filler = {
        Key("layer_norm", "fill", f"f{j}", "float16").text() + cache_mod._versions_suffix(DEV): entry(1.0)
        for j in range(1500)
    }
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": 1, "device": DEV.header(), "entries": filler}))
    ctx = multiprocessing.get_context("fork")
    acked: list[int] = []
    for round_, fraction in enumerate([0.2, 0.5, 0.8]):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_put_forever, args=(str(path), 1000 * round_, child))
        proc.start()
        child.close()
        times = []
        while len(times) < 6:
            assert parent.poll(15), "the writer stalled"
            i, t = parent.recv()
            acked.append(i)
            times.append(t)
        period = (times[-1] - times[1]) / (len(times) - 2)
        time.sleep(max(0.0, times[-1] + fraction * period - time.monotonic()))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        while parent.poll(0.05):
            try:
                acked.append(parent.recv()[0])
            except EOFError:
                break
        parent.close()

        json.loads(path.read_text())  # parses after every kill
        with warnings.catch_warnings():
            warnings.simplefilter("error", CacheWarning)
            entries = Cache(path, DEV).entries()
        assert len(entries) >= 1500 + len(acked)
        for i in acked:
            assert Key("layer_norm", "s", f"i{i}", "float16").text() in entries


# ---------------------------------------------------------------------- defaults and env var


def test_cache_dir_env_override_and_default_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("REWRITER_CACHE_DIR", raising=False)
    import platformdirs

    assert cache_dir() == pathlib.Path(platformdirs.user_cache_dir("rewriter"))

    monkeypatch.setenv("REWRITER_CACHE_DIR", str(tmp_path / "one"))
    assert cache_dir() == tmp_path / "one"
    dev = current_device("cpu")
    assert default_path(dev) == tmp_path / "one" / f"kernels-{dev.slug}.json"
    first = default_cache("cpu")
    assert first.path == default_path(dev) and first.device == dev
    assert default_cache("cpu") is first  # memoised
    assert Cache().path == first.path and Cache().device == dev
    first.put(key(0), entry(1.0))
    assert (tmp_path / "one" / f"kernels-{dev.slug}.json").exists()

    monkeypatch.setenv("REWRITER_CACHE_DIR", str(tmp_path / "two"))
    second = default_cache("cpu")
    assert second is not first and second.path == tmp_path / "two" / f"kernels-{dev.slug}.json"
    assert second.get(key(0)) is None

    monkeypatch.setenv("REWRITER_CACHE_DIR", str(tmp_path / "one"))
    assert default_cache("cpu") is first
