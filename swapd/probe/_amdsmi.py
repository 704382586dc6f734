"""AMD GPUs through the amdsmi library, imported only when asked for.

amdsmi must match the installed ROCm, so importing it can fail in many ways;
consumer Radeon cards answer NOT_SUPPORTED to many calls, per-process memory
among them, and the older calls report megabytes where the newer report bytes.
Where amdsmi has no per-process figure, the kernel's DRM fdinfo stands in,
matched to the GPU by its PCI address.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from swapd.errors import SwapdError
from swapd.probe._drm import DrmVram, TreeVram, pci_address
from swapd.probe._select import EachDevice, keep_readable, select_indices
from swapd.probe._tree import attribute, foreign_list, process_trees
from swapd.probe._types import Device, MemorySource, Reading, Unusable

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence
    from pathlib import Path
    from types import ModuleType

# amdsmi_get_gpu_vram_usage reports "MB" that are mebibytes.
MIB = 1024 * 1024


def amd_env(index: int) -> dict[str, str]:
    """Environment that shows a child only GPU ``index``.

    ROCr filters first and HIP then numbers what is left, so the one visible GPU
    is HIP (and CUDA-named) device 0; setting all three overrides whatever the
    daemon itself inherited.
    """
    return {
        "ROCR_VISIBLE_DEVICES": str(index),
        "HIP_VISIBLE_DEVICES": "0",
        "CUDA_VISIBLE_DEVICES": "0",
    }


class AmdSmiProbe:
    """VRAM per GPU and, where the driver tells, VRAM per process."""

    def __init__(
        self,
        amd: ModuleType,
        devices: Sequence[tuple[Device, object]],
        pci: Mapping[str, str | None],
        drm: DrmVram,
    ) -> None:
        self._amd = amd
        self._handles = {device.id: handle for device, handle in devices}
        self.devices: Sequence[Device] = tuple(device for device, _ in devices)
        self._pci = pci
        self._drm = drm
        # Devices whose byte-exact calls failed once; they use the megabyte call from then on.
        self._megabytes: set[str] = set()
        self._closed = False
        self._each = EachDevice()

    def read(self, pids: Collection[int] = ()) -> list[Reading]:
        """Read every device that answers; raises SwapdError when none reports its VRAM."""
        trees = process_trees(pids)
        view = self._drm.for_trees(trees)
        return self._each.read(self.devices, lambda device: self._read(device, trees, view)[0])

    def read_device(
        self, device: Device, trees: Mapping[int, frozenset[int]]
    ) -> tuple[Reading, str | None]:
        """Read one device; the second value says why amdsmi's per-process usage is missing."""
        return self._read(device, trees, self._drm.for_trees(trees))

    def _read(
        self, device: Device, trees: Mapping[int, frozenset[int]], view: TreeVram
    ) -> tuple[Reading, str | None]:
        """Read one device, taking per-process figures from fdinfo where amdsmi has none."""
        handle = self._handles[device.id]
        try:
            total, used = self._memory(device.id, handle)
        except self._amd.AmdSmiException as error:
            raise SwapdError(f"{device.id}: amdsmi cannot read VRAM: {error}") from error
        usage, missing = self._processes(handle)
        if missing is None and (missing := foreign_list(usage, trees)) is not None:
            usage = {}  # host pids (KFD's): fdinfo, read in this namespace, may tell
        by_pid, source = self._per_process(device, trees, view, usage, supported=missing is None)
        reading = Reading(
            device=device.id,
            total=total,
            free=max(0, total - used),
            by_pid=by_pid,
            per_process_supported=source != "device-delta",
            source=source,
        )
        return reading, missing

    def _per_process(
        self,
        device: Device,
        trees: Mapping[int, frozenset[int]],
        view: TreeVram,
        usage: Mapping[int, int],
        *,
        supported: bool,
    ) -> tuple[dict[int, int], MemorySource]:
        """amdsmi's figures when it has one for every tree on the GPU, else fdinfo's."""
        by_pid = attribute(usage, trees)
        if supported and by_pid.keys() >= trees.keys():
            # Every tree has a figure: no need to scan fdinfo.
            return by_pid, "amdsmi"
        drm = view.on(self._pci.get(device.id))
        if drm is None:
            return by_pid, "amdsmi" if supported else "device-delta"
        if supported and drm.keys() <= by_pid.keys():
            # The trees amdsmi left out hold no VRAM here by the kernel's count either.
            return by_pid, "amdsmi"
        # Consumer cards list clients with zero or "N/A" VRAM; the kernel's count is right.
        return drm, "fdinfo"

    def _memory(self, device_id: str, handle: object) -> tuple[int, int]:
        """Total and used VRAM in bytes."""
        amd = self._amd
        if device_id not in self._megabytes:
            try:
                vram = amd.AmdSmiMemoryType.VRAM
                total = int(amd.amdsmi_get_gpu_memory_total(handle, vram))
                used = int(amd.amdsmi_get_gpu_memory_usage(handle, vram))
            except (amd.AmdSmiException, AttributeError):
                # Missing from older libraries, unsupported on some cards.
                self._megabytes.add(device_id)
            else:
                return total, used
        usage = amd.amdsmi_get_gpu_vram_usage(handle)
        return int(usage["vram_total"]) * MIB, int(usage["vram_used"]) * MIB

    def _processes(self, handle: object) -> tuple[dict[int, int], str | None]:
        """VRAM bytes per pid, or the reason the driver cannot tell."""
        amd = self._amd
        try:
            entries = amd.amdsmi_get_gpu_process_list(handle)
        except amd.AmdSmiException as error:
            return {}, f"{type(error).__name__}: {error}"
        usage: dict[int, int] = {}
        for entry in entries:
            if not isinstance(entry, Mapping):
                # ROCm 5.7 returned opaque handles that need one more call each.
                return {}, "this amdsmi version lists process handles, not memory"
            pid = entry.get("pid")
            memory = entry.get("memory_usage")
            vram = memory.get("vram_mem") if isinstance(memory, Mapping) else None
            # Fields the driver cannot fill come back as "N/A" strings.
            if isinstance(pid, int) and isinstance(vram, int):
                usage[pid] = usage.get(pid, 0) + vram
        return usage, None

    def close(self) -> None:
        """Shut amdsmi down once."""
        if not self._closed:
            self._closed = True
            self._amd.amdsmi_shut_down()


def open_amdsmi(
    wanted: Collection[int] | None, warnings: list[str], proc: Path | None = None
) -> AmdSmiProbe:
    """Import and initialise amdsmi and open the wanted GPUs; raises Unusable saying why not.

    ``proc`` is where DRM fdinfo is read (``/proc`` unless a test says otherwise).
    """
    try:
        amd = importlib.import_module("amdsmi")
    except ModuleNotFoundError as error:
        raise Unusable("amdsmi not installed (pip install swapd[amd])") from error
    except Exception as error:  # a mismatched ROCm fails in many ways
        raise Unusable(f"amdsmi failed to load ({type(error).__name__}: {error})") from error
    try:
        amd.amdsmi_init()
    except amd.AmdSmiException as error:
        raise Unusable(f"amdsmi unavailable ({type(error).__name__}: {error})") from error
    try:
        return _open_devices(amd, wanted, warnings, DrmVram(proc))
    except BaseException:
        amd.amdsmi_shut_down()
        raise


def _name(amd: ModuleType, handle: object, index: int) -> str:
    """Marketing name, which consumer cards may leave empty or refuse."""
    try:
        name = str(amd.amdsmi_get_gpu_asic_info(handle).get("market_name") or "")
    except (amd.AmdSmiException, AttributeError):
        name = ""
    return name.strip() or f"AMD GPU {index}"


def _pci(amd: ModuleType, handle: object) -> str | None:
    """PCI address, to find the GPU's clients in DRM fdinfo; None if amdsmi cannot tell."""
    try:
        return pci_address(amd.amdsmi_get_gpu_device_bdf(handle))
    except (amd.AmdSmiException, AttributeError):
        return None


def _open_devices(
    amd: ModuleType, wanted: Collection[int] | None, warnings: list[str], drm: DrmVram
) -> AmdSmiProbe:
    """Open handles, then read each device once so that a broken one is dropped up front."""
    try:
        handles = list(amd.amdsmi_get_processor_handles())
    except amd.AmdSmiException as error:
        raise Unusable(f"amdsmi cannot list GPUs ({type(error).__name__}: {error})") from error
    candidates = [
        (
            Device(f"gpu{index}", "amd", index, _name(amd, handles[index], index), amd_env(index)),
            handles[index],
        )
        for index in select_indices("amdsmi", range(len(handles)), wanted, warnings)
    ]
    pci = {device.id: _pci(amd, handle) for device, handle in candidates}
    checker = AmdSmiProbe(amd, candidates, pci, drm)
    usable = keep_readable(
        checker, candidates, warnings, source="amdsmi", per_process="per-process VRAM"
    )
    for device, _ in usable:
        if pci[device.id] is None:
            warnings.append(
                f"{device.id} ({device.name}): amdsmi gives no PCI address, "
                "so DRM fdinfo cannot stand in for per-process VRAM"
            )
    return AmdSmiProbe(amd, usable, pci, drm)
