"""Device memory telemetry: what each GPU (or host RAM) has free, and what our processes use.

Sources, tried in order by :func:`open_probe`: NVML for NVIDIA, amdsmi for AMD,
the amdgpu sysfs counters when amdsmi cannot load, and host RAM as the last
resort. On AMD, the kernel's DRM fdinfo gives per-process VRAM where amdsmi
does not. A JSON file stands in for GPUs in tests. None of them creates a GPU
compute context, which would itself take hundreds of MiB on every device.
"""

from swapd.probe._fake import FakeFileProbe
from swapd.probe._host import HOST_DEVICE, HostRamProbe, host_memory
from swapd.probe._open import open_probe
from swapd.probe._types import (
    CUDA_ORDER,
    DEVICE_VARIABLES,
    GPU_PICKS,
    Device,
    DeviceKind,
    DevicesSpec,
    MemorySource,
    Probe,
    Reading,
)

__all__ = [
    "CUDA_ORDER",
    "DEVICE_VARIABLES",
    "GPU_PICKS",
    "HOST_DEVICE",
    "Device",
    "DeviceKind",
    "DevicesSpec",
    "FakeFileProbe",
    "HostRamProbe",
    "MemorySource",
    "Probe",
    "Reading",
    "host_memory",
    "open_probe",
]
