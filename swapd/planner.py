"""The capacity planner behind ``swapd plan``: which models fit together, and where.

It reads this host's memory once (total, free, what swapd's backends use and
what everything else uses), takes each preset's need as admission would
(declared, else measured, else estimated) and packs the models onto the
devices largest first. A model that fits in no packing but alone on a device is
swapped in on demand; one larger than every device it may use never loads.
Reading is async (probes and GGUF headers run in threads); :func:`pack` is pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from swapd.admission import Admission, Snapshot
from swapd.presets import Preset
from swapd.probe import Device

Fit = Literal["together", "alone", "never"]


@dataclass(frozen=True)
class DeviceMemory:
    """One device's memory at one reading, split between swapd's backends and the rest."""

    device: str
    name: str
    total: int
    free: int
    swapd: int

    @property
    def outside(self) -> int:
        """What other processes (a desktop, another job) use."""
        return max(0, self.total - self.free - self.swapd)


@dataclass(frozen=True)
class Want:
    """One model: its need on each device it may use, and where the number comes from."""

    name: str
    needs: Mapping[str, int]
    source: str
    pinned: bool = False


@dataclass(frozen=True)
class Placed:
    """Where one model lands in the plan."""

    name: str
    need: int
    source: str
    fit: Fit
    device: str | None
    reason: str | None = None


@dataclass(frozen=True)
class Room:
    """One device's room for swapd's models and the models packed into it."""

    memory: DeviceMemory
    capacity: int
    together: list[str] = field(default_factory=list)
    used: int = 0


@dataclass(frozen=True)
class CapacityPlan:
    """The planner's answer."""

    rooms: list[Room]
    models: list[Placed]

    def as_json(self) -> dict[str, Any]:
        """What ``GET /swapd/plan`` and ``swapd plan --json`` print."""
        return {
            "devices": [
                {
                    "device": r.memory.device,
                    "name": r.memory.name,
                    "total": r.memory.total,
                    "free": r.memory.free,
                    "swapd": r.memory.swapd,
                    "outside": r.memory.outside,
                    "capacity": r.capacity,
                    "together": r.together,
                    "used": r.used,
                }
                for r in self.rooms
            ],
            "models": [
                {
                    "name": m.name,
                    "need": m.need,
                    "source": m.source,
                    "fit": m.fit,
                    "device": m.device,
                    "reason": m.reason,
                }
                for m in self.models
            ],
        }


def capacity(memory: DeviceMemory, reserve: int, budget: int | None) -> int:
    """What swapd's models may use on a device with all of them stopped."""
    room = memory.total - memory.outside - reserve
    return max(0, room if budget is None else min(room, budget))


def pack(
    wants: Sequence[Want], rooms: Sequence[Room], max_running: int | None = None
) -> CapacityPlan:
    """Place pinned models, then the largest first, each on the device with the most room left.

    No more than ``max_running`` are packed together: one more fits only alone.
    """
    left = {r.memory.device: r.capacity for r in rooms}
    pinned = dict.fromkeys(left, 0)  # what pinned models take: no load ever evicts it
    together: dict[str, list[str]] = {r.memory.device: [] for r in rooms}
    placed: list[Placed] = []
    for want in sorted(wants, key=lambda w: (not w.pinned, -max(w.needs.values(), default=0))):
        usable = [d for d in want.needs if d in left]
        largest = max(want.needs.values(), default=0)
        fitting = [d for d in usable if want.needs[d] <= left[d]]
        if max_running is not None and sum(map(len, together.values())) >= max_running:
            fitting = []  # the count is full: loading it stops another, as for memory
        if fitting:
            device = max(fitting, key=lambda d: left[d] - want.needs[d])
            left[device] -= want.needs[device]
            pinned[device] += want.needs[device] if want.pinned else 0
            together[device].append(want.name)
            placed.append(Placed(want.name, want.needs[device], want.source, "together", device))
            continue
        alone = [d for d in usable if want.needs[d] <= _room(rooms, d) - pinned[d]]
        if alone:
            device = max(alone, key=lambda d: _room(rooms, d) - pinned[d])
            reason = "fits alone; loading it evicts models packed there"
            if max_running is not None and want.needs[device] <= left[device]:
                reason = f"fits, but max_running is {max_running}; loading it stops another"
            placed.append(
                Placed(want.name, want.needs[device], want.source, "alone", device, reason)
            )
            continue
        best = max((_room(rooms, d) - pinned[d] for d in usable), default=0)
        reason = (
            f"needs {largest} bytes; its devices offer at most {best}"
            if usable
            else "none of its devices is present"
        )
        placed.append(Placed(want.name, largest, want.source, "never", None, reason))
    out = [
        Room(r.memory, r.capacity, together[r.memory.device], r.capacity - left[r.memory.device])
        for r in rooms
    ]
    order = {w.name: i for i, w in enumerate(wants)}
    return CapacityPlan(out, sorted(placed, key=lambda p: order[p.name]))


def _room(rooms: Sequence[Room], device: str) -> int:
    return next(r.capacity for r in rooms if r.memory.device == device)


async def read_memory(
    admission: Admission, pids: Sequence[int], fallback: Mapping[str, int]
) -> tuple[Snapshot, list[DeviceMemory]]:
    """One reading of every device; ``fallback`` is swapd's use where there are no per-pid data."""
    snap = await admission.read(pids)
    memory = []
    for device in admission.probe.devices:
        reading = snap.readings.get(device.id)
        if reading is None:
            continue
        ours = (
            sum(reading.by_pid.values())
            if reading.per_process_supported
            else fallback.get(device.id, 0)
        )
        memory.append(DeviceMemory(device.id, device.name, reading.total, reading.free, ours))
    return snap, memory


async def plan(
    admission: Admission,
    presets: Sequence[Preset],
    snap: Snapshot,
    memory: Sequence[DeviceMemory],
) -> CapacityPlan:
    """Needs as admission sees them now, packed onto ``memory``."""
    limits = admission.limits
    rooms = [Room(m, capacity(m, limits.reserve, limits.budget)) for m in memory]
    wants = []
    for preset in presets:
        devices: list[Device] = admission.candidates(preset)
        needs = await admission.needs(preset, devices, snap)
        sources = {n.source for n in needs.values()}
        source = sources.pop() if len(sources) == 1 else "mixed"
        needed = {d: n.bytes for d, n in needs.items()}
        wants.append(Want(preset.name, needed, source, pinned=preset.pin))
    return pack(wants, rooms, limits.max_running)
