"""AMD VRAM read from the amdgpu driver's sysfs counters, for when amdsmi cannot be loaded.

The counters give device totals only; per-process usage comes from DRM fdinfo,
matched by the PCI address that the card's ``device`` link names. GPUs are
numbered in card order among those with VRAM counters, which is how ROCm
numbers them on ordinary machines.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from swapd.errors import SwapdError
from swapd.probe._amdsmi import amd_env
from swapd.probe._drm import DrmVram, pci_address
from swapd.probe._select import EachDevice, select_indices
from swapd.probe._tree import process_trees
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


def card_pci(folder: Path) -> str | None:
    """The PCI address of a card: its ``device`` folder links to one named by it."""
    try:
        return pci_address(folder.resolve().name)
    except OSError:
        return None


class AmdSysfsProbe:
    """Total and used VRAM per card, and per-process VRAM where DRM fdinfo tells it."""

    def __init__(self, cards: Sequence[tuple[Device, Path]], drm: DrmVram) -> None:
        self._folders = {device.id: folder for device, folder in cards}
        self._pci = {device.id: card_pci(folder) for device, folder in cards}
        self.devices: Sequence[Device] = tuple(device for device, _ in cards)
        self._drm = drm
        self._each = EachDevice()

    def pci(self, device: Device) -> str | None:
        """The card's PCI address, by which fdinfo records name it."""
        return self._pci[device.id]

    def read(self, pids: Collection[int] = ()) -> list[Reading]:
        """Read every card that answers; raises SwapdError when no counter can be read."""
        view = self._drm.for_trees(process_trees(pids))

        def read_one(device: Device) -> Reading:
            reading = self.read_device(device)
            by_pid = view.on(self._pci[device.id])
            if by_pid is None:
                return reading
            return replace(reading, by_pid=by_pid, per_process_supported=True, source="fdinfo")

        return self._each.read(self.devices, read_one)

    def read_device(self, device: Device) -> Reading:
        """Read one card's counters; the reading has no per-process figures."""
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
            source="device-delta",
        )

    def close(self) -> None:
        """Hold nothing open, so release nothing."""


def open_amd_sysfs(
    wanted: Collection[int] | None,
    warnings: list[str],
    root: Path | None = None,
    proc: Path | None = None,
) -> AmdSysfsProbe:
    """Open the wanted cards; raises Unusable when there are none or none can be read.

    ``root`` is the DRM class folder and ``proc`` where DRM fdinfo is read; tests
    point them at fake trees.
    """
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
    drm = DrmVram(proc)
    checker = AmdSysfsProbe(candidates, drm)
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
    probe = AmdSysfsProbe(usable, drm)
    warnings.extend(
        f"{device.id}: no PCI address under {root or DRM_ROOT}, "
        "so per-process VRAM cannot be read from DRM fdinfo"
        for device in probe.devices
        if probe.pci(device) is None
    )
    return probe
