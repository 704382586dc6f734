"""Pick the requested GPU indices out of those a source found."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from swapd.errors import SwapdError
from swapd.logs import get_logger
from swapd.probe._types import Unusable

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping, Sequence

    from swapd.probe._types import Device, Reading


class DeviceReader(Protocol):
    """A GPU probe that can read one device and say why per-process data is missing."""

    def read_device(
        self, device: Device, trees: Mapping[int, frozenset[int]]
    ) -> tuple[Reading, str | None]:
        """Read one device."""
        ...


_log = get_logger("swapd.probe")


class EachDevice:
    """Readings of the devices that answer: one GPU lost must not stop loads on the others."""

    def __init__(self) -> None:
        self._failing: set[str] = set()

    def read(
        self, devices: Sequence[Device], read_one: Callable[[Device], Reading]
    ) -> list[Reading]:
        """``read_one`` of each device, leaving out those that fail (all of them, too).

        A device left out is logged when it starts failing (``probe.device.fail``) and when
        it answers again (``probe.device.back``); admission places nothing on it meanwhile:
        a load that may use no other device gets 503 ``insufficient_memory``, also where
        that GPU is the only one (not a failed load, which would back the model off).
        """
        readings: list[Reading] = []
        for device in devices:
            try:
                readings.append(read_one(device))
            except SwapdError as error:
                if device.id not in self._failing:
                    self._failing.add(device.id)
                    _log.error("probe.device.fail", device=device.id, error=str(error))
                continue
            if device.id in self._failing:
                self._failing.discard(device.id)
                _log.info("probe.device.back", device=device.id)
        return readings


def select_indices(
    source: str, available: Collection[int], wanted: Collection[int] | None, warnings: list[str]
) -> list[int]:
    """Return the wanted indices that exist (all when ``wanted`` is None), warning about the rest.

    Raises Unusable when the source has no GPU or none of the wanted ones.
    """
    if not available:
        raise Unusable(f"{source} found no GPUs")
    if wanted is None:
        return sorted(available)
    found = ", ".join(f"gpu{index}" for index in sorted(available))
    chosen: list[int] = []
    for index in sorted(set(wanted)):
        if index in available:
            chosen.append(index)
        else:
            warnings.append(f"gpu{index} does not exist ({source} found {found}); dropped")
    if not chosen:
        raise Unusable(f"{source} has none of the requested GPUs")
    return chosen


def keep_readable(
    checker: DeviceReader,
    candidates: Sequence[tuple[Device, object]],
    warnings: list[str],
    *,
    source: str,
    per_process: str,
) -> list[tuple[Device, object]]:
    """The candidates that answer a first read; warn about the rest and missing per-process data.

    Raises Unusable when no device can be read at all.
    """
    usable: list[tuple[Device, object]] = []
    for device, handle in candidates:
        try:
            _, missing = checker.read_device(device, {})
        except SwapdError as error:
            warnings.append(f"{error}; dropped")
            continue
        if missing is not None:
            warnings.append(
                f"{device.id} ({device.name}): {source} does not report {per_process} ({missing})"
            )
        usable.append((device, handle))
    if not usable:
        raise Unusable(
            f"{source} could not read any GPU's {'VRAM' if source == 'amdsmi' else 'memory'}"
        )
    return usable
