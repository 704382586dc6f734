"""The staging cache on real files in a temporary directory, and a copier killed mid-copy."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from swapd import _cache_dir, _copy, policy, staging
from swapd.staging import (
    CacheFull,
    ChecksumMismatch,
    Entry,
    StagingCache,
    StagingError,
)


def plan_room(
    entries: list[Entry], budget: int, need: int, in_use: list[str], reserved: int = 0
) -> list[str] | None:
    """The keys of the copies ``policy.cache_room`` drops, or None."""
    drops = policy.cache_room(entries, budget, need, in_use, reserved)
    return None if drops is None else [d.key for d in drops]


MIB = 1024 * 1024
KEY = re.compile(r"[0-9a-f]{32}")


def write(path: Path, size: int, seed: int = 0) -> Path:
    """A file of ``size`` reproducible random bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(seed).randbytes(size))  # noqa: S311 - test data, not secrets
    return path


def sha(path: Path) -> str:
    """The file's SHA-256, computed the plain way."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def names(folder: Path) -> list[str]:
    """What a folder holds, by name."""
    return sorted(p.name for p in folder.iterdir())


def leftovers(cache_dir: Path) -> list[str]:
    """Names in the cache directory that are neither the lock nor a complete entry."""
    return sorted(
        p.name for p in cache_dir.iterdir() if p.name != ".lock" and not KEY.fullmatch(p.name)
    )


def complete(cache_dir: Path) -> list[str]:
    """Names of complete entries (directories named by a key)."""
    return sorted(p.name for p in cache_dir.iterdir() if KEY.fullmatch(p.name))


@pytest_asyncio.fixture
async def cache(tmp_path: Path) -> AsyncIterator[StagingCache]:
    """An open cache with a 1 GiB budget, closed after the test."""
    async with StagingCache(tmp_path / "cache", 1024 * MIB) as opened:
        yield opened


# ---------------------------------------------------------------- copies


@pytest.mark.asyncio
async def test_a_file_is_copied_into_the_cache_with_progress(
    cache: StagingCache, tmp_path: Path
) -> None:
    """A staged file is a byte-identical copy under the cache, and progress reaches the total."""
    source = write(tmp_path / "slow" / "model.gguf", 3 * MIB + 17)
    reports: list[tuple[int, int]] = []
    during: list[tuple[int, int] | None] = []

    def progress(done: int, total: int) -> None:
        reports.append((done, total))
        during.append(cache.progress(source))

    path = await cache.stage(source, progress=progress)
    assert path.name == "model.gguf"
    assert path.is_relative_to(cache.cache_dir)
    assert path.read_bytes() == source.read_bytes()
    assert cache.cached_path(source) == path
    assert reports[-1] == (source.stat().st_size, source.stat().st_size)
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)
    assert len(reports) <= 3  # once at the start and per 64 MiB chunk, never per small block
    assert all(report is not None for report in during)
    assert cache.progress(source) is None
    assert cache.usage() == (source.stat().st_size, 1024 * MIB)


@pytest.mark.asyncio
async def test_a_directory_tree_is_copied_with_linked_files_as_files(
    cache: StagingCache, tmp_path: Path
) -> None:
    """A model directory is copied whole; a link to a file becomes a copy of that file."""
    model = tmp_path / "slow" / "qwen"
    write(model / "config.json", 100, seed=1)
    write(model / "weights" / "a.safetensors", 2 * MIB, seed=2)
    write(tmp_path / "blobs" / "tok", 5000, seed=3)
    (model / "tokenizer.json").symlink_to(tmp_path / "blobs" / "tok")
    (model / "empty").mkdir()

    path = await cache.stage(model)
    assert path.name == "qwen"
    copied = sorted(str(p.relative_to(path)) for p in path.rglob("*"))
    assert copied == ["config.json", "empty", "tokenizer.json", "weights", "weights/a.safetensors"]
    assert not (path / "tokenizer.json").is_symlink()
    for name in ("config.json", "tokenizer.json", "weights/a.safetensors"):
        assert (path / name).read_bytes() == (model / name).read_bytes()
    assert cache.usage()[0] == 100 + 2 * MIB + 5000


@pytest.mark.asyncio
async def test_a_second_stage_is_a_cache_hit_without_a_copy(
    cache: StagingCache, tmp_path: Path
) -> None:
    """Staging an unchanged source again returns the same file and starts no copy."""
    source = write(tmp_path / "m.gguf", MIB)
    first = await cache.stage(source)
    inode = first.stat().st_ino
    with capture_logs() as logs:
        again = await cache.stage(source)
    assert again == first
    assert again.stat().st_ino == inode
    assert "staging.copy.start" not in [e["event"] for e in logs]


@pytest.mark.asyncio
async def test_entries_survive_a_restart(tmp_path: Path) -> None:
    """A new cache on the same directory finds the complete entries, digest included."""
    source = write(tmp_path / "m.gguf", MIB)
    async with StagingCache(tmp_path / "cache", 10 * MIB) as cache:
        path = await cache.stage(source, sha256=sha(source))
    async with StagingCache(tmp_path / "cache", 10 * MIB) as cache:
        assert cache.cached_path(source) == path
        (entry,) = cache.entries()
        assert entry.sha256 == sha(source)
        assert entry.source == str(source)


@pytest.mark.asyncio
@pytest.mark.parametrize("change", ["mtime", "size"])
async def test_a_changed_source_is_copied_again(
    cache: StagingCache, tmp_path: Path, change: str
) -> None:
    """A source whose mtime or size changed is no hit; its copy replaces the stale one."""
    source = write(tmp_path / "m.gguf", MIB, seed=1)
    old = await cache.stage(source)
    before = source.stat()
    if change == "mtime":
        write(source, MIB, seed=2)
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    else:
        write(source, MIB + 1, seed=2)
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert cache.cached_path(source) is None

    new = await cache.stage(source)
    assert new != old
    assert new.read_bytes() == source.read_bytes()
    assert not old.exists()
    assert [e.path for e in cache.entries()] == [new]


@pytest.mark.asyncio
async def test_a_file_changed_inside_a_model_directory_makes_it_a_new_source(
    cache: StagingCache, tmp_path: Path
) -> None:
    """A directory is a hit only while none of its files is added, removed or rewritten."""
    model = tmp_path / "qwen"
    write(model / "config.json", 100)
    write(model / "sub" / "w.bin", 1000)
    await cache.stage(model)
    write(model / "sub" / "extra.bin", 10)
    assert cache.cached_path(model) is None
    again = await cache.stage(model)
    assert (again / "sub" / "extra.bin").exists()
    stat = (model / "sub" / "w.bin").stat()
    write(model / "sub" / "w.bin", 1000, seed=9)
    os.utime(model / "sub" / "w.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache.cached_path(model) is None


@pytest.mark.asyncio
async def test_a_stale_copy_in_use_is_kept(cache: StagingCache, tmp_path: Path) -> None:
    """When the source changes under a running model, the copy that model uses stays."""
    source = write(tmp_path / "m.gguf", MIB, seed=1)
    old = await cache.stage(source)
    write(source, 2 * MIB, seed=2)
    new = await cache.stage(source, in_use=[source])
    assert old.exists()
    assert new.exists()
    assert cache.usage()[0] == 3 * MIB


@pytest.mark.asyncio
async def test_a_missing_source_is_a_staging_error(cache: StagingCache, tmp_path: Path) -> None:
    """Staging a path that does not exist names it and caches nothing."""
    with pytest.raises(StagingError, match=r"cannot stage .*/nowhere\.gguf"):
        await cache.stage(tmp_path / "nowhere.gguf")
    assert cache.entries() == ()


# ---------------------------------------------------------------- concurrency


@pytest.mark.asyncio
async def test_concurrent_stages_of_one_source_join_one_copy(
    cache: StagingCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three callers staging the same source at once share a single copy and its progress.

    The copy waits until all three have joined it: on a busy machine a 2 MiB copy could
    end before a caller's own look at the source returned, making that caller a plain hit.
    """
    source = write(tmp_path / "m.gguf", 2 * MIB)
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}

    def progress(caller: int) -> Callable[[int, int], None]:
        return lambda done, _total: seen[caller].append(done)

    joined = threading.Event()
    build = cache._build  # held back, not replaced

    def held_build(job: Any) -> Any:
        joined.wait(60)
        return build(job)

    monkeypatch.setattr(cache, "_build", held_build)
    with capture_logs() as logs:
        calls = [asyncio.ensure_future(cache.stage(source, progress=progress(i))) for i in range(3)]
        for _ in range(6000):  # up to a minute for the three to join
            copies = list(cache._copies.values())  # the copy and its waiters
            if copies and len(copies[0].callbacks) == 3:
                break
            await asyncio.sleep(0.01)
        joined.set()
        paths = await asyncio.gather(*calls)
    assert len(set(paths)) == 1
    assert [e["event"] for e in logs].count("staging.copy.start") == 1
    assert all(reports and reports[-1] == 2 * MIB for reports in seen.values())


@pytest.mark.asyncio
async def test_a_second_owner_of_the_directory_is_refused(tmp_path: Path) -> None:
    """Only one cache may own a directory; the second is told which process holds it."""
    async with StagingCache(tmp_path / "cache", MIB):
        with pytest.raises(StagingError, match=rf"in use by another process \(pid {os.getpid()}\)"):
            StagingCache(tmp_path / "cache", MIB).open()


# ---------------------------------------------------------------- budget


def entry(key: str, size: int, used: int, source: str | None = None) -> Entry:
    """An entry for the planner: only key, source, size and last use matter to it."""
    return Entry(key, source or f"/models/{key}", size, used)


THREE = [entry("a", 4, used=30), entry("b", 3, used=10), entry("c", 2, used=20)]


@pytest.mark.parametrize(
    ("budget", "need", "in_use", "reserved", "plan"),
    [
        (20, 5, [], 0, []),  # 9 used, 11 free: nothing to evict
        (10, 2, [], 0, ["b"]),  # 1 free: the least recently used goes first
        (10, 5, [], 0, ["b", "c"]),  # then the next
        (10, 5, ["/models/b"], 0, ["c", "a"]),  # an entry in use is skipped
        (10, 8, ["/models/a"], 0, None),  # b and c free 5+1, not 8
        (10, 11, [], 0, None),  # more than the whole budget
        (12, 3, [], 3, ["b"]),  # a copy in progress holds 3 of the 3 free bytes
        (9, 0, [], 0, []),  # nothing needed, nothing evicted
    ],
)
def test_plan_room_evicts_least_recently_used_bytes_first(
    budget: int, need: int, in_use: list[str], reserved: int, plan: list[str] | None
) -> None:
    """The planner frees bytes in LRU order, skips entries in use, and says None when it can't."""
    assert plan_room(THREE, budget, need, in_use, reserved) == plan


def test_plan_room_breaks_ties_by_key() -> None:
    """Entries last used at the same instant are evicted in key order, so plans repeat."""
    tied = [entry("y", 1, used=5), entry("x", 1, used=5)]
    assert plan_room(tied, 2, 1, []) == ["x"]


@pytest.mark.asyncio
async def test_the_least_recently_used_copy_is_evicted_across_a_restart(tmp_path: Path) -> None:
    """With a 3 MiB budget, a fourth 1 MiB model evicts the copy used longest ago."""
    a, b, c, d = (write(tmp_path / f"{n}.gguf", MIB, seed=i) for i, n in enumerate("abcd"))
    async with StagingCache(tmp_path / "cache", 3 * MIB) as cache:
        for source in (a, b, c):
            await cache.stage(source)
        cache.touch(cache.cached_path(a) or "")  # now b is the least recently used
        (b_key,) = [e.key for e in cache.entries() if e.source == str(b)]
    async with StagingCache(tmp_path / "cache", 3 * MIB) as cache:
        assert cache.plan_room(MIB, in_use=[]) == (policy.DropCached(b_key),)
        assert cache.plan_room(MIB, in_use=[b]) != (policy.DropCached(b_key),)
        await cache.stage(d)
        assert cache.cached_path(b) is None
        assert all(cache.cached_path(s) is not None for s in (a, c, d))
        assert cache.usage() == (3 * MIB, 3 * MIB)
        assert len(complete(cache.cache_dir)) == 3


@pytest.mark.asyncio
async def test_a_copy_in_use_is_never_evicted_and_a_full_cache_gives_the_numbers(
    tmp_path: Path,
) -> None:
    """When every copy is in use, staging fails with need, budget, used and pinned bytes."""
    a, b, c = (write(tmp_path / f"{n}.gguf", MIB, seed=i) for i, n in enumerate("abc"))
    async with StagingCache(tmp_path / "cache", 2 * MIB) as cache:
        await cache.stage(a)
        await cache.stage(b)
        with pytest.raises(CacheFull) as caught:
            await cache.stage(c, in_use=[a, str(b)])
        error = caught.value
        assert (error.need, error.budget, error.used, error.pinned) == (
            MIB,
            2 * MIB,
            2 * MIB,
            2 * MIB,
        )
        assert str(error).startswith(f"cannot stage {c}: it needs 1048576 bytes (1.0 MiB)")
        assert "budget is 2097152 (2.0 MiB), 2097152 (2.0 MiB) are used" in str(error)
        assert cache.cached_path(a) is not None
        assert cache.cached_path(b) is not None
        assert leftovers(cache.cache_dir) == []

        await cache.stage(c, in_use=[b])  # a is not in use any more: it goes
        assert cache.cached_path(a) is None
        assert cache.cached_path(b) is not None


@pytest.mark.asyncio
async def test_evict_removes_entries_and_returns_the_bytes(
    cache: StagingCache, tmp_path: Path
) -> None:
    """Evicting by key deletes the copy at once and frees its bytes."""
    path = await cache.stage(write(tmp_path / "m.gguf", MIB))
    (entry,) = cache.entries()
    assert await cache.evict([entry.key, "0" * 32]) == MIB
    assert not path.exists()
    assert cache.usage()[0] == 0
    assert complete(cache.cache_dir) == []
    assert leftovers(cache.cache_dir) == []


# ---------------------------------------------------------------- integrity


@pytest.mark.asyncio
async def test_a_checksum_mismatch_leaves_nothing_in_the_cache(tmp_path: Path) -> None:
    """A wrong sha256 names the file and both digests, and no copy survives, even a restart."""
    source = write(tmp_path / "m.gguf", 3 * MIB)
    wrong = "0" * 64
    async with StagingCache(tmp_path / "cache", 10 * MIB) as cache:
        with pytest.raises(ChecksumMismatch) as caught:
            await cache.stage(source, sha256=wrong)
        assert str(caught.value) == f"{source}: sha256 is {sha(source)}, expected {wrong}"
        assert cache.cached_path(source) is None
        assert cache.usage()[0] == 0
        assert names(cache.cache_dir) == [".lock"]
    async with StagingCache(tmp_path / "cache", 10 * MIB) as cache:
        assert cache.cached_path(source) is None
        path = await cache.stage(source, sha256=sha(source).upper())
        assert cache.entries()[0].sha256 == sha(source)
        assert '"sha256": "' + sha(source) in (path.parent.parent / "entry.json").read_text()


@pytest.mark.asyncio
async def test_a_copy_staged_without_checksum_is_checked_when_one_is_given(
    cache: StagingCache, tmp_path: Path
) -> None:
    """A cached copy is hashed once a sha256 is asked for; a mismatch removes it."""
    source = write(tmp_path / "m.gguf", MIB)
    await cache.stage(source)
    with pytest.raises(ChecksumMismatch, match="expected " + "1" * 64):
        await cache.stage(source, sha256="1" * 64)
    assert cache.cached_path(source) is None

    await cache.stage(source)
    path = await cache.stage(source, sha256=sha(source))
    assert cache.entries()[0].sha256 == sha(source)
    assert sha(source) in (path.parent.parent / "entry.json").read_text()


@pytest.mark.asyncio
async def test_sha256_is_for_files_only(cache: StagingCache, tmp_path: Path) -> None:
    """A sha256 for a directory, or one that is not 64 hex digits, is refused before copying."""
    write(tmp_path / "dir" / "f", 10)
    with pytest.raises(StagingError, match="is a directory: sha256 is checked for a single file"):
        await cache.stage(tmp_path / "dir", sha256="0" * 64)
    with pytest.raises(StagingError, match="sha256 must be 64 hex digits"):
        await cache.stage(write(tmp_path / "f", 10), sha256="abc")
    assert cache.entries() == ()


@pytest.mark.asyncio
async def test_leftovers_and_broken_entries_are_deleted_at_open(tmp_path: Path) -> None:
    """Partial copies, half-deleted entries and entries with a bad manifest go at open."""
    cache_dir = tmp_path / "cache"
    write(cache_dir / f".partial-{'b' * 32}-123456" / "data" / "m.gguf", 100)
    write(cache_dir / f".evicted-{'c' * 32}-abcdef" / "data" / "m.gguf", 100)
    write(cache_dir / ("a" * 32) / "data" / "m.gguf", 100)
    (cache_dir / ("a" * 32) / "entry.json").write_text("{not json")
    (cache_dir / "notes.txt").write_text("left alone: not the cache's")
    with capture_logs() as logs:
        async with StagingCache(cache_dir, MIB) as cache:
            assert cache.entries() == ()
    assert names(cache_dir) == [".lock", "notes.txt"]
    (clean,) = [e for e in logs if e["event"] == "staging.clean"]
    assert len(clean["removed"]) == 3


@pytest.mark.asyncio
async def test_a_manifest_rewrite_cut_short_leaves_nothing_after_open(tmp_path: Path) -> None:
    """A kill inside a manifest's rewrite leaves ``entry.json.XXXXXX``; the next open deletes it.

    The entry itself is whole (the old manifest stays until the rename) and is kept.
    """
    source = write(tmp_path / "m.gguf", MIB)
    async with StagingCache(tmp_path / "cache", 10 * MIB) as cache:
        path = await cache.stage(source)
    entry_dir = path.parent.parent
    (entry_dir / "entry.json.0a1b2c").write_text('{"half": ')
    with capture_logs() as logs:
        async with StagingCache(tmp_path / "cache", 10 * MIB) as cache:
            assert cache.cached_path(source) == path
    assert names(entry_dir) == ["data", "entry.json"]
    (clean,) = [e for e in logs if e["event"] == "staging.clean"]
    gone = f"{entry_dir.name}/entry.json.0a1b2c (interrupted manifest rewrite)"
    assert clean["removed"] == [gone]


# ---------------------------------------------------------------- durability


def manifest(entry_dir: Path) -> dict[str, object]:
    """An entry's ``entry.json``, parsed."""
    loaded: dict[str, object] = json.loads((entry_dir / "entry.json").read_text())
    return loaded


def mark_unsynced(entry_dir: Path, boot: str) -> None:
    """Rewrite a manifest as publish leaves it before the background fsync: unsynced in ``boot``."""
    fields = manifest(entry_dir) | {"version": 2, "unsynced_boot": boot}
    (entry_dir / "entry.json").write_text(json.dumps(fields))


@pytest.mark.asyncio
async def test_the_background_sync_marks_a_published_copy_synced(tmp_path: Path) -> None:
    """After stage returns, a task fsyncs the copy and drops the unsynced mark on disk too."""
    source = write(tmp_path / "m.gguf", 2 * MIB)
    with capture_logs() as logs:
        async with StagingCache(tmp_path / "cache", 10 * MIB) as cache:
            path = await cache.stage(source)
            await cache.synced()
            (entry,) = cache.entries()
            assert entry.synced
            written = manifest(path.parent.parent)
    assert written["version"] == 1
    assert "unsynced_boot" not in written
    events = [e["event"] for e in logs]
    assert events.index("staging.copy.done") < events.index("staging.sync.done")


def test_publish_marks_the_entry_unsynced_until_sync_has_run(tmp_path: Path) -> None:
    """The manifest names this boot until the data, the names and the rename are synced."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    source = _copy.scan(write(tmp_path / "m.gguf", MIB))
    key = _cache_dir.key_of(str(source.path), source.fingerprint)
    partial = _cache_dir.start_partial(cache_dir, key)
    _copy.copy(
        source,
        partial / "data" / "m.gguf",
        sha256=False,
        report=lambda _: None,
        cancel=threading.Event(),
    )
    boot = _cache_dir.boot_id()
    entry = _cache_dir.Manifest(
        str(source.path), is_dir=False, size=MIB, fingerprint=source.fingerprint, sha256=None,
        unsynced_boot=boot,
    )  # fmt: skip
    _cache_dir.publish(partial, entry, cache_dir)
    assert manifest(cache_dir / key)["unsynced_boot"] == boot
    assert _cache_dir.sync(cache_dir, key, threading.Event())
    assert "unsynced_boot" not in manifest(cache_dir / key)
    assert not _cache_dir.sync(cache_dir, "0" * 32, threading.Event())  # gone: nothing to do


@pytest.mark.asyncio
async def test_an_unsynced_entry_from_another_boot_is_discarded_at_open(tmp_path: Path) -> None:
    """A copy never synced before the machine restarted may be torn: deleted and logged."""
    source = write(tmp_path / "m.gguf", MIB)
    async with StagingCache(tmp_path / "cache", 10 * MIB) as cache:
        path = await cache.stage(source)
    entry_dir = path.parent.parent
    mark_unsynced(entry_dir, "another-boot")
    with capture_logs() as logs:
        async with StagingCache(tmp_path / "cache", 10 * MIB) as cache:
            assert cache.entries() == ()
            assert cache.cached_path(source) is None
    assert not entry_dir.exists()
    (clean,) = [e for e in logs if e["event"] == "staging.clean"]
    reason = "not yet synced when the machine restarted: possibly torn"
    assert clean["removed"] == [f"{entry_dir.name} ({reason})"]


@pytest.mark.asyncio
async def test_an_unsynced_entry_from_this_boot_is_synced_and_kept_at_open(
    tmp_path: Path,
) -> None:
    """A copy left unsynced by a crash of swapd alone is whole in the page cache: kept, synced."""
    source = write(tmp_path / "m.gguf", MIB)
    async with StagingCache(tmp_path / "cache", 10 * MIB) as cache:
        path = await cache.stage(source)
    entry_dir = path.parent.parent
    mark_unsynced(entry_dir, _cache_dir.boot_id())
    with capture_logs() as logs:
        async with StagingCache(tmp_path / "cache", 10 * MIB) as cache:
            assert cache.cached_path(source) == path
            (entry,) = cache.entries()
            assert entry.synced
    assert "unsynced_boot" not in manifest(entry_dir)
    assert path.read_bytes() == source.read_bytes()
    (recover,) = [e for e in logs if e["event"] == "staging.sync.recover"]
    assert recover["keys"] == [entry_dir.name]


@pytest.mark.asyncio
async def test_a_copy_evicted_while_its_fsync_runs_is_deleted_only_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eviction takes the entry out at once; its file stays until the fsync on it returns."""
    source = write(tmp_path / "m.gguf", 3 * MIB)
    entered, release = threading.Event(), threading.Event()
    links: list[int] = []  # the data file's link count when its fsync returns
    real_fsync = os.fsync

    def held_fsync(fd: int) -> None:
        # The disk stands still for the copy's data file until the test lets it go on.
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size == 3 * MIB and not release.is_set():
            entered.set()
            release.wait(30)
            links.append(os.fstat(fd).st_nlink)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", held_fsync)
    async with StagingCache(tmp_path / "cache", 10 * MIB) as cache:
        path = await cache.stage(source)
        await asyncio.to_thread(entered.wait, 30)
        eviction = asyncio.create_task(cache.evict([e.key for e in cache.entries()]))
        await asyncio.sleep(0)
        assert cache.entries() == ()
        assert complete(cache.cache_dir) == []
        [moved] = list(cache.cache_dir.glob(".evicted-*/data/m.gguf"))
        # Time for a deletion that does not wait to happen; a correct one cannot finish here.
        await asyncio.wait({eviction}, timeout=0.5)
        assert not eviction.done()
        assert moved.exists()
        release.set()
        assert await eviction == 3 * MIB
        assert links == [1]  # the file still had its name when its fsync returned
        assert leftovers(cache.cache_dir) == []
        assert not path.exists()
        again = await cache.stage(source)
        await cache.synced()
        assert "unsynced_boot" not in manifest(again.parent.parent)


@pytest.mark.asyncio
async def test_a_use_recorded_while_the_sync_rewrites_the_manifest_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The LRU order on disk survives the sync replacing the manifest under a touch."""
    a, b = write(tmp_path / "a.gguf", MIB, seed=1), write(tmp_path / "b.gguf", MIB, seed=2)
    entered, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def held_fsync(fd: int) -> None:
        # Hold a's new manifest (written, not yet renamed over the old one) until let go.
        opened = Path(f"/proc/self/fd/{fd}")
        manifest_of_a = "/entry.json." in str(opened.readlink()) and str(a) in opened.read_text()
        if manifest_of_a and not release.is_set():
            entered.set()
            release.wait(30)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", held_fsync)
    async with StagingCache(tmp_path / "cache", 2 * MIB) as cache:
        await cache.stage(a)
        await asyncio.to_thread(entered.wait, 30)
        await cache.stage(b)
        cache.touch(cache.cached_path(a) or "")  # now b is the least recently used, on disk too
        release.set()
        await cache.synced()
    async with StagingCache(tmp_path / "cache", 2 * MIB) as cache:
        (b_key,) = [e.key for e in cache.entries() if e.source == str(b)]
        assert cache.plan_room(MIB, in_use=[]) == (policy.DropCached(b_key),)


CHILD = """
import asyncio, sys
from pathlib import Path
from swapd.staging import StagingCache

async def main():
    async with StagingCache(Path(sys.argv[1]), 1 << 40) as cache:
        await cache.stage(sys.argv[2])

asyncio.run(main())
"""


def kill_mid_copy(cache_dir: Path, source: Path) -> bool:
    """Run a copier, SIGKILL it once it has written bytes; False if it had finished by then."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(cache_dir), str(source)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        while not any(p.stat().st_size for p in cache_dir.glob(".partial-*/data/*")):
            assert child.poll() is None, child.communicate()[1].decode()
            time.sleep(0.001)
        os.kill(child.pid, signal.SIGSTOP)  # frozen, so what we look at is what it leaves
        return complete(cache_dir) == []
    finally:
        child.kill()
        child.communicate()


@pytest.mark.asyncio
async def test_a_copy_killed_mid_way_leaves_nothing_that_looks_complete(tmp_path: Path) -> None:
    """SIGKILL during a copy leaves a partial copy that the next open deletes; no entry."""
    source = tmp_path / "big.gguf"
    with source.open("wb") as file:  # 512 MiB, sparse but for real bytes at both ends
        file.write(os.urandom(MIB))
        file.seek(511 * MIB)
        file.write(os.urandom(MIB))
    for attempt in range(5):
        cache_dir = tmp_path / f"cache{attempt}"
        if kill_mid_copy(cache_dir, source):
            break
    else:
        pytest.fail("every copy finished before it could be killed")
    assert leftovers(cache_dir) != []

    with capture_logs() as logs:
        async with StagingCache(cache_dir, 1024 * MIB) as cache:
            assert leftovers(cache_dir) == []
            assert cache.cached_path(source) is None
            assert cache.usage()[0] == 0
            path = await cache.stage(source)
            assert path.stat().st_size == 512 * MIB
    clean = [e for e in logs if e["event"] == "staging.clean"]
    assert "interrupted copy" in clean[0]["removed"][0]


@pytest.mark.asyncio
async def test_closing_the_cache_stops_a_copy_and_leaves_no_partial(tmp_path: Path) -> None:
    """Closing while a copy runs cancels its waiters and deletes the partial copy."""
    source = tmp_path / "big.gguf"
    with source.open("wb") as file:
        file.truncate(256 * MIB)
    cache = StagingCache(tmp_path / "cache", 1024 * MIB)
    await asyncio.to_thread(cache.open)
    started = asyncio.Event()
    waiter = asyncio.create_task(cache.stage(source, progress=lambda _d, _t: started.set()))
    await started.wait()
    await cache.aclose()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert leftovers(cache.cache_dir) == []


# ---------------------------------------------------------------- the copier


@pytest.mark.parametrize(
    "methods", [("copy_file_range",), ("sendfile",), ("read",), ("sendfile", "read")]
)
def test_every_copy_method_gives_the_same_bytes_and_digest(
    tmp_path: Path, methods: tuple[str, ...]
) -> None:
    """Each fallback (kernel copy, sendfile, reads and writes) copies and hashes alike."""
    source = write(tmp_path / "src", 9 * MIB + 3)
    dest = tmp_path / "dst"
    reports: list[int] = []
    src_fd = os.open(source, os.O_RDONLY)
    dst_fd = os.open(dest, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        done = _copy.copy_fd(
            src_fd,
            dst_fd,
            source.stat().st_size,
            report=reports.append,
            cancel=threading.Event(),
            methods=methods,
        )
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert done == source.stat().st_size
    assert dest.read_bytes() == source.read_bytes()
    assert reports[-1] == done


def test_the_digest_is_computed_while_copying(tmp_path: Path) -> None:
    """A copy with sha256 returns the digest of the bytes written, equal to the source's."""
    source = write(tmp_path / "src", 5 * MIB + 1)
    done, digest = _copy.copy(
        _copy.scan(source),
        tmp_path / "dst",
        sha256=True,
        report=lambda _: None,
        cancel=threading.Event(),
    )
    assert (done, digest) == (source.stat().st_size, sha(source))
    assert _copy.hash_file(tmp_path / "dst") == sha(source)


def test_a_checked_copy_starts_small_and_doubles_to_the_full_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hasher gets a small first chunk to start on; the digest covers every chunk."""
    monkeypatch.setattr(_copy, "CHUNK", 4 * MIB)
    monkeypatch.setattr(_copy, "_FIRST_HASHED", MIB // 2)
    source = write(tmp_path / "src", 13 * MIB + 5)
    reports: list[int] = []
    done, digest = _copy.copy(
        _copy.scan(source),
        tmp_path / "dst",
        sha256=True,
        report=reports.append,
        cancel=threading.Event(),
    )
    assert (done, digest) == (source.stat().st_size, sha(source))
    steps = [b - a for a, b in zip([0, *reports], reports, strict=False)]
    assert steps == [MIB // 2, MIB, 2 * MIB, 4 * MIB, 4 * MIB, 13 * MIB + 5 - 11 * MIB - MIB // 2]


@pytest.mark.asyncio
async def test_a_digest_is_kept_when_the_copy_is_used_or_synced_while_it_is_hashed(
    cache: StagingCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy's fsync, or a load's touch, replaces its index entry while it is hashed.

    The digest still belongs to the same copy: it is recorded (it was dropped, so each
    later load with the sha256 hashed the file again; seen as a failure of the test above
    when the background fsync ended during the hash).
    """
    source = write(tmp_path / "m.gguf", MIB)
    path = await cache.stage(source)
    await cache.synced()
    loop = asyncio.get_running_loop()
    plain_hash = _copy.hash_file

    def hash_while_touched(
        file: Path, cancel: threading.Event, report: _copy.Report | None = None
    ) -> str:
        asyncio.run_coroutine_threadsafe(_touch(cache, path), loop).result(timeout=30)
        return plain_hash(file, cancel, report)

    monkeypatch.setattr(staging, "hash_file", hash_while_touched)
    await cache.stage(source, sha256=sha(source))
    assert cache.entries()[0].sha256 == sha(source)


async def _touch(cache: StagingCache, path: Path) -> None:
    cache.touch(path)
