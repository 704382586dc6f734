"""Choose the telemetry source for the configured devices, falling back instead of failing."""

from __future__ import annotations

from typing import TYPE_CHECKING

from swapd.probe._amdsmi import open_amdsmi
from swapd.probe._fake import open_fake
from swapd.probe._host import HostRamProbe
from swapd.probe._nvml import open_nvml
from swapd.probe._sysfs import open_amd_sysfs
from swapd.probe._types import Unusable

if TYPE_CHECKING:
    from collections.abc import Collection
    from pathlib import Path

    from swapd.probe._types import DevicesSpec, Probe


def open_probe(spec: DevicesSpec, *, fake_file: Path | None = None) -> tuple[Probe, list[str]]:
    """Return the probe and human-readable warnings about fallbacks.

    A missing library or driver becomes a warning and a fallback, never an
    error; only a ``fake_file`` that is missing or malformed raises SwapdError.
    """
    warnings: list[str] = []
    if spec == "cpu":
        if fake_file is not None:
            warnings.append(f"fake probe file {fake_file} ignored: devices is 'cpu'")
        return HostRamProbe(), warnings
    wanted = None if spec == "auto" else spec
    if fake_file is None:
        return _open_gpus(wanted, warnings), warnings
    try:
        return open_fake(fake_file, wanted, warnings), warnings
    except Unusable as why:
        warnings.append(f"{why}; using host RAM")
        return HostRamProbe(), warnings


def _open_gpus(wanted: Collection[int] | None, warnings: list[str]) -> Probe:
    """Try NVML, then amdsmi, then the amdgpu sysfs counters, then settle for host RAM."""
    reasons: list[str] = []
    for opener in (open_nvml, open_amdsmi):
        try:
            return opener(wanted, warnings)
        except Unusable as why:
            reasons.append(str(why))
    try:
        sysfs = open_amd_sysfs(wanted, warnings)
    except Unusable:
        # Absent counters are the normal case off AMD machines: not worth a word.
        pass
    else:
        # NVML's absence is expected on an AMD machine; only amdsmi's is news.
        warnings.append(
            f"{reasons[-1]}; reading VRAM from amdgpu sysfs and per-process VRAM from DRM fdinfo"
        )
        return sysfs
    warnings.append("; ".join([*reasons, "using host RAM"]))
    return HostRamProbe()
