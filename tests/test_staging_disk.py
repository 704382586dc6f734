"""The staging cache against its disk, and copies evicted before their load used them.

A small disk is stood in for by reading the cache's free space as a fixed size less what
lies under the cache directory and beside it: real files, a pretend file system.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest
from test_staging import write

from swapd import _cache_dir, _copy, staging
from swapd._copy import scan
from swapd.staging import CacheFull, ChecksumMismatch, Entry, StagingCache

MIB = 1024 * 1024


def small_disk(monkeypatch: pytest.MonkeyPatch, root: Path, size: int) -> None:
    """Make the file system under ``root`` read as ``size`` bytes, less what ``root`` holds."""

    def free(_path: Path) -> int:
        used = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        return max(size - used, 0)

    monkeypatch.setattr(staging, "_disk_free", free)


def hold_copies(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Make each copy set the first event as it starts, then wait for the second."""
    real_copy, started, go = _copy.copy, threading.Event(), threading.Event()

    def held_copy(*args: Any, **kwargs: Any) -> tuple[int, str | None]:
        started.set()
        go.wait(30)
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(staging, "copy", held_copy)
    return started, go


@pytest.mark.asyncio
async def test_the_default_budget_counts_the_space_a_crashed_copy_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash's partial copy is deleted at start, and its space joins the default budget."""
    disk = tmp_path / "nvme"
    cache_dir = disk / "cache"
    leftover = cache_dir / f".partial-{'a' * 32}-abcdef" / "data"
    write(leftover / "big.gguf", 24 * MIB)
    small_disk(monkeypatch, disk, 40 * MIB)
    source = write(tmp_path / "slow" / "m.gguf", 20 * MIB)
    async with StagingCache(cache_dir, None) as cache:
        assert not leftover.exists()
        assert cache.budget > 35 * MIB  # 90% of the 40 MiB, less the lock file's few bytes
        path = await cache.stage(source)
    assert path.read_bytes() == source.read_bytes()


@pytest.mark.asyncio
async def test_a_disk_fuller_than_the_budget_evicts_idle_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other files took the disk's room after start: an idle copy goes, the new one fits."""
    disk = tmp_path / "nvme"
    small_disk(monkeypatch, disk, 40 * MIB)
    a = write(tmp_path / "slow" / "a.gguf", 12 * MIB, seed=1)
    b = write(tmp_path / "slow" / "b.gguf", 15 * MIB, seed=2)
    async with StagingCache(disk / "cache", None) as cache:
        await cache.stage(a)
        write(disk / "other-data.bin", 14 * MIB)  # a log, a download: 14 MiB left free
        path = await cache.stage(b)
        assert [e.source for e in cache.entries()] == [str(b)]
    assert path.read_bytes() == b.read_bytes()


@pytest.mark.asyncio
async def test_copies_the_disk_cannot_hold_together_do_not_both_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A budget above the disk: the second copy is refused with the disk's numbers.

    It is a CacheFull (503, and the manager waits for room), not an out-of-space error
    half way through a copy.
    """
    disk = tmp_path / "nvme"
    small_disk(monkeypatch, disk, 40 * MIB)
    a = write(tmp_path / "slow" / "a.gguf", 22 * MIB, seed=1)
    b = write(tmp_path / "slow" / "b.gguf", 22 * MIB, seed=2)
    started, go = hold_copies(monkeypatch)
    async with StagingCache(disk / "cache", 100 * MIB) as cache:
        first = asyncio.create_task(cache.stage(a))
        await asyncio.to_thread(started.wait, 30)  # a's copy has started and holds its room
        with pytest.raises(CacheFull) as refused:
            await cache.stage(b)
        go.set()
        assert refused.value.disk is not None
        assert refused.value.disk < 22 * MIB
        assert "file system has" in str(refused.value)
        await first
        path = await cache.stage(b)  # a is idle now: evicted for b
    assert path.read_bytes() == b.read_bytes()


@pytest.mark.asyncio
async def test_a_model_larger_than_the_whole_disk_is_never_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal says the disk is short, even with every copy evicted."""
    disk = tmp_path / "nvme"
    small_disk(monkeypatch, disk, 20 * MIB)
    big = write(tmp_path / "slow" / "big.gguf", 30 * MIB)
    async with StagingCache(disk / "cache", 100 * MIB) as cache:
        with pytest.raises(CacheFull) as refused:
            await cache.stage(big)
    full = refused.value
    assert full.disk is not None
    assert full.need > full.disk + full.used


@pytest.mark.asyncio
async def test_a_folder_is_staged_without_its_hidden_files(tmp_path: Path) -> None:
    """A git-lfs clone's second copy of the weights (.git) is neither copied nor counted."""
    model = tmp_path / "slow" / "Qwen"
    write(model / "model.safetensors", 16 * MIB, seed=3)
    write(model / "config.json", 100)
    write(model / ".git" / "lfs" / "objects" / "ab" / "cd" / "abcd1234", 16 * MIB, seed=3)
    write(model / ".cache" / "huggingface" / "download" / "x.metadata", 10)
    async with StagingCache(tmp_path / "cache", 24 * MIB) as cache:
        path = await cache.stage(model)
        assert cache.usage()[0] == 16 * MIB + 100
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.asyncio
async def test_a_copy_is_held_while_its_checked_digest_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another stage cannot evict a copy between its hash and the digest's write.

    The write waits in the cache's threads behind other copies; had the copy been evicted
    meanwhile, the load would have failed with a KeyError or started from a deleted path.
    """
    source = write(tmp_path / "m.gguf", MIB)
    other = write(tmp_path / "o.gguf", MIB, seed=5)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    record = _cache_dir.record_digest
    entered, go = threading.Event(), threading.Event()

    def slow_record(cache_dir: Path, key: str, sha256: str) -> None:
        entered.set()
        go.wait(30)
        record(cache_dir, key, sha256)

    monkeypatch.setattr(_cache_dir, "record_digest", slow_record)
    async with StagingCache(tmp_path / "cache", int(1.5 * MIB)) as cache:
        await cache.stage(source)  # staged without a checksum (by another preset, say)
        checked = asyncio.create_task(cache.stage(source, sha256=digest))
        await asyncio.to_thread(entered.wait, 30)
        with pytest.raises(CacheFull):
            await cache.stage(other)  # the only room is m's copy, which is held
        go.set()
        path = await checked
        assert path.exists()
        assert [e.sha256 for e in cache.entries()] == [digest]


@pytest.mark.asyncio
async def test_a_copy_evicted_before_its_waiter_ran_is_copied_again(tmp_path: Path) -> None:
    """Evicted in the loop turn between its copy's end and the stage that waited for it.

    The stage copies it again rather than answer a deleted path (or fail with a KeyError).
    """
    a = write(tmp_path / "a.gguf", MIB, seed=1)
    b = write(tmp_path / "b.gguf", MIB, seed=2)
    cache: StagingCache | None = None
    evicted: list[bool] = []
    copies: list[asyncio.Task[Entry]] = []

    def copy_ended() -> None:
        # From a's copy task's done callback, before its waiter resumes: a copy of b starts
        # there and takes the room of a's (the budget holds one). A stage reaches this step
        # after a scan in a thread, so the cache's own step is called to hit the window.
        if cache is not None and not evicted:
            found = scan(b)
            job = cache._start(found, _cache_dir.key_of(str(b), found.fingerprint), None, ())
            evicted.append(not cache.entries())
            assert job.task is not None
            copies.append(job.task)

    async with StagingCache(tmp_path / "cache", int(1.5 * MIB), on_change=copy_ended) as opened:
        cache = opened
        with pytest.raises(CacheFull):  # copied again: b's copy in progress holds the room
            await cache.stage(a)
        assert evicted == [True]
        await copies[0]
        path = await cache.stage(a)  # b is idle now
        assert path.read_bytes() == a.read_bytes()


@pytest.mark.asyncio
async def test_a_copy_checked_against_an_older_digest_does_not_fail_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload fixed a wrong ``sha256`` while the copy checking the wrong one ran.

    The load with the right digest joined that copy; its mismatch is not the new load's.
    """
    source = write(tmp_path / "m.gguf", MIB)
    right = hashlib.sha256(source.read_bytes()).hexdigest()
    started, go = hold_copies(monkeypatch)
    async with StagingCache(tmp_path / "cache", 4 * MIB) as cache:
        wrong = asyncio.create_task(cache.stage(source, sha256="0" * 64))
        await asyncio.to_thread(started.wait, 30)
        joined = asyncio.Event()
        fixed = asyncio.create_task(
            cache.stage(source, sha256=right, progress=lambda _done, _total: joined.set())
        )
        await joined.wait()  # told the running copy's progress: it waits on that copy
        go.set()
        with pytest.raises(ChecksumMismatch):
            await wrong
        path = await fixed
        assert [e.sha256 for e in cache.entries()] == [right]
    assert path.read_bytes() == source.read_bytes()
