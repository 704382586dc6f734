"""How much memory a preset needs on a device: declared, learned, or estimated.

Order of trust: ``memory:`` in the preset, then the footprint measured after
the last load of the same launch, then an estimate (GGUF metadata for
llama-server; a whole-device default for vLLM, which sizes itself to
``--gpu-memory-utilization``).
"""

from __future__ import annotations

from dataclasses import dataclass

from swapd.estimate import estimate_for_args, parse_llama_args
from swapd.footprints import Footprints
from swapd.logs import get_logger
from swapd.presets import Preset
from swapd.probe import Device

_log = get_logger("swapd.needs")
# vLLM on a CPU sizes its KV cache from VLLM_CPU_KVCACHE_SPACE; without a declared
# memory: swapd assumes this much host RAM for it.
VLLM_CPU_DEFAULT = 4 * 1024**3
# vLLM on a GPU takes --gpu-memory-utilization of the card (its default is 0.9).
VLLM_GPU_DEFAULT_FRACTION = 0.9


@dataclass(frozen=True)
class Need:
    """Bytes to admit a load with, and where the number came from."""

    bytes: int
    source: str  # "preset", "measured" or "estimate"
    estimate: int | None = None


def estimate_bytes(preset: Preset, device: Device, total: int) -> int | None:
    """An estimate from the model itself, or None when there is nothing to go on."""
    on_gpu = device.kind != "cpu"
    if preset.backend == "llama-server" and preset.model is not None and preset.model.is_file():
        try:
            estimate = estimate_for_args(preset.model, parse_llama_args(preset.args), on_gpu=on_gpu)
        except (ValueError, OSError) as exc:
            _log.warning("model.estimate.fail", model=preset.name, error=str(exc))
            return None
        return estimate.total
    if preset.backend == "vllm":
        return int(total * VLLM_GPU_DEFAULT_FRACTION) if on_gpu else VLLM_CPU_DEFAULT
    return None


def memory_need(
    preset: Preset, device: Device, estimate: int | None, footprints: Footprints
) -> Need:
    """What admission should reserve for ``preset`` on ``device``.

    ``estimate`` is :func:`estimate_bytes` for this preset and device; the caller
    computes it once, off the event loop, since reading GGUF metadata is file I/O.
    """
    if preset.memory is not None:
        return Need(preset.memory, "preset", estimate)
    learned = footprints.get(preset, device.kind)
    if learned is not None:
        return Need(learned.bytes, "measured", estimate)
    return Need(estimate or 0, "estimate", estimate)
