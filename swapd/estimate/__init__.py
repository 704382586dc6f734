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

from dataclasses import dataclass
from typing import TYPE_CHECKING

from swapd.estimate._cache_types import CACHE_TYPES, cache_row_bytes, cache_type_block
from swapd.estimate._gguf_header import (
    MAX_DECODED_ARRAY,
    GGUFHeader,
    TensorInfo,
    read_gguf_header,
)
from swapd.estimate._llama_args import (
    FlashAttn,
    GpuLayers,
    LlamaArgs,
    SideFiles,
    env_args,
    llama_spelling,
    parse_llama_args,
    side_files,
)
from swapd.estimate._shape import (
    OUTPUT,
    SWA_DEFAULT_WINDOW,
    SWA_PATTERNS,
    TOKEN_EMBD,
    GGUFMetadataError,
    ModelShape,
    read_shape,
)
from swapd.estimate._sizes import (
    ACTIVATION_FACTOR,
    AUTO_SLOTS,
    CPU_OVERHEAD,
    CTX_PAD,
    GPU_FLASH_ATTN_HEADS,
    GPU_OVERHEAD,
    INPUT_TENSOR_PREFIXES,
    MIB,
    NO_FLASH_ATTN_ARCH,
    CacheLayout,
    cache_layout,
    compute_buffer,
    flash_attn_on,
    kv_cache_bytes,
    offload_plan,
    transposed_v_bytes,
    weights_on_device,
)
from swapd.gguf_split import split_parts

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

__all__ = [
    "ACTIVATION_FACTOR",
    "AUTO_SLOTS",
    "CACHE_TYPES",
    "CPU_OVERHEAD",
    "CTX_PAD",
    "GPU_FLASH_ATTN_HEADS",
    "GPU_OVERHEAD",
    "INPUT_TENSOR_PREFIXES",
    "MAX_DECODED_ARRAY",
    "MIB",
    "NO_FLASH_ATTN_ARCH",
    "OUTPUT",
    "SWA_DEFAULT_WINDOW",
    "SWA_PATTERNS",
    "TOKEN_EMBD",
    "CacheLayout",
    "Estimate",
    "FlashAttn",
    "GGUFHeader",
    "GGUFMetadataError",
    "GpuLayers",
    "LlamaArgs",
    "ModelShape",
    "SideFiles",
    "TensorInfo",
    "cache_layout",
    "cache_row_bytes",
    "cache_type_block",
    "compute_buffer",
    "env_args",
    "estimate_for_args",
    "estimate_gguf",
    "estimate_shape",
    "flash_attn_on",
    "kv_cache_bytes",
    "llama_spelling",
    "offload_plan",
    "parse_llama_args",
    "read_gguf_header",
    "read_shape",
    "side_files",
    "transposed_v_bytes",
    "weights_on_device",
]


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


def _mib(n: int, *, whole: bool = False) -> str:
    """Format bytes as MiB with one decimal, or none for a whole constant such as overhead."""
    if whole and n % MIB == 0:
        return f"{n // MIB} MiB"
    return f"{n / MIB:.1f} MiB"


def estimate_shape(  # noqa: PLR0913 - model, flags, and the three options of estimate_gguf
    shape: ModelShape,
    tensors: Sequence[TensorInfo],
    args: LlamaArgs,
    *,
    on_gpu: bool = True,
    n_outputs: int | None = None,
    overhead: int | None = None,
) -> Estimate:
    """Estimate from already-read metadata; flash attention "auto" as llama.cpp resolves it.

    :func:`estimate_gguf` documents the rest.
    """
    cache_type_block(args.cache_type_k)
    cache_type_block(args.cache_type_v)
    layout = cache_layout(shape, args)
    if on_gpu:
        weights, largest_left = weights_on_device(
            tensors, shape.n_layer, args.n_gpu_layers, args.n_cpu_moe
        )
        first_layer, _ = offload_plan(shape.n_layer, args.n_gpu_layers)
    else:
        weights, largest_left = sum(t.n_bytes for t in tensors), 0
        first_layer = 0
    on_device = on_gpu and first_layer < shape.n_layer
    flash_attn = flash_attn_on(shape, args, on_device=on_device)
    compute = compute_buffer(
        shape,
        layout,
        n_ubatch=args.n_ubatch,
        flash_attn=flash_attn,
        n_outputs=layout.slots if n_outputs is None else n_outputs,
    )
    if args.flash_attn == "auto" and not flash_attn and shape.arch != NO_FLASH_ATTN_ARCH:
        compute += transposed_v_bytes(shape, layout, args)
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

    Flash attention "auto" counts as on where llama.cpp enables it: on the CPU always, on
    CUDA and ROCm for the head sizes their kernels take (:func:`flash_attn_on`). With
    other heads the attention scores (``n_ubatch * cells * n_head`` f32) are counted.
    """
    # Fail on a bad cache type before touching the file.
    cache_type_block(args.cache_type_k)
    cache_type_block(args.cache_type_v)
    header = read_gguf_header(path)
    return estimate_shape(
        read_shape(header, path),
        header.tensors + _other_split_tensors(path, header),
        args,
        on_gpu=on_gpu,
        n_outputs=n_outputs,
        overhead=overhead,
    )


def _other_split_tensors(path: Path, header: GGUFHeader) -> tuple[TensorInfo, ...]:
    """The tensors of a split GGUF's other files, which llama.cpp loads along with the first."""
    count = header.metadata.get("split.count")
    if not isinstance(count, int) or count <= 1:
        return ()
    parts = split_parts(path)
    if len(parts) != count:
        suffix = f"-00001-of-{count:05d}.gguf"
        raise ValueError(f"{path}: split GGUF of {count} files, not named PREFIX{suffix}")
    return tuple(tensor for other in parts[1:] for tensor in read_gguf_header(other).tensors)
