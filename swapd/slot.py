"""One model's live state, owned by the manager, and the frozen view everyone else reads."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from swapd import states
from swapd.errors import BackendStartError, RequestError
from swapd.ringlog import RingLog
from swapd.states import State

if TYPE_CHECKING:
    from pathlib import Path

    from swapd.backends import BackendKind, Launch, Tier
    from swapd.needs import Need
    from swapd.pages import FileId, WarmSet
    from swapd.presets import Preset
    from swapd.probe import Device, DeviceKind
    from swapd.process import Child


@dataclass
class Slot:
    """Mutable state of one model; only the manager writes it."""

    preset: Preset
    kind: BackendKind
    state: State = State.STOPPED
    since: float = field(default_factory=time.time)
    last_used: float = 0.0  # monotonic; 0 = never
    in_flight: int = 0
    waiters: int = 0
    child: Child | None = None
    launch: Launch | None = None
    device: Device | None = None
    need: Need | None = None
    measured: int | None = None  # device bytes of the process tree, last measured
    # What its process kept on its GPU once asleep (vLLM: its CUDA context), as read then.
    kept_on_device: int = 0
    memory_source: str | None = None  # where per-process numbers came from (probe source)
    last_error: RequestError | None = None
    load_task: asyncio.Task[None] | None = None
    stop_task: asyncio.Task[None] | None = None
    demote_task: asyncio.Task[None] | None = None
    sleep_task: asyncio.Task[None] | None = None
    liveness_task: asyncio.Task[None] | None = None  # probes the serving process's health
    ttl_timer: asyncio.TimerHandle | None = None
    ram_timer: asyncio.TimerHandle | None = None
    ring: RingLog = field(default_factory=RingLog)
    # The ram tier: a sleeping process (sleep_level > 0), or the model's pages held.
    sleep_level: int = 0  # the level this launch was started with; 0: no sleep mode
    sleep_note: str | None = None  # why sleep mode is off, when the backend refused it
    # Started with --enable-sleep-mode: its sleep frees memory (level 2 discards weights).
    # Without it (refused) a sleep only pauses the engine and keeps everything.
    sleep_mode: bool = False
    pages: WarmSet | None = None
    ram_bytes: int = 0  # host RAM the model holds in the ram tier
    ram_since: float = 0.0
    escaped: bool = False  # its last process left a helper outside its group (setsid)
    # LRFU: requests weighed by age (policy.crf_update); kept across stops, for eviction order.
    crf: float = 0.0
    crf_at: float = 0.0
    # How long its last start from disk took, spawn to ready, on each kind of device (a model
    # allowed on a GPU and on the CPU starts at two speeds). Kept across stops, not across a
    # restart that changed its launch: what losing it costs each request that comes back
    # for it, for eviction order and holds.
    start_times: dict[DeviceKind, float] = field(default_factory=dict)
    started_on: DeviceKind | None = None  # the kind of device its last start was on
    model_bytes: int = 0  # its weights' size as its last start (or pages held) found it
    # The file its last start read, whatever the name: another preset's hold of it (through
    # a link) is the same pages.
    model_id: FileId | None = None
    # "tmpfs" or "ramfs" when that file lives in RAM already: no ram tier for its pages.
    model_in_memory: str | None = None
    # The admission that drained it (DRAINING) so that a request waiting past max_wait can
    # swap in; None: no such drain.
    swap_drain: object | None = None
    hold: str | None = None  # why its admissible load is held (policy.hold), while it is
    # Failed starts in a row, a crash soon after ready counting as one; cleared once a
    # start has stayed up STABLE_AFTER (manager).
    failures: int = 0
    ready_at: float = 0.0  # monotonic; when its backend last became ready
    answered_at: float = 0.0  # monotonic; its last answered liveness probe (or ready)
    retry_at: float = 0.0  # monotonic; when a backoff ends
    staged_path: str | None = None
    staged_source: Path | None = None  # the source staged_path is a copy of (a reload may
    # point the preset elsewhere while the old process still runs on this copy)
    staging: tuple[int, int] | None = None  # bytes done, total, while copying (or hashing)
    # Its last load found that no device could ever hold it (NeverFits): a copy of its
    # model is made for it no more. Cleared by its next load and by a reload.
    never_fits: bool = False
    staging_wait: str | None = None  # why the copy waits for room in the cache
    unloaded_at: float = 0.0  # monotonic; the last unload asked for (a restart keeps it down)
    leaving_ram: bool = False  # STOPPING from ASLEEP: its weights are in host RAM, not on a device
    # Told of every move (the manager's change feed: /swapd/events, systemd's STATUS line).
    observer: Callable[[Slot], None] | None = field(default=None, repr=False, compare=False)

    def move(self, expected: State | tuple[State, ...], new: State) -> None:
        """Change state along an edge of :data:`swapd.states.EDGES`, and remember when."""
        states.check(self.state, expected, new)
        self.state = new
        self.since = time.time()
        self.changed()

    def changed(self) -> None:
        """Tell the observer of a move, or of a change it shows without one (a pid gone)."""
        if self.observer is not None:
            self.observer(self)

    @property
    def busy(self) -> bool:
        """Not evictable now: serving, awaited, or in a transition.

        A model drained for a waiting swap (``max_wait``) is evictable as soon as its
        last request ends, however many requests queue for it meanwhile.
        """
        if self.state is State.DRAINING and self.swap_drain is not None:
            return self.in_flight > 0
        return self.in_flight > 0 or self.waiters > 0 or self.state in states.IN_TRANSITION

    @property
    def reload_s(self) -> float | None:
        """Its start time from disk on the kind of device it is on, or was last on."""
        kind = self.device.kind if self.device is not None else self.started_on
        return None if kind is None else self.start_times.get(kind)

    @property
    def draining(self) -> bool:
        """Waiting for in-flight requests before a stop."""
        return self.state is State.DRAINING

    @property
    def asleep(self) -> bool:
        """In the ram tier with its process alive."""
        return self.state is State.ASLEEP

    @property
    def tier(self) -> Tier:
        """Where the weights are now (see the README's tier table)."""
        if self.state in states.ON_DEVICE and not self.leaving_ram:
            return "device"
        if self.state is State.ASLEEP or self.pages is not None:
            return "ram"
        if self.state is State.QUEUED and self.child is not None:
            return "ram"  # a wake that waits for room: the process still sleeps
        if self.preset.stage and self.staged_path is None:
            return "store"
        return "disk"


@dataclass(frozen=True)
class ModelView:
    """A frozen snapshot of one model, for the app, the CLI and metrics."""

    name: str
    aliases: tuple[str, ...]
    backend: str
    state: str
    tier: str
    pid: int | None
    port: int | None
    device: str | None
    since: float
    last_used: float | None  # wall clock
    in_flight: int
    waiting: int
    ttl: float
    ttl_left: float | None  # seconds until the TTL moves it down a tier; None: not armed
    ram_ttl: float
    pin: bool
    need: int | None
    need_source: str | None
    estimate: int | None
    measured: int | None
    memory_source: str | None
    ram_bytes: int
    pages_locked: bool | None
    pages_note: str | None
    sleep_level: int
    sleep_note: str | None
    staging: tuple[int, int] | None
    staging_wait: str | None
    hold: str | None
    error: str | None
    exit_code: int | None
    failures: int
    retry_at: float | None  # wall clock
    escaped: bool
    # For the model list only (GET /v1/models), not in /swapd/status.
    description: str | None = None
    metadata: Mapping[str, Any] | None = None
    unlisted: bool = False

    def as_json(self) -> dict[str, Any]:
        """The model's entry in ``/swapd/status``."""
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "backend": self.backend,
            "state": self.state,
            "tier": self.tier,
            "pid": self.pid,
            "port": self.port,
            "device": self.device,
            "since": self.since,
            "last_used": self.last_used,
            "in_flight": self.in_flight,
            "waiting": self.waiting,
            "ttl": self.ttl,
            "ttl_left": self.ttl_left,
            "ram_ttl": self.ram_ttl,
            "pin": self.pin,
            "memory": {
                "need": self.need,
                "need_source": self.need_source,
                "estimate": self.estimate,
                "measured": self.measured,
                "source": self.memory_source,
                "ram": self.ram_bytes,
            },
            "pages": (
                None
                if self.pages_locked is None
                else {"locked": self.pages_locked, "note": self.pages_note}
            ),
            "sleep": {"level": self.sleep_level, "note": self.sleep_note},
            "staging": (
                None
                if self.staging is None
                else {
                    "done": self.staging[0],
                    "total": self.staging[1],
                    "waiting": self.staging_wait,
                }
            ),
            "hold": self.hold,
            "error": self.error,
            "exit_code": self.exit_code,
            "failures": self.failures,
            "retry_at": self.retry_at,
            "escaped": self.escaped,
        }


def snapshot(slot: Slot) -> ModelView:
    """Freeze what a reader may see of ``slot``."""
    now_mono, now = time.monotonic(), time.time()
    error = slot.last_error
    return ModelView(
        name=slot.preset.name,
        aliases=slot.preset.aliases,
        backend=slot.kind.name,
        state=slot.state.value,
        tier=slot.tier,
        pid=slot.child.pid if slot.child else None,
        port=slot.launch.port if slot.launch else None,
        device=slot.device.id if slot.device else None,
        since=slot.since,
        last_used=now - (now_mono - slot.last_used) if slot.last_used else None,
        in_flight=slot.in_flight,
        waiting=slot.waiters,
        ttl=slot.preset.ttl,
        ttl_left=_left(slot.ttl_timer),
        ram_ttl=slot.preset.ram_ttl,
        pin=slot.preset.pin,
        need=slot.need.bytes if slot.need else None,
        need_source=slot.need.source if slot.need else None,
        estimate=slot.need.estimate if slot.need else None,
        measured=slot.measured,
        memory_source=slot.memory_source,
        ram_bytes=slot.ram_bytes,
        pages_locked=slot.pages.locked if slot.pages else None,
        pages_note=slot.pages.lock_error if slot.pages else None,
        sleep_level=slot.sleep_level,
        sleep_note=slot.sleep_note,
        staging=slot.staging,
        staging_wait=slot.staging_wait,
        hold=slot.hold,
        error=error.message if error else None,
        exit_code=error.exit_code if isinstance(error, BackendStartError) else None,
        failures=slot.failures,
        escaped=slot.escaped,
        retry_at=(now + (slot.retry_at - now_mono) if slot.state is State.BACKOFF else None),
        description=slot.preset.description,
        metadata=slot.preset.metadata,
        unlisted=slot.preset.unlisted,
    )


def _left(timer: asyncio.TimerHandle | None) -> float | None:
    """Seconds until ``timer`` fires (loop time), or None when none is armed."""
    if timer is None or timer.cancelled():
        return None
    return round(max(0.0, timer.when() - asyncio.get_running_loop().time()), 3)
