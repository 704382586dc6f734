r"""The one owner of model state: loads, leases, swaps, TTL stops.

Request handlers never read a model's state and act on it; they ask for a
lease (:meth:`Manager.acquire`) and get a ready upstream URL or a typed error.
A load is a task owned by the manager, so a client that disconnects cannot
cancel a load that others wait for. State moves only here::

    STOPPED -> QUEUED -> STARTING -> READY -> STOPPING -> STOPPED
                  \\          \\          \\-> FAILED (backend exited by itself)
                   \\          \\-> FAILED (exit or timeout while starting)
                    \\-> FAILED (no room: InsufficientMemory, QueueTimeout)
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from swapd import policy
from swapd.backends import BinaryNotFound, Launch, Placement, build_launch, free_port
from swapd.config import Config
from swapd.errors import (
    BackendStartError,
    InsufficientMemory,
    QueueTimeout,
    RequestError,
    Unavailable,
    UnknownModel,
    describe_exit,
)
from swapd.footprints import Footprints
from swapd.logs import get_logger
from swapd.needs import Need, estimate_bytes, memory_need
from swapd.pidfiles import PidRecords
from swapd.presets import Preset
from swapd.probe import Device, Probe, Reading
from swapd.process import Child
from swapd.ringlog import RingLog
from swapd.upstream import UpstreamPool

_log = get_logger("swapd.manager")
# How often to re-read memory while waiting for a stopped backend's memory to come back.
_RELEASE_POLL = 0.05
# How long after ready a backend's memory is measured.
_MEASURE_DELAY = 1.0


class State(enum.Enum):
    """Where a model is in its life."""

    STOPPED = "stopped"
    QUEUED = "queued"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


@dataclass
class Slot:
    """Mutable state of one model; only the manager writes it."""

    preset: Preset
    state: State = State.STOPPED
    since: float = field(default_factory=time.time)
    last_used: float = 0.0  # monotonic; 0 = never
    in_flight: int = 0
    waiters: int = 0
    draining: bool = False
    child: Child | None = None
    launch: Launch | None = None
    device: Device | None = None
    need: Need | None = None
    measured: int | None = None
    last_error: RequestError | None = None
    load_task: asyncio.Task[None] | None = None
    stop_task: asyncio.Task[None] | None = None
    ttl_timer: asyncio.TimerHandle | None = None
    ring: RingLog = field(default_factory=RingLog)

    def move(self, state: State) -> None:
        """Change state and remember when."""
        self.state = state
        self.since = time.time()

    @property
    def busy(self) -> bool:
        """Not evictable now: serving, awaited, or in a transition."""
        return (
            self.in_flight > 0
            or self.waiters > 0
            or self.state in (State.QUEUED, State.STARTING, State.STOPPING)
        )

    @property
    def holds_memory(self) -> bool:
        """Whether a process of this model exists (so it counts against memory)."""
        return self.state in (State.STARTING, State.READY, State.STOPPING)


@dataclass(frozen=True)
class Lease:
    """Permission to send one request to a ready backend."""

    model: str
    host: str
    port: int
    slot: Slot


class Manager:
    """Owns every model's slot, the admission lock and the child processes."""

    def __init__(
        self,
        config: Config,
        probe: Probe,
        pool: UpstreamPool,
        *,
        on_group: Callable[[str, int], None] = lambda _e, _p: None,
    ) -> None:
        self.config = config
        self.probe = probe
        self.pool = pool
        self._on_group = on_group
        self.slots = {p.name: Slot(p) for p in config.presets}
        self.records = PidRecords(config.state_dir)
        self.footprints = Footprints(config.state_dir)
        self._admission = asyncio.Lock()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._estimates: dict[tuple[str, str], int | None] = {}
        self.limits = policy.Limits(
            reserve=config.reserve, budget=config.budget, max_running=config.max_running
        )

    # ---------------------------------------------------------------- lookups

    def slot_for(self, name: str) -> Slot:
        """The slot a model name or alias refers to."""
        preset = self.config.preset(name)
        if preset is None:
            raise UnknownModel(name, sorted(self.slots))
        return self.slots[preset.name]

    def _spawn_task(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)  # keep a strong reference until it finishes
        task.add_done_callback(self._tasks.discard)
        # A load's error reaches its waiters; when every waiter has gone, it is logged
        # already, so mark it retrieved rather than have asyncio complain at collection.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    def _notify(self) -> None:
        # Wake everyone waiting for "something changed", then arm a fresh event.
        self._changed.set()
        self._changed = asyncio.Event()

    # ---------------------------------------------------------------- leases

    async def acquire(self, name: str) -> Lease:
        """Wait until the model is ready and count one request in flight on it."""
        slot = self.slot_for(name)
        slot.waiters += 1
        try:
            while True:
                if self._closing:
                    raise Unavailable("swapd is shutting down")
                if slot.state is State.READY and not slot.draining:
                    assert slot.launch is not None  # noqa: S101 - READY implies launched
                    slot.in_flight += 1
                    slot.last_used = time.monotonic()
                    self._cancel_ttl(slot)
                    return Lease(slot.preset.name, slot.launch.host, slot.launch.port, slot)
                if slot.stop_task is not None:
                    await asyncio.shield(slot.stop_task)
                    continue
                if slot.draining:
                    await self._changed.wait()
                    continue
                await asyncio.shield(self._ensure_loading(slot))
        finally:
            slot.waiters -= 1

    def release(self, lease: Lease) -> None:
        """End a request; arm the TTL when the model falls idle."""
        slot = lease.slot
        slot.in_flight -= 1
        slot.last_used = time.monotonic()
        if slot.in_flight == 0:
            self._arm_ttl(slot)
            self._notify()

    @contextlib.asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[Lease]:
        """``async with manager.lease(model) as lease:`` -- acquire and always release."""
        held = await self.acquire(name)
        try:
            yield held
        finally:
            self.release(held)

    # ---------------------------------------------------------------- TTL

    def _cancel_ttl(self, slot: Slot) -> None:
        if slot.ttl_timer is not None:
            slot.ttl_timer.cancel()
            slot.ttl_timer = None

    def _arm_ttl(self, slot: Slot) -> None:
        self._cancel_ttl(slot)
        ttl = slot.preset.ttl
        if ttl > 0 and slot.state is State.READY and not slot.preset.pin:
            loop = asyncio.get_running_loop()
            slot.ttl_timer = loop.call_later(ttl, self._ttl_expired, slot)

    def _ttl_expired(self, slot: Slot) -> None:
        slot.ttl_timer = None
        if slot.state is State.READY and not slot.busy:
            _log.info("model.ttl.expire", model=slot.preset.name, ttl_s=slot.preset.ttl)
            self._begin_stop(slot, reason="ttl")

    # ---------------------------------------------------------------- loading

    def _ensure_loading(self, slot: Slot) -> asyncio.Task[None]:
        if slot.load_task is None or slot.load_task.done():
            slot.move(State.QUEUED)
            slot.last_error = None
            slot.load_task = self._spawn_task(self._load(slot), f"load:{slot.preset.name}")
        return slot.load_task

    async def load(self, name: str) -> None:
        """Make a model ready without sending it a request (``/swapd/models/{name}/load``)."""
        slot = self.slot_for(name)
        while slot.state is not State.READY:
            if slot.stop_task is not None:
                await asyncio.shield(slot.stop_task)
                continue
            await asyncio.shield(self._ensure_loading(slot))
        slot.last_used = slot.last_used or time.monotonic()
        if slot.in_flight == 0:
            self._arm_ttl(slot)

    async def _load(self, slot: Slot) -> None:
        name = slot.preset.name
        started = time.monotonic()
        try:
            async with self._admission:
                device, total = await self._admit(slot)
                await self._start(slot, device, total)
        except RequestError as exc:
            slot.last_error = exc
            if slot.state is not State.STOPPED:
                slot.move(State.FAILED)
            code = exc.exit_code if isinstance(exc, BackendStartError) else None
            _log.warning("model.load.fail", model=name, error=exc.message, code=code)
            raise
        finally:
            self._notify()
        _log.info("model.load.done", model=name, load_s=round(time.monotonic() - started, 3))

    async def read_memory(self) -> list[Reading]:
        """One probe reading of every device, including our children's share (in a thread)."""
        pids = [s.child.pid for s in self.slots.values() if s.child and s.child.pid]
        return await asyncio.to_thread(self.probe.read, [p for p in pids if p is not None])

    def _residents(self, readings: list[Reading], exclude: Slot) -> list[policy.Resident]:
        by_pid: dict[int, int] = {}
        for reading in readings:
            for pid, nbytes in reading.by_pid.items():
                by_pid[pid] = by_pid.get(pid, 0) + nbytes
        residents = []
        for slot in self.slots.values():
            if slot is exclude or not slot.holds_memory or slot.device is None:
                continue
            pid = slot.child.pid if slot.child and slot.child.pid else 0
            usage = by_pid.get(pid, 0)
            # A child still growing may show less than it will use: count the larger.
            usage = max(usage, slot.need.bytes if slot.need else 0)
            residents.append(
                policy.Resident(
                    name=slot.preset.name,
                    device=slot.device.id,
                    usage=usage,
                    last_used=slot.last_used,
                    busy=slot.busy,
                    pinned=slot.preset.pin,
                )
            )
        return residents

    def _candidates(self, preset: Preset) -> list[Device]:
        devices = list(self.probe.devices)
        if preset.devices is not None:
            wanted = set(preset.devices)
            devices = [d for d in devices if d.index in wanted]
        return devices

    async def _admit(self, slot: Slot) -> tuple[Device, int]:
        """Plan, evict, and wait until the model fits; return the device and its total memory."""
        preset = slot.preset
        candidates = self._candidates(preset)
        if not candidates:
            raise InsufficientMemory(f"none of the devices {preset.devices} is available")
        deadline = time.monotonic() + self.config.queue_timeout
        while True:
            readings = {r.device: r for r in await self.read_memory()}
            views, needs = [], {}
            for device in candidates:
                reading = readings.get(device.id)
                if reading is None:
                    continue
                key = (preset.name, device.id)
                if key not in self._estimates:
                    # Reading GGUF metadata is file I/O: once per model and device, in a thread.
                    self._estimates[key] = await asyncio.to_thread(
                        estimate_bytes, preset, device, reading.total
                    )
                needs[device.id] = memory_need(
                    preset, device, self._estimates[key], self.footprints
                )
                # The policy takes one need; devices differ only by kind, so each view is
                # planned with its own need below when they differ.
                views.append(policy.DeviceView(device.id, reading.total, reading.free))
            residents = self._residents(list(readings.values()), exclude=slot)
            plan = _best_plan(needs, views, residents, self.limits)
            if isinstance(plan, policy.Impossible):
                raise InsufficientMemory(f"cannot load {preset.name!r}: {plan.reason}")
            if isinstance(plan, policy.Admit):
                slot.need = needs[plan.device]
                device = next(d for d in candidates if d.id == plan.device)
                if plan.victims:
                    await self._evict(plan.victims, device, slot.need.bytes)
                    continue  # re-plan on fresh readings: the release may be partial
                return device, readings[device.id].total
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QueueTimeout(
                    f"cannot load {preset.name!r}: waited {self.config.queue_timeout:g}s for "
                    f"busy models to finish: {', '.join(plan.busy)}",
                    retry_after=self.config.queue_timeout / 4,
                )
            _log.info("model.load.wait", model=preset.name, busy=list(plan.busy))
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    async def _evict(self, victims: tuple[str, ...], device: Device, need: int) -> None:
        _log.info("model.evict", victims=list(victims), device=device.id)
        stops = [self._begin_stop(self.slots[v], reason="evict") for v in victims]
        await asyncio.gather(*(asyncio.shield(t) for t in stops))
        # Drivers release memory asynchronously: wait, bounded, until the room is really there.
        deadline = time.monotonic() + self.config.release_timeout
        while time.monotonic() < deadline:
            reading = next((r for r in await self.read_memory() if r.device == device.id), None)
            if reading is None or reading.free - self.limits.reserve >= need:
                return
            await asyncio.sleep(_RELEASE_POLL)

    async def _start(self, slot: Slot, device: Device, total: int) -> None:
        preset = slot.preset
        slot.device = device
        assert slot.need is not None  # noqa: S101 - _admit sets it
        fraction = None
        if device.kind != "cpu" and total:
            fraction = min(0.95, slot.need.bytes / total) if slot.need.bytes else None
        port = free_port()
        try:
            # PATH lookups and, once per binary, `llama-server --help`: off the event loop.
            launch = await asyncio.to_thread(
                build_launch,
                preset,
                port,
                Placement(
                    on_gpu=device.kind != "cpu",
                    gpu_fraction=fraction,
                    device_env=device.visible_env,
                ),
            )
        except BinaryNotFound as exc:
            slot.move(State.FAILED)
            raise BackendStartError(
                preset.name, None, [], reason=f"could not start: {exc}"
            ) from exc
        slot.ring.clear()
        child = Child(preset.name, launch.argv, launch.env, ring=slot.ring, on_group=self._group)
        slot.child, slot.launch = child, launch
        slot.move(State.STARTING)
        _log.info("model.load.start", model=preset.name, device=device.id, port=port)
        try:
            await child.spawn()
            self.records.add(child.pid or 0, preset.name)
            await child.wait_ready(
                launch.host, launch.port, launch.health_path, preset.start_timeout, self.pool
            )
        except BackendStartError:
            await child.stop(preset.stop_timeout)
            self._forget_child(slot)
            slot.move(State.FAILED)
            raise
        except asyncio.CancelledError:
            await child.stop(preset.stop_timeout)
            self._forget_child(slot)
            slot.move(State.STOPPED)
            raise
        slot.move(State.READY)
        slot.last_used = time.monotonic()
        self._spawn_task(self._watch(slot, child), f"watch:{preset.name}")
        self._spawn_task(self._measure(slot, child), f"measure:{preset.name}")

    def _group(self, event: str, pgid: int) -> None:
        self._on_group(event, pgid)

    def _forget_child(self, slot: Slot) -> None:
        if slot.child is not None and slot.child.pid is not None:
            self.records.remove(slot.child.pid)
        if slot.launch is not None:
            self.pool.forget(slot.launch.host, slot.launch.port)
        slot.child = None
        slot.launch = None
        slot.device = None
        slot.measured = None

    async def _measure(self, slot: Slot, child: Child) -> None:
        """Record what the ready backend really uses, for status and the next admission."""
        # Not at the instant it turns ready: the first request is in flight then, and a
        # backend's buffers settle during it.
        await asyncio.sleep(_MEASURE_DELAY)
        if slot.device is None or child.pid is None:
            return
        reading = next((r for r in await self.read_memory() if r.device == slot.device.id), None)
        if reading is None or child.pid not in reading.by_pid or slot.child is not child:
            return
        slot.measured = reading.by_pid[child.pid]
        self.footprints.put(slot.preset, slot.device.kind, slot.measured)
        _log.info("model.measure", model=slot.preset.name, bytes=slot.measured)

    async def _watch(self, slot: Slot, child: Child) -> None:
        """Notice a backend that exits by itself while ready."""
        code = await child.wait_exit()
        if slot.child is not child or slot.state is not State.READY:
            return
        _log.error(
            "backend.crash",
            model=slot.preset.name,
            code=code,
            reason=describe_exit(code),
            tail=slot.ring.tail(5),
        )
        slot.last_error = BackendStartError(slot.preset.name, code, slot.ring.tail())
        self._cancel_ttl(slot)
        slot.move(State.FAILED)  # READY -> FAILED: no new lease goes to a dead backend
        await child.stop(slot.preset.stop_timeout)  # reap the rest of its group
        if slot.child is child:
            self._forget_child(slot)
        self._notify()

    # ---------------------------------------------------------------- stopping

    def _begin_stop(self, slot: Slot, *, reason: str) -> asyncio.Task[None]:
        if slot.stop_task is None:
            if slot.child is not None:
                # READY -> STOPPING now, not when the task first runs: no lease may slip in
                # between the decision to stop and the stop itself.
                slot.move(State.STOPPING)
            slot.stop_task = self._spawn_task(self._stop(slot, reason), f"stop:{slot.preset.name}")
        return slot.stop_task

    async def _stop(self, slot: Slot, reason: str) -> None:
        self._cancel_ttl(slot)
        child = slot.child
        try:
            if child is not None:
                _log.info("model.stop", model=slot.preset.name, reason=reason)
                await child.stop(slot.preset.stop_timeout)
                self._forget_child(slot)
            slot.move(State.STOPPED)
        finally:
            slot.stop_task = None
            slot.draining = False
            self._notify()

    async def unload(self, name: str) -> None:
        """Stop a model once its in-flight requests finish; new requests wait and reload it."""
        slot = self.slot_for(name)
        if slot.load_task is not None and not slot.load_task.done():
            with contextlib.suppress(RequestError):
                await asyncio.shield(slot.load_task)
        if slot.state is not State.READY:
            if slot.state is State.FAILED:
                slot.move(State.STOPPED)
            return
        slot.draining = True
        while slot.in_flight > 0:
            await self._changed.wait()
        await asyncio.shield(self._begin_stop(slot, reason="unload"))

    async def close(self) -> None:
        """Stop every backend (shutdown); loads in progress are cancelled."""
        self._closing = True
        for slot in self.slots.values():
            self._cancel_ttl(slot)
            if slot.load_task is not None and not slot.load_task.done():
                slot.load_task.cancel()
        loads = [s.load_task for s in self.slots.values() if s.load_task is not None]
        await asyncio.gather(*loads, return_exceptions=True)
        stops = [self._begin_stop(s, reason="shutdown") for s in self.slots.values() if s.child]
        await asyncio.gather(*stops, return_exceptions=True)

    async def preload(self) -> None:
        """Load the presets marked ``preload: true``, one after another."""
        for slot in self.slots.values():
            if slot.preset.preload:
                try:
                    await self.load(slot.preset.name)
                except RequestError as exc:
                    _log.error("model.preload.fail", model=slot.preset.name, error=exc.message)

    # ---------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        """A JSON-ready view of every model; never starts anything, never touches TTLs."""
        now_mono, now = time.monotonic(), time.time()
        models = []
        for slot in self.slots.values():
            last_used = now - (now_mono - slot.last_used) if slot.last_used else None
            models.append(
                {
                    "name": slot.preset.name,
                    "aliases": list(slot.preset.aliases),
                    "backend": slot.preset.backend,
                    "state": slot.state.value,
                    "pid": slot.child.pid if slot.child else None,
                    "port": slot.launch.port if slot.launch else None,
                    "device": slot.device.id if slot.device else None,
                    "since": slot.since,
                    "last_used": last_used,
                    "in_flight": slot.in_flight,
                    "waiting": slot.waiters,
                    "ttl": slot.preset.ttl,
                    "pin": slot.preset.pin,
                    "memory": {
                        "need": slot.need.bytes if slot.need else None,
                        "need_source": slot.need.source if slot.need else None,
                        "estimate": slot.need.estimate if slot.need else None,
                        "measured": slot.measured,
                    },
                    "error": slot.last_error.message if slot.last_error else None,
                    "exit_code": (
                        slot.last_error.exit_code
                        if isinstance(slot.last_error, BackendStartError)
                        else None
                    ),
                }
            )
        return {"models": models}


def _best_plan(
    needs: dict[str, Need],
    views: list[policy.DeviceView],
    residents: list[policy.Resident],
    limits: policy.Limits,
) -> policy.Plan:
    # Group devices by need so each group is planned with its own number.
    by_need: dict[int, list[policy.DeviceView]] = {}
    for view in views:
        by_need.setdefault(needs[view.id].bytes, []).append(view)
    plans = [policy.plan_admission(n, vs, residents, limits) for n, vs in by_need.items()]
    for kind in (policy.Admit, policy.Wait):
        found = [p for p in plans if isinstance(p, kind)]
        if found:
            return found[0]
    return plans[0] if plans else policy.Impossible("no device reported memory")
