"""Admission: one lock per device, fresh readings, and the policy's plan for one load.

Admission decides and the manager acts: this module reads memory, works out
what a model needs on each candidate device and asks :mod:`swapd.policy` for a
plan. It never starts or stops anything and never imports the manager.

Locks are held only while a plan is made (a reading and a pure function), and
the manager reserves the memory by marking the model as loading before it lets
go; a backend's start is never under a lock, so a one-second wake does not wait
behind a five-minute cold start, and two devices start models in parallel.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from dataclasses import dataclass

from swapd import policy
from swapd.footprints import Footprints
from swapd.gguf_split import split_parts
from swapd.logs import get_logger
from swapd.needs import Need, estimate_bytes, memory_need
from swapd.presets import Preset
from swapd.probe import HOST_DEVICE, Device, Probe, Reading, host_memory
from swapd.weights import file_stamp, side_paths

_log = get_logger("swapd.admission")


@dataclass(frozen=True)
class Snapshot:
    """One reading of every device, and the host memory available to the ram tier."""

    readings: dict[str, Reading]
    host_available: int
    # The models (their slots' ids) still starting or waking when the reading began: where
    # a device gives no per-process figures, what they took after it is in no free figure
    # of this reading, even if they are ready by the time it is used.
    coming_up: frozenset[int] = frozenset()


def _estimate(preset: Preset, device: Device, total: int) -> tuple[int | None, bool]:
    """The estimate, and whether the model file it came from (if any) exists."""
    there = preset.model is None or preset.model.exists()
    return estimate_bytes(preset, device, total), there


def _file_identity(preset: Preset) -> tuple[tuple[int, int], ...] | None:
    """Size and mtime of each model file (every shard of a split GGUF), and of side files.

    A file replaced at the same path is estimated anew; so is a draft or projector the
    args name, also one that was not there yet.
    """
    if preset.model is None:
        return None
    try:
        found = [part.stat() for part in split_parts(preset.model)]
    except OSError:
        return None
    sides = [file_stamp(path) for path in side_paths([*preset.args, *preset.cmd])]
    return (*((st.st_size, st.st_mtime_ns) for st in found), *sides)


class Admission:
    """Per-device locks, readings and needs; plans come from :mod:`swapd.policy`."""

    def __init__(
        self,
        probe: Probe,
        footprints: Footprints,
        limits: policy.Limits,
        default_memory: int = 1024**3,
    ) -> None:
        self.probe = probe
        self.default_memory = default_memory
        self.footprints = footprints
        self.limits = limits
        self._locks = {device.id: asyncio.Lock() for device in probe.devices}
        self._estimates: dict[tuple[object, ...], int | None] = {}

    def candidates(self, preset: Preset) -> list[Device]:
        """The devices a preset may be placed on."""
        devices = list(self.probe.devices)
        if preset.devices is not None:
            wanted = set(preset.devices)
            devices = [d for d in devices if d.index in wanted]
        return devices

    @contextlib.asynccontextmanager
    async def locked(self, devices: Iterable[Device]) -> AsyncIterator[None]:
        """Hold the locks of ``devices``, taken in one global order so two loads never deadlock."""
        async with contextlib.AsyncExitStack() as stack:
            for device_id in sorted({d.id for d in devices}):
                await stack.enter_async_context(self._locks[device_id])
            yield

    async def read(self, pids: Collection[int], coming_up: Collection[int] = ()) -> Snapshot:
        """Read every device and host memory, in a worker thread (drivers block).

        ``coming_up``: the ids of the slots still starting or waking as the reading begins.
        """
        starting = frozenset(coming_up)

        def read_all() -> Snapshot:
            readings = {r.device: r for r in self.probe.read(pids)}
            host = readings.get(HOST_DEVICE.id)  # read just now on a host-RAM probe
            # Available host memory, bounded by cgroup limits either way.
            available = host.free if host is not None else host_memory()[1]
            return Snapshot(readings, available, starting)

        return await asyncio.to_thread(read_all)

    async def needs(
        self, preset: Preset, devices: Sequence[Device], snapshot: Snapshot
    ) -> dict[str, Need]:
        """What ``preset`` needs on each device that reported memory."""
        needs: dict[str, Need] = {}
        for device in devices:
            reading = snapshot.readings.get(device.id)
            if reading is None:
                continue
            # What the launch runs is in the key: an estimate that a reload's forget()
            # raced (a prefetch still reading the old file) is never taken for the new one.
            key = (
                preset.name,
                device.id,
                preset.backend,
                str(preset.model),
                preset.args,
                preset.cmd,
                tuple(sorted(preset.env.items())),  # vLLM's CPU KV size may come from it
                _file_identity(preset),
            )
            if key in self._estimates:
                estimate = self._estimates[key]
            else:
                # Reading GGUF metadata is file I/O: once per model and device, in a thread.
                estimate, there = await asyncio.to_thread(_estimate, preset, device, reading.total)
                if there:  # a missing model file is asked again: it may be there by then
                    self._estimates[key] = estimate
            needs[device.id] = memory_need(
                preset, device, estimate, self.footprints, self.default_memory
            )
        return needs

    async def prefetch(self, presets: Iterable[Preset]) -> None:
        """Estimate each preset on each of its devices ahead of its first load.

        Reading a GGUF's metadata took 39 ms of a first swap; done here, in the
        background at start and after a reload, no request waits for it.
        """
        try:
            snapshot = await self.read(())
        except Exception as exc:  # noqa: BLE001 - each load reads again and answers the error
            _log.warning("model.estimate.fail", error=str(exc))
            return
        for preset in presets:
            try:
                await self.needs(preset, self.candidates(preset), snapshot)
            except Exception as exc:  # noqa: BLE001 - its load reads it again and answers the error
                _log.warning("model.estimate.fail", model=preset.name, error=str(exc))

    def forget(self, name: str) -> None:
        """Drop a model's cached estimates (a reload changed what it runs)."""
        for key in [k for k in self._estimates if k[0] == name]:
            del self._estimates[key]

    def plan(
        self,
        needs: dict[str, int],
        snapshot: Snapshot,
        residents: Sequence[policy.Resident],
    ) -> policy.Plan:
        """The policy's best plan over the devices in ``needs``."""
        views = [
            policy.DeviceView(device_id, snapshot.readings[device_id].total, reading.free)
            for device_id, reading in snapshot.readings.items()
            if device_id in needs
        ]
        return policy.best_plan(needs, views, residents, self.limits)
