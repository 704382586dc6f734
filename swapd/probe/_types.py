"""What a probe reports: the devices it watches, one reading per device, and the protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, TypeAlias

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping, Sequence

DeviceKind: TypeAlias = Literal["cpu", "nvidia", "amd", "fake"]
# "auto": every GPU found; "cpu": host RAM only; a tuple: those GPU indices.
DevicesSpec: TypeAlias = Literal["auto", "cpu"] | tuple[int, ...]
# Where a reading's per-process figures come from; "device-delta" means there are
# none, so a model's use can only be told from device totals before and after.
MemorySource: TypeAlias = Literal["nvml", "amdsmi", "fdinfo", "host", "fake", "device-delta"]


@dataclass(frozen=True)
class Device:
    """One memory pool that backends are placed on: a GPU or host RAM."""

    id: str
    kind: DeviceKind
    index: int | None
    name: str
    # Left out of the hash so that devices can be set members and dict keys.
    visible_env: Mapping[str, str] = field(hash=False)


# The variables that pick the GPUs a backend sees; set to nothing, one hides every GPU.
GPU_PICKS = frozenset({"CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"})
# The variables a GPU's ``visible_env`` sets: swapd's to set, since a backend runs on the
# GPU they name whatever device admission placed and counted it on.
DEVICE_VARIABLES = GPU_PICKS | {"CUDA_DEVICE_ORDER"}
# CUDA numbers devices fastest first by default, NVML by PCI bus: this makes them agree.
CUDA_ORDER = "PCI_BUS_ID"


@dataclass(frozen=True)
class Reading:
    """Memory of one device at one moment, in bytes, with the asked processes' share."""

    device: str
    total: int
    free: int
    by_pid: Mapping[int, int] = field(hash=False)
    per_process_supported: bool
    source: MemorySource = "device-delta"


class Probe(Protocol):
    """Reads device memory; blocking but fast, so callers run it in a worker thread."""

    devices: Sequence[Device]

    def read(self, pids: Collection[int] = ()) -> list[Reading]:
        """Return one reading per device; ``by_pid`` covers each asked pid's process tree."""
        ...

    def close(self) -> None:
        """Release the driver library; the probe is not used afterwards."""
        ...


class Unusable(Exception):
    """A telemetry source cannot be used here; the message says why, for the warning."""
