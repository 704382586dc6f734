"""A fast reader of a GGUF file's metadata and tensor table (never the tensor data).

``gguf.GGUFReader`` turns every element of every array into a numpy object,
which takes seconds for a 262k-token vocabulary; admission only needs the
scalars, the lengths of big arrays and each tensor's size, so this reader
skips array bodies it does not keep.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# GGUF value types and the struct format of the scalar ones.
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
# Arrays longer than this keep only their length (vocabularies, merges).
_KEEP_ARRAY = 4096

Value = int | float | bool | str | list[int | float | bool | str]


class GgufError(ValueError):
    """The file is not a GGUF file this reader understands."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's name, shape and size in bytes."""

    name: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class GgufInfo:
    """Metadata keys and the tensor table of one GGUF file."""

    metadata: dict[str, Value]
    array_lengths: dict[str, int]
    tensors: tuple[TensorInfo, ...]


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> int | float | bool:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GgufError("file ends inside its header")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        result: int | float | bool = value
        return result

    def u32(self) -> int:
        return int(self.unpack("<I"))

    def u64(self) -> int:
        return int(self.unpack("<Q"))

    def string(self) -> str:
        length = self.u64()
        raw = self.buf[self.pos : self.pos + length]
        self.pos += length
        return raw.decode("utf-8", "replace")

    def skip_string(self) -> None:
        length = self.u64()  # read first: `pos += u64()` would add to the stale position
        self.pos += length

    def value(self, kind: int) -> int | float | bool | str:
        if kind == _STRING:
            return self.string()
        if kind not in _SCALARS:
            raise GgufError(f"unknown metadata value type {kind}")
        return self.unpack(_SCALARS[kind])


def _tensor_bytes(shape: tuple[int, ...], ggml_type: int) -> int:
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError) as exc:
        raise GgufError(f"unknown tensor type {ggml_type}") from exc
    elements = 1
    for dim in shape:
        elements *= dim
    return elements // block * size


def read_gguf(path: Path) -> GgufInfo:
    """Read the header of ``path``; raise :class:`GgufError` if it is not GGUF v2 or v3."""
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf)
        if buf[:4] != b"GGUF":
            raise GgufError(f"{path} is not a GGUF file")
        cur.pos = 4
        version = cur.u32()
        if version not in (2, 3):
            raise GgufError(f"{path}: GGUF version {version} is not supported")
        n_tensors, n_kv = cur.u64(), cur.u64()
        metadata: dict[str, Value] = {}
        lengths: dict[str, int] = {}
        for _ in range(n_kv):
            key = cur.string()
            kind = cur.u32()
            if kind != _ARRAY:
                metadata[key] = cur.value(kind)
                continue
            item_kind, count = cur.u32(), cur.u64()
            lengths[key] = count
            if count <= _KEEP_ARRAY and item_kind != _ARRAY:
                metadata[key] = [cur.value(item_kind) for _ in range(count)]
            elif item_kind == _STRING:
                for _ in range(count):
                    cur.skip_string()
            elif item_kind in _SCALARS:
                cur.pos += count * struct.calcsize(_SCALARS[item_kind])
            else:
                raise GgufError(f"{path}: nested array in {key} is not supported")
        tensors = []
        for _ in range(n_tensors):
            name = cur.string()
            shape = tuple(cur.u64() for _ in range(cur.u32()))
            ggml_type = cur.u32()
            cur.u64()  # offset into the data section
            tensors.append(TensorInfo(name, shape, _tensor_bytes(shape, ggml_type)))
    return GgufInfo(metadata, lengths, tuple(tensors))
