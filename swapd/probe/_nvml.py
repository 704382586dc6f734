"""NVIDIA GPUs through NVML (nvidia-ml-py), which reads memory without creating a CUDA context."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from swapd.errors import SwapdError
from swapd.probe._select import EachDevice, keep_readable, select_indices
from swapd.probe._tree import attribute, foreign_list, process_trees
from swapd.probe._types import CUDA_ORDER, Device, Reading, Unusable

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping, Sequence
    from types import ModuleType


def nvidia_env(index: int) -> dict[str, str]:
    """Environment that shows a child only GPU ``index`` as NVML numbers it.

    CUDA numbers devices fastest first by default, NVML by PCI bus; the order
    setting makes the two agree on machines with mixed GPUs.
    """
    return {"CUDA_VISIBLE_DEVICES": str(index), "CUDA_DEVICE_ORDER": CUDA_ORDER}


class NvmlProbe:
    """Free and total memory per GPU, and per-process memory from the running-process lists."""

    def __init__(self, nvml: ModuleType, devices: Sequence[tuple[Device, object]]) -> None:
        self._nvml = nvml
        self._handles = {device.id: handle for device, handle in devices}
        self.devices: Sequence[Device] = tuple(device for device, _ in devices)
        self._closed = False
        self._each = EachDevice()

    def read(self, pids: Collection[int] = ()) -> list[Reading]:
        """Read every device that answers; raises SwapdError when none reports its memory."""
        trees = process_trees(pids)
        return self._each.read(self.devices, lambda device: self.read_device(device, trees)[0])

    def read_device(
        self, device: Device, trees: Mapping[int, frozenset[int]]
    ) -> tuple[Reading, str | None]:
        """Read one device; the second value says why per-process usage is missing, if it is."""
        nvml = self._nvml
        handle = self._handles[device.id]
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        except nvml.NVMLError as error:
            raise SwapdError(f"{device.id}: NVML cannot read memory: {error}") from error
        usage, missing = self._processes(handle)
        if missing is None and (missing := foreign_list(usage, trees)) is not None:
            usage = {}
        reading = Reading(
            device=device.id,
            total=int(memory.total),
            free=int(memory.free),
            by_pid=attribute(usage, trees),
            per_process_supported=missing is None,
            source="nvml" if missing is None else "device-delta",
        )
        return reading, missing

    def _processes(self, handle: object) -> tuple[dict[int, int], str | None]:
        """Bytes per pid from the compute list, plus graphics contexts (Vulkan backends)."""
        nvml = self._nvml
        try:
            compute = list(nvml.nvmlDeviceGetComputeRunningProcesses(handle))
        except nvml.NVMLError as error:
            # NotSupported on some boards, NoPermission in some containers: keep the totals.
            return {}, f"{type(error).__name__}: {error}"
        try:
            graphics = list(nvml.nvmlDeviceGetGraphicsRunningProcesses(handle))
        except nvml.NVMLError:
            # Compute contexts are what LLM backends hold; graphics ones are a bonus.
            graphics = []
        usage: dict[int, int] = {}
        for proc in [*compute, *graphics]:
            used = proc.usedGpuMemory
            # None where NVML cannot tell (WDDM, WSL2): better no number than a wrong one.
            if used is not None:
                pid = int(proc.pid)
                # A process with both kinds of context is listed twice with the same bytes.
                usage[pid] = max(usage.get(pid, 0), int(used))
        return usage, None

    def close(self) -> None:
        """Shut NVML down once; NVML counts inits, so other users in the process are unaffected."""
        if not self._closed:
            self._closed = True
            self._nvml.nvmlShutdown()


def open_nvml(wanted: Collection[int] | None, warnings: list[str]) -> NvmlProbe:
    """Initialise NVML and open the wanted GPUs; raises Unusable saying why NVML cannot serve."""
    try:
        nvml = importlib.import_module("pynvml")
    except ImportError as error:
        raise Unusable(
            "NVML unavailable (nvidia-ml-py not installed: pip install swapd[nvidia])"
        ) from error
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as error:
        raise Unusable(f"NVML unavailable ({type(error).__name__}: {error})") from error
    try:
        return _open_devices(nvml, wanted, warnings)
    except BaseException:
        nvml.nvmlShutdown()
        raise


def _open_devices(
    nvml: ModuleType, wanted: Collection[int] | None, warnings: list[str]
) -> NvmlProbe:
    """Open handles, then read each device once so that a broken one is dropped up front."""
    try:
        count = int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError as error:
        raise Unusable(f"NVML cannot list GPUs ({type(error).__name__}: {error})") from error
    candidates: list[tuple[Device, object]] = []
    for index in select_indices("NVML", range(count), wanted, warnings):
        try:
            # The count includes GPUs this process may not open (NoPermission where a
            # unit or container has only some /dev/nvidiaN), and lost ones: drop those.
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = str(nvml.nvmlDeviceGetName(handle))
        except nvml.NVMLError as error:
            warnings.append(
                f"gpu{index}: NVML cannot open it ({type(error).__name__}: {error}); dropped"
            )
            continue
        candidates.append((Device(f"gpu{index}", "nvidia", index, name, nvidia_env(index)), handle))
    if not candidates:
        raise Unusable("NVML could not open any GPU")
    checker = NvmlProbe(nvml, candidates)
    usable = keep_readable(
        checker, candidates, warnings, source="NVML", per_process="per-process memory"
    )
    return NvmlProbe(nvml, usable)
