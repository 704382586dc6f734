"""AMD VRAM read from the amdgpu driver's sysfs counters, for when amdsmi cannot be loaded.

The counters give device totals only: no per-process usage. GPUs are numbered
in card order among those with VRAM counters, which is how ROCm numbers them on
ordinary machines.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from swapd.errors import SwapdError
from swapd.probe._amdsmi import amd_env
from swapd.probe._select import select_indices
from swapd.probe._types import Device, Reading, Unusable

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence

DRM_ROOT = Path("/sys/class/drm")
_CARD = re.compile(r"card(\d+)")


def find_cards(root: Path | None = None) -> list[Path]:
    """Return the ``device`` folders of cards that expose VRAM counters, in card order."""
    found: list[tuple[int, Path]] = []
    try:
        entries = list((root or DRM_ROOT).iterdir())
    except OSError:
        return []
    for entry in entries:
        match = _CARD.fullmatch(entry.name)
        folder = entry / "device"
        if match and (folder / "mem_info_vram_total").is_file():
            found.append((int(match.group(1)), folder))
    return [folder for _, folder in sorted(found)]


def _counter(path: Path) -> int:
    """One integer counter (bytes)."""
    return int(path.read_text(encoding="ascii").strip())


class AmdSysfsProbe:
    """Total and used VRAM per card; ``per_process_supported`` is always False."""

    def __init__(self, cards: Sequence[tuple[Device, Path]]) -> None:
        self._folders = {device.id: folder for device, folder in cards}
        self.devices: Sequence[Device] = tuple(device for device, _ in cards)

    def read(self, pids: Collection[int] = ()) -> list[Reading]:  # noqa: ARG002 - protocol
        """Read every card; raises SwapdError when a counter cannot be read."""
        return [self.read_device(device) for device in self.devices]

    def read_device(self, device: Device) -> Reading:
        """Read one card's counters."""
        folder = self._folders[device.id]
        try:
            total = _counter(folder / "mem_info_vram_total")
            used = _counter(folder / "mem_info_vram_used")
        except (OSError, ValueError) as error:
            raise SwapdError(f"{device.id}: cannot read VRAM from {folder}: {error}") from error
        return Reading(
            device=device.id,
            total=total,
            free=max(0, total - used),
            by_pid={},
            per_process_supported=False,
        )

    def close(self) -> None:
        """Hold nothing open, so release nothing."""


def open_amd_sysfs(
    wanted: Collection[int] | None, warnings: list[str], root: Path | None = None
) -> AmdSysfsProbe:
    """Open the wanted cards; raises Unusable when there are none or none can be read."""
    folders = find_cards(root)
    candidates = [
        (
            Device(
                f"gpu{index}",
                "amd",
                index,
                f"AMD GPU {index} ({folders[index].parent.name})",
                amd_env(index),
            ),
            folders[index],
        )
        for index in select_indices("amdgpu sysfs", range(len(folders)), wanted, warnings)
    ]
    checker = AmdSysfsProbe(candidates)
    usable: list[tuple[Device, Path]] = []
    for device, folder in candidates:
        try:
            checker.read_device(device)
        except SwapdError as error:
            warnings.append(f"{error}; dropped")
            continue
        usable.append((device, folder))
    if not usable:
        raise Unusable("amdgpu sysfs VRAM counters cannot be read")
    return AmdSysfsProbe(usable)
