"""Per-process VRAM for the AMD probes from DRM fdinfo, each problem logged once.

The AMD probes match a GPU to fdinfo records by PCI address, which amdsmi and
sysfs both know. A problem (an old kernel without VRAM keys, a process whose
files cannot be read) turns the reading into device totals only and is logged
as ``probe.fallback`` the first time it happens, not on every read.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from swapd.logs import get_logger
from swapd.probe import _fdinfo

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

_log = get_logger("swapd.probe")
_PCI = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
_DEVICE_TOTALS = "AMD per-process VRAM falls back to device totals"


def pci_address(text: object) -> str | None:
    """A PCI address as ``drm-pdev`` spells it (``0000:03:00.0``), or None if it is not one."""
    value = str(text).strip().lower()
    return value if _PCI.fullmatch(value) else None


class DrmVram:
    """Reads fdinfo under one ``/proc`` root for one probe and remembers what it has logged."""

    def __init__(self, proc: Path | None = None) -> None:
        # Looked up here, not as a default argument, so that it follows the module's value.
        self.proc = proc or _fdinfo.PROC_ROOT
        self._told: set[str] = set()

    def for_trees(self, trees: Mapping[int, frozenset[int]]) -> TreeVram:
        """A view for one probe read; it scans at most once, and only if asked."""
        return TreeVram(self, trees)

    def tell(self, key: str, detail: str) -> None:
        """Log ``detail`` as a fallback unless a problem of this kind was logged before."""
        if key not in self._told:
            self._told.add(key)
            _log.warning("probe.fallback", detail=detail)


class TreeVram:
    """The fdinfo figures of one read's process trees."""

    def __init__(self, owner: DrmVram, trees: Mapping[int, frozenset[int]]) -> None:
        self._owner = owner
        self._trees = trees
        self._scan: _fdinfo.DrmScan | None = None

    def on(self, pci: str | None) -> dict[int, int] | None:
        """Bytes per root on the GPU at ``pci``; None when fdinfo cannot tell."""
        if pci is None:
            return None
        if not self._trees:
            return {}
        if self._scan is None:
            self._scan = _fdinfo.scan_vram(self._trees, self._owner.proc)
        scan = self._scan
        for driver in sorted(scan.other_drivers):
            self._owner.tell(
                f"driver:{driver}", f"DRM fdinfo: {driver} clients are not counted, only amdgpu"
            )
        if scan.unreadable is not None:
            self._owner.tell(
                "unreadable", f"DRM fdinfo cannot be read ({scan.unreadable}); {_DEVICE_TOTALS}"
            )
            return None
        if pci in scan.blind or "" in scan.blind:
            keys = ", ".join(_fdinfo.VRAM_KEYS)
            self._owner.tell(
                "blind",
                f"this kernel's DRM fdinfo has no VRAM per client ({keys}); {_DEVICE_TOTALS}",
            )
            return None
        return {root: nbytes for root, nbytes in scan.vram.get(pci, {}).items() if nbytes > 0}
