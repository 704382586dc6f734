"""The memory a cgroup limit leaves swapd: in a container, or a unit with MemoryMax=.

``/proc/meminfo`` speaks for the whole host; a limit on swapd's cgroup or any above
it is what the kernel holds swapd and its backends to (their cgroups nest under
swapd's). The tightest limit on the way up is the total, and what is left under each
(its limit less its working set: usage less inactive file pages, as the kubelet
counts it) bounds what is available.

Both hierarchies are read: v2's ``memory.max``, and v1's ``memory.limit_in_bytes``
where the memory controller is mounted on its own (older Docker and Kubernetes
hosts, hybrid systemd set-ups), whose "no limit" is a number near 2**63.

The folders on the way up are found once; their limits are read at every reading, as
``systemctl set-property swapd MemoryMax=`` or a container's resize changes them live.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")
# v1 writes "no limit" as the largest page-aligned counter; anything this large limits nothing.
V1_UNLIMITED = 1 << 62


@dataclass(frozen=True)
class Hierarchy:
    """Where one cgroup version keeps a cgroup's limit, usage and inactive file pages."""

    limit_file: str
    usage_file: str
    inactive_key: str  # in memory.stat, counted for the cgroup and everything below it


V2 = Hierarchy("memory.max", "memory.current", "inactive_file")
V1 = Hierarchy("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


@dataclass(frozen=True)
class MemoryLimit:
    """One cgroup on swapd's way up that has a memory limit."""

    folder: Path
    limit: int
    hierarchy: Hierarchy = V2

    def room(self) -> int | None:
        """What its limit leaves, now; None when the cgroup cannot be read any more."""
        try:
            usage = int((self.folder / self.hierarchy.usage_file).read_text())
            stat = (self.folder / "memory.stat").read_text()
        except (OSError, ValueError):
            return None
        key = self.hierarchy.inactive_key + " "
        inactive = next(
            (int(line.split()[1]) for line in stat.splitlines() if line.startswith(key)), 0
        )
        return max(0, self.limit - max(0, usage - inactive))


@dataclass(frozen=True)
class CgroupFolder:
    """One cgroup on swapd's way up, whose limit may be set, changed or lifted at any time."""

    folder: Path
    hierarchy: Hierarchy = V2

    def limit_now(self) -> MemoryLimit | None:
        """Its memory limit as it stands; None when it has none."""
        limit = _limit(self.folder / self.hierarchy.limit_file)
        return None if limit is None else MemoryLimit(self.folder, limit, self.hierarchy)


def cgroup_folders(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> list[CgroupFolder]:
    """The cgroups from swapd's own up to the top of its memory hierarchy."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return []
    # "ID:controllers:path": v1's memory controller has a line of its own; v2's is "0::".
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if "memory" in controllers.split(","):
            return _walk(root / "memory", path, V1)
    unified = next((line[3:] for line in lines if line.startswith("0::")), None)
    if unified is None:
        return []  # no memory controller to read: /proc/meminfo is all there is
    return _walk(root, unified, V2)


def limits_now(folders: Sequence[CgroupFolder]) -> list[MemoryLimit]:
    """The limits those cgroups carry now."""
    return [limit for f in folders if (limit := f.limit_now()) is not None]


def memory_limits(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> list[MemoryLimit]:
    """The cgroups from swapd's own up to the top of its hierarchy that carry a memory limit."""
    return limits_now(cgroup_folders(root, self_cgroup))


def _walk(top: Path, path: str, hierarchy: Hierarchy) -> list[CgroupFolder]:
    folder = top / path.lstrip("/")
    found = []
    while folder != top.parent and folder.is_relative_to(top):
        found.append(CgroupFolder(folder, hierarchy))
        folder = folder.parent
    return found


def _limit(file: Path) -> int | None:
    # The root has no limit file; an unreadable one limits nothing swapd can see.
    try:
        value = file.read_text().strip()
    except OSError:
        return None
    if not value.isdigit() or int(value) >= V1_UNLIMITED:
        return None  # "max" (v2), v1's near-2**63 "no limit", or something unexpected
    return int(value)
