"""How much memory a preset needs on a device: declared, learned, or estimated.

Order of trust: ``memory:`` in the preset, then the footprint measured after
the last load of the same launch, then an estimate (GGUF metadata for
llama-server; a whole-device default for vLLM, which sizes itself to
``--gpu-memory-utilization``).
"""

from __future__ import annotations

from dataclasses import dataclass

from swapd.backends import kind_of
from swapd.footprints import Footprints
from swapd.presets import Preset
from swapd.probe import Device


@dataclass(frozen=True)
class Need:
    """Bytes to admit a load with, and where the number came from."""

    bytes: int
    source: str  # "preset", "measured" or "estimate"
    estimate: int | None = None


def estimate_bytes(preset: Preset, device: Device, total: int) -> int | None:
    """The kind's estimate from the model itself, or None when there is nothing to go on."""
    return kind_of(preset).estimate(preset, device, total)


def memory_need(
    preset: Preset,
    device: Device,
    estimate: int | None,
    footprints: Footprints,
    default: int = 1024**3,
) -> Need:
    """What admission should reserve for ``preset`` on ``device``.

    ``estimate`` is :func:`estimate_bytes` for this preset and device; the caller
    computes it once, off the event loop, since reading GGUF metadata is file I/O.
    """
    if preset.memory is not None:
        if estimate is not None and kind_of(preset).own_share(preset, device):
            # Its own share of the card or of host RAM (vLLM's --gpu-memory-utilization) is
            # what it takes, whatever memory: says: admitted for less, the rest would go to
            # another model.
            return Need(max(preset.memory, estimate), "preset", estimate)
        return Need(preset.memory, "preset", estimate)
    learned = footprints.get(preset, device.kind)
    if learned is not None and not (kind_of(preset).sizes_to_card and device.kind != "cpu"):
        return Need(learned.bytes, "measured", estimate)
    if estimate is None:
        # Nothing to go on (a command backend, say): a conservative guess until measured.
        return Need(default, "default", None)
    return Need(estimate, "estimate", estimate)
