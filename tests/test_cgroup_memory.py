"""Host RAM bounded by the cgroup limits above swapd (a container, a unit's MemoryMax=).

The tree is written to a temporary folder in the kernel's format: a limit cannot be
set on this test's own cgroup everywhere the suite runs.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from swapd.probe import _host
from swapd.probe._cgroup_memory import cgroup_folders, memory_limits
from swapd.probe._host import host_memory

GIB = 1024**3


def _cgroup(folder: Path, *, limit: str, usage: int, inactive_file: int) -> None:
    folder.mkdir(parents=True)
    (folder / "memory.max").write_text(f"{limit}\n")
    (folder / "memory.current").write_text(f"{usage}\n")
    (folder / "memory.stat").write_text(f"anon 1\nfile 2\ninactive_file {inactive_file}\n")


def test_the_tightest_limit_on_the_way_up_bounds_total_and_available(tmp_path: Path) -> None:
    """A pod limit above swapd's container: each caps what swapd may count on."""
    root = tmp_path / "cgroup"
    _cgroup(root / "pod", limit=str(2 * GIB), usage=GIB, inactive_file=GIB // 4)
    _cgroup(root / "pod" / "swapd", limit="max", usage=GIB, inactive_file=0)
    self_cgroup = tmp_path / "self"
    self_cgroup.write_text("0::/pod/swapd\n")
    limits = memory_limits(root, self_cgroup)
    assert [(limit.folder.name, limit.limit) for limit in limits] == [("pod", 2 * GIB)]
    # 2 GiB less the working set (1 GiB used, a quarter of it inactive file pages).
    assert limits[0].room() == 2 * GIB - (GIB - GIB // 4)
    total, available = host_memory(limits)
    memory = psutil.virtual_memory()
    assert total == min(memory.total, 2 * GIB)
    assert available == min(memory.available, 2 * GIB - (GIB - GIB // 4))


def _cgroup_v1(folder: Path, *, limit: int, usage: int, inactive_file: int) -> None:
    folder.mkdir(parents=True)
    (folder / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (folder / "memory.usage_in_bytes").write_text(f"{usage}\n")
    # v1 lists the cgroup's own counters, then the hierarchy's under total_.
    (folder / "memory.stat").write_text(
        f"cache 2\ninactive_file 1\ntotal_cache 2\ntotal_inactive_file {inactive_file}\n"
    )


def test_a_cgroup_v1_memory_limit_bounds_total_and_available(tmp_path: Path) -> None:
    """A v1 memory controller (older Docker, a hybrid host): its limit counts as v2's does."""
    memory = tmp_path / "cgroup" / "memory"
    _cgroup_v1(memory / "docker", limit=2 * GIB, usage=GIB, inactive_file=GIB // 4)
    # v1's "no limit" is a near-2**63 number, not "max".
    _cgroup_v1(memory / "docker" / "swapd", limit=9223372036854771712, usage=GIB, inactive_file=0)
    self_cgroup = tmp_path / "self"
    self_cgroup.write_text("9:name=systemd:/\n4:memory:/docker/swapd\n1:cpu:/\n0::/\n")
    limits = memory_limits(tmp_path / "cgroup", self_cgroup)
    assert [(limit.folder.name, limit.limit) for limit in limits] == [("docker", 2 * GIB)]
    assert limits[0].room() == 2 * GIB - (GIB - GIB // 4)  # total_inactive_file, not the own
    total, available = host_memory(limits)
    assert total == min(psutil.virtual_memory().total, 2 * GIB)
    assert available <= 2 * GIB - (GIB - GIB // 4)


def test_without_a_limit_the_host_is_all(tmp_path: Path) -> None:
    """No memory limit anywhere, or no memory controller: /proc/meminfo's numbers stand."""
    root = tmp_path / "cgroup"
    _cgroup(root / "a", limit="max", usage=GIB, inactive_file=0)
    unified = tmp_path / "unified"
    unified.write_text("0::/a\n")
    legacy = tmp_path / "legacy"
    legacy.write_text("4:memory:/a\n1:cpu:/\n")
    _cgroup_v1(root / "memory" / "a", limit=9223372036854771712, usage=GIB, inactive_file=0)
    no_memory = tmp_path / "no_memory"
    no_memory.write_text("1:cpu:/\n")
    assert memory_limits(root, unified) == []
    assert memory_limits(root, legacy) == []
    assert memory_limits(root, no_memory) == []
    assert memory_limits(root, tmp_path / "missing") == []
    assert host_memory([])[0] == psutil.virtual_memory().total


def test_a_limit_set_changed_or_lifted_while_swapd_runs_is_read_at_the_next_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`systemctl set-property swapd MemoryMax=` takes effect live; so does a pod's resize."""
    root = tmp_path / "cgroup"
    _cgroup(root / "system.slice", limit="max", usage=GIB, inactive_file=0)
    _cgroup(root / "system.slice" / "swapd.service", limit="max", usage=GIB, inactive_file=0)
    self_cgroup = tmp_path / "self"
    self_cgroup.write_text("0::/system.slice/swapd.service\n")
    folders = cgroup_folders(root, self_cgroup)
    monkeypatch.setattr(_host, "_own_folders", lambda: folders)
    memory = psutil.virtual_memory()
    assert host_memory()[0] == memory.total  # no limit when swapd started

    (root / "system.slice" / "swapd.service" / "memory.max").write_text(f"{2 * GIB}\n")
    total, available = host_memory()
    assert total == min(memory.total, 2 * GIB)
    assert available <= GIB  # 2 GiB less the 1 GiB it uses

    (root / "system.slice" / "swapd.service" / "memory.max").write_text(f"{3 * GIB}\n")
    assert host_memory()[0] == min(memory.total, 3 * GIB)

    (root / "system.slice" / "swapd.service" / "memory.max").write_text("max\n")
    assert host_memory()[0] == memory.total
