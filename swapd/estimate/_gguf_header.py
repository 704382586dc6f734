"""Read a GGUF's metadata and tensor table fast, without numpy views of every string."""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import gguf

if TYPE_CHECKING:
    from pathlib import Path


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's name, size in bytes and GGUF shape (fastest dimension first)."""

    name: str
    n_bytes: int
    shape: tuple[int, ...] = ()


# struct formats of GGUF's scalar value types (IntEnum keys, so plain ids look up too).
_VT = gguf.GGUFValueType
_SCALAR_FORMATS: dict[int, str] = {
    _VT.UINT8: "B",
    _VT.INT8: "b",
    _VT.UINT16: "H",
    _VT.INT16: "h",
    _VT.UINT32: "I",
    _VT.INT32: "i",
    _VT.UINT64: "Q",
    _VT.INT64: "q",
    _VT.FLOAT32: "f",
    _VT.FLOAT64: "d",
    _VT.BOOL: "?",
}
_STRING, _ARRAY = int(_VT.STRING), int(_VT.ARRAY)
_GGUF_MAGIC = b"GGUF"
# Arrays longer than this (token lists, scores, merges) are counted, never decoded.
MAX_DECODED_ARRAY = 4096
# The longest array of strings read, each skipped by its length: 64 times the longest
# vocabulary (262k tokens) or merge list. A longer one is damage, not a model.
MAX_STRING_ARRAY = 1 << 24
# A tensor has at most this many dimensions (GGML_MAX_DIMS).
MAX_DIMS = 4
# The fewest bytes a metadata entry (key length, type, one byte) and a tensor entry (name
# length, dimension count, type, offset) take: a count the file cannot hold is refused at once.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF's metadata and tensor table, without the tensor data."""

    metadata: dict[str, object]  # scalars, and arrays of up to MAX_DECODED_ARRAY as lists
    array_lengths: dict[str, int]  # the item count of every array, long ones included
    tensors: tuple[TensorInfo, ...]


class _Cursor:
    """Reads GGUF values one after another from a buffer in one byte order."""

    def __init__(self, buf: mmap.mmap, order: str) -> None:
        self.buf = buf
        self.order = order
        self.pos = 0
        self._u32 = struct.Struct(order + "I")
        self._u64 = struct.Struct(order + "Q")

    def u32(self) -> int:
        """Read an unsigned 32-bit integer."""
        (value,) = self._u32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(value)

    def u64(self) -> int:
        """Read an unsigned 64-bit integer."""
        (value,) = self._u64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return int(value)

    def left(self) -> int:
        """Bytes of the buffer after the cursor."""
        return len(self.buf) - self.pos

    def string(self) -> str:
        """Read a length-prefixed UTF-8 string."""
        n = self.u64()
        if n > self.left():
            # Checked before the slice, which would copy the rest of a many-GiB file.
            raise struct.error("string runs past the end of the file")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> object:
        """Read one value of type ``vtype``; arrays come back as ``(length, items or None)``."""
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array()
        fmt = self.order + _SCALAR_FORMATS[vtype]
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def array(self) -> tuple[int, list[object] | None]:
        """Read an array's length, and its items when it is short and of scalars."""
        vtype, count = self.u32(), self.u64()
        if vtype in _SCALAR_FORMATS:
            fmt = f"{self.order}{count}{_SCALAR_FORMATS[vtype]}"
            size = struct.calcsize(fmt)
            items = None
            if count <= MAX_DECODED_ARRAY:
                items = list(struct.unpack_from(fmt, self.buf, self.pos))
            elif self.pos + size > len(self.buf):
                raise struct.error("array runs past the end of the file")
            self.pos += size
            return count, items
        if vtype == _ARRAY:
            raise struct.error("an array of arrays, which llama.cpp does not read")
        if vtype == _STRING and count > MAX_DECODED_ARRAY:
            if count > min(self.left() // 8, MAX_STRING_ARRAY):
                raise struct.error(f"an array of {count} strings")
            for _ in range(count):
                # Skip each string by its length: a token list has 100k+ of them.
                n = self.u64()
                self.pos += n
            return count, None
        return count, [self.value(vtype) for _ in range(count)]

    def tensor(self) -> TensorInfo:
        """Read one entry of the tensor table."""
        name = self.string()
        n_dims = self.u32()
        if n_dims > MAX_DIMS:
            raise struct.error(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(self.u64() for _ in range(n_dims))
        ggml_type = self.u32()
        self.u64()  # the data offset, which an estimate does not need
        try:
            block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise ValueError(f"tensor {name!r} has unknown ggml type {ggml_type}") from None
        return TensorInfo(name, math.prod(shape) // block * type_bytes, shape)


def _metadata(cur: _Cursor, count: int) -> tuple[dict[str, object], dict[str, int]]:
    """Read the metadata entries; a key given twice is refused, as llama.cpp does.

    Zeroed bytes read as entries with an empty key, so the second one stops a run of them.
    """
    if count > cur.left() // _MIN_KV_BYTES:
        raise struct.error(f"{count} metadata entries")
    metadata: dict[str, object] = {}
    array_lengths: dict[str, int] = {}
    for _ in range(count):
        key = cur.string()
        if key in metadata or key in array_lengths:
            raise struct.error(f"key {key!r} given twice")
        value = cur.value(cur.u32())
        if isinstance(value, tuple):
            array_lengths[key], value = value
        if value is not None:
            metadata[key] = value
    return metadata, array_lengths


def _tensors(cur: _Cursor, count: int) -> tuple[TensorInfo, ...]:
    """Read the tensor table; a name given twice is refused, as llama.cpp does."""
    if count > cur.left() // _MIN_TENSOR_BYTES:
        raise struct.error(f"{count} tensors")
    tensors: dict[str, TensorInfo] = {}
    for _ in range(count):
        tensor = cur.tensor()
        if tensor.name in tensors:
            raise struct.error(f"tensor {tensor.name!r} given twice")
        tensors[tensor.name] = tensor
    return tuple(tensors.values())


_FIXED_HEADER = 24  # magic, version, tensor count, metadata count


def read_gguf_header(path: Path) -> GGUFHeader:
    """Read a GGUF's metadata and tensor table.

    ``gguf.GGUFReader`` makes numpy views of every string, which takes many seconds for a
    262k-token vocabulary; this walks the header with ``struct`` and skips long arrays.
    """
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != _GGUF_MAGIC:
            raise ValueError(f"{path}: not a GGUF file")
        if len(buf) < _FIXED_HEADER:
            raise ValueError(f"{path}: truncated GGUF header ({len(buf)} bytes)")
        # A file written on a big-endian machine has its version's low bytes in front.
        (version,) = struct.unpack_from("<I", buf, 4)
        cur = _Cursor(buf, "<" if version & 0xFFFF else ">")
        cur.pos = 8
        try:
            n_tensors, n_kv = cur.u64(), cur.u64()
            metadata, array_lengths = _metadata(cur, n_kv)
            tensors = _tensors(cur, n_tensors)
        except (struct.error, KeyError) as e:
            raise ValueError(f"{path}: malformed GGUF header at byte {cur.pos}: {e}") from None
    return GGUFHeader(metadata, array_lengths, tensors)
