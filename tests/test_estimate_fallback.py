"""A GGUF whose metadata the estimate cannot read must not be admitted with the 1 GiB default."""

from __future__ import annotations

import asyncio
import struct
from typing import TYPE_CHECKING

from fakes.tiny_gguf import write_one_block_llama

from swapd import policy
from swapd.admission import Admission
from swapd.footprints import Footprints
from swapd.presets import Preset
from swapd.probe import HostRamProbe

if TYPE_CHECKING:
    from pathlib import Path

MIB = 1024**2


def _write_with_unknown_type(path: Path) -> Path:
    """An 8 MiB GGUF whose big tensor has a ggml type newer than the installed gguf package."""
    write_one_block_llama(path, 2048)  # 8 MiB
    data = bytearray(path.read_bytes())
    name = b"blk.0.ffn_up.weight"
    at = data.index(name) + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 250)  # a type id gguf does not know
    path.write_bytes(bytes(data))
    return path


def test_unreadable_gguf_needs_at_least_its_file_size(tmp_path: Path) -> None:
    """A tensor type the gguf package does not know: the need is the file and its overhead."""
    model = _write_with_unknown_type(tmp_path / "new-quant.gguf")
    size = model.stat().st_size
    assert size > 8 * MIB
    preset = Preset(name="m", file="m.yaml", backend="llama-server", model=model)
    # default_memory stands in for the 1 GiB default against a 60 GiB model: smaller than the file.
    adm = Admission(HostRamProbe(), Footprints(tmp_path), policy.Limits(), default_memory=MIB)

    async def run() -> int:
        snap = await adm.read(())
        needs = await adm.needs(preset, adm.candidates(preset), snap)
        return needs["cpu"].bytes

    assert asyncio.run(run()) >= size
