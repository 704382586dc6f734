"""A damaged or hostile GGUF header is refused at once, with bounded memory, never a hang.

The estimate reads every model's header in the background and again under a device's
lock as a load plans; what it cannot read falls back to the file's size.
"""

from __future__ import annotations

import struct
import tracemalloc
from typing import TYPE_CHECKING

import pytest

from swapd.estimate import read_gguf_header

if TYPE_CHECKING:
    from pathlib import Path

MIB = 1024**2
STRING, ARRAY, UINT32 = 8, 9, 4


def _header(n_tensors: int, n_kv: int) -> bytes:
    """GGUF v3's fixed header: magic, version and the two counts."""
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


def _key(name: str) -> bytes:
    raw = name.encode()
    return struct.pack("<Q", len(raw)) + raw


def _write(path: Path, data: bytes, size: int = 0) -> Path:
    """Write ``data``, then extend the file with zeros (a sparse file) up to ``size``."""
    path.write_bytes(data)
    if size:
        with path.open("r+b") as f:
            f.truncate(size)
    return path


def _read_bounded(path: Path) -> tuple[str, int]:
    """Read the header; return the error and the peak bytes allocated."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="malformed GGUF header") as caught:
            read_gguf_header(path)
        return str(caught.value), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_string_longer_than_the_file_is_not_copied(tmp_path: Path) -> None:
    """A key whose length runs past the end is refused before the rest of the file is copied."""
    path = _write(tmp_path / "m.gguf", _header(0, 1) + struct.pack("<Q", 1 << 62), 64 * MIB)
    error, peak = _read_bounded(path)
    assert "past the end" in error
    assert peak < MIB


def test_nested_arrays_are_refused_not_recursed(tmp_path: Path) -> None:
    """Arrays of arrays, which llama.cpp refuses, are a ValueError: not a RecursionError."""
    data = _header(0, 1) + _key("a") + struct.pack("<I", ARRAY)
    data += struct.pack("<IQ", ARRAY, 1) * 5000 + struct.pack("<IQ", UINT32, 0)
    error, _ = _read_bounded(_write(tmp_path / "m.gguf", data))
    assert "array of arrays" in error


@pytest.mark.parametrize(
    ("head", "refusal"),
    [
        # 8M tensor entries of zeros: each a valid 24-byte entry
        (_header(8 * MIB, 0), "at byte 72: tensor '' given twice"),
        # 8M metadata entries of zeros: key "", a uint8 0
        (_header(0, 8 * MIB), "at byte 45: key '' given twice"),
        (
            _header(0, 1) + _key("a") + struct.pack("<IIQ", ARRAY, STRING, 30 * MIB),
            "at byte 49: an array of 31457280 strings",
        ),
        (
            _header(1, 0) + _key("t") + struct.pack("<I", 0xFFFFFFFF),
            "at byte 37: tensor 't' has 4294967295 dimensions",
        ),
        (_header(1 << 60, 0), "at byte 24: 1152921504606846976 tensors"),
        (_header(0, 1 << 60), "at byte 24: 1152921504606846976 metadata entries"),
    ],
    ids=["tensors", "keys", "strings", "dimensions", "huge-tensors", "huge-keys"],
)
def test_a_zeroed_file_with_big_counts_is_refused_at_once(
    tmp_path: Path, head: bytes, refusal: str
) -> None:
    """Counts that a 256 MiB file of zeros could hold are refused where they are read.

    Each would walk the whole file (a zeroed entry reads as a valid one), for minutes on a
    multi-GiB file and with a Python object per tensor; llama.cpp refuses the second key or
    tensor named "" and more than four dimensions, and no vocabulary has 30M tokens.
    """
    error, peak = _read_bounded(_write(tmp_path / "m.gguf", head, 256 * MIB))
    assert error.endswith(refusal)
    assert peak < MIB, error


def test_a_repeated_key_is_refused(tmp_path: Path) -> None:
    """A key given twice (llama.cpp refuses the file) is named, not silently replaced."""
    entry = _key("llama.block_count") + struct.pack("<II", UINT32, 2)
    error, _ = _read_bounded(_write(tmp_path / "m.gguf", _header(0, 2) + entry * 2))
    assert "'llama.block_count' given twice" in error


def _model(path: Path, block_count: int, head_count: int | list[float]) -> Path:
    """A one-tensor llama GGUF with these block and head counts."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(block_count)
    writer.add_context_length(1024)
    writer.add_embedding_length(64)
    writer.add_head_count(head_count)  # type: ignore[arg-type]  # floats: the damage tested
    writer.add_tensor("token_embd.weight", np.zeros((1024, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _cpu_need(path: Path, tmp_path: Path) -> int:
    """What admission reserves on the host for a llama-server preset of ``path``."""
    import asyncio

    from swapd import policy
    from swapd.admission import Admission
    from swapd.footprints import Footprints
    from swapd.presets import Preset
    from swapd.probe import HostRamProbe

    preset = Preset(name="m", file="m.yaml", backend="llama-server", model=path)
    adm = Admission(HostRamProbe(), Footprints(tmp_path), policy.Limits())

    async def run() -> int:
        snap = await adm.read(())
        return (await adm.needs(preset, adm.candidates(preset), snap))["cpu"].bytes

    return asyncio.run(run())


def test_a_block_count_llama_cpp_refuses_falls_back_to_the_file_size(tmp_path: Path) -> None:
    """More blocks than llama.cpp loads (512) is damage: the need is the file and its overhead.

    The per-layer tuples were built for whatever the file said: at 2**31 blocks, 16 GiB
    of them and minutes of looping, in the thread a load waits on.
    """
    from swapd.estimate import CPU_OVERHEAD

    path = _model(tmp_path / "m.gguf", 5_000_000, 8)
    assert _cpu_need(path, tmp_path) == path.stat().st_size + CPU_OVERHEAD


def test_per_layer_floats_fall_back_to_the_file_size(tmp_path: Path) -> None:
    """A per-layer head count of floats (infinity too) falls back: no OverflowError escapes.

    llama.cpp takes only integer arrays there. An infinity made ``int()`` raise
    OverflowError, which no caller catches: the load failed with a 500.
    """
    from swapd.estimate import CPU_OVERHEAD

    path = _model(tmp_path / "m.gguf", 2, [float("inf"), 8.0])
    assert _cpu_need(path, tmp_path) == path.stat().st_size + CPU_OVERHEAD
