"""The staging cache: model files copied from slow storage to local NVMe before a load.

    SwapdError
    └── StagingError            a source cannot be staged (unreadable, changed, cache locked)
        ├── CacheFull           no eviction plan makes room: need, budget, used, pinned
        └── ChecksumMismatch    the copy's SHA-256 is not the expected one: file, both digests

One :class:`StagingCache` owns one cache directory (an flock keeps a second swapd out).
``open()`` deletes what interrupted copies and deletions left behind and reads the complete
entries (see :mod:`swapd._cache_dir` for the layout and why a crash never leaves a copy that
looks complete). ``stage()`` copies in a thread (:mod:`swapd._copy`); the index of entries is
only changed on the event loop.

A copy is published (renamed into place) as soon as it is copied and checked, before it is
fsynced: ``stage()`` returns as ``cp`` would. A task per entry then fsyncs it off the request
path and marks it synced (:func:`swapd._cache_dir.sync`); ``synced()`` waits for those tasks
and ``aclose()`` lets them finish, so a clean shutdown leaves nothing unsynced. An entry
evicted while its fsync runs leaves the index at once, but its files are deleted only once
that fsync has returned.

A source is a file (a GGUF) or a directory (a vLLM model: copied whole, links replaced by
what they point to); a ``sha256`` is checked for a file only. An entry is keyed by the
source's absolute path and fingerprint (size and mtime; for a directory, every file's), so a
changed source is copied again. Room is planned by :func:`swapd.policy.cache_room`, a pure
function: least recently used entries first, never an entry whose source is in use. The
budget counts file bytes (apparent sizes).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Self, TypeVar

from swapd import _cache_dir as layout
from swapd import policy
from swapd._copy import Cancelled, Source, copy, hash_file, scan
from swapd.errors import SwapdError
from swapd.logs import get_logger
from swapd.units import format_size

_log = get_logger("swapd.staging")
T = TypeVar("T")
Progress = Callable[[int, int], None]
# Sources whose copies are in use: a collection, or a function asked each time it matters.
InUse = Collection[str | Path] | Callable[[], Collection[str | Path]]
# Progress callbacks run at most this often (plus once at the start and once at the end).
REPORT_EVERY_S = 0.1
_SHA256_HEX = 64
# How many times a stage copies a source whose copy other stages evicted before it was used.
_ATTEMPTS = 3


class StagingError(SwapdError):
    """A source could not be staged; the message names it and says why."""


class CacheFull(StagingError):
    """No eviction plan frees ``need`` bytes: every candidate is in use, or need > budget."""

    def __init__(  # noqa: PLR0913 - each is a number the message gives
        self,
        source: str,
        need: int,
        budget: int,
        used: int,
        pinned: int,
        *,
        disk: int | None = None,
    ) -> None:
        self.source = source
        self.need = need
        self.budget = budget
        self.used = used
        self.pinned = pinned
        self.disk = disk
        # ``disk``: the bytes the cache's file system will have free once the copies in
        # progress end, where that and not the budget is what is short.
        short = (
            ""
            if disk is None
            else f", and its file system has {disk} ({format_size(disk)}) free once the copies"
            " in progress end"
        )
        super().__init__(
            f"cannot stage {source}: it needs {need} bytes ({format_size(need)}), the cache"
            f" budget is {budget} ({format_size(budget)}), {used} ({format_size(used)}) are"
            f" used, of which {pinned} ({format_size(pinned)}) by models in use or copies"
            f" in progress{short}"
        )


class ChecksumMismatch(StagingError):
    """The staged copy's SHA-256 differs from the one expected; nothing is left cached."""

    def __init__(self, source: str, expected: str, actual: str) -> None:
        self.source, self.expected, self.actual = source, expected, actual
        super().__init__(f"{source}: sha256 is {actual}, expected {expected}")


@dataclass(frozen=True)
class Entry:
    """A complete entry: the copy at ``path`` of ``source`` as it was (``size`` bytes).

    ``last_used_ns`` is wall-clock nanoseconds; ``sha256`` is set once the copy was checked;
    ``synced`` once its fsync has returned; ``copy`` is the copy's identity, kept when a
    touch or the fsync replaces the entry, new for each copy. The planner reads only
    ``key``, ``source``, ``size`` and ``last_used_ns``.
    """

    key: str
    source: str
    size: int
    last_used_ns: int
    sha256: str | None = None
    path: Path = field(default=Path(), compare=False)
    synced: bool = True
    copy: object = field(default_factory=object, compare=False, repr=False)


def _absolute(source: str | Path) -> str:
    # abspath, not resolve: the name the preset gives is the key, and ".." is normalised.
    return os.path.abspath(source)  # noqa: PTH100 - Path has no normalise-without-resolve


@dataclass(eq=False)
class _Copy:
    """One copy in progress, joined by every caller that stages the same source."""

    source: Source
    key: str
    sha256: str | None
    loop: asyncio.AbstractEventLoop
    callbacks: list[Progress]
    done: int = 0
    emitted: int = -1
    cancel: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task[Entry] | None = None
    stopped: str | None = None  # why :meth:`StagingCache.stop_unwanted` stopped it
    _last_report: float = 0.0

    def report(self, done: int) -> None:
        """From the copy thread: ``done`` bytes are copied; tell the loop now and then."""
        self.done = done
        now = time.monotonic()
        if done >= self.source.size or now - self._last_report >= REPORT_EVERY_S:
            self._last_report = now
            # RuntimeError: the loop has closed, so nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.emit)

    def emit(self) -> None:
        """On the loop: call every waiter's progress callback with (done, total)."""
        done, self.emitted = self.done, self.done
        for callback in list(self.callbacks):
            try:
                callback(done, self.source.size)
            except Exception as exc:  # noqa: BLE001 - a status hook must not stop a copy
                _log.error("staging.progress.fail", source=str(self.source.path), error=repr(exc))


@dataclass(eq=False)
class _Sync:
    """The background fsync of one published entry."""

    task: asyncio.Task[None]
    cancel: threading.Event


@dataclass
class _Trash:
    """Detached entries to delete, once the fsyncs still running on them have returned."""

    paths: list[Path] = field(default_factory=list)
    syncs: list[asyncio.Task[None]] = field(default_factory=list)
    size: int = 0  # bytes of their copies, still on the disk until deleted


class StagingCache:
    """The staging cache in ``cache_dir``, holding at most ``budget`` bytes of copies.

    Call :meth:`open` (blocking: it may delete leftovers) or use ``async with``, which opens
    it in a thread and closes it on exit. Every other method is called from the event loop.
    """

    def __init__(
        self,
        cache_dir: Path,
        budget: int | None,
        on_change: Callable[[], None] | None = None,
        unwanted: Callable[[str], str | None] | None = None,
    ) -> None:
        if budget is not None and budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        self.cache_dir = Path(_absolute(cache_dir))
        # None: no cap but the disk, read at open (a tenth of it is kept free).
        self._disk_share = budget is None
        self.budget = budget or 0
        self._entries: dict[str, Entry] = {}
        self._copies: dict[str, _Copy] = {}
        self._held: Counter[str] = Counter()  # keys of copies being checked for a load
        self._syncs: dict[str, _Sync] = {}
        self._deleting = 0  # bytes of detached copies not deleted yet
        self._boot = ""
        self._lock_fd: int | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._clock = 0
        # Told when a copy ends, done or failed: a stage waiting for room may go on.
        self._on_change = on_change
        # Asked, once no stage() waits on a copy, why nobody wants that source's copy any
        # more (None: it is wanted). An unwanted copy is stopped.
        self._unwanted = unwanted
        self._stagers: Counter[str] = Counter()  # absolute sources: stage() calls under way

    # ------------------------------------------------------------------ lifetime

    def open(self) -> None:
        """Take the directory's lock, delete leftovers and invalid entries, read the rest.

        Raises StagingError if another process holds the cache.
        """
        try:
            self._lock_fd = layout.lock(self.cache_dir)
        except BlockingIOError:
            pid = layout.holder(self.cache_dir)
            msg = f"{self.cache_dir} is in use by another process (pid {pid})"
            raise StagingError(msg) from None
        except OSError as exc:
            hint = " (under systemd: add it to ReadWritePaths=)" if exc.errno == errno.EROFS else ""
            msg = f"cannot open the staging cache {self.cache_dir}: {exc}{hint}"
            raise StagingError(msg) from exc
        self._boot = layout.boot_id()
        found = layout.load(self.cache_dir, self._boot)
        # After the cleanup: a crashed copy's leftovers are free space, not lost to the budget.
        free = _disk_free(self.cache_dir) if self._disk_share else 0
        if found.removed:
            _log.warning("staging.clean", cache_dir=str(self.cache_dir), removed=found.removed)
        if found.synced:
            _log.info("staging.sync.recover", cache_dir=str(self.cache_dir), keys=found.synced)
        for key, (manifest, last_used) in found.entries.items():
            path = layout.data_path(self.cache_dir, key, manifest.name)
            self._entries[key] = Entry(
                key, manifest.source, manifest.size, last_used, manifest.sha256, path
            )
        self._clock = max((e.last_used_ns for e in self._entries.values()), default=0)
        self._executor = ThreadPoolExecutor(4, thread_name_prefix="swapd-staging")
        used, _ = self.usage()
        if self._disk_share:
            # What the copies already hold, and 90% of what is free: the free space alone
            # would shrink the cache by its own size at each start.
            self.budget = used + int(free * 0.9)
        elif used > self.budget:
            used = self._fit_at_open()
        _log.info("staging.open", entries=len(self._entries), used=used, budget=self.budget)

    def resize(self, budget: int | None) -> None:
        """Take a new budget (a reload's); None: what the copies hold and 90% of the free space.

        Nothing is evicted here: :meth:`fit` does, knowing which copies are in use. One
        statvfs of the cache's disk where ``budget`` is None, as :meth:`_room` does.
        """
        if budget is not None and budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        self._disk_share = budget is None
        if budget is None:
            try:
                free = _disk_free(self.cache_dir)
            except OSError:  # the directory was removed: the next copy makes it again
                free = 0
            budget = sum(e.size for e in self._entries.values()) + int(free * 0.9)
        self.budget = budget
        _log.info("staging.budget", budget=budget)

    async def fit(self, in_use: InUse) -> int:
        """Evict copies not in use, least recently used first, until the rest fit the budget.

        Where the copies in use alone are over it, every other one goes; the bytes freed.
        """
        pinned = self._pinned(in_use)
        entries = self._entries.values()
        drops = policy.cache_room(entries, self.budget, 0, pinned, self._reserved())
        if drops is None:
            victims = [e.key for e in entries if e.source not in pinned]
        else:
            victims = [d.key for d in drops]
        return await self.evict(victims) if victims else 0

    def over_budget(self) -> bool:
        """Whether the copies (and the copies in progress) take more than the budget."""
        used, budget = self.usage()
        return used > budget

    def _fit_at_open(self) -> int:
        """Evict the least recently used copies past a budget lowered since the last run.

        Nothing is in use yet: left over it, the cache held more than its budget until a
        copy needed room. The bytes the cache holds after.
        """
        drops = policy.cache_room(self._entries.values(), self.budget, 0, ()) or ()
        _, trash = self._detach(d.key for d in drops)
        try:
            _remove_all(trash.paths)  # blocking, as the rest of open(); no fsync runs yet
        finally:
            self._deleting -= trash.size
        used, _ = self.usage()
        return used

    async def aclose(self) -> None:
        """Stop copies in progress, let published ones finish their fsync, release the lock.

        Partial copies are deleted. The fsyncs are waited for because an entry left unsynced
        is deleted at the next start if the machine restarts meanwhile, even cleanly.
        """
        tasks = [job.task for job in self._copies.values() if job.task is not None]
        for job in self._copies.values():
            job.cancel.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.synced()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.open)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ readers

    def cached_path(self, source: str | Path) -> Path | None:
        """The copy of ``source`` as it is now (one stat; a walk for a directory), or None."""
        try:
            found = scan(Path(_absolute(source)))
        except OSError:
            return None
        entry = self._entries.get(layout.key_of(str(found.path), found.fingerprint))
        return entry.path if entry is not None and entry.path.exists() else None

    def holds(self, source: str | Path) -> bool:
        """Whether the cache holds a copy of ``source``, as it is now or not (no I/O)."""
        path = _absolute(source)
        return any(e.source == path for e in self._entries.values())

    def digest_unlike(self, copy: str | Path, sha256: str | None) -> str | None:
        """The digest recorded for the copy at ``copy`` when it is not ``sha256``, else None.

        None too for a copy never checked (staged without a ``sha256``): only a hash, which
        its next load makes, can tell. No I/O.
        """
        if sha256 is None:
            return None
        for entry in self._entries.values():
            if str(entry.path) == str(copy):
                recorded = entry.sha256
                return recorded if recorded is not None and recorded != sha256 else None
        return None

    def entries(self) -> tuple[Entry, ...]:
        """A snapshot of the complete entries."""
        return tuple(self._entries.values())

    def usage(self) -> tuple[int, int]:
        """Bytes held by complete entries and reserved by copies in progress; the budget.

        An entry deleted behind the cache's back (one stat each) no longer counts.
        """
        used = sum(e.size for e in self._entries.values() if e.path.exists())
        return used + sum(j.source.size for j in self._copies.values()), self.budget

    async def synced(self) -> None:
        """Wait until every entry published so far is synced (or its fsync failed)."""
        tasks = {sync.task for sync in self._syncs.values()}
        if tasks:
            await asyncio.wait(tasks)

    def progress(self, source: str | Path) -> tuple[int, int] | None:
        """(bytes done, total) of the copy of ``source`` in progress, or None."""
        path = Path(_absolute(source))
        for job in self._copies.values():
            if job.source.path == path:
                return job.done, job.source.size
        return None

    def plan_room(
        self, need: int, in_use: Collection[str | Path]
    ) -> tuple[policy.DropCached, ...] | None:
        """The copies :meth:`evict` should remove to fit ``need`` more bytes; None if impossible.

        ``in_use`` names the sources (model paths) of running models: never evicted.
        """
        return policy.cache_room(
            self._entries.values(), self.budget, need, self._pinned(in_use), self._reserved()
        )

    # ------------------------------------------------------------------ changes

    def touch(self, path: str | Path) -> None:
        """Mark the cached copy at ``path`` (what :meth:`stage` returned) used now.

        For the LRU order, kept across restarts: a model that stops using its copy calls
        it, so a copy that served until a minute ago outlives one loaded later but idle.
        """
        found = next((e for e in self._entries.values() if str(e.path) == str(path)), None)
        if found is None:
            return
        newer = any(
            e.source == found.source and e.last_used_ns > found.last_used_ns
            for e in self._entries.values()
        )
        if not newer:  # a copy older than another of its source never hits again
            self._touch_key(found.key)

    def _touch_key(self, key: str) -> None:
        self._entries[key] = entry = replace(self._entries[key], last_used_ns=self._now())
        try:
            layout.touch(self.cache_dir, key, entry.last_used_ns)
        except OSError as exc:  # a cache disk gone read-only: the order holds until restart
            _log.warning("staging.touch.fail", key=key, error=str(exc))

    async def evict(self, keys: Iterable[str]) -> int:
        """Remove these entries (unknown keys are skipped); the bytes freed."""
        freed, trash = self._detach(keys)
        await self._delete(trash)
        return freed

    async def stage(
        self,
        source: str | Path,
        *,
        sha256: str | None = None,
        progress: Progress | None = None,
        in_use: InUse = (),
    ) -> Path:
        """The cached copy of ``source``, copied now unless it is cached already.

        ``sha256`` (a file source only) is checked against the copy, or against a cached
        copy that was staged without one. ``progress(done, total)`` is called on the loop
        while this call waits for a copy. A concurrent call for the same source joins the
        same copy. Room is made by evicting least recently used entries, never those whose
        source is in ``in_use`` (a collection, or a function the cache calls each time it
        evicts, so that what started meanwhile counts). The copy belongs to the cache:
        cancelling this call stops waiting, not the copy, unless it was the last call waiting
        and nobody wants the copy (:meth:`stop_unwanted`). Raises CacheFull, ChecksumMismatch
        or StagingError (any I/O error of the copy, the cache directory gone among them).
        """
        path = _absolute(source)
        self._stagers[path] += 1
        try:
            return await self._stage(path, sha256, progress, in_use)
        finally:
            self._stagers[path] -= 1
            if not self._stagers[path]:
                del self._stagers[path]
                self.stop_unwanted()

    def stop_unwanted(self) -> None:
        """Stop each copy that no stage() waits on and that nobody wants (``unwanted``).

        A caller that stops waiting (a client that hung up) leaves its copy running: the
        next load would start from zero. A copy is stopped only when ``unwanted`` gives a
        reason; it ends as a StagingError that names it, and leaves nothing behind.
        """
        if self._unwanted is None:
            return
        for job in self._copies.values():
            source = str(job.source.path)
            if job.stopped is not None or self._stagers[source]:
                continue
            reason = self._unwanted(source)
            if reason is not None:
                job.stopped = reason
                job.cancel.set()  # the copy's thread stops before its next chunk

    async def _stage(
        self, path: str, sha256: str | None, progress: Progress | None, in_use: InUse
    ) -> Path:
        try:
            found = await asyncio.to_thread(scan, Path(path))
        except OSError as exc:
            raise StagingError(f"cannot stage {path}: {exc}") from exc
        expected = _check_digest(found, sha256)
        key = layout.key_of(path, found.fingerprint)
        for _ in range(_ATTEMPTS):
            # Deleted behind the cache's back (an entry, or the whole directory): copy again.
            _, gone = self._detach([k for k, e in self._entries.items() if not e.path.exists()])
            await self._delete(gone)  # nothing to wait for unless an fsync ran on one
            await self._stopped_copy_ended(key)
            entry = self._entries.get(key)
            if entry is None:
                job = self._copies.get(key) or self._start(found, key, expected, in_use)
                try:
                    entry = await self._join(job, progress)
                except ChecksumMismatch:
                    if job.sha256 == expected:
                        raise
                    # It checked another digest (a reload changed the preset's meanwhile):
                    # ours is checked on a copy of its own.
                    continue
            entry = await self._verified(entry, expected, in_use, progress)
            # Another stage that needed the room may have evicted the copy between its end
            # and this waiter's turn (it was in no model's use yet): copy it again.
            if key in self._entries:
                self._touch_key(key)  # not the stale copies of the source: never hits again
                return entry.path
        msg = f"cannot stage {path}: its copy was evicted for other copies {_ATTEMPTS} times"
        raise StagingError(msg)

    # ------------------------------------------------------------------ internals

    def _now(self) -> int:
        # Strictly increasing, so two uses in a row never tie in the LRU order.
        self._clock = max(time.time_ns(), self._clock + 1)
        return self._clock

    def _pinned(self, in_use: InUse) -> set[str]:
        """Sources no eviction may touch: those in use, and copies held while hashed."""
        held = {self._entries[key].source for key in self._held if key in self._entries}
        return _sources(in_use) | held

    def _reserved(self) -> int:
        return sum(job.source.size for job in self._copies.values())

    def _room(self) -> tuple[int, int]:
        """The budget a plan may fill, and the disk's free bytes once the copies end.

        The budget, or less where the disk has less room (other files grew on it, or
        ``cache_budget`` is above its size): then idle copies are evicted for the space,
        and two copies never start that the disk cannot hold together.
        """
        try:
            free = _disk_free(self.cache_dir)
        except OSError:  # the directory was removed: the copy makes it again, and says
            return self.budget, 0
        disk = free - sum(job.source.size - job.done for job in self._copies.values())
        held = self._reserved() + sum(e.size for e in self._entries.values())
        return min(self.budget, held + disk), disk

    def _detach(self, keys: Iterable[str]) -> tuple[int, _Trash]:
        """Take entries out of the index and rename them away, at once, on the loop.

        An fsync running on one is told to stop after the file it is on; the entry's files
        are deleted (:meth:`_delete`) only once it has.
        """
        freed, trash = 0, _Trash()
        for key in keys:
            entry = self._entries.pop(key, None)
            if entry is None:
                continue
            freed += entry.size
            present = entry.path.exists()  # not one deleted behind the cache's back
            moved = layout.detach(self.cache_dir, key)
            if moved is not None:
                trash.paths.append(moved)
                trash.size += entry.size if present else 0
            sync = self._syncs.pop(key, None)
            if sync is not None:
                sync.cancel.set()
                trash.syncs.append(sync.task)
            _log.info("staging.evict", source=entry.source, key=key, bytes=entry.size)
        self._deleting += trash.size
        return freed, trash

    async def _delete(self, trash: _Trash) -> None:
        """Delete detached entries, after the fsyncs still running on them."""
        try:
            if trash.syncs:
                await asyncio.wait(trash.syncs)
            if trash.paths:
                await self._in_thread(threading.Event(), _remove_all, trash.paths)
        finally:
            self._deleting -= trash.size

    def _start(self, found: Source, key: str, sha256: str | None, in_use: InUse) -> _Copy:
        """Plan room, evict, reserve and start the copy, with no await in between."""
        need = found.size
        pinned = self._pinned(in_use)
        budget, disk = self._room()
        drops = policy.cache_room(self._entries.values(), budget, need, pinned, self._reserved())
        if drops is None:
            used, _ = self.usage()
            held = sum(e.size for e in self._entries.values() if e.source in pinned)
            # The detached copies are deleted before the copies in progress end: free then.
            short = disk + self._deleting if budget < self.budget else None
            pinned_bytes = held + self._reserved()
            raise CacheFull(str(found.path), need, self.budget, used, pinned_bytes, disk=short)
        victims = [d.key for d in drops]
        _, trash = self._detach(victims)
        job = _Copy(found, key, sha256, asyncio.get_running_loop(), [])
        self._copies[key] = job
        job.task = asyncio.create_task(self._run(job, trash, in_use), name=f"stage {found.path}")
        job.task.add_done_callback(_retrieve)
        if (on_change := self._on_change) is not None:
            job.task.add_done_callback(lambda _task: on_change())
        _log.info("staging.copy.start", source=str(found.path), bytes=need, evicted=victims)
        return job

    async def _stopped_copy_ended(self, key: str) -> None:
        """Wait for a copy of ``key`` that :meth:`stop_unwanted` stopped to end.

        It ends between two chunks: a stage that joined it meanwhile failed with its
        "stopped" although it wants the copy. Once it has ended, the key is free for one
        of its own (or for the entry, where it ended whole before it saw the stop).
        """
        while (job := self._copies.get(key)) is not None and job.stopped is not None:
            assert job.task is not None  # noqa: S101 - set by _start before it returns
            await asyncio.wait([job.task])

    async def _join(self, job: _Copy, progress: Progress | None) -> Entry:
        assert job.task is not None  # noqa: S101 - set by _start before it returns
        if progress is not None:
            job.callbacks.append(progress)
            if job.emitted >= 0:
                progress(job.done, job.source.size)
            else:
                job.loop.call_soon(job.emit)
        try:
            return await asyncio.shield(job.task)
        finally:
            if progress is not None:
                job.callbacks.remove(progress)

    async def _run(self, job: _Copy, trash: _Trash, in_use: InUse) -> Entry:
        """The copy's task: build the entry in a thread, then index it (the one place)."""
        started = time.monotonic()
        try:
            await self._delete(trash)  # the room planned for this copy
            manifest = await self._in_thread(job.cancel, self._build, job)
        except BaseException as exc:
            del self._copies[job.key]
            reason = "cancelled" if isinstance(exc, asyncio.CancelledError) else str(exc)
            _log.warning("staging.copy.fail", source=str(job.source.path), error=reason)
            raise
        # COPYING -> UNSYNCED: leave the copies and enter the index in one step.
        del self._copies[job.key]
        path = layout.data_path(self.cache_dir, job.key, manifest.name)
        entry = Entry(
            job.key,
            manifest.source,
            manifest.size,
            self._now(),
            manifest.sha256,
            path,
            synced=False,
        )
        self._entries[job.key] = entry
        self._start_sync(job.key)
        if job.emitted != job.done:
            job.emit()
        seconds = time.monotonic() - started
        _log.info(
            "staging.copy.done",
            source=manifest.source,
            bytes=manifest.size,
            seconds=round(seconds, 3),
            mib_s=round(manifest.size / 2**20 / max(seconds, 1e-9)),
        )
        # Older copies of the same source will never be hits again.
        pinned = self._pinned(in_use)
        stale = [
            e.key
            for e in self._entries.values()
            if e.source == manifest.source and e.key != job.key and e.source not in pinned
        ]
        _, old = self._detach(stale)
        await self._delete(old)
        return entry

    def _start_sync(self, key: str) -> None:
        cancel = threading.Event()
        task = asyncio.create_task(self._sync(key, cancel), name=f"sync {key}")
        self._syncs[key] = _Sync(task, cancel)
        task.add_done_callback(_log_failure)

    async def _sync(self, key: str, cancel: threading.Event) -> None:
        """An entry's background task: fsync it, then mark it synced in the index."""
        started = time.monotonic()
        try:
            await self._in_thread(cancel, layout.sync, self.cache_dir, key, cancel)
        except Cancelled:
            return  # evicted meanwhile: nothing to keep
        except OSError as exc:
            # It stays unsynced: kept while this boot lasts, deleted at the next open after one.
            _log.error("staging.sync.fail", key=key, error=str(exc))
            return
        finally:
            sync = self._syncs.get(key)
            mine = sync is not None and sync.task is asyncio.current_task()
            if mine:
                del self._syncs[key]
        entry = self._entries.get(key)
        if mine and entry is not None:
            # UNSYNCED -> SYNCED
            self._entries[key] = replace(entry, synced=True)
            # A touch while the thread rewrote the manifest went to the replaced file.
            layout.touch(self.cache_dir, key, entry.last_used_ns)
            seconds = round(time.monotonic() - started, 3)
            _log.info("staging.sync.done", source=entry.source, key=key, seconds=seconds)

    def _build(self, job: _Copy) -> layout.Manifest:
        """In a thread: copy, check, publish under the key."""
        try:
            return self._build_entry(job)
        except Cancelled:
            if job.stopped is None:
                raise
            raise StagingError(f"cannot stage {job.source.path}: stopped, {job.stopped}") from None
        except OSError as exc:  # a full disk, the cache directory removed, an I/O error
            raise StagingError(f"cannot stage {job.source.path}: {exc}") from exc

    def _build_entry(self, job: _Copy) -> layout.Manifest:
        src = job.source
        self.cache_dir.mkdir(parents=True, exist_ok=True)  # removed while swapd ran: again
        free = _disk_free(self.cache_dir)
        if free < src.size:
            raise StagingError(f"cannot stage {src.path}: it needs {src.size} bytes, the cache's"
                               f" file system has {free} free")  # fmt: skip
        partial = layout.start_partial(self.cache_dir, job.key)
        try:
            dest = partial / layout.DATA / src.path.name
            copied, digest = copy(
                src, dest, sha256=job.sha256 is not None, report=job.report, cancel=job.cancel
            )
            _check_copy(src, copied, digest, job.sha256)
            manifest = layout.Manifest(
                str(src.path), src.is_dir, src.size, src.fingerprint, digest, self._boot
            )
            layout.publish(partial, manifest, self.cache_dir)
        except BaseException:
            layout.remove(partial)
            raise
        return manifest

    async def _verified(
        self, entry: Entry, sha256: str | None, in_use: InUse, progress: Progress | None = None
    ) -> Entry:
        """The entry, once its digest is known to be ``sha256`` (hashing it if never checked).

        ``progress`` hears how far the hash is, as it hears a copy: seconds per GiB.
        """
        if sha256 is None or entry.sha256 == sha256:
            return entry
        if entry.sha256 is None:
            # Held while hashed and while its digest is written (behind other copies' work
            # in the cache's threads): a load is about to start from it, no stage may evict it.
            self._held[entry.key] += 1
            try:
                actual = await self._check(entry, progress)
            finally:
                self._held[entry.key] -= 1
                if not self._held[entry.key]:
                    del self._held[entry.key]
            entry = replace(entry, sha256=actual)
        if entry.sha256 != sha256:
            if entry.source not in self._pinned(in_use):
                await self.evict([entry.key])
            raise ChecksumMismatch(entry.source, sha256, str(entry.sha256))
        return entry

    async def _check(self, entry: Entry, progress: Progress | None = None) -> str:
        """Hash a copy staged without a checksum, and record its digest; the digest."""
        cancel = threading.Event()
        report = None if progress is None else _reporter(entry.source, entry.size, progress)
        try:
            actual = await self._in_thread(cancel, hash_file, entry.path, cancel, report)
        except OSError as exc:
            raise StagingError(f"cannot check the cached copy {entry.path}: {exc}") from exc
        current = self._entries.get(entry.key)
        if current is not None and current.copy is entry.copy:
            # The same copy, perhaps touched or synced meanwhile (a new Entry each).
            self._entries[entry.key] = replace(current, sha256=actual)
            try:
                await self._in_thread(
                    cancel, layout.record_digest, self.cache_dir, entry.key, actual
                )
            except OSError as exc:  # a full disk, say: the copy is still whole and checked
                _log.warning("staging.digest.unrecorded", key=entry.key, error=str(exc))
        return actual

    async def _in_thread(self, cancel: threading.Event, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn`` in the cache's threads; on cancellation, stop it and wait for it."""
        if self._executor is None:
            raise StagingError(f"the staging cache {self.cache_dir} is not open")
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancel.set()
            while not future.done():
                try:
                    await asyncio.wait({future})
                except asyncio.CancelledError:
                    continue
            if not future.cancelled():
                future.exception()  # retrieved: it is the cancellation that propagates
            raise


def _reporter(source: str, total: int, progress: Progress) -> Callable[[int], None]:
    """A report for a thread's work on ``total`` bytes: ``progress`` on the loop, now and then.

    As a copy reports: at the start, at most every REPORT_EVERY_S, and at the end.
    """
    loop = asyncio.get_running_loop()
    last = 0.0

    def report(done: int) -> None:
        nonlocal last
        now = time.monotonic()
        if done in (0, total) or now - last >= REPORT_EVERY_S:
            last = now
            # RuntimeError: the loop has closed, so nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_tell, progress, source, done, total)

    return report


def _tell(progress: Progress, source: str, done: int, total: int) -> None:
    try:
        progress(done, total)
    except Exception as exc:  # noqa: BLE001 - a status hook must not stop a check
        _log.error("staging.progress.fail", source=source, error=repr(exc))


def _disk_free(path: Path) -> int:
    """Bytes free on the file system of ``path``."""
    return shutil.disk_usage(path).free


def _sources(in_use: InUse) -> set[str]:
    """The absolute sources ``in_use`` names now (calling it, when it is a function)."""
    return {_absolute(s) for s in (in_use() if callable(in_use) else in_use)}


def _check_digest(found: Source, sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    digest = sha256.strip().lower()
    if found.is_dir:
        raise StagingError(f"{found.path} is a directory: sha256 is checked for a single file")
    if len(digest) != _SHA256_HEX or any(c not in "0123456789abcdef" for c in digest):
        raise StagingError(f"{found.path}: sha256 must be 64 hex digits, got {sha256!r}")
    return digest


def _check_copy(src: Source, copied: int, digest: str | None, expected: str | None) -> None:
    """Raise unless the copy has the source's size and the expected digest."""
    now = scan(src.path)
    if copied != src.size or now.fingerprint != src.fingerprint:
        raise StagingError(
            f"{src.path} changed while it was copied ({src.size} bytes expected,"
            f" {copied} copied, {now.size} now)"
        )
    if expected is not None and digest != expected:
        raise ChecksumMismatch(str(src.path), expected, str(digest))


def _remove_all(paths: Iterable[Path]) -> None:
    for path in paths:
        layout.remove(path)


def _retrieve(task: asyncio.Task[Entry] | Future[Entry]) -> None:
    # Every waiter may have given up; the failure is logged in _run, never left unretrieved.
    if not task.cancelled():
        task.exception()


def _log_failure(task: asyncio.Task[Any]) -> None:
    # What _sync does not expect is still an event, not a lost exception.
    if not task.cancelled() and (exc := task.exception()) is not None:
        _log.error("staging.sync.fail", task=task.get_name(), error=repr(exc))
