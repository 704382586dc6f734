"""Host RAM as the one device, for CPU backends and machines without a usable GPU."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import psutil

from swapd.probe._cgroup_memory import CgroupFolder, MemoryLimit, cgroup_folders, limits_now
from swapd.probe._tree import attribute, process_trees
from swapd.probe._types import Device, Reading

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence

HOST_DEVICE = Device(id="cpu", kind="cpu", index=None, name="host RAM", visible_env={})


def host_memory(limits: Sequence[MemoryLimit] | None = None) -> tuple[int, int]:
    """Host RAM's total and available, each bounded by the cgroup limits above swapd.

    ``available`` counts reclaimable cache, unlike ``free``.
    """
    memory = psutil.virtual_memory()
    total, available = int(memory.total), int(memory.available)
    for limit in limits_now(_own_folders()) if limits is None else limits:
        total = min(total, limit.limit)
        room = limit.room()
        if room is not None:
            available = min(available, room)
    return total, available


@functools.cache
def _own_folders() -> list[CgroupFolder]:
    """Found once: swapd does not move between cgroups (their limits are read each time)."""
    return cgroup_folders()


def _rss(pid: int) -> int:
    """Resident memory of one process, or 0 when it is gone or not ours to read."""
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        # The process exited (or became a zombie) between listing and reading.
        return 0


class HostRamProbe:
    """Total and available host RAM; per process, the RSS of each asked process tree."""

    def __init__(self) -> None:
        self.devices: Sequence[Device] = (HOST_DEVICE,)

    def read(self, pids: Collection[int] = ()) -> list[Reading]:
        """Read ``available`` as free (see :func:`host_memory`)."""
        total, available = host_memory()
        trees = process_trees(pids)
        rss = {pid: _rss(pid) for tree in trees.values() for pid in tree}
        return [
            Reading(
                device=HOST_DEVICE.id,
                total=total,
                free=available,
                by_pid=attribute(rss, trees),
                per_process_supported=True,
                source="host",
            )
        ]

    def close(self) -> None:
        """Hold nothing, so release nothing."""
