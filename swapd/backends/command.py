"""Any OpenAI-compatible server, run from the preset's ``cmd`` with macros replaced."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from swapd.backends._kind import OneProcess, OwnKey, Placement, RamVia, Tier
from swapd.backends._launch import BinaryNotFound, why_not_runnable

if TYPE_CHECKING:
    from swapd.presets import Preset
    from swapd.probe import Device


class CommandKind(OneProcess):
    """``backend: command``: swapd knows nothing of it but its port and health path."""

    name = "command"
    tiers: frozenset[Tier] = frozenset({"device", "disk", "store"})
    ram_via: RamVia | None = None
    needs_model = False
    sizes_to_card = False
    stop_signal = signal.SIGTERM
    own_key: OwnKey | None = None  # swapd cannot know how an arbitrary server takes a key
    model_flags: tuple[str, ...] = ()  # its cmd is written whole, ${MODEL} where wanted
    health_says_loaded = False  # an arbitrary server: health: none is the preset's to choose
    reserved_routes: frozenset[str] = frozenset()
    served_name_flag: str | None = None
    unused_keys: Mapping[str, str] = MappingProxyType(
        {
            "args": "cmd is run as written; put the arguments in cmd",
            "binary": "cmd is run as written; put the program first in cmd",
        }
    )

    def binary(self, preset: Preset) -> str:
        """The first word of ``cmd``, which must be an executable (``${MODEL}``: a llamafile)."""
        program = preset.cmd[0] if preset.cmd else ""
        program = program.replace("${MODEL}", str(preset.model) if preset.model else preset.name)
        if not shutil.which(program):
            raise BinaryNotFound(f"command {program!r} {why_not_runnable(program)}")
        return program

    def argv(self, preset: Preset, binary: str, port: int, placement: Placement) -> list[str]:
        """``cmd`` with ``${PORT}`` and ``${MODEL}`` replaced in every argument."""
        del binary  # cmd names its own program
        model = placement.model_path or (str(preset.model) if preset.model else preset.name)
        return [arg.replace("${PORT}", str(port)).replace("${MODEL}", model) for arg in preset.cmd]

    def estimate(self, preset: Preset, device: Device, total: int) -> int | None:
        """Unknown until measured."""
        del preset, device, total
        return None


COMMAND = CommandKind()
