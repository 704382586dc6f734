"""The memory a cgroup v2 limit leaves swapd: in a container, or a unit with MemoryMax=.

``/proc/meminfo`` speaks for the whole host; a ``memory.max`` on swapd's cgroup or
any above it is what the kernel holds swapd and its backends to (their cgroups
nest under swapd's). The tightest limit on the way up is the total, and what is
left under each (its limit less its working set: usage less inactive file pages,
as the kubelet counts it) bounds what is available.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class MemoryLimit:
    """One cgroup on swapd's way up that has a ``memory.max``."""

    folder: Path
    limit: int

    def room(self) -> int | None:
        """What its limit leaves, now; None when the cgroup cannot be read any more."""
        try:
            usage = int((self.folder / "memory.current").read_text())
            stat = (self.folder / "memory.stat").read_text()
        except (OSError, ValueError):
            return None
        inactive = next(
            (
                int(line.split()[1])
                for line in stat.splitlines()
                if line.startswith("inactive_file ")
            ),
            0,
        )
        return max(0, self.limit - max(0, usage - inactive))


def memory_limits(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> list[MemoryLimit]:
    """The cgroups from swapd's own up to the root that carry a ``memory.max`` (v2 only)."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return []
    unified = next((line[3:] for line in lines if line.startswith("0::")), None)
    if unified is None:
        return []  # cgroup v1 (or none): /proc/meminfo is all there is to read
    folder = root / unified.lstrip("/")
    found = []
    while folder != root.parent and folder.is_relative_to(root):
        try:
            value = (folder / "memory.max").read_text().strip()
        except OSError:
            value = "max"  # the root has none; an unreadable one limits nothing we can see
        if value != "max" and value.isdigit():
            found.append(MemoryLimit(folder, int(value)))
        folder = folder.parent
    return found
