"""A damaged or hostile GGUF header is refused at once, with bounded memory, never a hang.

The estimate reads every model's header in the background and again under a device's
lock as a load plans; what it cannot read falls back to the file's size.
"""

from __future__ import annotations

import struct
import time
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


def _read_bounded(path: Path) -> tuple[str, float, int]:
    """Read the header; return the error, the seconds taken and the peak bytes allocated."""
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(ValueError, match="malformed GGUF header") as caught:
            read_gguf_header(path)
        return str(caught.value), time.monotonic() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_string_longer_than_the_file_is_not_copied(tmp_path: Path) -> None:
    """A key whose length runs past the end is refused before the rest of the file is copied."""
    path = _write(tmp_path / "m.gguf", _header(0, 1) + struct.pack("<Q", 1 << 62), 64 * MIB)
    error, _, peak = _read_bounded(path)
    assert "past the end" in error
    assert peak < MIB


def test_nested_arrays_are_refused_not_recursed(tmp_path: Path) -> None:
    """Arrays of arrays, which llama.cpp refuses, are a ValueError: not a RecursionError."""
    data = _header(0, 1) + _key("a") + struct.pack("<I", ARRAY)
    data += struct.pack("<IQ", ARRAY, 1) * 5000 + struct.pack("<IQ", UINT32, 0)
    error, _, _ = _read_bounded(_write(tmp_path / "m.gguf", data))
    assert "array of arrays" in error


@pytest.mark.parametrize(
    "head",
    [
        _header(8 * MIB, 0),  # 8M tensor entries of zeros: each a valid 24-byte entry
        _header(0, 8 * MIB),  # 8M metadata entries of zeros: key "", a uint8 0
        _header(0, 1) + _key("a") + struct.pack("<IIQ", ARRAY, STRING, 30 * MIB),
        _header(1, 0) + _key("t") + struct.pack("<I", 0xFFFFFFFF),  # dimensions
        _header(1 << 60, 0),
        _header(0, 1 << 60),
    ],
    ids=["tensors", "keys", "strings", "dimensions", "huge-tensors", "huge-keys"],
)
def test_a_zeroed_file_with_big_counts_is_refused_at_once(tmp_path: Path, head: bytes) -> None:
    """Counts that a 256 MiB file of zeros could hold are refused in well under a second.

    Each would walk the whole file (a zeroed entry reads as a valid one), for minutes on a
    multi-GiB file and with a Python object per tensor; llama.cpp refuses the second key or
    tensor named "" and more than four dimensions, and no vocabulary has 30M tokens.
    """
    error, seconds, peak = _read_bounded(_write(tmp_path / "m.gguf", head, 256 * MIB))
    assert seconds < 1, error
    assert peak < MIB, error


def test_a_repeated_key_is_refused(tmp_path: Path) -> None:
    """A key given twice (llama.cpp refuses the file) is named, not silently replaced."""
    entry = _key("llama.block_count") + struct.pack("<II", UINT32, 2)
    error, _, _ = _read_bounded(_write(tmp_path / "m.gguf", _header(0, 2) + entry * 2))
    assert "'llama.block_count' given twice" in error
