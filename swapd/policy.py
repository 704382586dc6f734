"""Admission and eviction as pure functions of readings and residents.

No I/O, no clock, no logging: the manager feeds in what the probe measured
and what is resident, and carries out the plan it gets back. The benchmark
simulator replays traces through these same functions.

For each candidate device::

    outside   = total - free - (what swapd's own children use there)
    room now  = min(free - reserve, budget - swapd's use)        # budget is optional
    room max  = room now + everything evictable on that device   # pins never count

A load is admitted when ``need <= room now``; otherwise idle residents are
taken least recently used first until it fits (``Admit`` with victims); if only
busy residents could make room the request waits (``Wait``); if even evicting
every evictable resident is not enough, it is ``Impossible``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from swapd.units import format_size


@dataclass(frozen=True)
class Resident:
    """A model that holds memory now (loading, ready or stopping)."""

    name: str
    device: str
    usage: int
    last_used: float
    busy: bool = False  # requests in flight or waiting, or loading/stopping: not evictable now
    pinned: bool = False


@dataclass(frozen=True)
class DeviceView:
    """One device as the probe read it."""

    id: str
    total: int
    free: int


@dataclass(frozen=True)
class Limits:
    """Memory kept free and an optional cap on swapd's use, per device; a model count cap."""

    reserve: int = 0
    budget: int | None = None
    max_running: int | None = None


@dataclass(frozen=True)
class Admit:
    """Start on ``device`` once ``victims`` (idle, least recently used first) are stopped."""

    device: str
    victims: tuple[str, ...] = ()


@dataclass(frozen=True)
class Wait:
    """Room exists only if busy residents are stopped: wait until they are idle."""

    device: str
    busy: tuple[str, ...]


@dataclass(frozen=True)
class Impossible:
    """No set of evictions makes room; ``reason`` carries the numbers."""

    reason: str


Plan = Admit | Wait | Impossible


def _room_now(device: DeviceView, ours: int, limits: Limits) -> int:
    room = device.free - limits.reserve
    if limits.budget is not None:
        room = min(room, limits.budget - ours)
    return room


def _impossible_reason(
    need: int, device: DeviceView, residents: Sequence[Resident], limits: Limits
) -> str:
    ours = sum(r.usage for r in residents)
    pinned = sum(r.usage for r in residents if r.pinned)
    outside = max(0, device.total - device.free - ours)
    parts = [
        f"{device.id} has {format_size(device.total)}",
        f"{format_size(outside)} used outside swapd",
        f"{format_size(pinned)} pinned",
        f"{format_size(limits.reserve)} reserved",
    ]
    if limits.budget is not None:
        parts.append(f"budget {format_size(limits.budget)}")
    return f"needs {format_size(need)}; " + ", ".join(parts)


def _plan_device(
    need: int,
    device: DeviceView,
    residents: Sequence[Resident],
    limits: Limits,
    running: int,
) -> Plan:
    here = [r for r in residents if r.device == device.id]
    ours = sum(r.usage for r in here)
    room = _room_now(device, ours, limits)
    # Candidates in eviction order: idle before busy, least recently used first.
    order = sorted((r for r in residents if not r.pinned), key=lambda r: (r.busy, r.last_used))
    count_excess = 0 if limits.max_running is None else max(0, running + 1 - limits.max_running)
    freeable = sum(r.usage for r in order if r.device == device.id)
    if need > room + freeable or count_excess > len(order):
        return Impossible(_impossible_reason(need, device, here, limits))
    victims: list[Resident] = []
    for candidate in order:
        if need <= room and len(victims) >= count_excess:
            break
        if candidate.device != device.id and len(victims) >= count_excess:
            continue  # frees nothing on this device and the count is already satisfied
        victims.append(candidate)
        if candidate.device == device.id:
            room += candidate.usage
    victims = _prune(victims, need, room, count_excess, device.id)
    busy = tuple(v.name for v in victims if v.busy)
    if busy:
        return Wait(device.id, busy)
    return Admit(device.id, tuple(v.name for v in victims))


def _prune(
    victims: list[Resident], need: int, room: int, count_excess: int, device: str
) -> list[Resident]:
    """Drop victims the plan does not need, most recently used first.

    Greedy LRU can pick a victim for the count cap and then a later one that
    satisfies both memory and count; the first is then stopped for nothing.
    """
    kept = list(victims)
    for victim in reversed(victims):
        freed = victim.usage if victim.device == device else 0
        if need <= room - freed and len(kept) - 1 >= count_excess:
            kept.remove(victim)
            room -= freed
    return kept


def plan_admission(
    need: int,
    devices: Sequence[DeviceView],
    residents: Sequence[Resident],
    limits: Limits,
) -> Plan:
    """Decide where and at what cost a model that needs ``need`` bytes can start.

    ``devices`` are the candidates (the preset's pinned devices, or all); the
    best plan is the one with no victims and the most free memory, then the
    one with the fewest victims, then one that must wait.
    """
    if not devices:
        return Impossible("no device to place the model on")
    running = len(residents)
    plans = [(d, _plan_device(need, d, residents, limits, running)) for d in devices]
    admits = [(d, p) for d, p in plans if isinstance(p, Admit)]
    if admits:
        _, best = min(admits, key=lambda dp: (len(dp[1].victims), -dp[0].free))
        return best
    waits = [p for _, p in plans if isinstance(p, Wait)]
    if waits:
        return min(waits, key=lambda p: len(p.busy))
    return (
        plans[0][1]
        if len(plans) == 1
        else Impossible(
            "; ".join(f"{d.id}: {p.reason}" for d, p in plans if isinstance(p, Impossible))
        )
    )
