"""The one owner of model state: leases, loads, wakes, demotions, stops, TTLs.

Request handlers never read a model's state and act on it; they ask for a
lease (:meth:`Manager.acquire`) and get a ready upstream or a typed error. A
load is a task owned by the manager, so a client that disconnects cannot cancel
a load that others wait for. States move only here, along the edges of
:mod:`swapd.states`; :mod:`swapd.admission` plans each load and the manager
carries the plan out. Readers get frozen snapshots (:meth:`Manager.views`).

Tiers: a model leaving the device goes down to the ram tier while it has room
(vLLM sleeps; a llama-server's GGUF pages stay locked in RAM), otherwise to disk.
``ram_ttl`` and the ram budget move ram-tier models down to disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import weakref
from collections import deque
from collections.abc import (
    AsyncIterator,
    Callable,
    Collection,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from swapd import policy, residency
from swapd.admission import Admission, Snapshot
from swapd.backends import (
    BinaryNotFound,
    Launch,
    Placement,
    SleepFailed,
    SleepUnsupported,
    build_launch,
    free_port,
    has_flag,
    kind_of,
)
from swapd.cgroups import Cgroups, kill_members
from swapd.config import Config
from swapd.errors import (
    BackendGone,
    BackendStartError,
    BackingOff,
    BreakerOpen,
    CacheFull,
    InsufficientMemory,
    LoadFailed,
    NeverFits,
    NotLoaded,
    QueueFull,
    QueueTimeout,
    RequestError,
    StageFailed,
    Unavailable,
    UnknownModel,
    describe_exit,
)
from swapd.events import Changes
from swapd.footprints import Footprints, fingerprint
from swapd.logs import get_logger
from swapd.metrics import Metrics
from swapd.needs import Need
from swapd.pages import FileId, WarmSet, file_id, memory_fs
from swapd.pidfiles import PidRecords
from swapd.planner import DeviceMemory, read_memory
from swapd.presets import Preset
from swapd.probe import HOST_DEVICE, Device, Probe, host_memory
from swapd.process import OUTPUT_GRACE, Child
from swapd.reload import ReloadPlan
from swapd.residency import Claim
from swapd.slot import ModelView, Slot, snapshot
from swapd.staging import CacheFull as StagingFull
from swapd.staging import StagingCache, StagingError
from swapd.states import COMING_UP, State
from swapd.upstream import UpstreamError, UpstreamPool

_log = get_logger("swapd.manager")
# How often to re-read memory while waiting for a stopped backend's memory to come back.
_RELEASE_POLL = 0.05
# Added to a wait that must not end early (uvloop's timers fire up to 1 ms early).
_TIMER_SLACK = 0.002
# How long after ready a backend's memory is measured.
_MEASURE_DELAY = 1.0
# A measure this far over what a load was admitted with is worth a warning: a fifth
# more, and more than a small model's noise.
_ADMITTED_LOW_RATIO = 1.2
_ADMITTED_LOW_SLACK = 64 * 1024 * 1024
# An expired ram_ttl met a wake under way: how soon to look again.
_RAM_TTL_RECHECK_S = 1.0
# While the ram tier holds anything: how often host memory and held files are looked at, so
# that locked pages yield to other programs' need (the kernel cannot reclaim them, only the
# OOM killer can act) and a deleted or replaced file's pages are let go.
_RAM_CHECK_S = 5.0
# Backoff after failed starts: 1 s doubling to 60 s; after this many in a row, no retries
# until an explicit load.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
BREAKER_AFTER = 5
# A TTL stop whose memory reading failed is tried again this soon (or at the TTL, if shorter).
_TTL_RETRY = 5.0
# A backend that exits by itself sooner than this after becoming ready counts as a failed
# start (backoff, breaker): a crash on the first request must not restart in a loop.
STABLE_AFTER = 60.0
# A liveness probe waits at most this long for an answer, and at least _PROBE_FLOOR.
_PROBE_TIMEOUT = 5.0
_PROBE_FLOOR = 1.0


@dataclass(frozen=True)
class Lease:
    """Permission to send one request to a ready backend."""

    model: str
    host: str
    port: int
    slot: Slot
    # A request that may not load its model nor count as its use (``?autoload=false``):
    # it changes neither the TTL nor the eviction order.
    passive: bool = False


@dataclass
class _Job:
    """One admission in progress."""

    slot: Slot
    candidates: list[Device]
    waking: bool
    staging: asyncio.Task[None] | None
    started: float
    drained: list[Slot] = field(default_factory=list)
    held_at: float | None = None  # while its plan is held (policy.hold): since when
    hold_until: float = 0.0  # and until when at most


@dataclass(frozen=True)
class _Staging:
    """The plan can start the model once its weights are in the staging cache."""


@dataclass(frozen=True)
class _Room:
    """Victims are going down a tier for the load: wait for them, unlocked, then plan again."""

    moves: list[asyncio.Task[Any]]
    device: Device
    need: int


@dataclass(frozen=True)
class _Outdated:
    """Why a staged copy no longer serves its model: the event's reason, and in words."""

    reason: str
    why: str


def _wake_level(slot: Slot) -> int:
    """The level a sleeper wakes from: without sleep mode nothing was discarded.

    A launch whose backend refused --enable-sleep-mode (vLLM's CPU build) only paused at
    its /sleep, so a level-2 sleeper keeps its weights: a plain wake, with no
    reload_weights reading the whole model again for nothing.
    """
    return slot.sleep_level if slot.sleep_mode else min(slot.sleep_level, 1)


def _sleep_key(preset: Preset) -> str:
    """The launch a refused --enable-sleep-mode is remembered for: a new binary or env is new.

    The fingerprint covers the env (and the model's files, args and command).
    """
    return "\0".join([fingerprint(preset), preset.binary or ""])


def _probing(preset: Preset) -> tuple[str | None, float, int]:
    """What the liveness probe of a running process is made of."""
    return preset.health, preset.health_interval, preset.health_failures


def _leaving(slot: Slot) -> bool:
    """On its way off the device: stopping, going to sleep, or draining to stop.

    A drain for a waiting swap (``max_wait``) is not: the model may serve again.
    """
    if slot.state is State.DRAINING:
        return slot.swap_drain is None
    return slot.state in (State.STOPPING, State.SLEEPING)


async def _close_later(pages: WarmSet, delay: float) -> None:
    """Unlock and unmap held pages after ``delay`` seconds (now if 0), in a worker thread."""
    try:
        await asyncio.sleep(delay)
    except asyncio.CancelledError:
        pages.close()  # shutting down: released at once, never left locked
        raise
    await asyncio.to_thread(pages.close)


class _Abandoned(Unavailable):
    """A queued load whose every waiter went away: it ends before it drains or evicts."""


def _stages(preset: Preset, source: str) -> bool:
    """Whether ``preset`` copies the file at the absolute path ``source`` to the cache."""
    model = preset.model
    # abspath, not resolve: as the cache keys its copies.
    return preset.stage and model is not None and os.path.abspath(model) == source  # noqa: PTH100


def _never_room(full: StagingFull) -> bool:
    """No stop of a model can make this room: over the budget, or over the whole disk."""
    if full.need > full.budget:
        return True
    # With every copy evicted, the disk has what it has free and what the copies hold.
    return full.disk is not None and full.need > full.disk + full.used


def _assumed(needs: Mapping[str, Need]) -> str:
    """Where a refused need is default_memory, say so: no file of the user's holds it."""
    if not any(need.source == "default" for need in needs.values()):
        return ""
    return (
        " (the need is default_memory, assumed with no memory:, measurement or estimate; "
        "set memory: in the preset, or lower default_memory)"
    )


class Manager:
    """Owns every model's slot, the child processes and the tiers."""

    def __init__(
        self,
        config: Config,
        probe: Probe,
        pool: UpstreamPool,
        *,
        on_group: Callable[[str, int], None] = lambda _e, _p: None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.probe = probe
        self.pool = pool
        self._on_group = on_group
        self.metrics = metrics or Metrics()
        self.changes = Changes()  # every state move, for /swapd/events and systemd's STATUS
        self.slots = {p.name: self._new_slot(p) for p in config.presets}
        self._restarts: dict[str, asyncio.Task[None]] = {}
        self.records = PidRecords(config.state_dir)
        self.footprints = Footprints(config.state_dir)
        self.limits = policy.Limits(
            reserve=config.reserve, budget=config.budget, max_running=config.max_running
        )
        self.admission = Admission(
            probe, self.footprints, self.limits, default_memory=config.default_memory
        )
        self.ram_budget = _ram_budget(config)
        self._changed = asyncio.Event()
        # The loader's recent work, for holds: loads and wakes done, and those under way.
        self._load_spans: deque[tuple[float, float]] = deque()
        self._loading: dict[int, float] = {}  # when each load under way began, by id() of its slot
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ram_check: asyncio.Task[None] | None = None
        # A model whose restart a later one replaced mid-drain, and that was serving: when
        # that restart began (an unload since keeps it down).
        self._served: dict[str, float] = {}
        self._closing = False
        # Loads that a forced unload cancelled: their waiters are answered, not cancelled.
        self._cut_loads: weakref.WeakSet[asyncio.Task[None]] = weakref.WeakSet()
        self._retiring: list[Slot] = []  # removed by a reload, still draining or stopping
        # Loads whose victims are going down a tier (no lock held meanwhile): every other
        # plan counts the room they make as theirs.
        self._claims: dict[int, Claim] = {}  # by id() of the loading slot
        self.cgroups: Cgroups | None = None
        if config.cgroups:
            self.cgroups, why = Cgroups.open()
            if self.cgroups is None:
                _log.info("cgroup.fallback", reason=why)
        # Launches (fingerprint, binary, env) whose backend refused --enable-sleep-mode.
        self._sleep_refused: dict[str, str] = {}
        # Launches whose sleep API is missing (a /sleep answered 404 or 405): they go down
        # to disk instead, started without sleep mode.
        self._sleep_missing: dict[str, str] = {}
        # Per GPU: held while a backend that sizes itself to the card (vLLM) starts. It
        # profiles the card's free memory as it starts, so a second one starting beside
        # it would count the first's growing use against itself.
        self._sizing_starts: dict[str, asyncio.Lock] = {}
        self._sizing_now: dict[str, str] = {}  # per GPU: the model whose start holds its lock
        self.staging: StagingCache | None = None
        if config.cache_dir is not None:
            self.staging = StagingCache(
                config.cache_dir, config.cache_budget, self._copy_ended, self._unwanted_copy
            )

    def _used_copy(self, slot: Slot) -> None:
        """A process or pages let go of the staged copy: it was in use until now (LRU).

        Kept past a lowered ``cache_budget`` while in use, it is evicted now if still over.
        """
        if self.staging is not None and slot.staged_path is not None:
            self.staging.touch(slot.staged_path)
            if self.staging.over_budget() and not self._closing:
                self._spawn_task(self._fit_cache(), "cache_budget")

    async def _fit_cache(self) -> None:
        """Evict idle copies past the cache's budget; their models are in ``store`` again."""
        if self.staging is None or not await self.staging.fit(self._sources_in_use):
            return
        await self._refresh_staged()
        self._notify()  # a copy waiting for room may fit now: the budget may have grown

    def _new_slot(self, preset: Preset) -> Slot:
        slot = Slot(preset, kind_of(preset))
        slot.observer = self._publish
        return slot

    def _publish(self, slot: Slot) -> None:
        """Hand a slot's move to the feed, unless a reload removed the model.

        A removed model leaves the feed at once (``event: removed``), as it leaves status,
        while it drains and stops: its later views would bring it back to a listener (and
        once its name is added back, they would be taken for the new model's).
        """
        if self.slots.get(slot.preset.name) is slot:
            self.changes.publish(slot)

    def _at_rest(self, slot: Slot) -> None:
        """Show the feed a model nothing waits for or uses any more.

        Its last views counted the requests (and the load) that waited for it, and its
        last use and TTL come after them: else the feed would keep them for good.
        """
        if not (slot.waiters or slot.in_flight) and self.slots.get(slot.preset.name) is slot:
            self.changes.show(slot)

    async def open(self) -> None:
        """Open the staging cache (cleans interrupted copies) and find what is staged.

        Estimates of every model's memory are read meanwhile, in the background.
        """
        self._prefetch(self.config.presets)
        if self.staging is None:
            return
        await asyncio.to_thread(self.staging.open)
        for slot in self.slots.values():
            await self._find_staged(slot)
        self._spawn_task(self._check_copies(), "copy_check")

    def _prefetch(self, presets: Iterable[Preset]) -> None:
        """Estimate ``presets`` ahead of their first loads, off every request's path."""
        self._spawn_task(self.admission.prefetch(list(presets)), "estimates")

    async def _find_staged(self, slot: Slot) -> None:
        """Point the slot at its model's staged copy, or at none (a preset no longer staged).

        None too for a copy checked against another ``sha256`` than the preset's: its load
        would refuse it.
        """
        found = None
        if self.staging is not None and slot.preset.stage and slot.preset.model is not None:
            found = await self._cached_copy(slot.preset.model)
        if found is not None and (digest := self._digest_unlike(slot, found)) is not None:
            _log.info(
                "model.tier",
                model=slot.preset.name,
                tier="store",
                reason="sha256_changed",
                why=f"{found} has sha256 {digest}, the preset expects {slot.preset.sha256}",
            )
            found = None
        slot.staged_path = str(found) if found else None
        slot.staged_source = slot.preset.model if found else None

    async def _cached_copy(self, source: str | Path) -> Path | None:
        """The staging cache's copy of ``source`` as it is now, or None (one stat, in a thread).

        None too when the cache cannot be read (an entry that answers EACCES or EIO),
        logged: the model counts as not staged, and its next load stages it again. Raised,
        at start it kept swapd from starting at all.
        """
        staging = self.staging
        assert staging is not None  # noqa: S101 - only asked with a cache
        try:
            return await asyncio.to_thread(staging.cached_path, source)
        except OSError as exc:
            _log.warning("staging.read.fail", source=str(source), error=str(exc))
            return None

    # ---------------------------------------------------------------- lookups and views

    def slot_for(self, name: str) -> Slot:
        """The slot a model name or alias refers to."""
        preset = self.config.preset(name)
        if preset is None:
            raise UnknownModel(name, sorted(self.slots))
        return self.slots[preset.name]

    def views(
        self, *, states: Collection[State] | None = None, name: str | None = None
    ) -> list[ModelView]:
        """Frozen snapshots of every model, or of those in ``states``, or of model ``name``.

        Only the models kept are snapshotted: the feed's progress tick, with hundreds of
        models at rest, reads their states and snapshots none of them.
        """
        if name is None:
            kept = list(self.slots.values())
        else:
            kept = [slot] if (slot := self.slots.get(name)) is not None else []
        if states is not None:
            kept = [slot for slot in kept if slot.state in states]
        for slot in kept:
            self._forget_lost_copy(slot)
        return [snapshot(slot) for slot in kept]

    def view(self, name: str) -> ModelView:
        """A frozen snapshot of one model (by name or alias)."""
        slot = self.slot_for(name)
        self._forget_lost_copy(slot)
        return snapshot(slot)

    def _unwanted_copy(self, source: str) -> str | None:
        """Why no model wants a copy of ``source`` any more, or None while one may use it.

        Asked by the cache once no load waits on the copy: a model that stages the file
        wants it, unless its last load found that no device could ever hold it.
        """
        # The presets as configured now: a reload's restart swaps a slot's preset later.
        staging = [p for p in self.config.presets if _stages(p, source)]
        if not staging:
            return "no model stages it any more"
        slots = [self.slots.get(p.name) for p in staging]
        if all(s is not None and s.never_fits for s in slots):
            names = ", ".join(repr(p.name) for p in staging)
            return f"{names} can never fit on its devices"
        return None

    def _copy_ended(self) -> None:
        """A copy ended, done or failed: a load waiting for room may go on; find new copies."""
        self._notify()
        if not self._closing:
            self._spawn_task(self._find_new_copies(), "find_copies")

    async def _find_new_copies(self, *, copied: bool = False) -> None:
        """Take models in ``store`` whose file the cache now holds out of it.

        A load cut short (a forced unload) leaves its copy to finish in the cache, and a copy
        made for one preset serves another of the same file: both would show in ``store``,
        their copy counted in the cache, until their next load. ``copied``: only the models
        whose file the cache holds some copy of (no I/O to tell), not every file in store.
        """
        for slot in list(self.slots.values()):
            model = slot.preset.model
            if slot.tier != "store" or model is None:
                continue
            if copied and self.staging is not None and not self.staging.holds(model):
                continue
            found = await self._cached_copy(model)
            if found is not None and self._digest_unlike(slot, found) is not None:
                continue  # its load would refuse that copy: still only in the store
            # Checked again after the thread hop: a load or a reload may have moved it.
            if found is not None and slot.tier == "store" and slot.preset.model == model:
                slot.staged_path, slot.staged_source = str(found), model
                slot.changed()

    def _forget_lost_copy(self, slot: Slot, *, loading: bool = False) -> None:
        """A staged copy deleted behind swapd's back: the model is in ``store`` again.

        The cache stops counting it at once, and the next load copies it again: kept, the
        model would show in ``disk`` with nothing of it in the cache. One stat. ``loading``:
        called by the slot's own load, which is about to stage, not in use of the copy.
        """
        path = slot.staged_path
        if path is None or self._uses_staged_copy(slot, counting_load=not loading):
            return
        if not Path(path).exists():
            self._to_store(slot)

    async def _check_copies(self) -> None:
        """Every few seconds: a staged model at rest follows its file to store and back.

        Its copy is stale once the file changed or went; a file put back as it was (a
        mount that came back, a rename undone) has its copy again.
        """
        while not self._closing:
            await asyncio.sleep(_RAM_CHECK_S)
            try:
                for slot in list(self.slots.values()):
                    await self._forget_outdated_copy(slot)
                await self._find_new_copies(copied=True)
            except Exception as exc:  # noqa: BLE001 - a look that failed once: look again later
                _log.warning("model.copy_check.fail", error=repr(exc))

    async def _forget_outdated_copy(self, slot: Slot, *, loading: bool = False) -> None:
        """A staged copy no process or held page uses, of a source changed since: forgotten.

        The cache keys a copy by its source's size and mtime: the next load copies the file
        as it is now, and never starts from this one. Kept, the model showed ``disk`` (and
        its load said it came from there) while its weights were only on slow storage.
        ``loading``: called by the slot's own load, which stages next, not in use of the copy.
        """
        copy, source = slot.staged_path, slot.staged_source
        if copy is None or source is None:
            return
        if self._uses_staged_copy(slot, counting_load=not loading):
            return
        if not await asyncio.to_thread(_known, source):
            return  # slow storage that does not answer now (EIO, a stale mount): the copy stays
        outdated = await self._copy_outdated(slot)
        # Checked again after the thread hop: a load, a stop or a reload may have moved it.
        in_use = self._uses_staged_copy(slot, counting_load=not loading)
        if outdated is None or slot.staged_path != copy or in_use:
            return
        self._to_store(slot, reason=outdated.reason)

    @staticmethod
    def _to_store(slot: Slot, *, reason: str | None = None) -> None:
        """The slot's staged copy is gone or stale: its weights are only in the store."""
        slot.staged_path = slot.staged_source = None
        if reason is not None:
            _log.info("model.tier", model=slot.preset.name, tier="store", reason=reason)
        slot.changed()  # no move: the tier changed

    def logs(self, name: str, lines: int) -> tuple[str, list[str]]:
        """The model's name and its backend's last output lines."""
        slot = self.slot_for(name)
        return slot.preset.name, slot.ring.tail(lines)

    def incarnation(self, name: str) -> int:
        """Which configured model ``name`` stands for now (:class:`UnknownModel` if none).

        A model a reload removed and added back under its name is another incarnation:
        a stream that follows the first (its logs, its views) ends with it.
        """
        return id(self.slot_for(name))

    def logs_since(self, name: str, cursor: int | None) -> tuple[list[str], int]:
        """Output lines printed after ``cursor`` (None: none yet, just the cursor), and the next."""
        ring = self.slot_for(name).ring
        return ring.since(ring.total if cursor is None else cursor)

    def _every_slot(self) -> list[Slot]:
        """The configured slots, and those a reload removed that still drain or stop.

        A retiring slot's process holds memory until it has stopped: it counts wherever
        memory, processes and cached files are counted, though its name is unknown.
        """
        return [*self.slots.values(), *self._retiring]

    def status(self) -> dict[str, Any]:
        """A JSON-ready view of every model and tier; never starts anything or touches TTLs."""
        return {"models": [v.as_json() for v in self.views()], "tiers": self.tiers()}

    def tiers(self) -> dict[str, dict[str, int | None]]:
        """The bytes each tier holds and its budget (None: none set, or no cache)."""
        everyone = self._every_slot()
        on_device = sum(
            policy.counted_usage(s.measured, s.need.bytes if s.need else None)
            for s in everyone
            if s.tier == "device"
        )
        # A sleeper's tier is ram (also while its wake waits, or it stops), but what it keeps
        # on its GPU counts against the budget, as admission counts it.
        on_device += sum(s.kept_on_device for s in everyone if s.child and s.tier != "device")
        return {
            "device": {"bytes": on_device, "budget": self._device_budget()},
            "ram": {"bytes": sum(s.ram_bytes for s in everyone), "budget": self.ram_budget},
            "disk": self._disk_tier(),
        }

    async def memory(self) -> tuple[Snapshot, list[DeviceMemory]]:
        """One reading of every device: total, free, and what swapd's backends use there."""
        counted: dict[str, int] = {}
        for slot in self._every_slot():
            if slot.device is not None and slot.tier == "device":
                need = slot.need.bytes if slot.need else None
                used = policy.counted_usage(slot.measured, need)
                counted[slot.device.id] = counted.get(slot.device.id, 0) + used
        return await read_memory(self.admission, self._pids(), counted)

    def _device_budget(self) -> int | None:
        """``budget`` caps each device; the tier's bytes add up every device, and so this."""
        budget = self.config.budget
        return None if budget is None else budget * len(self.probe.devices)

    def _disk_tier(self) -> dict[str, int | None]:
        if self.staging is None:
            return {"bytes": None, "budget": None}
        used, budget = self.staging.usage()
        return {"bytes": used, "budget": budget}

    # ---------------------------------------------------------------- tasks

    def _spawn_task(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)  # keep a strong reference until it finishes
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._task_done)
        return task

    @staticmethod
    def _task_done(task: asyncio.Task[Any]) -> None:
        # A load's error reaches its waiters (and model.load.fail has logged it); anything
        # else that escapes a task is a bug, and is logged as an event, never lost.
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, RequestError):
            _log.error("task.fail", task=task.get_name(), error=repr(exc), exc_info=exc)

    def _notify(self) -> None:
        # Wake everyone waiting for "something changed", then arm a fresh event.
        self._changed.set()
        self._changed = asyncio.Event()

    # ---------------------------------------------------------------- leases

    async def acquire(self, name: str, *, admitted: bool = False, passive: bool = False) -> Lease:
        """Wait until the model is ready and count one request in flight on it.

        ``admitted``: a request leased once already (its backend died before it was sent,
        or a cold stream hands it on): counted for the eviction order and let past
        ``max_queue`` then, not again. ``passive``: served only while the model is ready
        (else :class:`NotLoaded`), and not counted as its use (see :class:`Lease`).
        """
        slot = self.slot_for(name)
        if not admitted and not passive:  # a passive one has no use to count, no queue
            self._let_in(slot)
        # A passive one waiting behind ``concurrency`` takes no queue place from a client.
        waiting = 0 if passive else 1
        slot.waiters += waiting
        try:
            while True:
                if self._closing:
                    raise Unavailable("swapd is shutting down")
                self._refuse_if_failing(slot)
                if slot.state is State.READY:
                    assert slot.launch is not None  # noqa: S101 - READY implies launched
                    concurrency = slot.preset.concurrency  # a reload may have changed it meanwhile
                    if concurrency is not None and slot.in_flight >= concurrency:
                        await self._changed.wait()  # queue behind the model's own limit
                        continue
                    slot.in_flight += 1
                    if not passive:
                        slot.last_used = time.monotonic()
                    self._cancel_ttl(slot)
                    launch = slot.launch
                    return Lease(slot.preset.name, launch.host, launch.port, slot, passive)
                if passive:
                    raise NotLoaded(slot.preset.name, slot.state.value)
                await self._toward_ready(slot)
        finally:
            slot.waiters -= waiting
            if waiting and not slot.waiters and slot.state is State.QUEUED:
                self._notify()  # its load, waiting for room, ends now rather than later
            if waiting:
                self._at_rest(slot)  # a load that failed (or a queue left) counted it

    def _let_in(self, slot: Slot) -> None:
        """Count a new request for the eviction order; :class:`QueueFull` past its queue."""
        self._count_request(slot)
        preset = slot.preset
        if preset.max_queue is not None:
            # Past concurrency and max_queue together. A request within concurrency is no
            # queue, also while the model loads (all of those run at once once it is ready).
            # Without concurrency, the request that starts a load is no queue either: max_queue
            # more wait with it (0 would otherwise refuse the one request that loads it).
            limit = (preset.concurrency or 1) + preset.max_queue
            ahead = slot.waiters if preset.concurrency is None else slot.in_flight + slot.waiters
            # Without concurrency a ready model queues nothing: the request goes at once.
            queues = preset.concurrency is not None or slot.state is not State.READY
            if queues and ahead >= limit:
                raise QueueFull(preset.name, limit)

    async def _toward_ready(self, slot: Slot) -> None:
        """One step toward READY: wait out a stop, demotion, sleep or drain, else (join a) load.

        A model a reload removed meanwhile is never loaded again (404).
        """
        for task in (slot.stop_task, slot.demote_task, slot.sleep_task):
            if task is not None:
                await asyncio.shield(task)
                return
        if slot.state is State.DRAINING or self._reaping(slot):
            await self._changed.wait()
            return
        self._refuse_if_removed(slot)
        await self._join_load(slot)

    def _count_request(self, slot: Slot) -> None:
        """Every request counts for the eviction order (its CRF), queued or not."""
        now = time.monotonic()
        slot.crf, slot.crf_at = policy.crf_update(slot.crf, slot.crf_at, now), now
        if slot.hold is not None:
            self._notify()  # its held load may go now that its CRF has grown

    @staticmethod
    def _reaping(slot: Slot) -> bool:
        """A dead backend whose group is still being stopped: wait, then start afresh."""
        return slot.state is State.FAILED and slot.child is not None

    def _removed(self, slot: Slot) -> bool:
        """Whether a reload removed the model (its name now unknown, or another slot's)."""
        return self.slots.get(slot.preset.name) is not slot

    def _refuse_if_removed(self, slot: Slot) -> None:
        """Answer 404 when a reload removed the model while the request waited for it."""
        if self._removed(slot):
            raise UnknownModel(slot.preset.name, sorted(self.slots))

    def _refuse_if_failing(self, slot: Slot) -> None:
        """Answer at once, starting nothing, while the model backs off or its breaker is open.

        Also when a reload removed the model while the request waited for it.
        """
        self._refuse_if_removed(slot)
        error = slot.last_error.message if slot.last_error else "unknown"
        if slot.state is State.BACKOFF:
            wait = slot.retry_at - time.monotonic()
            if wait > 0:
                raise BackingOff(slot.preset.name, wait, error)
        elif slot.state is State.FAILED and slot.failures >= BREAKER_AFTER:
            raise BreakerOpen(slot.preset.name, slot.failures, error)

    async def _join_load(self, slot: Slot) -> None:
        task = self._ensure_loading(slot)
        # Until the load ends, or is cut: a cut start stops its process group first, within
        # the model's stop_timeout (minutes, for a backend that ignores SIGTERM), and its
        # waiters are answered at once, not after that. Kept waiting, at shutdown they held
        # the drain, and every other model's stop behind it.
        while not task.done():
            if task.cancelling() and (cut := self._cut_error(slot, task)) is not None:
                raise cut
            changed = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait((task, changed), return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
        if not task.cancelled():
            error = task.exception()
            if error is None:
                return
            if isinstance(error, RequestError):
                # Each waiter its own: the load's error is kept as the model's last error.
                raise error.twin() from error.__cause__
            raise error
        if (cut := self._cut_error(slot, task)) is not None:
            raise cut
        raise asyncio.CancelledError

    def _cut_error(self, slot: Slot, task: asyncio.Task[None]) -> RequestError | None:
        """What the waiters of a load that was cut are answered, or None if nobody cut it."""
        if self._closing:
            return Unavailable("swapd is shutting down")
        if self._removed(slot):
            # Its retirement cut the load: the model is gone.
            return UnknownModel(slot.preset.name, sorted(self.slots))
        if task in self._cut_loads:
            return Unavailable(f"model {slot.preset.name!r} was unloaded (force) while it loaded")
        return None

    async def exit_noticed(self, lease: Lease, timeout: float) -> bool:
        """Wait, bounded, until swapd has seen the lease's backend exit; whether it has.

        Called when that backend refused a connection: the process has died, and
        :meth:`_watch` moves the model on once its exit is reaped.
        """
        slot = lease.slot
        deadline = time.monotonic() + timeout

        def alive() -> bool:
            launch = slot.launch
            return (
                slot.state in (State.READY, State.DRAINING)
                and launch is not None
                and (launch.host, launch.port) == (lease.host, lease.port)
            )

        while alive():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await self._wait_for_change(remaining)
        return True

    def release(self, lease: Lease) -> None:
        """End a request; arm the TTL when the model falls idle."""
        slot = lease.slot
        slot.in_flight -= 1
        if not lease.passive:
            slot.last_used = time.monotonic()
        if slot.in_flight == 0:
            after = None  # the whole TTL, from this use
            if lease.passive:  # what is left of it since the last use
                after = max(0.0, slot.last_used + slot.preset.ttl - time.monotonic())
            self._arm_ttl(slot, after)
            self._notify()
            self._at_rest(slot)
        elif slot.preset.concurrency is not None:
            self._notify()  # a request queued behind the model's own limit may go

    @contextlib.asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[Lease]:
        """``async with manager.lease(model) as lease:`` -- acquire and always release."""
        held = await self.acquire(name)
        try:
            yield held
        finally:
            self.release(held)

    # ---------------------------------------------------------------- timers

    def _cancel_ttl(self, slot: Slot) -> None:
        if slot.ttl_timer is not None:
            slot.ttl_timer.cancel()
            slot.ttl_timer = None

    def _arm_ttl(self, slot: Slot, after: float | None = None) -> None:
        """Arm the TTL of a ready model (none when pinned or 0), for ``after`` or the TTL."""
        self._cancel_ttl(slot)
        ttl = slot.preset.ttl
        if ttl > 0 and slot.state is State.READY and not slot.preset.pin:
            delay = ttl if after is None else after
            slot.ttl_timer = asyncio.get_running_loop().call_later(delay, self._ttl_expired, slot)

    def _ttl_expired(self, slot: Slot) -> None:
        slot.ttl_timer = None
        if slot.state is State.READY and not slot.busy and slot.demote_task is None:
            _log.info("model.ttl.expire", model=slot.preset.name, ttl_s=slot.preset.ttl)
            slot.demote_task = self._spawn_task(self._demote(slot), f"demote:{slot.preset.name}")

    def _cancel_ram_ttl(self, slot: Slot) -> None:
        if slot.ram_timer is not None:
            slot.ram_timer.cancel()
            slot.ram_timer = None

    def _entered_ram(self, slot: Slot, nbytes: int) -> None:
        slot.ram_bytes = nbytes
        slot.ram_since = time.monotonic()
        self._rearm_ram_ttl(slot)
        _log.info("model.tier", model=slot.preset.name, tier="ram", bytes=nbytes)
        slot.changed()  # its bytes in ram, known only after the move to asleep
        if self._ram_check is None or self._ram_check.done():
            self._ram_check = self._spawn_task(self._check_ram_tier(), "ram_check")

    async def _check_ram_tier(self) -> None:
        """While the ram tier holds anything: let it go where memory runs short or files change."""
        # Pages, or a sleeper: the ram tier's, also while their stop still ends (tier device).
        while any(s.pages or s.asleep for s in self.slots.values()) and not self._closing:
            await asyncio.sleep(_RAM_CHECK_S)
            try:
                for slot in list(self.slots.values()):
                    if slot.load_task is None or slot.load_task.done():  # a load checks its own
                        await self._drop_stale_pages(slot)
                await self._fit_ram_budget()
            except Exception as exc:  # noqa: BLE001 - a reading that failed once: look again later
                _log.warning("model.ram_check.fail", error=repr(exc))

    def _rearm_ram_ttl(self, slot: Slot) -> None:
        """Count ``ram_ttl`` from when the model entered the ram tier, if it is there now."""
        self._cancel_ram_ttl(slot)
        ttl = slot.preset.ram_ttl
        if ttl > 0 and slot.tier == "ram":  # a queued wake too: a refused one stays asleep
            left = max(0.0, slot.ram_since + ttl - time.monotonic())
            slot.ram_timer = asyncio.get_running_loop().call_later(
                left, self._ram_ttl_expired, slot
            )

    def _ram_ttl_expired(self, slot: Slot) -> None:
        slot.ram_timer = None
        loading = slot.load_task is not None and not slot.load_task.done()
        if loading or slot.busy:
            if slot.child is not None or slot.pages is not None:
                # A wake (or a start from pages) is under way or asked for: a refused one
                # leaves the model in the ram tier, its time there over. Look again then.
                slot.ram_timer = asyncio.get_running_loop().call_later(
                    _RAM_TTL_RECHECK_S, self._ram_ttl_expired, slot
                )
            return
        if slot.tier == "ram":
            _log.info("model.ram_ttl.expire", model=slot.preset.name, ram_ttl_s=slot.preset.ram_ttl)
            self.metrics.evicted(slot.preset.name, "ram_ttl")
            self._down_to_disk(slot, reason="ram_ttl")

    # ---------------------------------------------------------------- loading

    def _ensure_loading(self, slot: Slot) -> asyncio.Task[None]:
        if slot.load_task is not None and slot.load_task.done():
            self._never_ran(slot, slot.load_task)  # its done-callback may not have run yet
        if slot.load_task is None or slot.load_task.done():
            # Only a model asleep in the ram tier wakes; anything else starts afresh.
            waking = slot.state is State.ASLEEP
            slot.last_error = None  # before the move: its view must not carry the old error
            slot.move((State.STOPPED, State.FAILED, State.ASLEEP, State.BACKOFF), State.QUEUED)
            slot.load_task = self._spawn_task(
                self._load(slot, waking=waking), f"load:{slot.preset.name}"
            )
            slot.load_task.add_done_callback(lambda task: self._never_ran(slot, task))
        return slot.load_task

    def _never_ran(self, slot: Slot, task: asyncio.Task[None]) -> None:
        """A load cancelled before its first step (a forced unload at once) ran no cleanup."""
        if task.cancelled() and slot.load_task is task and slot.state is State.QUEUED:
            self._unqueue(slot)
            self._notify()

    @staticmethod
    def _unqueue(slot: Slot) -> None:
        """A load that never ran, or was refused room: back where it was waiting from."""
        slot.move(State.QUEUED, State.ASLEEP if slot.child else State.STOPPED)

    async def load(self, name: str) -> None:
        """Make a model ready without sending it a request (``/swapd/models/{name}/load``).

        An explicit load clears a backoff and an open breaker.
        """
        slot = self.slot_for(name)
        slot.failures = 0
        slot.waiters += 1  # someone waits for it: the load is not one nobody wants
        try:
            while slot.state is not State.READY:
                if self._closing:
                    raise Unavailable("swapd is shutting down")
                await self._toward_ready(slot)
            slot.last_used = slot.last_used or time.monotonic()
            if slot.in_flight == 0:
                self._arm_ttl(slot)
        finally:
            slot.waiters -= 1
            self._at_rest(slot)

    async def _load(self, slot: Slot, *, waking: bool) -> None:
        name = slot.preset.name
        started = time.monotonic()
        staging = None
        slot.never_fits = False
        try:
            await self._drop_stale_pages(slot)  # (a sleeper holds none)
            self._forget_lost_copy(slot, loading=True)
            await self._forget_outdated_copy(slot, loading=True)
            from_tier = "ram" if waking else slot.tier
            staging = None if waking else self._stage_meanwhile(slot)
            device, total = await self._admit(slot, waking=waking, staging=staging)
            if waking and slot.state is State.STARTING:
                waking, from_tier = False, "disk"  # the sleeper died while its wake waited
            self._loading[id(slot)] = time.monotonic()
            if waking:
                await self._wake(slot)
            else:
                await self._start(slot, device, total)
        except RequestError as exc:
            # Its copy, when no other load waits on it, is stopped once it is let go below.
            slot.never_fits = isinstance(exc, NeverFits)
            self._load_failed(slot, exc)
            raise
        except asyncio.CancelledError:
            if slot.state is State.QUEUED:
                self._unqueue(slot)
            elif slot.state is State.STARTING and slot.child is None:
                # Cancelled before the spawn (sizing the model, building the launch):
                # nothing runs, and nothing may stay reserved for it.
                slot.move(State.STARTING, State.STOPPED)
                if slot.pages is None:
                    slot.device = None
            raise
        except Exception as exc:
            # Anything unexpected (an unwritable state_dir, a probe that raises) still
            # answers every waiter with the envelope and leaves nothing running.
            _log.exception("model.load.error", model=name, error=repr(exc))
            error = LoadFailed(name, f"{type(exc).__name__}: {exc}")
            self._load_failed(slot, error)
            raise error from exc
        finally:
            if staging is not None and not staging.done():
                staging.cancel()
            self._loaded(slot)
            self._notify()
        load_s = time.monotonic() - started
        self.metrics.load_done(name, from_tier, load_s)
        _log.info(
            "model.load.done",
            model=name,
            how="wake" if waking else "start",
            from_tier=from_tier,
            load_s=round(load_s, 3),
        )
        # Armed now, not only when a lease ends: the request that asked for this load
        # may have gone (a client that hung up), and then no lease ever would. A waiter
        # that takes its lease next cancels it.
        self._arm_ttl(slot)

    def _stage_meanwhile(self, slot: Slot) -> asyncio.Task[None] | None:
        """Copy a ``stage: true`` model while its load waits for room or for busy models."""
        if not slot.preset.stage or self.staging is None:
            return None
        staging = self._spawn_task(self._stage(slot), f"stage:{slot.preset.name}")
        # Its end (a failed copy above all) must wake the load that waits for room.
        staging.add_done_callback(lambda _task: self._notify())
        return staging

    def _loaded(self, slot: Slot) -> None:
        """A load or wake ended, well or not: keep its span for :meth:`_loader_busy`.

        By slot, not name: a model a reload removed and one added back under its name
        may load at once, and each span is its own.
        """
        began = self._loading.pop(id(slot), None)
        now = time.monotonic()
        if began is not None:
            self._load_spans.append((began, now))
        while self._load_spans and self._load_spans[0][1] < now - policy.HOLD_WINDOW_S:
            self._load_spans.popleft()

    def _loader_busy(self) -> float:
        """The share of the last few minutes spent loading, those under way included."""
        now = time.monotonic()
        under_way = [(began, now) for began in self._loading.values()]
        return policy.loader_busy([*self._load_spans, *under_way], now)

    def _hold_rule(self) -> policy.HoldRule:
        # Bounded by max_wait and queue_timeout too: a hold never outlasts either promise.
        config = self.config
        longest = min(config.hold_max, config.max_wait, config.queue_timeout)
        return policy.HoldRule(max_s=longest, busy=config.hold_busy)

    def _load_failed(self, slot: Slot, exc: RequestError) -> None:
        if isinstance(exc, _Abandoned):  # not a failure: nothing to say to anyone
            _log.info("model.load.abandon", model=slot.preset.name)
            self._end_failed_load(slot, exc)
            return
        slot.last_error = exc
        code = exc.exit_code if isinstance(exc, BackendStartError) else None
        _log.warning("model.load.fail", model=slot.preset.name, error=exc.message, code=code)
        self._end_failed_load(slot, exc)
        if slot.tier == "ram":
            # Asleep again, or keeping the locked pages its start was to read: busy while
            # it loaded, every fit meanwhile left it alone (a ram_budget a reload lowered,
            # a demotion into the tier), so it must fit now.
            self._spawn_task(self._fit_ram_budget(), "ram_budget")

    def _end_failed_load(self, slot: Slot, exc: RequestError) -> None:
        """Move a slot whose load failed to where it now stands: unqueued, failed, backing off."""
        if slot.state is State.STARTING and slot.child is None:
            # Admitted, then failed before any process ran (sizing the files, building the
            # launch): a failed start, which backs off; nothing stays reserved for it.
            slot.move(State.STARTING, State.FAILED)
            if slot.pages is None:
                slot.device = None
        if isinstance(exc, Unavailable) and slot.state is State.QUEUED:
            # Refused for memory, queue time or cache room: nothing is wrong with the model.
            self._unqueue(slot)
            return
        if slot.state is State.QUEUED:
            # A refused wake leaves the process asleep in the ram tier.
            slot.move(State.QUEUED, State.ASLEEP if slot.child else State.FAILED)
        if slot.state is not State.FAILED:
            return
        self._count_failure(slot)

    def _count_failure(self, slot: Slot) -> None:
        """One more failure in a row for a FAILED model: back off, or open the breaker."""
        slot.failures += 1
        if slot.failures >= BREAKER_AFTER:
            _log.error("model.breaker.open", model=slot.preset.name, failures=slot.failures)
            slot.changed()  # no move: it stays failed, with one failure more
            return
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (slot.failures - 1))
        slot.retry_at = time.monotonic() + delay
        slot.move(State.FAILED, State.BACKOFF)
        _log.info("model.backoff", model=slot.preset.name, failures=slot.failures, delay_s=delay)
        # Status, /v1/models and metrics must not say backoff once requests are let through.
        asyncio.get_running_loop().call_later(delay + _TIMER_SLACK, self._backoff_over, slot)

    def _backoff_over(self, slot: Slot) -> None:
        """retry_at has passed with no request: failed, and the next request starts it."""
        # A timer of an earlier backoff finds a later retry_at (or another state): no move.
        if slot.state is State.BACKOFF and slot.retry_at <= time.monotonic() + _TIMER_SLACK:
            slot.move(State.BACKOFF, State.FAILED)
            self._notify()

    @staticmethod
    def _proven(slot: Slot) -> bool:
        """Whether its backend has stayed up long enough for its start to count as good."""
        return time.monotonic() - slot.ready_at >= STABLE_AFTER

    def _pids(self) -> list[int]:
        return [s.child.pid for s in self._every_slot() if s.child and s.child.pid]

    async def _read_all(self) -> Snapshot:
        """A reading of every device for our processes, knowing which were still coming up."""
        # By slot, not pid: a start is STARTING before its process is spawned.
        coming_up = [id(s) for s in self._every_slot() if s.state in COMING_UP]
        return await self.admission.read(self._pids(), coming_up)

    def _resident(
        self, slot: Slot, snap: Snapshot, now: float | None = None
    ) -> policy.Resident | None:
        """How a slot counts for admission, or None when it holds no device memory."""
        resident = residency.resident(
            slot, snap, now=time.monotonic() if now is None else now, ram_budget=self.ram_budget
        )
        if resident is not None and resident.ram_via == "pages" and self._pages_held_at(slot):
            return replace(resident, ram_cost=0)  # its file's pages are in the tier already
        return resident

    def _pages_held_at(self, slot: Slot) -> WarmSet | None:
        """Pages another model holds of the file this one would hold (two presets, one GGUF).

        Under its name, or under another (a link to it) as its last start found.
        """
        model = slot.staged_path or str(slot.preset.model)
        return next(
            (
                s.pages
                for s in self._every_slot()
                if s is not slot
                and s.pages is not None
                and (
                    str(s.pages.path) == model
                    or (slot.model_id is not None and s.pages.file_id == slot.model_id)
                )
            ),
            None,
        )

    def _residents(self, snap: Snapshot, exclude: Slot) -> list[policy.Resident]:
        now = time.monotonic()  # one clock for every CRF in the plan
        retiring = [
            # Never a victim: its retirement stops it, and a load waits for that.
            replace(resident, busy=True)
            for slot in self._retiring
            if (resident := self._resident(slot, snap, now)) is not None
        ]
        host = [device.id for device in self.probe.devices if device.kind == "cpu"]
        current: list[policy.Resident] = []
        for slot in self.slots.values():
            if slot is exclude:
                continue
            resident = self._resident(slot, snap, now)
            if resident is not None:
                current.append(resident)
            else:
                current += residency.locked_pages(slot, host, now)
        # Claims are matched to their victims, which are never retiring: only the current
        # models are looked at, whatever a retiring namesake holds.
        claims = residency.claimed(self._claims.values(), current, self.slots, exclude, now)
        return retiring + current + claims

    @staticmethod
    def _crf(slot: Slot) -> float:
        """The slot's recency-frequency value now (LRFU): what eviction order keeps."""
        return residency.crf_now(slot, time.monotonic())

    def _ram_cost(self, slot: Slot, measured: int) -> int:
        """Host RAM the slot would take in the ram tier."""
        return residency.ram_cost(slot, measured)

    async def _sleeper_uses(self, slot: Slot) -> int | None:
        """What the sleeping process uses on its device, read now; None where unread.

        A reading that fails once (a driver hiccup) is logged (``model.measure.fail``).
        """
        pid = slot.child.pid if slot.child else None
        device = slot.device
        if device is None or pid is None:
            return None
        try:
            snap = await self.admission.read([pid])
        except Exception as exc:  # noqa: BLE001 - each caller says what a failed read counts
            _log.error("model.measure.fail", model=slot.preset.name, error=repr(exc))
            return None
        reading = snap.readings.get(device.id)
        return None if reading is None else reading.by_pid.get(pid)

    async def _asleep_cost(self, slot: Slot) -> int:
        """Host RAM a model takes now that it sleeps: on a CPU, what its process keeps.

        Counted as last measured where unread: the sleep must still enter the ram tier, or
        it would stay asleep uncounted, with no ram_ttl, for good.
        """
        used = None
        if slot.device is not None and slot.device.kind == "cpu":
            used = await self._sleeper_uses(slot)
        return self._ram_cost(slot, slot.measured or 0) if used is None else used

    async def _read_kept_on_device(self, slot: Slot) -> None:
        """Read what a sleeper keeps on its GPU, for the device tier's bytes; 0 where unread.

        Admission reads it afresh at every plan; this is for ``/swapd/status`` only. Kept
        only if the same sleep still lasts: a wake, a stop or a second sleep meanwhile
        makes the reading another's.
        """
        child, since = slot.child, slot.ram_since
        used = await self._sleeper_uses(slot)
        same_sleep = slot.child is child and slot.ram_since == since
        if used is not None and same_sleep and slot.state is State.ASLEEP:
            slot.kept_on_device = used

    def _ram_tier(self, snap: Snapshot) -> policy.RamTier:
        entries = residency.ram_entries(self._every_slot(), self._retiring, time.monotonic())
        available = snap.host_available - self.config.reserve - self._pinning()
        return policy.RamTier(self.ram_budget, available, entries)

    def _pinning(self) -> int:
        """Host RAM that GPU loads under way will pin (``--cpu-offload-gb``), not yet taken.

        A load making room (its claim) or starting: the ram tier must not fill it first.
        """
        devices = {d.id: d for d in self.probe.devices}
        starting = sum(
            residency.pinned(s, s.device) for s in self._every_slot() if s.state is State.STARTING
        )
        claimed = sum(
            residency.pinned(c.slot, devices.get(c.device))
            for c in self._claims.values()
            if c.slot.state is not State.STARTING
        )
        return starting + claimed

    async def _admit(
        self, slot: Slot, *, waking: bool, staging: asyncio.Task[None] | None = None
    ) -> tuple[Device, int]:
        """Plan, make room and reserve; return the device the model goes on and its total.

        On return the slot is STARTING or WAKING, so it counts as a resident in every
        later plan before its process has taken any memory.
        """
        preset = slot.preset
        candidates = self.admission.candidates(preset)
        if waking and slot.device is not None:
            candidates = [slot.device]  # a sleeping process wakes where it sleeps
        if not candidates:
            raise InsufficientMemory(f"none of the devices {preset.devices} is available")
        job = _Job(slot, candidates, waking, staging, time.monotonic())
        try:
            return await self._admit_loop(job)
        finally:
            if self._claims.pop(id(slot), None) is not None:
                self._notify()
            self._end_hold(job)
            self._end_swap_drains(job.drained, owner=job)

    async def _admit_loop(self, job: _Job) -> tuple[Device, int]:
        slot, staging = job.slot, job.staging
        preset = slot.preset
        while True:
            # Taken before the checks and the plan: a change while the plan awaits (the
            # copy failing, a model going idle) must still end the wait that follows.
            changed = self._changed
            # Read each time: a reload changes the bound of a load already waiting.
            deadline = job.started + self.config.queue_timeout
            if slot.waiters == 0:
                # Every client hung up while it waited: a hold, a drain or an eviction of
                # other models' work would now serve nobody.
                raise _Abandoned(f"nobody waits for {preset.name!r} any more")
            self._start_if_sleeper_died(job)
            if staging is not None and staging.done():
                # A copy that failed (checksum, no cache room) ends the load here: it
                # must not start from the unstaged source, nor evict anything for it.
                staging.result()
            staged = staging is None or staging.done()
            waited = time.monotonic() - job.started
            step = await self._plan_step(
                slot, job.candidates, waking=job.waking, staged=staged, waited=waited
            )
            if isinstance(step, policy.Hold):
                self._begin_hold(job, step)
                await self._wait_for_change(min(step.seconds, deadline - time.monotonic()), changed)
                continue
            self._end_hold(job)
            if isinstance(step, tuple):
                return step
            if isinstance(step, _Staging):
                assert staging is not None  # noqa: S101 - only returned while it runs
                await asyncio.shield(staging)  # raises the staging error, if any
                continue
            if isinstance(step, _Room):
                # Unlocked: a load that fits beside the claimed room need not wait for a
                # slow /sleep or stop_timeout. The claim stays until the next plan.
                await asyncio.gather(*(asyncio.shield(t) for t in step.moves))
                await self._await_release(step.device, step.need)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QueueTimeout(
                    f"cannot load {preset.name!r}: waited {self.config.queue_timeout:g}s for "
                    f"busy models to finish: {', '.join(step.busy)}",
                    retry_after=self.config.queue_timeout / 4,
                )
            _log.info("model.load.wait", model=preset.name, busy=list(step.busy))
            waited = time.monotonic() - job.started
            if waited >= self.config.max_wait:
                remaining = self._drain_for(job, step, remaining)
            else:
                # Awake at max_wait even if nothing else changes by then: that is when
                # the busy models are drained (their releases notify only once idle).
                # A little late, not early: uvloop rounds timers to whole milliseconds.
                remaining = min(remaining, self.config.max_wait - waited + _TIMER_SLACK)
            await self._wait_for_change(remaining, changed)

    def _held_there(self, slot: Slot, snap: Snapshot, device_id: str, *, waking: bool) -> int:
        """What a load already holds on a device: no room is needed for it again.

        A sleeper wakes into what it still holds where it sleeps. A llama-server started
        from its locked pages on host RAM maps those very pages, which host memory no
        longer shows as available (unlocked, they still count as available; with
        ``--no-mmap`` the server reads the weights into memory of its own).
        """
        if waking:
            pid = slot.child.pid if slot.child is not None else None
            return snap.readings[device_id].by_pid.get(pid, 0) if pid else 0
        pages = slot.pages
        if pages is None or device_id != HOST_DEVICE.id:
            return 0
        # The locked files' size (the limit may have run out part-way through a split
        # GGUF), also where another model's hold counts them (ram_bytes 0 here).
        return 0 if has_flag(slot.preset.args, "--no-mmap") else pages.locked_bytes

    def _start_if_sleeper_died(self, job: _Job) -> None:
        """A sleeper that died while its wake waited has nothing left to wake: start afresh.

        On any device it may use, as any start does.
        """
        if not job.waking or job.slot.child is not None:
            return
        preset = job.slot.preset
        job.waking = False
        job.candidates = self.admission.candidates(preset)
        if not job.candidates:
            raise InsufficientMemory(f"none of the devices {preset.devices} is available")

    async def _wait_for_change(self, timeout: float, changed: asyncio.Event | None = None) -> None:
        """Until something changes (since ``changed`` was taken, when given), or ``timeout``."""
        changed = changed or self._changed
        # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancellation that
        # arrives once the event is set (a reload notifies, then cancels a removed load).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, timeout)):
                await changed.wait()

    def _begin_hold(self, job: _Job, hold: policy.Hold) -> None:
        """Say that the load is held, and why, once when the hold begins."""
        job.slot.hold = hold.reason
        if job.held_at is not None:
            return
        job.held_at = time.monotonic()
        job.hold_until = job.held_at + hold.seconds
        _log.info(
            "model.hold.start",
            model=job.slot.preset.name,
            crf=round(hold.crf, 3),
            victims_crf=round(hold.victims_crf, 3),
            worth=None if hold.worth is None else round(hold.worth, 3),
            victims_worth=None if hold.victims_worth is None else round(hold.victims_worth, 3),
            loader_busy=round(hold.busy, 3),
            hold_s=round(hold.seconds, 3),
        )

    def _end_hold(self, job: _Job) -> None:
        """The hold is over: its time ran out, its condition cleared, or the load ended."""
        if job.held_at is None:
            return
        now = time.monotonic()
        _log.info(
            "model.hold.end",
            model=job.slot.preset.name,
            why="expired" if now >= job.hold_until else "cleared",
            held_s=round(now - job.held_at, 3),
        )
        job.slot.hold = None
        job.held_at = None

    def _drain_for(self, job: _Job, wait: policy.Wait, remaining: float) -> float:
        """Drain what ``job`` has waited on past ``max_wait``; how long to wait then."""
        drained = self._drain_for_swap(wait, waiting=job.slot.preset.name, owner=job)
        job.drained += drained
        # One busy only by the waiters its own load left (not resumed yet) is evictable
        # once drained, and no release of it will say so: plan again at once.
        return 0.0 if any(d.in_flight == 0 for d in drained) else remaining

    def _drain_for_swap(self, wait: policy.Wait, *, waiting: str, owner: object) -> list[Slot]:
        """Stop leasing the busy models a request has waited on past ``max_wait``.

        Their queued requests wait; once their requests in flight end they are
        evictable and the swap happens. Served model by model, ABCABC becomes AABBCC.
        """
        drained = []
        for name, device in dict.fromkeys(wait.busy_at):
            # A retiring model (a reload removed it) is busy too, and not here. A model of
            # its name added back is what the plan waits on only where it is: busy on
            # another device, or idle, it stays.
            other = self.slots.get(name)
            if (
                other is not None
                and other.state is State.READY
                and other.device is not None
                and other.device.id == device
                and other.busy
                and not other.preset.pin
            ):
                other.move(State.READY, State.DRAINING)
                other.swap_drain = owner
                self._cancel_ttl(other)
                drained.append(other)
        if drained:
            _log.info(
                "model.drain",
                models=[d.preset.name for d in drained],
                reason="max_wait",
                waiting=waiting,
            )
        return drained

    def _end_swap_drains(self, drained: list[Slot], *, owner: object) -> None:
        """Models drained for this admission (``owner``) but not taken serve again.

        Only while that drain lasts: one since evicted, loaded again and drained by another
        admission is that one's to hand back.
        """
        for other in drained:
            if other.state is State.DRAINING and other.swap_drain is owner:
                other.move(State.DRAINING, State.READY)
                other.swap_drain = None
                if other.in_flight == 0:
                    self._arm_ttl(other)
        if drained:
            self._notify()

    async def _plan_step(
        self, slot: Slot, candidates: list[Device], *, waking: bool, staged: bool, waited: float
    ) -> tuple[Device, int] | _Staging | _Room | policy.Wait | policy.Hold:
        """Plan under the candidates' locks: make room, then reserve; or say to wait or hold.

        Victims are sent down a tier under the locks, which then go (a vLLM's /sleep may
        take minutes); the room they make is claimed (:func:`swapd.residency.claimed`)
        until this load plans again, so no other load can take it (requests queued for a
        victim would otherwise reload it first, forever), while one that fits beside it
        goes at once.
        The locks are never held while a backend starts. Until the weights are staged
        nothing is reserved; evictions the plan needs still go ahead, since their stops may
        free the cache space the copy needs.
        """
        preset = slot.preset
        async with self.admission.locked(candidates):
            if self._claims.pop(id(slot), None) is not None:  # planned afresh, under the locks
                # A load that waits on the claimed room plans again once the locks go:
                # this plan may leave the room unreserved (a copy to wait for, a hold).
                self._notify()
            while True:
                snap = await self._read_all()
                needs = await self.admission.needs(preset, candidates, snap)
                if not needs:
                    raise InsufficientMemory(
                        f"cannot load {preset.name!r}: none of its devices reported memory "
                        "(probe.device.fail in the log says why)"
                    )
                residents = self._residents(snap, exclude=slot)
                wanted = {
                    d: max(0, n.bytes - self._held_there(slot, snap, d, waking=waking))
                    for d, n in needs.items()
                }
                plan = self.admission.plan(wanted, snap, residents)
                if isinstance(plan, policy.Impossible):
                    reason = f"cannot load {preset.name!r}: {plan.reason}{_assumed(needs)}"
                    if self._never_fits(wanted, snap, candidates):
                        raise NeverFits(reason)
                    raise InsufficientMemory(reason)
                if isinstance(plan, policy.Wait):
                    return plan
                device = next(d for d in candidates if d.id == plan.device)
                held = policy.hold(
                    plan,
                    self._crf(slot),
                    residents,
                    busy=self._loader_busy(),
                    waited=waited,
                    rule=self._hold_rule(),
                    reload_s=slot.start_times.get(device.kind),
                )
                if held is not None:
                    return held  # the locks go: other loads may plan meanwhile
                slot.need = needs[plan.device]
                down = self._down_moves(
                    slot, device, plan, snap, residents=residents, need=wanted[device.id]
                )
                steps = policy.load_plan(preset.name, plan, down, waking=waking, staged=staged)
                return self._first_steps(slot, device, plan, steps, snap, need=wanted[device.id])

    def _first_steps(  # noqa: PLR0913 - one plan's facts, handed over as they are
        self,
        slot: Slot,
        device: Device,
        plan: policy.Admit,
        steps: Sequence[policy.Action],
        snap: Snapshot,
        *,
        need: int,
    ) -> tuple[Device, int] | _Staging | _Room:
        """Carry out the load plan's first steps; the caller plans again after all but the last.

        The moves down go together (the room they make is claimed for this load); then the
        copy is waited for; then the start or the wake is reserved, and the load goes on.
        """
        first = steps[0]
        if not isinstance(first, policy.Stage | policy.Start | policy.Wake) and not policy.is_down(
            first
        ):
            raise AssertionError(f"a load's plan does not begin with {first}")
        if isinstance(first, policy.Stage):
            return _Staging()
        if isinstance(first, policy.Start | policy.Wake):
            slot.device = device
            waking = isinstance(first, policy.Wake)
            slot.move(State.QUEUED, State.WAKING if waking else State.STARTING)
            return device, snap.readings[device.id].total
        moves = self._make_room(slot, plan, [s for s in steps if policy.is_down(s)])
        self._claims[id(slot)] = Claim(slot, device.id, need, plan.victims)
        return _Room(moves, device, need)

    def _never_fits(self, wanted: dict[str, int], snap: Snapshot, candidates: list[Device]) -> bool:
        """Whether every candidate reported memory and none could hold the model, even empty."""
        for device in candidates:
            reading = snap.readings.get(device.id)
            if device.id not in wanted or reading is None:
                return False  # it may report later, with room
            if not policy.never_fits(wanted[device.id], reading.total, self.limits):
                return False
        return True

    def _down_moves(  # noqa: PLR0913 - one plan's facts, handed over as they are
        self,
        slot: Slot,
        device: Device,
        plan: policy.Admit,
        snap: Snapshot,
        *,
        residents: list[policy.Resident],
        need: int,
    ) -> tuple[policy.Down, ...]:
        """Where the plan's victims go: down to the ram tier while it has room, else to disk."""
        if not plan.victims:
            return ()
        # One resident per name: a model a reload removed may still drain under the name
        # of the victim that replaced it, and only the victim goes down.
        victims = policy.named_once(plan.victims, residents)
        ram = self._ram_tier(snap)
        if device.kind == "cpu":
            # Pages kept in RAM come out of the very memory this load needs.
            reading = snap.readings[device.id]
            view = policy.DeviceView(device.id, reading.total, reading.free)
            left = policy.room_after(need, view, residents, self.limits, plan.victims)
            ram = policy.RamTier(ram.budget, min(ram.available, left), ram.entries)
        else:
            # What it will pin in host RAM (offloaded weights) is no room for its victims.
            pinned = residency.pinned(slot, device)
            ram = policy.RamTier(ram.budget, ram.available - pinned, ram.entries)
        return policy.demotions(victims, ram)

    def _make_room(
        self, slot: Slot, plan: policy.Admit, actions: Sequence[policy.Down]
    ) -> list[asyncio.Task[Any]]:
        """Send the plan's victims down a tier; the moves, to wait for unlocked."""
        moves = self._carry_out(actions, reason="evict")
        _log.info(
            "model.evict",
            model=slot.preset.name,
            victims=list(plan.victims),
            actions=[f"{type(a).__name__.lower()}:{a.model}" for a in actions],
            device=plan.device,
        )
        if any(isinstance(a, policy.Sleep) for a in actions):
            # A sleeper's true cost is read once asleep and may exceed the plan's: what the
            # ram tier holds past its budget goes down, off the load's path.
            self._spawn_task(self._fit_after(moves), "ram_budget")
        return moves

    async def _fit_after(self, moves: list[asyncio.Task[Any]]) -> None:
        await asyncio.gather(*(asyncio.shield(t) for t in moves), return_exceptions=True)
        await self._fit_ram_budget()

    @staticmethod
    def _uses_staged_copy(slot: Slot, *, counting_load: bool = True) -> bool:
        """Whether its staged copy is in use: by a process, held pages, or a load under way.

        A load that has staged and waits for room, or starts, is about to open the copy;
        not the load that stages now (``counting_load`` False): it opens the copy it makes.
        """
        loading = counting_load and slot.load_task is not None and not slot.load_task.done()
        return bool(slot.staged_path) and bool(slot.child or slot.pages or loading)

    def _sources_in_use(self, staging: Slot | None = None) -> list[Path]:
        """Sources whose staged copies are in use now (:meth:`_uses_staged_copy`).

        Called by the cache when it plans room, not before: a model may start meanwhile.
        """
        return [
            s.staged_source
            for s in self._every_slot()
            if s.staged_source is not None
            and self._uses_staged_copy(s, counting_load=s is not staging)
        ]

    async def _stage(self, slot: Slot) -> None:
        """Copy the model into the staging cache (or find it there); retry once room frees."""
        assert self.staging is not None  # noqa: S101 - only called with a cache
        preset = slot.preset
        source = preset.model
        assert source is not None  # noqa: S101 - stage needs a model path

        def progress(done: int, total: int) -> None:
            slot.staging = (done, total)

        began = time.monotonic()
        try:
            while True:
                try:
                    path = await self.staging.stage(
                        source,
                        sha256=preset.sha256,
                        progress=progress,
                        in_use=lambda: self._sources_in_use(staging=slot),
                    )
                    # In use from here: the refresh below awaits, and another load's copy
                    # planning room meanwhile must not evict this one.
                    slot.staged_path, slot.staged_source = str(path), source
                    break
                except StagingFull as exc:
                    # Files that running models use are pinned; a stop may free them.
                    # queue_timeout read each time: a reload changes it for this wait too.
                    remaining = began + self.config.queue_timeout - time.monotonic()
                    if remaining <= 0 or _never_room(exc):
                        raise CacheFull(f"cannot stage {preset.name!r}: {exc}") from exc
                    _log.info("model.stage.wait", model=preset.name, reason=str(exc))
                    # Status says why the load stands still: nothing is copied meanwhile.
                    slot.staging, slot.staging_wait = (0, exc.need), str(exc)
                    # The events feed, not the manager's waiters: a _notify() here woke the
                    # other copies waiting for room, each of which tried, failed and woke
                    # this one again (thousands of tries a second).
                    slot.changed()
                    await self._wait_for_change(remaining)
                    slot.staging_wait = None
        except StagingError as exc:
            raise StageFailed(preset.name, str(exc)) from exc
        finally:
            slot.staging = slot.staging_wait = None
            # Room made for a copy that then failed (a checksum) still evicted copies.
            await self._refresh_staged(exclude=slot)
        _log.info("model.staged", model=preset.name, path=slot.staged_path)

    async def _refresh_staged(self, exclude: Slot | None = None) -> None:
        """Forget staged paths whose copies the cache evicted: those models are in store."""
        for other in list(self.slots.values()):
            source, copy = other.staged_source, other.staged_path
            if other is exclude or source is None or copy is None or self._uses_staged_copy(other):
                continue
            found = await self._cached_copy(source)
            # Checked again after the thread hop: a load may have taken or replaced the copy.
            if found is None and other.staged_path == copy and not self._uses_staged_copy(other):
                self._to_store(other)

    async def _await_release(self, device: Device, need: int) -> None:
        # Drivers release memory asynchronously: wait, bounded, until the room is really there.
        deadline = time.monotonic() + self.config.release_timeout
        while time.monotonic() < deadline:
            # The device's free memory is all this asks: no per-process scan (milliseconds of
            # /proc walking per read, on the path of every swap).
            snap = await self.admission.read(())
            reading = snap.readings.get(device.id)
            if reading is None or reading.free - self.limits.reserve >= need:
                return
            await asyncio.sleep(_RELEASE_POLL)

    def _placement(self, slot: Slot, device: Device, total: int) -> Placement:
        preset = slot.preset
        fraction = None
        # The share of a GPU granted, for a kind that sizes itself to the card (vLLM).
        if device.kind != "cpu" and total and slot.need is not None and slot.need.bytes:
            fraction = min(0.95, slot.need.bytes / total)
        level = 0
        key = _sleep_key(preset)  # a fingerprint: the model's files are stat'ed
        if slot.kind.ram_via == "sleep" and self.ram_budget > 0 and key not in self._sleep_missing:
            setting = preset.sleep
            level = (1 if device.kind != "cpu" else 0) if setting == "auto" else int(setting)
        refused = key in self._sleep_refused
        return Placement(
            on_gpu=device.kind != "cpu",
            gpu_fraction=fraction,
            device_env=device.visible_env,
            sleep_level=level,
            sleep_flag=not refused,
            model_path=slot.staged_path,
        )

    async def _start(self, slot: Slot, device: Device, total: int) -> None:
        """Spawn and wait for readiness; on any failure, nothing is left running."""
        preset = slot.preset
        slot.device = device
        placement = self._placement(slot, device, total)
        if preset.model is not None:
            # At each start: the files may have changed since the last (new weights in place).
            slot.model_bytes, slot.model_id, slot.model_in_memory = await asyncio.to_thread(
                _file_facts, slot, preset.model, slot.staged_path or preset.model
            )
        async with self._one_sizing_start(slot, device):
            await self._start_spawned(slot, device, placement)

    @contextlib.asynccontextmanager
    async def _one_sizing_start(self, slot: Slot, device: Device) -> AsyncIterator[None]:
        """One start at a time on a GPU for kinds that size themselves to it (vLLM).

        While it waits, status says why in ``hold``: its state alone says starting, with
        no pid, for as long as the other start takes.
        """
        if not slot.kind.sizes_to_card or device.kind == "cpu":
            yield
            return
        lock = self._sizing_starts.setdefault(device.id, asyncio.Lock())
        waits = lock.locked()
        if waits:
            ahead = self._sizing_now.get(device.id)
            _log.info("model.start.wait", model=slot.preset.name, device=device.id, waits_for=ahead)
            slot.hold = f"waits for {ahead!r} to finish starting on {device.id}"
            slot.changed()
        try:
            await lock.acquire()
        finally:
            if waits:
                slot.hold = None
                slot.changed()
        self._sizing_now[device.id] = slot.preset.name
        try:
            yield
        finally:
            self._sizing_now.pop(device.id, None)
            lock.release()

    async def _start_spawned(self, slot: Slot, device: Device, placement: Placement) -> None:
        """Spawn, retrying once without the sleep flag where the backend refuses it."""
        preset = slot.preset
        key = _sleep_key(preset)  # a fingerprint: the model's files are stat'ed
        try:
            await self._spawn_ready(slot, device, placement)
        except BackendStartError as exc:
            refused = (
                slot.kind.refused_sleep(list(exc.log_tail))
                if placement.sleep_level and placement.sleep_flag and exc.exit_code is not None
                else None
            )
            if refused is None:
                raise
            # The backend refused --enable-sleep-mode (vLLM's CPU build does): start it
            # again without the flag, and remember that for this launch.
            self._sleep_refused[key] = refused
            _log.warning("model.sleep.refused", model=preset.name, line=refused)
            slot.move(State.FAILED, State.QUEUED)
            slot.move(State.QUEUED, State.STARTING)
            retry = Placement(**{**placement.__dict__, "sleep_flag": False})
            await self._spawn_ready(slot, device, retry)
            placement = retry
        slot.sleep_level = placement.sleep_level
        slot.sleep_mode = placement.sleep_flag
        line = self._sleep_refused.get(key)
        missing = self._sleep_missing.get(key)
        if missing:
            slot.sleep_note = (
                f"the backend's sleep API is missing ({missing}); started without sleep "
                "mode, it goes down to disk instead"
            )
        elif line and placement.sleep_level:
            slot.sleep_note = (
                f"the backend refused --enable-sleep-mode ({line}); started without it, so "
                "its sleep keeps its device memory"
            )
        else:
            slot.sleep_note = None

    async def _spawn_ready(self, slot: Slot, device: Device, placement: Placement) -> None:
        preset = slot.preset
        slot.device, slot.started_on = device, device.kind
        port = free_port()
        try:
            # PATH lookups and, once per binary, `llama-server --help`: off the event loop.
            launch = await asyncio.to_thread(build_launch, preset, port, placement)
        except BinaryNotFound as exc:
            slot.move(State.STARTING, State.FAILED)
            if slot.pages is None:  # nothing ran: nothing of it is on the device
                slot.device = None
            raise BackendStartError(
                preset.name, None, [], reason=f"could not start: {exc}"
            ) from exc
        slot.ring.clear()
        from_pages = slot.pages is not None  # warm: not what a start from disk costs
        child = Child(
            preset.name,
            launch.argv,
            launch.env,
            ring=slot.ring,
            on_group=self._on_group,
            stop_signal=slot.kind.stop_signal,
            cgroup=self._new_cgroup(preset.name),
        )
        slot.child, slot.launch = child, launch
        _log.info("model.load.start", model=preset.name, device=device.id, port=port)
        spawned = time.monotonic()
        try:
            await child.spawn()
            self.records.add(child.pid or 0, preset.name, mark=child.backend_id)
            await child.wait_ready(
                launch.host,
                launch.port,
                launch.health_path,
                preset.start_timeout,
                self.pool,
                headers=launch.headers,
            )
            # Watched before it serves: a backend whose exit nobody notices stays ready,
            # dead, for good. One that cannot be watched is stopped as a failed start.
            self._spawn_task(self._watch(slot, child), f"watch:{preset.name}")
        except BaseException as exc:
            # Whatever went wrong (exit, timeout, cancellation, an unforeseen error),
            # the group is stopped and reaped before the error goes on.
            cancelled = isinstance(exc, asyncio.CancelledError)
            try:
                await self._stop_child(slot, child)
            except asyncio.CancelledError:
                cancelled = True  # a forced unload cut in while the stop ran: it finished
                raise
            finally:
                # Whatever cut in, the stop has ended the group: no dead pid stays behind
                # (a slot left FAILED with its child would wait to be reaped forever).
                self._let_go(slot)
                slot.move(State.STARTING, State.STOPPED if cancelled else State.FAILED)
            raise
        slot.move(State.STARTING, State.READY)
        slot.last_used = slot.ready_at = slot.answered_at = time.monotonic()
        if not from_pages:
            slot.start_times[device.kind] = slot.ready_at - spawned
        slot.escaped = False  # failures are cleared once it has proven itself (_proven)
        self._after_ready(slot, child)

    def _after_ready(self, slot: Slot, child: Child) -> None:
        """Let go of the pages a start read, measure the process, probe its liveness.

        A step that raises is logged (``model.ready.error``) and the others go on: the
        backend serves all the same. It is up, answered its health check and is watched;
        failing the request would stop a good backend for want of a figure or a probe,
        and leave the model ready with an error no request ever clears.
        """
        name = slot.preset.name
        steps: dict[str, Callable[[], object]] = {
            # The process maps the file itself now. Unmapping swapd's locked copy costs
            # milliseconds of kernel time: not while the first request is computed.
            "pages": lambda: self._drop_pages(slot, after=_MEASURE_DELAY),
            "measure": lambda: self._spawn_task(self._measure(slot, child), f"measure:{name}"),
            "liveness": lambda: self._probe_liveness(slot, child),
        }
        for step, run in steps.items():
            try:
                run()
            except Exception as exc:  # noqa: BLE001 - logged with its trace; it serves on
                _log.error(
                    "model.ready.error", model=name, step=step, error=repr(exc), exc_info=exc
                )

    def _probe_liveness(self, slot: Slot, child: Child) -> None:
        """(Re)start the liveness probe of a serving process, with the preset as it is now.

        None without a health path: that its port accepts tells nothing of a frozen process
        (the kernel accepts for it), and its exit is seen without a probe.
        """
        if slot.liveness_task is not None:
            slot.liveness_task.cancel()
            slot.liveness_task = None
        if slot.preset.health is None:
            return
        task = self._spawn_task(self._liveness(slot, child), f"liveness:{slot.preset.name}")
        slot.liveness_task = task

    def _new_cgroup(self, model: str) -> Path | None:
        if self.cgroups is None:
            return None
        try:
            return self.cgroups.create(model)
        except OSError as exc:
            _log.warning("cgroup.create.fail", model=model, error=str(exc))
            return None

    async def _wake(self, slot: Slot) -> None:
        """Wake a sleeping backend (vLLM ``/wake_up``); no new process."""
        self._cancel_ram_ttl(slot)
        started = time.monotonic()
        launch = slot.launch
        if launch is None:  # the sleeping process died meanwhile
            slot.move(State.WAKING, State.FAILED)
            await self._end_failed_child(slot, "the sleeping process is gone")
            raise BackendStartError(
                slot.preset.name, None, slot.ring.tail(), reason="could not wake: process gone"
            )
        try:
            try:
                # A wake is a load: bounded by start_timeout, as a start is.
                async with asyncio.timeout(slot.preset.start_timeout):
                    await slot.kind.wake(self.pool, launch.host, launch.port, _wake_level(slot))
            except TimeoutError as exc:
                raise SleepFailed(f"not awake after {slot.preset.start_timeout:g}s") from exc
        except (SleepFailed, SleepUnsupported) as exc:
            why = self._why_sleep_failed(slot, exc)
            slot.move(State.WAKING, State.FAILED)
            await self._end_failed_child(slot, f"wake failed: {why}")
            raise BackendStartError(
                slot.preset.name, None, slot.ring.tail(), reason=f"could not wake: {why}"
            ) from exc
        except BaseException:
            slot.move(State.WAKING, State.FAILED)
            await self._end_failed_child(slot, "wake interrupted")
            raise
        slot.ram_bytes = 0
        slot.move(State.WAKING, State.READY)
        slot.last_used = time.monotonic()
        _log.info("model.wake", model=slot.preset.name, wake_s=round(time.monotonic() - started, 3))

    def _let_go(self, slot: Slot) -> None:
        """Forget the slot's ended process; a bookkeeping step that raises still lets go of it.

        Kept, a dead process strands its model: failed, each request waits for a reaping
        that is over (no timeout); starting or stopping, nothing moves it on.
        """
        try:
            self._forget_child(slot)
        except Exception as exc:  # noqa: BLE001 - logged with its trace; the slot moves on
            _log.error(
                "backend.forget.error", model=slot.preset.name, error=repr(exc), exc_info=exc
            )
            slot.child = slot.launch = None
            slot.measured = None
            if slot.pages is None:
                slot.ram_bytes, slot.device = 0, None
            slot.changed()

    def _forget_child(self, slot: Slot) -> None:
        self._used_copy(slot)
        if slot.child is not None and slot.child.escaped:
            slot.escaped = True  # shown in status until the next start
        if slot.child is not None and slot.child.pid is not None:
            self.records.remove(slot.child.pid)
        if slot.launch is not None:
            self.pool.retire(slot.launch.host, slot.launch.port)
        slot.child = None
        slot.launch = None
        slot.measured = None
        slot.ram_bytes = 0 if slot.pages is None else slot.ram_bytes
        if slot.pages is None:
            slot.device = None
        if slot.state is State.FAILED:
            # It moved to FAILED while its process was being stopped: the feed's last view
            # would keep that pid and port until the next move, for good after a long run.
            slot.changed()

    async def _end_failed_child(self, slot: Slot, why: str) -> None:
        _log.error("backend.fail", model=slot.preset.name, reason=why)
        try:
            if slot.child is not None:
                await self._stop_child(slot, slot.child)  # finishes even if cancelled
        finally:
            self._let_go(slot)
            slot.device = None
            self._notify()

    @staticmethod
    async def _stop_child(slot: Slot, child: Child) -> None:
        """Stop and reap ``child``'s group; a stop that raises still ends it (SIGKILL).

        Its callers forget the process next and move the model on: raised on, they left
        it stopping, or failed with a process to wait for, for good.
        """
        try:
            await child.stop(slot.preset.stop_timeout)
        except Exception as exc:  # noqa: BLE001 - logged with its trace; the group is killed
            _log.error("backend.stop.error", model=slot.preset.name, error=repr(exc), exc_info=exc)
            child.kill_group()
            with contextlib.suppress(Exception):
                await child.stop(0)  # reaps it, where the stop that raised did not get so far

    async def _measure(self, slot: Slot, child: Child) -> None:
        """Record what the ready backend really uses, for status and the next admission."""
        # Not at the instant it turns ready: the first request is in flight then, and a
        # backend's buffers settle during it.
        await asyncio.sleep(_MEASURE_DELAY)
        try:
            device = slot.device
            if device is None or child.pid is None or slot.child is not child:
                return
            snap = await self.admission.read([child.pid])
            reading = snap.readings.get(device.id)
            if reading is None or slot.child is not child:
                return
            if child.pid not in reading.by_pid:
                # No figure for the process (device totals only): status says so.
                slot.memory_source = reading.source if reading.source == "device-delta" else None
                return
            slot.measured = reading.by_pid[child.pid]
            slot.memory_source = reading.source
            self.footprints.put(slot.preset, device.kind, slot.measured)
            _log.info("model.measure", model=slot.preset.name, bytes=slot.measured)
            slot.changed()
            self._warn_if_admitted_low(slot)
        except Exception as exc:  # noqa: BLE001 - a failed measurement must not vanish
            _log.error("model.measure.fail", model=slot.preset.name, error=repr(exc))

    def _warn_if_admitted_low(self, slot: Slot) -> None:
        """Say so when a backend took well over what it was admitted with.

        Admission counted the smaller number until now, so a load beside it could have
        run the device short; the measure counts from here on. Seen on CUDA: llama-server
        measured 2962 MiB against an estimate of 1862.
        """
        need, measured = slot.need, slot.measured
        if need is None or measured is None or need.source == "measured":
            return
        if measured > need.bytes * _ADMITTED_LOW_RATIO + _ADMITTED_LOW_SLACK:
            _log.warning(
                "model.need.low",
                model=slot.preset.name,
                admitted=need.bytes,
                measured=measured,
                source=need.source,
                detail="the backend took more than its load was admitted with; swapd counts "
                "the measure from now on. To count it from the first load, set `memory:` "
                "in the preset",
            )

    async def _watch(self, slot: Slot, child: Child) -> None:
        """Notice a backend that exits by itself while ready, draining or asleep (or waking)."""
        # Its last lines are in the pipe at its exit, read in a moment; output that flows
        # on comes from a helper that left its group, and must not keep a dead model ready.
        code = await child.wait_exit(output_within=OUTPUT_GRACE)
        alive_states = (State.READY, State.DRAINING, State.ASLEEP)
        while slot.child is child and slot.state in (State.SLEEPING, State.WAKING):
            # Its /sleep or /wake_up is under way: that call may still have been answered
            # (it then ends asleep or ready, with no process), so act on where it ends.
            if self._closing:
                return
            await self._changed.wait()
        if slot.child is child and slot.state is State.QUEUED:
            # Asleep, its wake queued: the wake finds no process (a refused one leaves the
            # model stopped, not asleep), and the ram tier no longer holds it.
            _log.error(
                "backend.crash", model=slot.preset.name, code=code, reason=describe_exit(code)
            )
            await self._stop_child(slot, child)  # reap the rest of its group
            if slot.child is child:
                self._cancel_ram_ttl(slot)
                self._let_go(slot)
                slot.ram_bytes = 0
            self._notify()
            return
        if slot.child is not child or slot.state not in alive_states:
            return
        _log.error(
            "backend.crash",
            model=slot.preset.name,
            code=code,
            reason=describe_exit(code),
            tail=slot.ring.tail(5),
        )
        if not isinstance(slot.last_error, BackendGone):  # liveness already said why
            slot.last_error = BackendStartError(slot.preset.name, code, slot.ring.tail())
        self._cancel_ttl(slot)
        self._cancel_ram_ttl(slot)
        slot.move(alive_states, State.FAILED)  # no new lease goes to a dead backend
        await self._stop_child(slot, child)  # reap the rest of its group
        if slot.child is child:
            self._let_go(slot)
            slot.ram_bytes = 0
            if self._proven(slot):
                slot.failures = 0  # a crash after a good run: start again at once
            elif slot.state is State.FAILED:
                self._count_failure(slot)  # soon after ready: as a failed start
        self._notify()

    async def _liveness(self, slot: Slot, child: Child) -> None:
        """Probe the health path of a serving backend; kill it after enough misses in a row.

        A frozen process accepts connections and never answers: only a probe with a
        deadline notices. Probes go straight to the backend and never touch the TTL.
        """
        preset = slot.preset
        interval = preset.health_interval
        # Never under a second, however often it probes: a deadline of a few ms would
        # count a healthy backend's answer on a busy machine as a miss, and kill it.
        timeout = min(max(interval, _PROBE_FLOOR), _PROBE_TIMEOUT)
        misses = 0
        while slot.child is child and child.exit_code is None:
            await asyncio.sleep(interval)
            if slot.child is not child or slot.launch is None:
                return
            if slot.state not in (State.READY, State.DRAINING):
                misses = 0  # asleep, waking or stopping: not a serving backend now
                continue
            if preset.health is None:
                return  # a reload that cannot change it without a restart; never probed
            if await self._probe(slot.launch, preset.health, timeout):
                misses = 0
                slot.answered_at = time.monotonic()  # kept across a probe restart
                if slot.failures and self._proven(slot):
                    slot.failures = 0  # its start has proven good
                continue
            if slot.child is not child or slot.state not in (State.READY, State.DRAINING):
                misses = 0  # moved while probed (stopping, asleep, crashed): not a miss
                continue
            misses += 1
            _log.warning("backend.probe.miss", model=preset.name, misses=misses)
            if misses >= preset.health_failures:
                _log.error(
                    "backend.unresponsive",
                    model=preset.name,
                    pid=child.pid,
                    misses=misses,
                    interval_s=interval,
                )
                await self._kill_frozen(slot, child, misses)
                return

    async def _kill_frozen(self, slot: Slot, child: Child, misses: int) -> None:
        """SIGKILL a backend that missed its probes."""
        preset = slot.preset
        slot.last_error = BackendGone(
            preset.name, f"no answer to {misses} health probes in a row; killed"
        )
        # No new lease may go to it from here; SIGKILL also ends a frozen process.
        slot.move((State.READY, State.DRAINING), State.FAILED)
        self._cancel_ttl(slot)
        child.kill_group()
        await self._stop_child(slot, child)
        if slot.child is child:
            self._let_go(slot)
            # Frozen within STABLE_AFTER of ready: a failed start, as an early crash is
            # (_watch), so a backend that freezes on every start backs off.
            if slot.answered_at - slot.ready_at >= STABLE_AFTER:
                slot.failures = 0
            elif slot.state is State.FAILED:
                self._count_failure(slot)
        self._notify()

    async def _probe(self, launch: Launch, path: str, timeout: float) -> bool:
        host, port = launch.host, launch.port
        try:
            async with asyncio.timeout(timeout):
                status, _ = await self.pool.control(host, port, "GET", path, launch.headers)
        except (UpstreamError, TimeoutError, OSError):
            self.pool.forget(host, port)  # a connection that timed out is not reusable
            return False
        return status == 200

    # ---------------------------------------------------------------- demotion and stops

    def _carry_out(self, actions: Sequence[policy.Down], *, reason: str) -> list[asyncio.Task[Any]]:
        """Start the plan's actions; state moves happen now, the waiting in the tasks."""
        tasks: list[asyncio.Task[Any]] = []
        # A model a reload removed while the plan was made: its retirement stops it.
        actions = [a for a in actions if a.model in self.slots]
        locks = {a.model for a in actions if isinstance(a, policy.LockPages)}
        for model in dict.fromkeys(a.model for a in actions):  # a stop and its pages: one move
            self.metrics.evicted(model, reason)
        for action in actions:
            slot = self.slots[action.model]
            if isinstance(action, policy.Sleep):
                tasks.append(self._begin_sleep(slot, reason=reason))
            elif isinstance(action, policy.Stop):
                tasks.append(
                    self._begin_stop(slot, reason=reason, keep_pages=slot.preset.name in locks)
                )
            elif isinstance(action, policy.UnlockPages):
                self._drop_hold(slot, reason=reason)
        return tasks

    def _drop_hold(self, slot: Slot, *, reason: str) -> None:
        """Push held pages down for room: those the model counts go for every preset sharing them.

        The plan counted their bytes as freed, and they are only once nobody holds them: a
        sharer left would take the count over and keep them locked. A busy sharer (a start
        from them) keeps them, as the plan keeps busy entries.
        """
        pages = slot.pages
        counted = slot.ram_bytes > 0
        sharers = [
            s for s in self.slots.values() if s is not slot and s.pages is pages and not s.busy
        ]
        self._drop_pages(slot, reason=reason)
        for other in sharers if counted and pages is not None else []:
            self.metrics.evicted(other.preset.name, reason)
            self._drop_pages(other, reason=reason)

    def _begin_sleep(self, slot: Slot, *, reason: str) -> asyncio.Task[None]:
        # READY -> SLEEPING now, so no lease slips in before the sleep.
        slot.move((State.READY, State.DRAINING), State.SLEEPING)
        slot.swap_drain = None
        self._cancel_ttl(slot)
        slot.sleep_task = self._spawn_task(self._sleep(slot, reason), f"sleep:{slot.preset.name}")
        return slot.sleep_task

    async def _sleep(self, slot: Slot, reason: str) -> None:
        assert slot.launch is not None  # noqa: S101 - only a ready slot sleeps
        launch = slot.launch
        started = time.monotonic()
        try:
            await slot.kind.sleep(self.pool, launch.host, launch.port, slot.sleep_level)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the process is ended
            why = self._why_sleep_failed(slot, exc)
            slot.last_error = BackendStartError(
                slot.preset.name, None, slot.ring.tail(), reason=f"could not sleep: {why}"
            )
            slot.move(State.SLEEPING, State.FAILED)
            await self._end_failed_child(slot, f"sleep failed: {why}")
            return
        finally:
            slot.sleep_task = None
            self._notify()
        slot.move(State.SLEEPING, State.ASLEEP)
        slot.kept_on_device = 0  # read anew below, off this task's path
        child = slot.child
        try:
            cost = await self._asleep_cost(slot)
        except Exception as exc:  # noqa: BLE001 - counted as a failed reading is
            _log.error("model.measure.fail", model=slot.preset.name, error=repr(exc))
            cost = self._ram_cost(slot, slot.measured or 0)
        if slot.child is not child or slot.state not in (State.ASLEEP, State.QUEUED):
            return  # woken (or stopped) while its cost was read: it is not in the ram tier
        try:
            self._entered_ram(slot, cost)
        except Exception as exc:  # noqa: BLE001 - logged with its trace; it goes to disk
            self._not_in_ram_tier(slot, exc)
            return
        _log.info(
            "model.sleep",
            model=slot.preset.name,
            reason=reason,
            sleep_level=slot.sleep_level,
            sleep_s=round(time.monotonic() - started, 3),
        )
        if slot.device is not None and slot.device.kind != "cpu":
            # For the status only: a load waiting on this sleep does not wait for the read.
            self._spawn_task(self._read_kept_on_device(slot), f"kept:{slot.preset.name}")

    def _not_in_ram_tier(self, slot: Slot, exc: Exception) -> None:
        """A sleeper the ram tier could not take in: down to disk (``model.tier.error``).

        Asleep but uncounted, it would hold its memory past the ram budget, with no
        ``ram_ttl`` to end it, for good. A wake asked for meanwhile goes on.
        """
        _log.error(
            "model.tier.error", model=slot.preset.name, tier="ram", error=repr(exc), exc_info=exc
        )
        if slot.state is State.ASLEEP:
            self._begin_stop(slot, reason="tier_error")

    def _why_sleep_failed(self, slot: Slot, exc: Exception) -> str:
        """:meth:`_sleep_failed`, for a sleep or wake that must end as a failed one all the same.

        An error in that handling (remembering a missing sleep API) is logged as the
        sleep's: raised, it left the model sleeping or waking, with its process, for good.
        """
        try:
            return self._sleep_failed(slot, exc)
        except Exception as err:  # noqa: BLE001 - logged with its trace; the process is ended
            _log.error("model.sleep.error", model=slot.preset.name, error=repr(err), exc_info=err)
            answered = isinstance(exc, (SleepFailed, SleepUnsupported))
            return str(exc) if answered else f"{type(exc).__name__}: {exc}"

    def _sleep_failed(self, slot: Slot, exc: Exception) -> str:
        """Why a sleep (or wake) failed, in words; an error not the backend's answer is logged.

        Any error ends the sleep as a failed one: left sleeping, the model could not be
        loaded again, and the load that waited for its room failed. A sleep API found
        missing (the wake of level 2 needs /collective_rpc, which its /sleep did not) is
        remembered: the launch's next starts go without sleep mode.
        """
        if isinstance(exc, SleepFailed) and exc.api_missing:
            self._sleep_missing_found(slot, exc)
        if isinstance(exc, (SleepFailed, SleepUnsupported)):
            return str(exc)
        _log.error("model.sleep.error", model=slot.preset.name, error=repr(exc), exc_info=exc)
        return f"{type(exc).__name__}: {exc}"

    def _sleep_missing_found(self, slot: Slot, exc: SleepFailed) -> None:
        """Remember for the launch that its sleep API is missing (``model.sleep.missing``).

        Its next starts go without sleep mode, and down to disk when demoted, rather than
        failing each demotion or wake the same way.
        """
        self._sleep_missing[_sleep_key(slot.preset)] = str(exc)
        _log.warning("model.sleep.missing", model=slot.preset.name, reason=str(exc))

    def _begin_stop(
        self, slot: Slot, *, reason: str, keep_pages: bool = False
    ) -> asyncio.Task[None]:
        if slot.stop_task is None:
            if slot.child is not None:
                # Move now, not when the task first runs: no lease may slip in between the
                # decision to stop and the stop itself.
                slot.leaving_ram = slot.state is State.ASLEEP
                slot.move((State.READY, State.DRAINING, State.ASLEEP), State.STOPPING)
                slot.swap_drain = None
            slot.stop_task = self._spawn_task(
                self._stop(slot, reason, keep_pages=keep_pages), f"stop:{slot.preset.name}"
            )
        return slot.stop_task

    async def _close_connections(self, slot: Slot) -> None:
        """Close swapd's idle connections to a backend about to stop (none is in use).

        A backend's shutdown waits for its connections to end: llama-server took 145-160
        ms to exit on SIGTERM with a blocking client's idle connection open, 45-55 ms
        without. swapd's loop answers the backend's close at once (52 against 60 ms, within
        noise) unless it is busy; closed first, nothing is left to wait on.
        """
        if slot.launch is not None:
            self.pool.forget(slot.launch.host, slot.launch.port)
            await asyncio.sleep(0)  # asyncio's transports close on the next loop turn

    async def _stop(self, slot: Slot, reason: str, *, keep_pages: bool) -> None:
        self._cancel_ttl(slot)
        self._cancel_ram_ttl(slot)
        child = slot.child
        hold = None
        try:
            if keep_pages and slot.preset.model is not None:
                # Locked while the backend exits (it still maps them, so they are resident):
                # the lock costs a swap nothing beyond the stop itself.
                hold = asyncio.create_task(self._hold_pages(slot))
            if child is not None:
                _log.info("model.stop", model=slot.preset.name, reason=reason)
                if slot.failures and self._proven(slot):
                    slot.failures = 0  # stopped after a good run
                await self._close_connections(slot)
                await self._stop_child(slot, child)
                self._let_go(slot)
            if hold is not None:
                await hold
            self._stopped(slot)
        except Exception as exc:  # noqa: BLE001 - logged with its trace; the stop still ends
            # Pages that could not be held, or any other step that raised: the process is
            # ended and the model stopped all the same. Left stopping, no request could
            # load it again, and every load that waited for its room failed.
            _log.error("model.stop.error", model=slot.preset.name, error=repr(exc), exc_info=exc)
            if hold is not None:
                [held] = await asyncio.gather(hold, return_exceptions=True)
                if isinstance(held, BaseException) and slot.pages is not None:
                    # Taken but not entered in the tier: locked, uncounted, for good.
                    self._drop_pages(slot, reason="stop_error")
            if child is not None and slot.child is child:
                await self._stop_child(slot, child)
                self._let_go(slot)
            self._stopped(slot)
        finally:
            slot.leaving_ram = False
            slot.stop_task = None
            self._notify()

    def _stopped(self, slot: Slot) -> None:
        """A stop has ended: the model is stopped, in the ram tier where its pages are held."""
        if slot.state is not State.STOPPING:
            return
        slot.move(State.STOPPING, State.STOPPED)
        if slot.pages is not None:
            # Its pages entered the ram tier while it still stopped (tier "device"),
            # when ram_ttl could not be armed: now it can.
            self._rearm_ram_ttl(slot)
            # Planned with the size read at its start: the file may have changed.
            self._spawn_task(self._fit_ram_budget(), "ram_budget")

    async def _drop_stale_pages(self, slot: Slot) -> None:
        """Let go of held pages whose file was deleted or replaced: a start would not read them.

        Held pages of a staged copy go too when the copy's source changed since it was made.
        """
        pages = slot.pages
        if pages is None:
            return
        copy = slot.staged_path
        why = await asyncio.to_thread(_pages_changed, slot, pages)
        outdated = None
        if why is None:
            outdated = await self._copy_outdated(slot)
            why = None if outdated is None else outdated.why
        if why is None or slot.pages is not pages:
            return
        _log.info("model.pages.stale", model=slot.preset.name, why=why)
        self._drop_pages(slot, reason="file_changed")
        if outdated is not None and slot.staged_path == copy:
            # Its next load copies the file as it is now: the model is in store.
            self._to_store(slot, reason=outdated.reason)

    async def _copy_outdated(self, slot: Slot) -> _Outdated | None:
        """Why the staged copy the slot uses is no copy of its file as it is now, or None.

        The copy itself is unchanged, but its source was replaced or rewritten since (a
        start stages the new file and reads that copy, not these pages), or the preset's
        ``sha256`` is not the copy's, as checked (a start refuses it: ``stage_failed``).
        """
        source, copy = slot.staged_source, slot.staged_path
        if self.staging is None or source is None or copy is None:
            return None
        found = await self._cached_copy(source)
        if found is None or str(found) != copy:
            return _Outdated("source_changed", f"{source} changed since it was copied to {copy}")
        recorded = self._digest_unlike(slot, found)
        if recorded is not None:
            return _Outdated(
                "sha256_changed",
                f"{copy} has sha256 {recorded}, the preset expects {slot.preset.sha256}",
            )
        return None

    def _digest_unlike(self, slot: Slot, copy: Path) -> str | None:
        """The checked digest of ``copy`` when the slot's preset expects another; else None."""
        assert self.staging is not None  # noqa: S101 - only asked with a cache
        return self.staging.digest_unlike(copy, slot.preset.sha256)

    async def _hold_pages(self, slot: Slot) -> None:
        """Lock the model's weight pages in RAM (the llama-server ram tier).

        Pages another preset of the same file holds are shared, not mapped and locked
        twice: counted once, with the model that took them (``ram_bytes`` 0 here).
        """
        model = slot.staged_path or str(slot.preset.model)
        shared = self._pages_held_at(slot)
        if shared is not None:
            stale = await asyncio.to_thread(_pages_changed, slot, shared)
            if stale is None and self._pages_held_at(slot) is shared:  # still held after
                slot.pages = shared
                slot.model_bytes = shared.size
                self._entered_ram(slot, 0)
                return
        try:
            pages = await asyncio.to_thread(WarmSet.open, model)
        except OSError as exc:
            _log.warning("model.pages.fail", model=slot.preset.name, error=str(exc))
            return
        slot.pages = pages
        slot.model_bytes = pages.size  # what the next plan costs it at
        if not pages.locked:
            _log.warning("model.pages.unlocked", model=slot.preset.name, note=pages.lock_error)
        self._entered_ram(slot, pages.size)

    def _drop_pages(self, slot: Slot, *, reason: str | None = None, after: float = 0.0) -> None:
        pages, slot.pages = slot.pages, None
        if pages is None:
            return
        self._used_copy(slot)
        if slot.staged_path is not None and slot.child is None:
            # Its staged copy is evictable now (ram_ttl, the ram budget): a copy waiting
            # for room in the cache tries again, as it does after a stop.
            self._notify()
        self._cancel_ram_ttl(slot)
        counted, slot.ram_bytes = slot.ram_bytes, 0
        if slot.child is None:
            slot.device = None
        if reason is not None:
            _log.info("model.tier", model=slot.preset.name, tier="disk", reason=reason)
        sharers = [s for s in self._every_slot() if s.pages is pages]
        if not sharers:
            self._spawn_task(_close_later(pages, after), f"unlock:{slot.preset.name}")
        elif counted:
            # Another preset of the file still holds them: it counts them from now.
            sharers[0].ram_bytes = counted
            sharers[0].changed()
        slot.changed()  # no move: the tier (or, while serving, the ram bytes) changed

    def _down_to_disk(self, slot: Slot, *, reason: str) -> None:
        if slot.asleep:
            self._begin_stop(slot, reason=reason)
        elif slot.pages is not None:
            self._drop_pages(slot, reason=reason)

    async def _demote(self, slot: Slot) -> None:
        """Move an idle ready model off the device (TTL): to the ram tier if it fits."""
        try:
            try:
                snap = await self._read_all()
            except Exception as exc:  # noqa: BLE001 - a reading that failed once (a driver hiccup)
                # Nothing else would arm the TTL again: the model would stay up for good.
                retry = min(slot.preset.ttl, _TTL_RETRY)
                _log.warning(
                    "model.ttl.retry", model=slot.preset.name, error=repr(exc), retry_s=retry
                )
                # Not over a TTL a request armed meanwhile (nor, as ever, for a pinned model).
                if not slot.busy and slot.ttl_timer is None:
                    self._arm_ttl(slot, after=retry)
                return
            if slot.state is not State.READY or slot.busy:
                return  # a request came in meanwhile
            resident = self._resident(slot, snap)
            if resident is None:
                return
            actions = policy.demotions([resident], self._ram_tier(snap))
            tasks = self._carry_out(actions, reason="ttl")
        finally:
            slot.demote_task = None
        await asyncio.gather(*(asyncio.shield(t) for t in tasks))
        await self._fit_ram_budget()

    async def _fit_ram_budget(self) -> None:
        """Send what the ram tier holds past its (lowered) budget down to disk."""
        snap = await self._read_all()
        self._carry_out(policy.ram_overflow(self._ram_tier(snap)), reason="ram_budget")

    async def _fit_max_running(self) -> None:
        """Take idle models off the device until at most ``max_running`` run (a reload).

        Counted: the models that stay. One already on its way down (stopping, going to
        sleep, draining to stop, retiring) is not: counted, each reload meanwhile (or a
        TTL, an unload, an eviction) would take another one down in its place. One that
        comes back (a restart) does so by a load, which ``max_running`` admits as any.
        """
        snap = await self._read_all()
        staying = [s for s in self.slots.values() if not _leaving(s)]
        residents = [r for s in staying if (r := self._resident(s, snap))]
        victims = policy.count_overflow(residents, self.limits.max_running)
        self._carry_out(policy.demotions(victims, self._ram_tier(snap)), reason="max_running")

    async def unload(self, name: str, *, force: bool = False) -> None:
        """Stop a model once its in-flight requests finish, down to disk (no warm pages).

        With ``force`` it stops at once: requests in flight are cut (502 backend_gone), and
        a load in progress is cancelled (its waiters get 503 ``unavailable``).
        """
        slot = self.slot_for(name)
        slot.unloaded_at = time.monotonic()
        load = slot.load_task
        if load is not None and not load.done():
            if force:
                # At once, even mid-start: the start is cancelled (its process group
                # stopped) and the requests waiting for it are answered 503.
                self._cut_loads.add(load)
                load.cancel()
                self._notify()  # its waiters are answered now, not once its stop is over
            await _outlast(load)
        await self._quiet(slot)
        if slot.state in (State.FAILED, State.BACKOFF) and slot.child is None:
            slot.move((State.FAILED, State.BACKOFF), State.STOPPED)
        if not force:
            # Whether it is ready or draining already (an earlier unload, a reload's
            # restart, a swap): what is in flight finishes first, as for a reload.
            await self._drain_and_stop(slot, "unload")
            self._notify()
            return
        if slot.state in (State.READY, State.DRAINING, State.ASLEEP):
            await asyncio.shield(self._begin_stop(slot, reason="unload"))
        elif slot.stop_task is not None:
            await asyncio.shield(slot.stop_task)
        self._drop_pages(slot, reason="unload")
        self._notify()

    async def unload_all(self, *, force: bool = False) -> None:
        """:meth:`unload` every model at once (pinned ones too: an operator asked).

        Each goes on to its end whatever another meets; the first failure is raised then.
        """

        async def one(name: str) -> None:
            with contextlib.suppress(UnknownModel):  # a reload removed it: it stops anyway
                await self.unload(name, force=force)

        ended = await asyncio.gather(*(one(n) for n in list(self.slots)), return_exceptions=True)
        failed = [e for e in ended if isinstance(e, BaseException)]
        if failed:
            raise failed[0]

    # ---------------------------------------------------------------- reload

    def reload(self, config: Config, plan: ReloadPlan) -> None:
        """Take a new config now; restarts and stops go on in tasks.

        Unchanged models keep their processes and in-place changes (TTL, aliases a
        kind does not pass, limits) apply at once. A changed launch restarts once
        its requests finish, and comes back if it was serving; a removed model
        stops once its requests finish, and new requests for it get 404.
        """
        old = self.slots
        if self.staging is not None and config.cache_budget != self.config.cache_budget:
            # Lowered: the copies past it that no model uses go at once, the others once
            # let go; raised: a copy waiting for room tries again.
            self.staging.resize(config.cache_budget)
            self._spawn_task(self._fit_cache(), "cache_budget")
            self._notify()
        self.config = config
        self.limits = policy.Limits(
            reserve=config.reserve, budget=config.budget, max_running=config.max_running
        )
        self.admission.limits = self.limits
        self.admission.default_memory = config.default_memory
        ram_budget = _ram_budget(config)  # a key taken out goes back to the default
        if ram_budget != self.ram_budget:
            self.ram_budget = ram_budget
            self._spawn_task(self._fit_ram_budget(), "ram_budget")
        slots = {p.name: old.get(p.name) or self._new_slot(p) for p in config.presets}
        self.slots = slots  # from here on, a removed name is unknown
        if config.max_running is not None:
            self._spawn_task(self._fit_max_running(), "max_running")  # lowered: idle ones go
        for preset in plan.in_place:
            before = slots[preset.name].preset
            self._apply_in_place(slots[preset.name], preset)
            if preset.preload and not before.preload:
                # Turned on: loaded now, as an added preset with preload: true is.
                self._spawn_task(self._preload_one(slots[preset.name]), "preload")
        for preset in plan.restarted:
            self._restart_later(slots[preset.name], preset)
        for name in plan.removed:
            self.changes.removed(name)
            self._retiring.append(old[name])
            self._spawn_task(self._retire(old[name]), f"retire:{name}")
        self.metrics.forget(plan.removed)
        for preset in plan.added:
            slots[preset.name].changed()  # the feed shows it (stopped), as status does
            self._spawn_task(self._after_reload(slots[preset.name], start=preset.preload), "add")
        self._stop_unwanted_copies()
        self._notify()

    def _stop_unwanted_copies(self) -> None:
        """After a reload: stop the copies that no model stages any more (nor waits on).

        A model that never fit may fit now (a new ``memory``, ``reserve``, ``budget``).
        """
        for slot in self.slots.values():
            slot.never_fits = False
        if self.staging is not None:
            self.staging.stop_unwanted()

    def _apply_in_place(self, slot: Slot, preset: Preset) -> None:
        old, slot.preset = slot.preset, preset
        slot.failures = 0  # a changed preset deserves fresh tries (a start_timeout raised)
        if slot.state is State.BACKOFF:
            slot.move(State.BACKOFF, State.FAILED)  # the next request starts it at once
            self._notify()
        idle = slot.state is State.READY and slot.in_flight == 0
        if idle and (preset.ttl != old.ttl or preset.pin != old.pin):
            self._arm_ttl(slot)  # the new ttl (or pin), counted from now; others keep the clock
        if preset.ram_ttl != old.ram_ttl and slot.tier == "ram":
            slot.ram_since = time.monotonic()  # as for ttl: counted from the reload
            self._rearm_ram_ttl(slot)  # armed, changed or cleared
        live = slot.liveness_task is not None and not slot.liveness_task.done()
        if (
            live
            and slot.child is not None
            and slot.state is not State.FAILED  # _kill_frozen is ending it: not cut short
            and _probing(preset) != _probing(old)
        ):
            self._probe_liveness(slot, slot.child)  # the old probe sleeps out the old interval
        _log.info("model.reload", model=preset.name, change="in_place")

    def _restart_later(self, slot: Slot, preset: Preset) -> None:
        name = preset.name
        before = self._restarts.get(name)
        task = self._spawn_task(self._restart(slot, preset, before), f"restart:{name}")
        self._restarts[name] = task
        task.add_done_callback(
            lambda t: self._restarts.pop(name) if self._restarts.get(name) is t else None
        )

    async def _settle(self, slot: Slot) -> None:
        """Wait until no load, stop, demotion or sleep of ``slot`` is under way."""
        while True:
            load = slot.load_task
            busy = [t for t in (slot.stop_task, slot.demote_task, slot.sleep_task) if t]
            if load is not None and not load.done():
                busy.append(load)
            if not busy:
                return
            await _outlast(busy[0])

    async def _quiet(self, slot: Slot) -> None:
        """Wait out what an unload cannot cut short: a demotion, a sleep, a dead group's reaping.

        Each ends in a state the unload then stops from (asleep, failed, stopped); acted on
        in the middle, the unload would answer while the model went on to sleep, or to back
        off as if it had failed.
        """
        while True:
            if slot.demote_task is not None:
                await _outlast(slot.demote_task)
            elif slot.sleep_task is not None:
                await _outlast(slot.sleep_task)
            elif self._reaping(slot):
                await self._changed.wait()
            else:
                return

    async def _drain_and_stop(self, slot: Slot, reason: str) -> None:
        """Let requests in flight finish (no new leases), then stop down to disk."""
        while True:
            await self._quiet(slot)
            if slot.state is State.READY and slot.in_flight > 0:
                slot.move(State.READY, State.DRAINING)
                self._cancel_ttl(slot)
            if slot.state is State.DRAINING:
                slot.swap_drain = None  # ours now: no admission may hand it back
                if slot.in_flight > 0:
                    await self._changed.wait()
                    continue
            if slot.state in (State.READY, State.DRAINING, State.ASLEEP):
                await asyncio.shield(self._begin_stop(slot, reason=reason))
                continue
            if slot.stop_task is not None:
                await asyncio.shield(slot.stop_task)
                continue
            break
        if slot.state in (State.FAILED, State.BACKOFF) and slot.child is None:
            slot.move((State.FAILED, State.BACKOFF), State.STOPPED)
        self._drop_pages(slot, reason=reason)

    async def _restart(self, slot: Slot, preset: Preset, before: asyncio.Task[None] | None) -> None:
        """Move ``slot`` to a new launch: drain, stop, swap the preset, start if it served."""
        if before is not None:
            await asyncio.gather(asyncio.shield(before), return_exceptions=True)
        await self._settle(slot)
        latest = self.config.preset(preset.name)  # a later reload may have changed it again
        if latest is None or self._removed(slot):
            self._served.pop(preset.name, None)
            return  # removed meanwhile: its retirement stops it
        preset = latest
        # Also when a restart this one replaced stopped it (and started nothing): it served.
        served = self._served.pop(preset.name, None)
        # Draining to stop, for no swap: an unload's drain, as much the user's last word
        # as an unload asked for during ours (it stays down, and says so).
        unloading = slot.state is State.DRAINING and _leaving(slot)
        # Draining for a swap is no serving to restore: it makes room for another model,
        # whose load a start here would race; requests queued for this one load it in turn.
        serving = slot.state is State.READY or unloading or served is not None
        # No new lease goes to the old process from here: it drains (or stops) first.
        slot.preset, slot.kind = preset, kind_of(preset)
        slot.failures = 0  # a changed preset deserves fresh tries
        self.admission.forget(preset.name)
        slot.model_bytes, slot.model_id, slot.model_in_memory = 0, None, None
        slot.start_times.clear()  # another file or other flags: its starts are timed anew
        _log.info("model.reload", model=preset.name, change="restart", serving=serving)
        # An unload from here on keeps it down; also one during a restart this one replaced.
        began = time.monotonic() if served is None else served
        await self._drain_and_stop(slot, "reload")
        if self._restarts.get(preset.name) is not asyncio.current_task():
            # A later reload changed it again meanwhile: its restart starts the newest
            # launch, not this one, and knows that the model served, and since when.
            if serving and not unloading:
                self._served[preset.name] = began
            return
        start = serving or preset.preload
        if start and (unloading or slot.unloaded_at >= began):
            # An unload asked for meanwhile is the user's last word: it stays down.
            _log.info("model.reload.stay_down", model=preset.name, reason="unloaded")
            start = False
        await self._after_reload(slot, start=start)

    async def _after_reload(self, slot: Slot, *, start: bool) -> None:
        self._prefetch([slot.preset])
        await self._find_staged(slot)
        if start and (error := await self._load_for_reload(slot)) is not None:
            _log.error("model.reload.fail", model=slot.preset.name, error=error)

    async def _preload_one(self, slot: Slot) -> None:
        if (error := await self._load_for_reload(slot)) is not None:
            _log.error("model.preload.fail", model=slot.preset.name, error=error)

    async def _load_for_reload(self, slot: Slot) -> str | None:
        """Load a model preloaded, or one a reload restarted or added; why not, if it failed.

        A removal, a forced unload or a shutdown that cuts the load short is the user's
        last word, not a failure: the model stays down (``model.reload.stay_down``).
        """
        if self._closing or self._removed(slot):
            return None
        asked = time.monotonic()
        try:
            await self.load(slot.preset.name)
        except RequestError as exc:
            if self._closing:
                return None
            if self._removed(slot) or slot.unloaded_at >= asked:
                reason = "removed" if self._removed(slot) else "unloaded"
                _log.info("model.reload.stay_down", model=slot.preset.name, reason=reason)
                return None
            return exc.message
        return None

    async def _retire(self, slot: Slot) -> None:
        """A removed model: finish what it serves, then stop it for good."""
        _log.info("model.reload", model=slot.preset.name, change="removed")
        try:
            load = slot.load_task
            if load is not None and not load.done():
                # Nobody is left for it to serve: its waiters get 404, and it evicts nothing.
                load.cancel()
                self._notify()
                await _outlast(load)
            await self._settle(slot)
            await self._drain_and_stop(slot, "removed")
            self._cancel_ttl(slot)
            self._cancel_ram_ttl(slot)
        finally:
            self._retiring.remove(slot)

    async def begin_shutdown(self) -> None:
        """Take no new work: loads in progress are cancelled and their waiters get 503.

        Requests already at a backend go on (the drain); :meth:`close` stops the rest.
        """
        self._closing = True
        for slot in self.slots.values():
            self._cancel_load(slot)
        self._notify()
        _log.info("swapd.drain", in_flight=sum(s.in_flight for s in self.slots.values()))

    def kill_all(self) -> None:
        """SIGKILL every backend's group and cgroup now: shutdown is not to wait for them.

        The stops under way then end at once, and so do the requests still at a backend.
        """
        for slot in self._every_slot():
            child = slot.child
            if child is not None:
                child.kill_group()
                if child.cgroup is not None:
                    kill_members(child.cgroup)

    @staticmethod
    def _cancel_load(slot: Slot) -> None:
        """Cancel a load in progress, unless it is being cancelled already.

        A cut start is stopping its group (SIGTERM, then stop_timeout): a second
        cancellation would make Child.stop SIGKILL it at once, mid-cleanup.
        """
        load = slot.load_task
        if load is not None and not load.done() and not load.cancelling():
            load.cancel()

    @staticmethod
    async def _settle_moves(slot: Slot) -> None:
        """Let its demotion, stop or sleep under way end, a sleep within the stop's grace.

        A frozen backend never answers its /sleep (the call waits 120 s); the stop that
        follows ends it anyway.
        """
        busy = [t for t in (slot.demote_task, slot.stop_task, slot.sleep_task) if t is not None]
        if busy:
            await asyncio.wait(busy, timeout=slot.preset.stop_timeout)
        if slot.sleep_task is not None:
            slot.sleep_task.cancel()
        await asyncio.gather(*busy, return_exceptions=True)

    async def close(self) -> None:
        """Stop every backend and release every held page (shutdown).

        Models a reload removed and that still drain are stopped too, as the rest: left to
        the reaper, they would get SIGKILL with no grace.
        """
        self._closing = True
        everyone = self._every_slot()
        for slot in everyone:
            self._cancel_ttl(slot)
            self._cancel_ram_ttl(slot)
            self._cancel_load(slot)
        # Each model on its own: one slow to stop (a cut start, a stop under way) holds
        # back no other's stop, so the shutdown takes the longest stop_timeout, not a sum.
        shuts = [
            self._spawn_task(self._shut_down(slot), f"shutdown:{slot.preset.name}")
            for slot in everyone
        ]
        await asyncio.gather(*shuts, return_exceptions=True)
        for slot in everyone:
            pages, slot.pages = slot.pages, None
            if pages is not None:
                pages.close()
        if self.staging is not None:
            await self.staging.aclose()

    async def _shut_down(self, slot: Slot) -> None:
        """Let its cut load and its move under way end, then stop its backend.

        A sleep under way ends (ASLEEP, or FAILED) before the stop: stopped in the middle
        of it, its record and state would be left to the sleep's own ending.
        """
        if slot.load_task is not None:
            await asyncio.gather(slot.load_task, return_exceptions=True)
        await self._settle_moves(slot)
        if slot.child is None:
            return
        if slot.state in (State.READY, State.DRAINING, State.ASLEEP):
            await _outlast(self._begin_stop(slot, reason="shutdown"))  # its task logs its error
        else:
            await slot.child.stop(slot.preset.stop_timeout)

    async def preload(self) -> None:
        """Load the presets marked ``preload: true``, one after another.

        A reload meanwhile may remove one, or an unload cut its start: no failure, as for
        a preload a reload turned on.
        """
        for slot in self.slots.values():
            if slot.preset.preload:
                await self._preload_one(slot)


async def _outlast(task: asyncio.Task[Any]) -> None:
    """Wait for ``task`` to end, however it ends: its error or cancellation is not ours.

    Awaiting a shield of it instead passes on its cancellation (a forced unload, a
    shutdown) as if the waiter itself had been cancelled.
    """
    await asyncio.wait([task])


def _known(source: str | Path) -> bool:
    """Whether ``source`` can be told apart from its copy: it answers a stat, or is gone."""
    try:
        Path(source).stat()
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return True


def _file_facts(slot: Slot, model: Path, read: str | Path) -> tuple[int, FileId | None, str | None]:
    """Weight bytes, the file a start reads and its in-memory filesystem; blocks (stats).

    ``read`` is the model or its staged copy. One thread hop for the three, at each start.
    """
    return slot.kind.weight_bytes(slot.preset, model), file_id(read), memory_fs(read)


def _pages_changed(slot: Slot, pages: WarmSet) -> str | None:
    """Why ``pages`` are not what the slot's next start reads, or None; blocks (stats).

    A hold shared under another name (a link) is checked under the slot's name too: the
    link may point elsewhere now.
    """
    why = pages.changed()
    model = slot.staged_path or str(slot.preset.model)
    if why is None and model != str(pages.path) and file_id(model) != pages.file_id:
        why = f"{model} is no longer the file whose pages are held ({pages.path})"
    return why


def _ram_budget(config: Config) -> int:
    """The ram tier's budget: ``ram_budget``, or half of host RAM when the key is absent."""
    return config.ram_budget if config.ram_budget is not None else host_memory()[0] // 2
