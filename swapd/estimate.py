"""Estimate the memory a llama-server will take for a GGUF, from the file's metadata alone.

The figures follow how llama.cpp places a model and sizes its buffers (``load_tensors``,
``llama_context``, ``llama_kv_cache_iswa``), so swapd can refuse a load before a backend
runs out of memory:

- **weights**: tensor bytes on the device. The input layer (``token_embd`` and the other
  lookup tables) always stays on the host. ``-ngl N`` offloads the *last* N entries of
  ``blk.0 … blk.{n-1}, output``, so the output layer (``output.weight``, ``output_norm``,
  and every other tensor outside a block) goes first: any N >= 1 puts it on the device.
  A model with tied embeddings has no ``output.weight``; llama.cpp then loads a second
  copy of ``token_embd`` as the output, so that copy counts when the output is offloaded.
- **kv_cache**: per offloaded layer, ``cells * n_head_kv * (head_dim_k * bytes(type_k) +
  head_dim_v * bytes(type_v))``. ``cells`` is the total context (``-c``, all slots
  together) rounded up to 256, or each slot's share rounded up when the slots have caches
  of their own. Sliding-window layers of the architectures in ``SWA_PATTERNS`` hold only
  the window of each sequence in a stream plus one micro-batch, rounded up (the whole
  context with ``--swa-full``).
- **compute**: the graph buffer, see :func:`compute_buffer`.
- **overhead**: a constant for the runtime itself (driver context, BLAS, threads).

With ``on_gpu=False`` the estimate is of host memory: every tensor counts, because the
file is memory-mapped and its pages stay resident once read.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import gguf

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

MIB = 1024 * 1024

# A CUDA or ROCm context plus the BLAS handles and workspaces each process holds
# (300 to 500 MiB as drivers report it), with room to spare.
GPU_OVERHEAD = 512 * MIB
# A CPU-only server's binary, libraries, tokenizer tables, threads and output buffer, plus
# the file's metadata and weights repacked for the CPU: llama-server with Gemma 3 270M
# held about 70 MiB beyond its buffers and file.
CPU_OVERHEAD = 96 * MIB

# llama.cpp rounds the context (and each slot's share of it) up to this many cells.
CTX_PAD = 256
# llama-server's -np auto: this many slots sharing one unified cache.
AUTO_SLOTS = 4

# Bytes per 32-value block (or per value, block of 1) of each KV cache type llama.cpp accepts.
CACHE_TYPES: dict[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
    "iq4_nl": (32, 18),
}

# Architectures whose llama.cpp loader interleaves sliding-window layers, with the default
# group size: in each group of n layers the last one has full attention. A
# ``{arch}.attention.sliding_window_pattern`` key in the file overrides the default.
# Others get a full-size cache on every layer, which can only over-estimate.
SWA_PATTERNS = {"gemma2": 2, "gemma3": 6, "cohere2": 4, "gpt-oss": 2}
# Gemma 2 files may leave the window out; llama.cpp assumes this one.
SWA_DEFAULT_WINDOW = {"gemma2": 4096}

# Tensors of llama.cpp's input layer: looked up with get_rows on the host, never offloaded.
INPUT_TENSOR_PREFIXES = (
    "token_embd.",
    "position_embd.",
    "token_types.",
    "per_layer_token_embd.",
    "masked_embd_",
)
TOKEN_EMBD = "token_embd.weight"  # noqa: S105 - a tensor name, not a password
OUTPUT = "output.weight"

# f32 activations held per token and per embedding dimension while a layer runs: the
# residual stream, its norm, Q, K, V, the attention output and the FFN gate and up
# projections, with room to spare. Measured: 10-15 for Gemma 3 270M on llama.cpp's CPU backend.
ACTIVATION_FACTOR = 16

_BLOCK = re.compile(r"blk\.(\d+)\.")

FlashAttn = Literal["on", "off", "auto"]
GpuLayers = int | Literal["all", "auto"] | None


class GGUFMetadataError(ValueError):
    """A GGUF lacks a metadata key the estimate needs, or holds it in the wrong shape."""

    def __init__(self, path: Path, key: str, reason: str) -> None:
        self.path = path
        self.key = key
        super().__init__(f"{path}: GGUF metadata {key!r} {reason}")


@dataclass(frozen=True)
class Estimate:
    """Bytes one llama-server will need on one device (or in host RAM), by component."""

    weights: int
    kv_cache: int
    compute: int
    overhead: int

    @property
    def total(self) -> int:
        """Bytes of all the components together."""
        return self.weights + self.kv_cache + self.compute + self.overhead

    def describe(self) -> str:
        """Render the sum for logs and error messages, in MiB."""
        return (
            f"weights {_mib(self.weights)} + KV {_mib(self.kv_cache)} + "
            f"compute {_mib(self.compute)} + overhead {_mib(self.overhead, whole=True)} = "
            f"{_mib(self.total)}"
        )


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a GGUF's metadata; per-layer values are tuples."""

    n_layer: int
    n_ctx_train: int
    n_embd: int
    n_vocab: int
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    head_dim_k: int
    head_dim_v: int
    n_swa: int = 0  # the sliding window in tokens; 0 when no layer slides
    is_swa: tuple[bool, ...] = ()  # per layer; empty when no layer slides


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's name, size in bytes and GGUF shape (fastest dimension first)."""

    name: str
    n_bytes: int
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class LlamaArgs:
    """The llama-server flags that change its memory use; None where llama-server decides.

    ``n_parallel`` None (or negative) is llama-server's auto: ``AUTO_SLOTS`` slots sharing
    one cache. ``kv_unified`` None is llama-server's default: unified only for auto slots.
    """

    n_ctx: int | None = None
    n_gpu_layers: GpuLayers = None
    n_parallel: int | None = None
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: FlashAttn = "auto"
    n_ubatch: int = 512
    kv_unified: bool | None = None
    swa_full: bool = False


@dataclass(frozen=True)
class CacheLayout:
    """How llama.cpp lays out the KV cache for a context and a number of slots."""

    slots: int
    streams: int  # 1 for a unified cache, else one per slot
    stream_cells: int  # cells of one stream of a full-attention layer
    swa_stream_cells: int  # cells of one stream of a sliding-window layer

    @property
    def cells(self) -> int:
        """Cells of a full-attention layer, all streams together."""
        return self.streams * self.stream_cells

    @property
    def swa_cells(self) -> int:
        """Cells of a sliding-window layer, all streams together."""
        return self.streams * self.swa_stream_cells


def _mib(n: int, *, whole: bool = False) -> str:
    """Format bytes as MiB with one decimal, or none for a whole constant such as overhead."""
    if whole and n % MIB == 0:
        return f"{n // MIB} MiB"
    return f"{n / MIB:.1f} MiB"


def _round_up(n: int, multiple: int) -> int:
    """Round ``n`` up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def cache_type_block(cache_type: str) -> tuple[int, int]:
    """Return (values, bytes) of one block of a KV cache type, spelled as llama-server does."""
    try:
        return CACHE_TYPES[cache_type]
    except KeyError:
        known = ", ".join(CACHE_TYPES)
        raise ValueError(f"unknown KV cache type {cache_type!r}; known: {known}") from None


def cache_row_bytes(cache_type: str, n_values: int) -> int:
    """Bytes of ``n_values`` cache entries stored as ``cache_type`` (e.g. ``q8_0``)."""
    block, block_bytes = cache_type_block(cache_type)
    return math.ceil(n_values / block) * block_bytes


def cache_layout(shape: ModelShape, args: LlamaArgs) -> CacheLayout:
    """Lay out the cache as ``llama_context`` and ``llama_kv_cache_iswa`` do."""
    auto = args.n_parallel is None or args.n_parallel < 0
    slots = AUTO_SLOTS if auto else max(args.n_parallel or 1, 1)
    unified = auto if args.kv_unified is None else args.kv_unified
    n_ctx = _round_up(args.n_ctx or shape.n_ctx_train, CTX_PAD)
    if unified or slots == 1:
        streams, stream_cells = 1, n_ctx
    else:
        streams, stream_cells = slots, _round_up(n_ctx // slots, CTX_PAD)
    swa_cells = stream_cells
    if shape.n_swa and not args.swa_full:
        # The window of every sequence in the stream, plus room for one micro-batch.
        window = shape.n_swa * (slots if streams == 1 else 1) + args.n_ubatch
        swa_cells = min(stream_cells, _round_up(window, CTX_PAD))
    return CacheLayout(slots, streams, stream_cells, swa_cells)


def offload_plan(n_layer: int, n_gpu_layers: GpuLayers) -> tuple[int, bool]:
    """Return the first offloaded block and whether the output layer is offloaded.

    llama.cpp offloads the last ``n_gpu_layers`` of the ``n_layer + 1`` layers, the output
    layer being the last; None, a negative count, "all" and "auto" mean every layer ("auto"
    lets llama.cpp fit what it can, and all is the most it will take).
    """
    if n_gpu_layers is None or isinstance(n_gpu_layers, str) or n_gpu_layers < 0:
        return 0, True
    first = max(n_layer + 1 - n_gpu_layers, 0)
    return min(first, n_layer), n_gpu_layers >= 1


def weights_on_device(
    tensors: Sequence[TensorInfo], n_layer: int, n_gpu_layers: GpuLayers
) -> tuple[int, int]:
    """Return bytes of the offloaded tensors and the largest tensor left on the host.

    The second figure matters because llama.cpp copies host weights into the device's
    compute buffer to run big matrix products there (op offload).
    """
    first_block, output_on_device = offload_plan(n_layer, n_gpu_layers)
    names = {t.name for t in tensors}
    on_device = 0
    largest_left = 0
    for t in tensors:
        match = _BLOCK.match(t.name)
        if match:
            offloaded = int(match.group(1)) >= first_block
        elif t.name.startswith(INPUT_TENSOR_PREFIXES):
            # A lookup table; only its duplicate as the tied output is ever offloaded.
            if t.name == TOKEN_EMBD and OUTPUT not in names:
                if output_on_device:
                    on_device += t.n_bytes
                else:
                    largest_left = max(largest_left, t.n_bytes)
            continue
        else:
            offloaded = output_on_device
        if offloaded:
            on_device += t.n_bytes
        else:
            largest_left = max(largest_left, t.n_bytes)
    return on_device, largest_left


def kv_cache_bytes(
    shape: ModelShape, layout: CacheLayout, args: LlamaArgs, first_layer: int
) -> int:
    """Bytes of K and V for layers ``first_layer`` onwards."""
    total = 0
    for il in range(first_layer, shape.n_layer):
        n_kv = shape.n_head_kv[il]
        k = cache_row_bytes(args.cache_type_k, n_kv * shape.head_dim_k)
        v = cache_row_bytes(args.cache_type_v, n_kv * shape.head_dim_v)
        sliding = bool(shape.is_swa) and shape.is_swa[il]
        total += (layout.swa_cells if sliding else layout.cells) * (k + v)
    return total


def compute_buffer(
    shape: ModelShape, layout: CacheLayout, *, n_ubatch: int, flash_attn: bool, n_outputs: int
) -> int:
    """Estimate the compute (graph) buffer llama.cpp reserves for one micro-batch.

    The graph is reserved for ``n_tokens = min(n_ubatch, cells)`` tokens attending to a
    stream of ``cells`` cells, and ggml's allocator reuses memory, so the peak is the larger
    of two phases:

    - the output: ``n_outputs * n_vocab`` f32 logits. llama-server reserves one output row
      per slot; older servers reserved ``n_ubatch`` rows, which callers can ask for;
    - attention without flash attention: ``n_tokens * cells * n_head`` f32 scores
      (softmax runs in place); flash attention works in tiles and needs none of it.

    On top of that: the attention masks (``n_tokens * cells``, and as much again over the
    window's cells for a sliding-window model; f32, or f16 with flash attention), inputs
    held all along, and ``ACTIVATION_FACTOR * n_tokens * n_embd`` f32 activations.
    """
    cells = layout.stream_cells
    n_tokens = min(n_ubatch, cells)
    logits = min(n_outputs, n_tokens) * shape.n_vocab * 4
    scores = 0 if flash_attn else n_tokens * cells * max(shape.n_head, default=0) * 4
    # Sliding-window layers get a mask of their own, over their own cells.
    mask_cells = cells + (layout.swa_stream_cells if shape.n_swa else 0)
    mask = n_tokens * mask_cells * (2 if flash_attn else 4)
    activations = ACTIVATION_FACTOR * n_tokens * shape.n_embd * 4
    return max(logits, scores) + mask + activations


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

    def string(self) -> str:
        """Read a length-prefixed UTF-8 string."""
        n = self.u64()
        raw = self.buf[self.pos : self.pos + n]
        if len(raw) != n:
            raise struct.error("string runs past the end of the file")
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
        if vtype == _STRING and count > MAX_DECODED_ARRAY:
            for _ in range(count):
                # Skip each string by its length: a token list has 100k+ of them.
                n = self.u64()
                self.pos += n
            return count, None
        return count, [self.value(vtype) for _ in range(count)]

    def tensor(self) -> TensorInfo:
        """Read one entry of the tensor table."""
        name = self.string()
        shape = tuple(self.u64() for _ in range(self.u32()))
        ggml_type = self.u32()
        self.u64()  # the data offset, which an estimate does not need
        try:
            block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise ValueError(f"tensor {name!r} has unknown ggml type {ggml_type}") from None
        return TensorInfo(name, math.prod(shape) // block * type_bytes, shape)


def read_gguf_header(path: Path) -> GGUFHeader:
    """Read a GGUF's metadata and tensor table.

    ``gguf.GGUFReader`` makes numpy views of every string, which takes many seconds for a
    262k-token vocabulary; this walks the header with ``struct`` and skips long arrays.
    """
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != _GGUF_MAGIC:
            raise ValueError(f"{path}: not a GGUF file")
        # A file written on a big-endian machine has its version's low bytes in front.
        (version,) = struct.unpack_from("<I", buf, 4)
        cur = _Cursor(buf, "<" if version & 0xFFFF else ">")
        cur.pos = 8
        try:
            n_tensors, n_kv = cur.u64(), cur.u64()
            metadata: dict[str, object] = {}
            array_lengths: dict[str, int] = {}
            for _ in range(n_kv):
                key = cur.string()
                value = cur.value(cur.u32())
                if isinstance(value, tuple):
                    array_lengths[key], value = value
                if value is not None:
                    metadata[key] = value
            tensors = tuple(cur.tensor() for _ in range(n_tensors))
        except (struct.error, KeyError) as e:
            raise ValueError(f"{path}: malformed GGUF header at byte {cur.pos}: {e}") from None
    return GGUFHeader(metadata, array_lengths, tensors)


def _int_field(header: GGUFHeader, key: str, path: Path) -> int:
    """Return a required integer metadata value."""
    value = header.metadata.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise GGUFMetadataError(path, key, "is missing or not an integer")
    return value


def _per_layer(value: object, n_layer: int, key: str, path: Path) -> tuple[int, ...]:
    """Expand a scalar-or-array metadata value to one integer per layer."""
    if isinstance(value, int):
        return (value,) * n_layer
    if isinstance(value, list) and len(value) == n_layer:
        return tuple(int(v) for v in value)
    raise GGUFMetadataError(path, key, f"must be an integer or a list of {n_layer}")


def _vocab_size(header: GGUFHeader) -> int:
    """Count the vocabulary from the token list, else from an embedding's shape."""
    n_tokens = header.array_lengths.get("tokenizer.ggml.tokens")
    if n_tokens is not None:
        return n_tokens
    shapes = {t.name: t.shape for t in header.tensors}
    for name in (TOKEN_EMBD, OUTPUT):
        if len(shapes.get(name, ())) == 2:
            # GGUF shapes list the fastest dimension first: [n_embd, n_vocab].
            return shapes[name][1]
    return 0


def _swa_layers(header: GGUFHeader, arch: str, n_layer: int) -> tuple[int, tuple[bool, ...]]:
    """Return the sliding window and which layers slide, as llama.cpp's loader decides."""
    pattern_default = SWA_PATTERNS.get(arch)
    window = header.metadata.get(f"{arch}.attention.sliding_window", SWA_DEFAULT_WINDOW.get(arch))
    if pattern_default is None or not isinstance(window, int) or window <= 0:
        return 0, ()
    pattern = header.metadata.get(f"{arch}.attention.sliding_window_pattern", pattern_default)
    if isinstance(pattern, list) and len(pattern) == n_layer:
        return window, tuple(bool(p) for p in pattern)
    if not isinstance(pattern, int) or isinstance(pattern, bool):
        pattern = pattern_default
    # The last layer of each group of ``pattern`` has full attention; 0 makes all slide.
    return window, tuple(pattern == 0 or il % pattern < pattern - 1 for il in range(n_layer))


def read_shape(header: GGUFHeader, path: Path) -> ModelShape:
    """Read the model dimensions the estimate needs from a GGUF header."""
    arch = header.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFMetadataError(path, "general.architecture", "is missing or not a string")
    n_layer = _int_field(header, f"{arch}.block_count", path)
    n_embd = _int_field(header, f"{arch}.embedding_length", path)
    head_key = f"{arch}.attention.head_count"
    n_head = _per_layer(header.metadata.get(head_key), n_layer, head_key, path)
    kv_key = f"{arch}.attention.head_count_kv"
    kv_value = header.metadata.get(kv_key)
    n_head_kv = n_head if kv_value is None else _per_layer(kv_value, n_layer, kv_key, path)
    # llama.cpp derives the default head size from the first layer's head count.
    default_head_dim = n_embd // n_head[0] if n_head and n_head[0] else 0
    head_dim_k = header.metadata.get(f"{arch}.attention.key_length")
    head_dim_v = header.metadata.get(f"{arch}.attention.value_length")
    n_swa, is_swa = _swa_layers(header, arch, n_layer)
    return ModelShape(
        n_layer=n_layer,
        n_ctx_train=_int_field(header, f"{arch}.context_length", path),
        n_embd=n_embd,
        n_vocab=_vocab_size(header),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k if isinstance(head_dim_k, int) else default_head_dim,
        head_dim_v=head_dim_v if isinstance(head_dim_v, int) else default_head_dim,
        n_swa=n_swa,
        is_swa=is_swa,
    )


def estimate_shape(  # noqa: PLR0913 - model, flags, and the three options of estimate_gguf
    shape: ModelShape,
    tensors: Sequence[TensorInfo],
    args: LlamaArgs,
    *,
    on_gpu: bool = True,
    n_outputs: int | None = None,
    overhead: int | None = None,
) -> Estimate:
    """Estimate from already-read metadata; flash attention "auto" counts as on.

    :func:`estimate_gguf` documents the rest.
    """
    cache_type_block(args.cache_type_k)
    cache_type_block(args.cache_type_v)
    layout = cache_layout(shape, args)
    if on_gpu:
        weights, largest_left = weights_on_device(tensors, shape.n_layer, args.n_gpu_layers)
        first_layer, _ = offload_plan(shape.n_layer, args.n_gpu_layers)
    else:
        weights, largest_left = sum(t.n_bytes for t in tensors), 0
        first_layer = 0
    compute = compute_buffer(
        shape,
        layout,
        n_ubatch=args.n_ubatch,
        flash_attn=args.flash_attn != "off",
        n_outputs=layout.slots if n_outputs is None else n_outputs,
    )
    if overhead is None:
        overhead = GPU_OVERHEAD if on_gpu else CPU_OVERHEAD
    return Estimate(
        weights=weights,
        kv_cache=kv_cache_bytes(shape, layout, args, first_layer),
        compute=compute + largest_left,
        overhead=overhead,
    )


def estimate_gguf(  # noqa: PLR0913 - each knob is a llama-server flag
    path: Path,
    *,
    n_ctx: int | None,
    n_gpu_layers: GpuLayers,
    cache_type_k: str = "f16",
    cache_type_v: str = "f16",
    on_gpu: bool = True,
    n_ubatch: int = 512,
    n_parallel: int | None = None,
    kv_unified: bool | None = None,
    swa_full: bool = False,
    flash_attn: bool = False,
    n_outputs: int | None = None,
    overhead: int | None = None,
) -> Estimate:
    """Estimate the memory a llama-server serving ``path`` needs on one device.

    ``n_ctx`` is the total context (``-c``, all slots together); None or 0 means the
    model's trained context, as ``-c 0`` does. ``n_gpu_layers`` follows ``-ngl``: None,
    negative, "all" or "auto" offload everything. ``n_parallel``, ``kv_unified`` and
    ``swa_full`` follow ``-np``, ``-kvu`` and ``--swa-full``, None leaving the choice to
    llama-server as :class:`LlamaArgs` describes. ``on_gpu=False`` estimates host memory
    for a CPU-only server instead, where every weight counts. ``flash_attn`` drops the
    attention scores from the compute buffer. ``n_outputs`` is the logit rows the graph
    is reserved for (default: one per slot). ``overhead`` defaults to ``GPU_OVERHEAD``
    or ``CPU_OVERHEAD``. Unknown cache types raise ValueError before the file is read.
    """
    args = LlamaArgs(
        n_ctx=n_ctx,
        n_gpu_layers=n_gpu_layers,
        n_parallel=n_parallel,
        cache_type_k=cache_type_k,
        cache_type_v=cache_type_v,
        flash_attn="on" if flash_attn else "off",
        n_ubatch=n_ubatch,
        kv_unified=kv_unified,
        swa_full=swa_full,
    )
    return estimate_for_args(path, args, on_gpu=on_gpu, n_outputs=n_outputs, overhead=overhead)


def estimate_for_args(
    path: Path,
    args: LlamaArgs,
    *,
    on_gpu: bool = True,
    n_outputs: int | None = None,
    overhead: int | None = None,
) -> Estimate:
    """Estimate for a llama-server started with the flags in ``args``.

    Flash attention "auto" counts as on: llama.cpp enables it wherever the backend supports
    the model's head sizes, which CUDA, ROCm and the CPU do for the common ones.
    """
    # Fail on a bad cache type before touching the file.
    cache_type_block(args.cache_type_k)
    cache_type_block(args.cache_type_v)
    header = read_gguf_header(path)
    return estimate_shape(
        read_shape(header, path),
        header.tensors,
        args,
        on_gpu=on_gpu,
        n_outputs=n_outputs,
        overhead=overhead,
    )


_FLAG_FIELDS = {
    "-c": "n_ctx",
    "--ctx-size": "n_ctx",
    "-ngl": "n_gpu_layers",
    "--n-gpu-layers": "n_gpu_layers",
    "--gpu-layers": "n_gpu_layers",
    "-np": "n_parallel",
    "--parallel": "n_parallel",
    "-ctk": "cache_type_k",
    "--cache-type-k": "cache_type_k",
    "-ctv": "cache_type_v",
    "--cache-type-v": "cache_type_v",
    "-fa": "flash_attn",
    "--flash-attn": "flash_attn",
    "-ub": "n_ubatch",
    "--ubatch-size": "n_ubatch",
}

# Flags without a value, and what they set.
_SWITCHES: dict[str, tuple[str, bool]] = {
    "-kvu": ("kv_unified", True),
    "--kv-unified": ("kv_unified", True),
    "-no-kvu": ("kv_unified", False),
    "--no-kv-unified": ("kv_unified", False),
    "--swa-full": ("swa_full", True),
}

# llama.cpp's spellings of on, off and auto (common_arg_utils::is_truthy and friends).
_FLASH_ATTN_VALUES: dict[str, FlashAttn] = {
    "on": "on",
    "enabled": "on",
    "true": "on",
    "1": "on",
    "off": "off",
    "disabled": "off",
    "false": "off",
    "0": "off",
    "auto": "auto",
    "-1": "auto",
}


def _parse_int(flag: str, value: str) -> int:
    """Parse an integer flag value, naming the flag when it is not one."""
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{flag} needs an integer, got {value!r}") from None


def _parse_gpu_layers(flag: str, value: str) -> GpuLayers:
    """Parse ``-ngl``: a count, "all" or "auto"."""
    if value == "all":
        return "all"
    if value == "auto":
        return "auto"
    return _parse_int(flag, value)


def _parse_flash_attn(flag: str, value: str) -> FlashAttn:
    """Parse ``-fa``'s value into on, off or auto."""
    try:
        return _FLASH_ATTN_VALUES[value]
    except KeyError:
        raise ValueError(f"{flag} takes on, off or auto, got {value!r}") from None


def parse_llama_args(args: Sequence[str]) -> LlamaArgs:
    """Read the memory-relevant flags from a llama-server argv; the last one given wins.

    Both ``--flag value`` and ``--flag=value`` work. ``-fa`` alone means on (older servers
    took it without a value); ``-kvu``, ``-no-kvu`` and ``--swa-full`` take none. Other
    flags and positional arguments are ignored. A known flag with a missing or malformed
    value raises ValueError.
    """
    found: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in _SWITCHES:
            name, setting = _SWITCHES[arg]
            found[name] = setting
            continue
        flag, eq, inline = arg.partition("=")
        field = _FLAG_FIELDS.get(flag) if flag.startswith("-") else None
        if field is None:
            continue
        if eq:
            value = inline
        elif field == "flash_attn" and (i == len(args) or args[i] not in _FLASH_ATTN_VALUES):
            value = "on"
        elif i < len(args):
            value = args[i]
            i += 1
        else:
            raise ValueError(f"{flag} needs a value")
        if field == "n_gpu_layers":
            found[field] = _parse_gpu_layers(flag, value)
        elif field == "flash_attn":
            found[field] = _parse_flash_attn(flag, value)
        elif field.startswith("cache_type"):
            cache_type_block(value)
            found[field] = value
        else:
            found[field] = _parse_int(flag, value)
    return LlamaArgs(**found)
