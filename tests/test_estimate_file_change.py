"""A model file replaced at the same path is estimated again, as its footprint is re-learned."""

from __future__ import annotations

import asyncio
import dataclasses
import os
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


def test_a_changed_shard_of_a_split_gguf_is_estimated_anew(tmp_path: Path) -> None:
    """The cache key and the footprint's fingerprint cover every shard, not the first alone."""
    import gguf
    import numpy as np

    def write(rows: int) -> list[Path]:
        for old in tmp_path.glob("m-*.gguf"):
            old.unlink()
        writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama", split_max_tensors=1)
        writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
        writer.add_tensor("blk.0.ffn_up.weight", np.zeros((rows, 64), np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return sorted(tmp_path.glob("m-*-of-*.gguf"))

    shards = write(16)
    preset = Preset(name="m", file="m.yaml", backend="llama-server", model=shards[0])
    adm = Admission(HostRamProbe(), Footprints(tmp_path), policy.Limits())

    async def need() -> int:
        snap = await adm.read(())
        return (await adm.needs(preset, adm.candidates(preset), snap))["cpu"].bytes

    before, old_fingerprint = asyncio.run(need()), fingerprint(preset)
    first, stat = shards[0].read_bytes(), shards[0].stat()
    write(16 * 1024)  # the second shard grows by 4 MiB
    shards[0].write_bytes(first)  # the first is as it was, to its mtime
    os.utime(shards[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint(preset) != old_fingerprint
    assert asyncio.run(need()) >= before + 4 * 1024**2 - 64 * 16 * 4


def test_a_replaced_draft_model_is_estimated_anew_and_learned_afresh(tmp_path: Path) -> None:
    """A draft (``-md``) replaced at the same path is a new estimate and a new footprint.

    The cache key and the fingerprint covered the model's own files alone: a bigger
    draft kept the old estimate, and a measured footprint of the smaller one, until a
    reload.
    """
    model, draft = tmp_path / "m.gguf", tmp_path / "draft.gguf"
    write_one_block_llama(model, 16)
    write_one_block_llama(draft, 16)
    preset = Preset(
        name="m", file="m.yaml", backend="llama-server", model=model, args=("-md", str(draft))
    )
    adm = Admission(HostRamProbe(), Footprints(tmp_path), policy.Limits())

    async def need() -> int:
        snap = await adm.read(())
        return (await adm.needs(preset, adm.candidates(preset), snap))["cpu"].bytes

    before, old_fingerprint = asyncio.run(need()), fingerprint(preset)
    write_one_block_llama(draft, 16 * 1024)  # 64 MiB of weights at the same path
    assert fingerprint(preset) != old_fingerprint
    assert asyncio.run(need()) >= before + 60 * 1024**2


def test_an_env_that_sizes_the_backend_is_another_footprint() -> None:
    """``LLAMA_ARG_CTX_SIZE`` sizes llama-server as ``-c`` does: one's measure is not another's."""
    base = Preset(name="m", file="m.yaml", backend="llama-server", model=None)
    small = dataclasses.replace(base, env={"LLAMA_ARG_CTX_SIZE": "512"})
    large = dataclasses.replace(base, env={"LLAMA_ARG_CTX_SIZE": "32768"})
    assert len({fingerprint(base), fingerprint(small), fingerprint(large)}) == 3


def test_a_vllm_folder_with_new_weights_is_learned_afresh(tmp_path: Path) -> None:
    """A vLLM on a CPU is admitted at its measured footprint: one of the folder's old weights.

    The fingerprint counted a model file's size but not a folder's, so weights replaced
    in the folder (a larger model under the same path) kept the smaller one's measure.
    """
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\0" * 4096)
    preset = Preset(name="m", file="m.yaml", backend="vllm", model=model)
    footprints = Footprints(tmp_path)
    footprints.put(preset, "cpu", 2 * 1024**3)
    assert footprints.get(preset, "cpu") is not None
    (model / "model.safetensors").write_bytes(b"\0" * 8192)
    assert footprints.get(preset, "cpu") is None
