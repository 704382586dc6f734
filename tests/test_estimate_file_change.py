"""A model file replaced at the same path is estimated again, as its footprint is re-learned."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fakes.tiny_gguf import write_one_block_llama

from swapd import policy
from swapd.admission import Admission
from swapd.footprints import Footprints, fingerprint
from swapd.presets import Preset
from swapd.probe import HostRamProbe

if TYPE_CHECKING:
    from pathlib import Path


def test_estimate_follows_a_replaced_model_file(tmp_path: Path) -> None:
    """A larger file at the same path is estimated anew, not served from the cache."""
    model = tmp_path / "current.gguf"
    write_one_block_llama(model, 16)  # 64 KiB of weights
    preset = Preset(name="m", file="m.yaml", backend="llama-server", model=model)
    adm = Admission(HostRamProbe(), Footprints(tmp_path), policy.Limits())

    async def need() -> int:
        snap = await adm.read(())
        return (await adm.needs(preset, adm.candidates(preset), snap))["cpu"].bytes

    before, old_fingerprint = asyncio.run(need()), fingerprint(preset)
    write_one_block_llama(model, 16 * 1024)  # the same path now holds 64 MiB of weights
    assert fingerprint(preset) != old_fingerprint  # footprints already treat it as a new launch
    assert asyncio.run(need()) >= before + 60 * 1024**2
