"""What a model's loss costs is read per slot and per kind of device.

A model allowed on a GPU and on the CPU starts at two speeds: its CPU start says nothing of
its GPU start. A model a reload removed keeps draining beside the one added back under its
name: each has its own weights' size.
"""

from __future__ import annotations

from pathlib import Path

from swapd import residency
from swapd.backends import KINDS
from swapd.presets import Preset
from swapd.probe import Device
from swapd.slot import Slot

GPU = Device(id="gpu0", kind="nvidia", index=0, name="GPU 0", visible_env={})
CPU = Device(id="cpu", kind="cpu", index=None, name="host RAM", visible_env={})
MIB = 1024**2


def _slot(name: str) -> Slot:
    preset = Preset(
        name=name, file=f"presets/{name}.yaml", backend="llama-server", model=Path("/m")
    )
    return Slot(preset, KINDS["llama-server"])


def test_a_start_timed_on_the_cpu_does_not_weigh_the_model_on_a_gpu() -> None:
    """Untimed on the GPU: its plans there compare plain CRFs until a GPU start is timed."""
    slot = _slot("x")
    slot.start_times["cpu"] = 30.0
    slot.device = GPU
    assert slot.reload_s is None
    slot.device = CPU
    assert slot.reload_s == 30.0


def test_a_stopped_model_is_weighed_by_the_start_on_the_device_it_last_ran_on() -> None:
    """Its locked pages (the ram tier) are worth the start they spare, on that device."""
    slot = _slot("x")
    slot.start_times["cpu"], slot.start_times["nvidia"] = 30.0, 4.0
    slot.device, slot.started_on = None, "nvidia"
    assert slot.reload_s == 4.0
    slot.started_on = "cpu"
    assert slot.reload_s == 30.0


def test_namesakes_cost_the_ram_tier_their_own_weights() -> None:
    """The retiring model's pages cost what its file held, not its namesake's new file."""
    retiring, added = _slot("x"), _slot("x")
    retiring.model_bytes, added.model_bytes = 300 * MIB, 700 * MIB
    assert residency.ram_cost(retiring, 0) == 300 * MIB
    assert residency.ram_cost(added, 0) == 700 * MIB
