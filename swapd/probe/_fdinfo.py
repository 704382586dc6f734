"""Per-process VRAM from the kernel's DRM fdinfo, for AMD GPUs whose amdsmi cannot tell.

Every open DRM file has a record at ``/proc/PID/fdinfo/FD`` (kernel
Documentation/gpu/drm-usage-stats.rst) naming its driver, its PCI device
(``drm-pdev``), its client (``drm-client-id``) and its memory per region.
Several fds, even in several processes after a fork, can share one client, so a
client counts once per process tree. Only fds that link to ``/dev/dri/`` are
read, which keeps a scan to one readlink per fd of a backend's processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

PROC_ROOT = Path("/proc")
_DRI = "/dev/dri/"
# Resident first: what the client holds in VRAM now. drm-memory-vram is the
# older amdgpu name for it; drm-total-vram also counts buffers not placed yet.
VRAM_KEYS = ("drm-resident-vram", "drm-memory-vram", "drm-total-vram")
# The kernel prints bytes with no unit, or KiB or MiB.
_UNITS = {"": 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
# Where vsize is among the /proc/PID/stat fields after the name: field 23, counting from 3.
_VSIZE = 23 - 3


@dataclass(frozen=True)
class DrmScan:
    """What one scan of the trees' DRM files found.

    ``vram`` maps a PCI address to each root's bytes there (amdgpu clients
    only); ``blind`` holds PCI addresses with an amdgpu client that reports no
    VRAM figure, and ``""`` for a DRM file without the ``drm-`` keys at all.
    """

    vram: Mapping[str, Mapping[int, int]]
    blind: frozenset[str]
    other_drivers: frozenset[str]
    unreadable: str | None


def parse_size(text: str) -> int | None:
    """Bytes from a fdinfo memory value such as ``"2048 KiB"``; None when malformed."""
    number, _, unit = text.strip().partition(" ")
    scale = _UNITS.get(unit.strip())
    if scale is None or not number.isdigit():
        return None
    return int(number) * scale


def parse_fdinfo(text: str) -> dict[str, str]:
    """The ``key: value`` lines of one fdinfo record."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _vram(fields: Mapping[str, str]) -> int | None:
    """The client's VRAM in bytes by the most exact key present, or None without one."""
    for key in VRAM_KEYS:
        if key in fields:
            return parse_size(fields[key])
    return None


class _Tally:
    """Accumulates one scan; split out so that the walk reads as a walk."""

    def __init__(self) -> None:
        self.vram: dict[str, dict[int, int]] = {}
        self.blind: set[str] = set()
        self.other_drivers: set[str] = set()
        self.unreadable: str | None = None

    def add(self, root: int, fields: Mapping[str, str], seen: set[tuple[str, str]]) -> None:
        """Count one DRM record for ``root`` unless its client was counted for that tree."""
        driver = fields.get("drm-driver")
        if driver is None:
            self.blind.add("")
            return
        if driver != "amdgpu":
            self.other_drivers.add(driver)
            return
        pdev = fields.get("drm-pdev", "").lower()
        client = (pdev, fields.get("drm-client-id", ""))
        if not pdev or client in seen:
            return
        seen.add(client)
        nbytes = _vram(fields)
        if nbytes is None:
            self.blind.add(pdev)
            return
        per_root = self.vram.setdefault(pdev, {})
        per_root[root] = per_root.get(root, 0) + nbytes

    def failed(self, path: str, error: OSError) -> None:
        """Keep the first entry that could not be read, for the log."""
        if self.unreadable is None:
            self.unreadable = f"{path}: {error.strerror or type(error).__name__}"


def scan_vram(trees: Mapping[int, frozenset[int]], proc: Path = PROC_ROOT) -> DrmScan:
    """Read the DRM fdinfo of every process in ``trees``.

    A process or fd that goes away mid-scan is skipped, as it holds nothing
    any more, and so is one that has let go of its memory (see
    :func:`_letting_go`); any other error (permissions, an odd entry) is recorded.
    """
    tally = _Tally()
    # Plain string paths and os calls: a vLLM tree can hold thousands of fds,
    # and a Path object per fd would cost more than the readlink itself.
    top = str(proc)
    for root, tree in trees.items():
        seen: set[tuple[str, str]] = set()
        for pid in sorted(tree):
            try:
                records = _drm_records(top, pid)
            except OSError as error:
                if not _letting_go(top, pid):
                    tally.failed(str(error.filename), error)
                continue
            for fields in records:
                tally.add(root, fields, seen)
    return DrmScan(
        vram=tally.vram,
        blind=frozenset(tally.blind),
        other_drivers=frozenset(tally.other_drivers),
        unreadable=tally.unreadable,
    )


def _drm_records(top: str, pid: int) -> list[dict[str, str]]:
    """The fdinfo fields of each DRM fd of ``pid``; raises OSError for an entry it cannot read."""
    fd_dir = f"{top}/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)  # noqa: PTH208 - see scan_vram
    except (FileNotFoundError, ProcessLookupError):
        return []
    records: list[dict[str, str]] = []
    for fd in fds:
        fields = _read_drm(f"{fd_dir}/{fd}", f"{top}/{pid}/fdinfo/{fd}")
        if fields is not None:
            records.append(fields)
    return records


def _read_drm(link: str, info: str) -> dict[str, str] | None:
    """The fdinfo fields of a DRM fd; None for other fds and fds closed meanwhile."""
    try:
        # Most fds are sockets, pipes and model files: one readlink rules them out.
        if not os.readlink(link).startswith(_DRI):  # noqa: PTH115 - str paths, see scan_vram
            return None
        with open(info, encoding="utf-8", errors="replace") as file:  # noqa: PTH123 - same
            return parse_fdinfo(file.read())
    except (FileNotFoundError, ProcessLookupError):
        return None


def _letting_go(top: str, pid: int) -> bool:
    """Whether ``pid`` is gone or has no address space: a zombie, or exiting.

    Without one the kernel makes the fd folders root's, so a reader that is not
    root gets EACCES from a process that holds no files, or is closing them. Its
    ``stat`` stays readable and shows a vsize (field 23) of 0.
    """
    try:
        with open(f"{top}/{pid}/stat", encoding="utf-8", errors="replace") as file:  # noqa: PTH123
            # The name in field 2 may hold spaces and ")": count from its last ")".
            fields = file.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return True
    except OSError:
        return False
    return len(fields) > _VSIZE and fields[_VSIZE] == "0"
