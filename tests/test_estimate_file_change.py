"""A model file replaced at the same path is estimated again, as its footprint is re-learned."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import gguf
import numpy as np

from swapd import policy
from swapd.admission import Admission
from swapd.footprints import Footprints, fingerprint
from swapd.presets import Preset
from swapd.probe import HostRamProbe

if TYPE_CHECKING:
    from pathlib import Path


def _write(path: Path, ffn_rows: int) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_head_count(8)
    writer.add_token_list([f"t{i}" for i in range(100)])
    writer.add_tensor("token_embd.weight", np.zeros((100, 64), np.float32))
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((ffn_rows, 1024), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_estimate_follows_a_replaced_model_file(tmp_path: Path) -> None:
    """A larger file at the same path is estimated anew, not served from the cache."""
    model = tmp_path / "current.gguf"
    _write(model, 16)  # 64 KiB of weights
    preset = Preset(name="m", file="m.yaml", backend="llama-server", model=model)
    adm = Admission(HostRamProbe(), Footprints(tmp_path), policy.Limits())

    async def need() -> int:
        snap = await adm.read(())
        return (await adm.needs(preset, adm.candidates(preset), snap))["cpu"].bytes

    before, old_fingerprint = asyncio.run(need()), fingerprint(preset)
    _write(model, 16 * 1024)  # the same path now holds 64 MiB of weights
    assert fingerprint(preset) != old_fingerprint  # footprints already treat it as a new launch
    assert asyncio.run(need()) >= before + 60 * 1024**2
