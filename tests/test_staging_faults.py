"""The staging cache's corners: budgets across restarts, odd folders, waits, LRU, faults.

Each test was written against a fault of the cache or of the manager's use of it; its
docstring says what the older code did.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
from conftest import StartDaemon
from daemon import fake_preset, hook_env, wait_for
from test_staging import complete, write
from test_staging_daemon import MIB, _model, staged_preset

from swapd import _cache_dir, _copy
from swapd import staging as staging_module
from swapd.staging import StagingCache, StagingError


def _bytes_under(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.mark.asyncio
async def test_the_default_budget_still_counts_the_caches_own_copies_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ``cache_budget``: "no cap but the disk" (90% of its free space at open).

    A disk of 16 MiB holds the cache alone. In one run, a (6 MiB) and b (6 MiB) both fit
    (budget 14.4 MiB). After a restart with a already cached, the budget is read from the
    free space that excludes a's own copy (10 MiB free -> 9 MiB budget), so staging b
    evicts a although the disk still has 4 MiB (25%) free with both: every restart shrinks
    the cache by what it already holds.
    """
    disk = 16 * MIB
    cache_dir = tmp_path / "cache"

    def usage(_path: str) -> SimpleNamespace:
        used = _bytes_under(cache_dir) if cache_dir.exists() else 0
        return SimpleNamespace(total=disk, used=used, free=disk - used)

    monkeypatch.setattr(psutil, "disk_usage", usage)
    a = write(tmp_path / "slow" / "a.gguf", 6 * MIB, seed=1)
    b = write(tmp_path / "slow" / "b.gguf", 6 * MIB, seed=2)

    # Without a restart both fit.
    async with StagingCache(tmp_path / "other", None) as once:
        await once.stage(a)
        await once.stage(b)
        assert len(complete(once.cache_dir)) == 2

    async with StagingCache(cache_dir, None) as first:
        await first.stage(a)
    async with StagingCache(cache_dir, None) as second:
        await second.stage(b)
        used, budget = second.usage()
        assert second.cached_path(a) is not None, (
            f"a's copy was evicted to stage b: budget {budget} after the restart, "
            f"used {used}, disk {disk} with {disk - used} free"
        )


@pytest.mark.asyncio
async def test_a_directory_linked_twice_in_a_model_directory_is_copied_under_both_names(
    tmp_path: Path,
) -> None:
    """A model directory is "copied whole, links replaced by what they point to".

    ``alias`` is a link to the sibling directory ``shared``: scan() skips whichever of the
    two comes second as if it were a loop (it remembers every directory inode it has seen,
    not only the ancestors), so the copy lacks ``shared/`` entirely, and is published as
    complete.
    """
    model = tmp_path / "slow" / "m"
    write(model / "config.json", 100, seed=1)
    write(model / "shared" / "w.safetensors", MIB, seed=2)
    (model / "alias").symlink_to("shared")
    async with StagingCache(tmp_path / "cache", 100 * MIB) as cache:
        path = await cache.stage(model)
        copied = sorted(str(p.relative_to(path)) for p in path.rglob("*"))
        assert "alias/w.safetensors" in copied, copied
        assert "shared/w.safetensors" in copied, copied


SLOW_COPY = """
import time
import swapd._copy as c
_real = c.copy
def copy(source, *args, **kwargs):
    time.sleep(1)  # slow storage: the load plans (and waits for busy) before the copy ends
    return _real(source, *args, **kwargs)
c.copy = copy
"""


def test_a_failed_copy_ends_a_load_that_waits_for_busy_models_at_once(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """s's copy fails its checksum while s's load waits for a busy model (max_running 1).

    The failure wakes nobody: the load sleeps on until something else changes (here the
    busy request ending, 8 s later; else ``max_wait``, 30 s by default, or a hold's end),
    so the client waits for an error that was known seconds before.
    """
    model = _model(tmp_path / "slow" / "m.gguf", 2 * MIB)
    d = start_daemon(
        {"busy": fake_preset("B"), "s": staged_preset(model, sha256="0" * 64)},
        {"cache_dir": str(tmp_path / "cache"), "max_running": 1, "max_wait": "60s"},
        env=hook_env(tmp_path / "hook", SLOW_COPY),
    )
    assert d.chat("busy")[0] == 200
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(d.chat, "busy", "long", fake_delay=8)
        wait_for(lambda: d.model("busy")["in_flight"] == 1)
        status, body = d.chat("s")
        busy_in_flight = d.model("busy")["in_flight"]  # 0 once its request has ended
        assert long.result()[0] == 200
    assert (status, body["error"]["code"]) == (500, "stage_failed")
    [failed] = d.events("staging.copy.fail")
    assert busy_in_flight == 1, (
        "the failed copy was answered only once the busy request ended",
        failed["timestamp"],
        d.events("model.load.fail")[0]["timestamp"],
    )


@pytest.mark.asyncio
async def test_a_stale_copy_kept_for_a_running_model_does_not_outlive_live_copies(
    tmp_path: Path,
) -> None:
    """touch() marks *every* copy of a source used, the stale one kept while in use too.

    m.gguf changed while a model ran on its old copy, so the old copy stayed (right). That
    copy can never be a hit again ("older copies of the same source will never be hits
    again"), yet each later stage of m.gguf touches it, so the LRU keeps it and evicts the
    live copy of x.gguf instead.
    """
    m = write(tmp_path / "m.gguf", MIB, seed=1)
    x = write(tmp_path / "x.gguf", MIB, seed=2)
    y = write(tmp_path / "y.gguf", MIB, seed=3)
    async with StagingCache(tmp_path / "cache", 3 * MIB) as cache:
        old = await cache.stage(m)
        write(m, MIB, seed=4)  # new weights under a running model
        await cache.stage(m, in_use=[m])  # the old copy is kept: a process runs on it
        await cache.stage(x)
        await cache.stage(m)  # the model (now stopped) loads again: a hit on the new copy
        await cache.stage(y)  # room for y: one of the three goes
        assert cache.cached_path(x) is not None, (
            "x's live copy was evicted while m's dead copy stayed",
            old.exists(),
        )


HELD_HASH = """
import hashlib, os, time
from pathlib import Path
import swapd._copy as c
def hash_file(path, cancel=None, report=None):
    # A long hash (GiBs): the file is open and being read when the test goes on.
    with open(path, "rb") as file:
        Path({hashing!r}).touch()
        for _ in range(600):  # until the test says go (at most 30 s)
            if os.path.exists({go!r}):
                break
            time.sleep(0.05)
        digest = hashlib.sha256()
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
c.hash_file = hash_file
"""


def test_a_cached_copy_being_verified_for_a_load_is_not_evicted_for_another(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A cached copy that a load is verifying is evicted under it for another model.

    a2 (no sha256) staged m.gguf; a (same file, with its sha256) loads: a cache hit,
    hashed once before use. While that hash runs, b's stage evicts the very copy a is
    about to start from: a's staged_path is still None, so _uses_staged_copy() does not
    count a's load. a's backend is then spawned on a path that no longer exists.
    """
    m = _model(tmp_path / "slow" / "m.gguf", 6 * MIB)
    b = _model(tmp_path / "slow" / "b.gguf", 6 * MIB)
    digest = hashlib.sha256(m.read_bytes()).hexdigest()
    hashing, go = tmp_path / "hashing", tmp_path / "go"
    d = start_daemon(
        {
            "a2": staged_preset(m),
            "a": staged_preset(m, sha256=digest),
            "b": staged_preset(b),
        },
        {"cache_dir": str(tmp_path / "cache"), "cache_budget": "10MiB", "queue_timeout": "5s"},
        env=hook_env(tmp_path / "hook", HELD_HASH.format(hashing=str(hashing), go=str(go))),
    )
    assert d.chat("a2")[0] == 200
    assert d.request("POST", "/swapd/models/a2/unload")[0] == 200
    with ThreadPoolExecutor(2) as pool:
        for_a = pool.submit(d.chat, "a")
        wait_for(hashing.exists)  # a's load verifies the cached copy
        for_b = pool.submit(d.chat, "b")
        # b's stage either evicts a's copy (the fault) or waits for room.
        wait_for(lambda: d.events("staging.evict") or d.events("model.stage.wait"))
        go.touch()
        status_a, body_a = for_a.result()
        for_b.result()  # no room for b while a runs on its copy: cache_full in time
    spawn = next(e for e in d.events("backend.spawn") if e["model"] == "a")
    [a_path] = [arg for arg in spawn["argv"] if "/cache/" in arg]
    evicted = [e["source"] for e in d.events("staging.evict")]
    assert status_a == 200, body_a
    assert Path(a_path).exists(), (
        f"a was started on {a_path}, evicted for b meanwhile",
        evicted,
        status_a,
    )


@pytest.mark.asyncio
async def test_a_cached_copy_that_goes_while_it_is_verified_is_a_staging_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stage() promises CacheFull, ChecksumMismatch or StagingError "(any I/O error)".

    A cached copy staged without a sha256 is hashed when a sha256 is first given; if the
    copy is evicted (another model's stage) between the check that it exists and the hash
    opening it, the raw FileNotFoundError escapes stage(). Through the daemon that is a 500
    load_failed "FileNotFoundError: ..." plus a task.fail bug report, not stage_failed.
    """
    source = write(tmp_path / "m.gguf", MIB)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    real = _copy.hash_file
    entered, go = threading.Event(), threading.Event()

    def held(
        path: Path, cancel: threading.Event | None = None, report: _copy.Report | None = None
    ) -> str:
        entered.set()
        go.wait(30)
        return real(path, cancel, report)

    monkeypatch.setattr(staging_module, "hash_file", held)
    async with StagingCache(tmp_path / "cache", 100 * MIB) as cache:
        await cache.stage(source)  # staged without a checksum
        verify = asyncio.create_task(cache.stage(source, sha256=digest))
        await asyncio.to_thread(entered.wait, 30)
        await cache.evict([e.key for e in cache.entries()])  # room for another model
        go.set()
        try:
            await verify
        except StagingError:
            pass
        except OSError as exc:
            pytest.fail(f"stage() raised {type(exc).__name__}: {exc}, not a StagingError")


@pytest.mark.asyncio
async def test_a_full_disk_while_recording_a_digest_fails_no_load_and_leaks_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """m.gguf was staged without a sha256; now its preset gives one and the disk is full.

    The copy hashes fine, but writing the digest into entry.json (record_digest ->
    _rewrite) fails with ENOSPC: the raw OSError escapes stage() (through the daemon: 500
    load_failed "OSError: ..." and a backoff, for a copy that is whole and checked), and the
    half-written temporary manifest stays in the entry for good (no open() removes it).
    """
    source = write(tmp_path / "m.gguf", MIB)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    async with StagingCache(tmp_path / "cache", 100 * MIB) as cache:
        await cache.stage(source)
        await cache.synced()
        [entry] = cache.entries()

        def full(_fd: int, _data: bytes) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(_cache_dir, "_write_all", full)
        raised: OSError | None = None
        try:
            await cache.stage(source, sha256=digest)
        except StagingError:
            pass
        except OSError as exc:
            raised = exc  # not a StagingError
        left = sorted(p.name for p in (cache.cache_dir / entry.key).iterdir())
        assert (raised, left) == (None, ["data", "entry.json"])


def test_the_copy_evicted_first_is_the_one_used_longest_ago_not_the_one_loaded_first(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """README: "least recently used copies not in use are evicted".

    a is loaded, then b; b is unloaded while a keeps serving; then a is unloaded. c needs
    room for one copy: b's copy is the one used longest ago, but the cache only records a
    use when a model is staged (its load), never while or after a backend ran on the copy,
    so it evicts a's copy, which served a request after b had stopped.
    """
    a = _model(tmp_path / "slow" / "a.gguf", 4 * MIB)
    b = _model(tmp_path / "slow" / "b.gguf", 4 * MIB)
    c = _model(tmp_path / "slow" / "c.gguf", 4 * MIB)
    d = start_daemon(
        {"a": staged_preset(a), "b": staged_preset(b), "c": staged_preset(c)},
        {"cache_dir": str(tmp_path / "cache"), "cache_budget": "10MiB"},
    )
    assert d.chat("a")[0] == 200
    assert d.chat("b")[0] == 200
    assert d.request("POST", "/swapd/models/b/unload")[0] == 200
    assert d.chat("a", "still in use")[0] == 200  # a is used after b
    assert d.request("POST", "/swapd/models/a/unload")[0] == 200
    assert d.chat("c")[0] == 200
    evicted = [Path(e["source"]).name for e in d.events("staging.evict")]
    assert evicted == ["b.gguf"], evicted


SLOW_A_COPY = """
import time
import swapd._copy as c
_real = c.copy
def copy(source, *args, **kwargs):
    if source.path.name == "a.gguf":
        time.sleep(2)  # slow storage
    return _real(source, *args, **kwargs)
c.copy = copy
"""


def test_a_stage_waiting_for_cache_room_goes_on_once_a_copy_it_waited_for_is_done(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """a's copy runs on after a's load was cut by a forced unload (the cache owns it).

    b's stage finds no room (a's copy reserves it) and waits for a change. a's copy then
    ends and is evictable at once, but its end wakes nobody: b waits on until something
    else happens (here busy's request ending; else queue_timeout, 2 min by default).
    """
    a = _model(tmp_path / "slow" / "a.gguf", 6 * MIB)
    b = _model(tmp_path / "slow" / "b.gguf", 6 * MIB)
    d = start_daemon(
        {"busy": fake_preset("B"), "a": staged_preset(a), "b": staged_preset(b)},
        {"cache_dir": str(tmp_path / "cache"), "cache_budget": "10MiB", "queue_timeout": "60s"},
        env=hook_env(tmp_path / "hook", SLOW_A_COPY),
    )
    assert d.chat("busy")[0] == 200
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(d.chat, "busy", "long", fake_delay=10)
        wait_for(lambda: d.model("busy")["in_flight"] == 1)
        for_a = pool.submit(d.chat, "a")
        wait_for(lambda: d.model("a")["staging"] is not None)
        # The load is cut (its waiter gets 503); the copy goes on, as the cache owns it.
        assert d.request("POST", "/swapd/models/a/unload?force=true")[0] == 200
        assert for_a.result()[0] == 503
        status_b, body_b = d.chat("b")
        busy_in_flight = d.model("busy")["in_flight"]  # 0 once its request has ended
        assert long.result()[0] == 200
    assert status_b == 200, body_b
    [a_done] = [e for e in d.events("staging.copy.done") if e["source"] == str(a)]
    staged_b = [e for e in d.events("model.staged") if e["model"] == "b"]
    assert busy_in_flight == 1, (
        "b was staged only once busy's request ended",
        a_done["timestamp"],
        staged_b[0]["timestamp"],
    )


@pytest.mark.asyncio
async def test_touch_of_a_copy_on_a_read_only_cache_does_not_raise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A use recorded as a model stops may not fail the stop: a read-only cache is logged.

    An EROFS from the manifest's utime escaped the stop path (a slot left STARTING).
    """
    source = tmp_path / "m.gguf"
    source.write_bytes(b"x" * 4096)
    async with StagingCache(tmp_path / "cache", 1 << 30) as cache:
        path = await cache.stage(source)

        def read_only(*_a: object, **_k: object) -> None:
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(_cache_dir, "touch", lambda *_a: read_only())
        cache.touch(path)  # what the manager does when a staged model stops


def test_a_copy_waiting_for_cache_room_says_so_in_status(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """b's copy waits while a's copy is in use: status says why b stands still, not a bare queue.

    Once a is unloaded its copy is evictable, and b is staged and served.
    """
    a = _model(tmp_path / "store" / "a.gguf", 6 * MIB)
    b = _model(tmp_path / "store" / "b.gguf", 6 * MIB)
    d = start_daemon(
        {"a": staged_preset(a), "b": staged_preset(b)},
        {"cache_dir": str(tmp_path / "cache"), "cache_budget": "10MiB", "queue_timeout": "60s"},
    )
    assert d.chat("a")[0] == 200  # a's copy is in use while a runs
    with ThreadPoolExecutor(1) as pool:
        for_b = pool.submit(d.chat, "b")
        wait_for(lambda: (d.model("b")["staging"] or {}).get("waiting") is not None)
        staging = d.model("b")["staging"]
        assert staging["done"] == 0
        assert staging["total"] == 6 * MIB
        assert "by models in use" in staging["waiting"]
        assert d.request("POST", "/swapd/models/a/unload")[0] == 200
        assert for_b.result()[0] == 200
    assert d.model("b")["staging"] is None
    assert d.model("b")["tier"] == "device"


def test_two_copies_waiting_for_cache_room_wait_quietly(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """b and c both wait for room while a's copy is in use: each tries again on a change only.

    The wait woke every waiter each time it began: b's failed try woke c, whose failed try
    woke b, thousands of tries (and ``model.stage.wait`` lines) a second until a stopped.
    """
    a, b, c = (_model(tmp_path / "store" / f"{n}.gguf", 6 * MIB) for n in "abc")
    d = start_daemon(
        {"a": staged_preset(a), "b": staged_preset(b), "c": staged_preset(c)},
        {"cache_dir": str(tmp_path / "cache"), "cache_budget": "10MiB", "queue_timeout": "60s"},
    )
    assert d.chat("a")[0] == 200  # a's copy is in use while a runs
    with ThreadPoolExecutor(2) as pool:
        for_b, for_c = pool.submit(d.chat, "b"), pool.submit(d.chat, "c")
        for name in "bc":
            wait_for(lambda n=name: (d.model(n)["staging"] or {}).get("waiting") is not None)
        for _ in range(20):  # nothing changes meanwhile: no copy is tried again
            assert d.get("/swapd/status")[0] == 200
        waits = len(d.events("model.stage.wait"))
        assert waits <= 10, waits  # one each, and one more for each real change
        assert d.request("POST", "/swapd/models/c/unload?force=true")[0] == 200
        assert d.model("c")["staging"] is None
        assert d.request("POST", "/swapd/models/a/unload")[0] == 200
        assert for_b.result()[0] == 200
        assert for_c.result()[0] == 503


@pytest.mark.llama
def test_a_copy_waiting_for_cache_room_goes_on_when_ram_ttl_drops_the_pages_holding_it(
    start_daemon: StartDaemon, tiny_gguf: Path, tmp_path: Path
) -> None:
    """a's pages in the ram tier pin its copy; ram_ttl lets them go, and b's copy goes on.

    Dropping the pages woke no one: b's copy, waiting for room, stood still until
    ``queue_timeout`` (five minutes here) and then failed with cache_full.
    """
    store = tmp_path / "store"
    store.mkdir()
    a, b = store / "a.gguf", store / "b.gguf"
    for path in (a, b):
        path.write_bytes(tiny_gguf.read_bytes())
    size = a.stat().st_size
    a_preset = {"backend": "llama-server", "model": str(a), "stage": True, "ttl": "1s"}
    d = start_daemon(
        {"a": {**a_preset, "ram_ttl": "6s"}, "b": staged_preset(b)},
        {
            "cache_dir": str(tmp_path / "cache"),
            "cache_budget": str(size + size // 2),  # room for one copy
            "queue_timeout": "300s",
        },
    )
    assert d.chat("a")[0] == 200
    wait_for(lambda: d.model("a")["tier"] == "ram", timeout=40)  # stopped, pages locked
    with ThreadPoolExecutor(1) as pool:
        for_b = pool.submit(d.chat, "b")
        wait_for(lambda: (d.model("b")["staging"] or {}).get("waiting") is not None)
        wait_for(lambda: d.events("model.ram_ttl.expire"), timeout=40)
        status, body = for_b.result(timeout=60)
    assert status == 200, body
    assert d.model("a")["tier"] == "store"  # its copy made the room


@pytest.mark.asyncio
async def test_a_copy_refused_while_an_evicted_copy_is_deleted_counts_that_space_as_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 17 MiB disk: x evicts a's 10 MiB; y (8 MiB), planned before a's files are gone, waits.

    Its CacheFull said the disk would have -1 MiB free once x's copy ended: a's bytes, still
    on the disk but out of the index, counted nowhere. The manager reads need > disk + used
    as "no stop can ever make this room" and answered 503 at once, though y fits beside x.
    """
    disk = 17 * MIB
    a = write(tmp_path / "a.gguf", 10 * MIB)
    x = write(tmp_path / "x.gguf", 8 * MIB)
    y = write(tmp_path / "y.gguf", 8 * MIB)
    folder = tmp_path / "cache"

    def free(_: Path) -> int:  # the disk holds the copies alone, wherever they are
        return disk - sum(p.stat().st_size for p in folder.rglob("*.gguf"))

    monkeypatch.setattr(staging_module, "_disk_free", free)
    async with StagingCache(folder, 100 * MIB) as cache:  # a budget above the disk's size
        await cache.stage(a)
        deleting = threading.Event()
        real_remove = staging_module._remove_all

        def remove_later(paths: list[Path]) -> None:
            if paths:
                deleting.wait(30)
            real_remove(paths)

        monkeypatch.setattr(staging_module, "_remove_all", remove_later)
        try:
            planned = asyncio.Event()  # x's copy began: a is out of the index, not deleted
            copying_x = asyncio.create_task(cache.stage(x, progress=lambda *_: planned.set()))
            await planned.wait()
            with pytest.raises(staging_module.CacheFull) as full:
                await cache.stage(y)
        finally:
            deleting.set()
        await copying_x
        assert full.value.disk == disk - 8 * MIB  # once x's copy ends: a gone, x there
        await cache.stage(y)  # and y does fit beside x


# A slow hash: the real loop, reading a MiB at a time, a fifth of a second each.
SLOW_HASH = """
import hashlib, time
import swapd._copy as c
class _Slow:
    def __init__(self):
        self._digest = hashlib.sha256()
    def update(self, block):
        time.sleep(0.2)
        self._digest.update(block)
    def hexdigest(self):
        return self._digest.hexdigest()
class _Hashlib:
    sha256 = _Slow
c.hashlib = _Hashlib
c._BUFFER = 1 << 20
"""


def _hashing(model: dict[str, Any]) -> dict[str, Any] | None:
    staging: dict[str, Any] | None = model["staging"]
    return staging if staging is not None and staging["done"] > 0 else None


def test_a_cache_hit_that_hashes_its_copy_shows_progress(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """a2 staged m.gguf without a sha256; a (same file, with one) then hits the copy.

    The copy is hashed before a starts from it (seconds per GiB), and status showed
    ``staging: null`` meanwhile: a queued model with nothing moving, like a hang.
    """
    model = _model(tmp_path / "slow" / "m.gguf", 8 * MIB)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    d = start_daemon(
        {"a2": staged_preset(model), "a": staged_preset(model, sha256=digest)},
        {"cache_dir": str(tmp_path / "cache")},
        env=hook_env(tmp_path / "hook", SLOW_HASH),
    )
    assert d.chat("a2")[0] == 200
    with ThreadPoolExecutor(1) as pool:
        for_a = pool.submit(d.chat, "a")
        staging = wait_for(lambda: _hashing(d.model("a")))
        assert staging["total"] == 8 * MIB, staging
        assert staging["done"] < 8 * MIB, staging
        assert for_a.result()[0] == 200
    assert d.model("a")["staging"] is None
