"""Bytes of each part of a llama-server's memory: weights, KV cache, compute buffer, overhead."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from swapd.estimate._cache_types import cache_row_bytes, cache_type_block
from swapd.estimate._shape import OUTPUT, TOKEN_EMBD, ModelShape

if TYPE_CHECKING:
    from collections.abc import Sequence

    from swapd.estimate._gguf_header import TensorInfo
    from swapd.estimate._llama_args import GpuLayers, LlamaArgs

MIB = 1024 * 1024

# What a GPU llama-server holds beyond its model, KV and compute buffers: the CUDA or ROCm
# context, loaded kernels, cuBLAS and its workspace. NVML put it at 595-687 MiB on an H100
# (CUDA 13, driver 580; 518 MiB of it the bare context), after a first answer; with room to spare.
GPU_OVERHEAD = 768 * MIB
# A CPU-only server's binary, libraries, tokenizer tables, threads and output buffer, plus
# the file's metadata and weights repacked for the CPU: llama-server with Gemma 3 270M
# held about 70 MiB beyond its buffers and file.
CPU_OVERHEAD = 96 * MIB

# llama.cpp rounds the context (and each slot's share of it) up to this many cells.
CTX_PAD = 256
# llama-server's -np auto: this many slots sharing one unified cache.
AUTO_SLOTS = 4

# Tensors of llama.cpp's input layer: looked up with get_rows on the host, never offloaded.
INPUT_TENSOR_PREFIXES = (
    "token_embd.",
    "position_embd.",
    "token_types.",
    "per_layer_token_embd.",
    "masked_embd_",
)

# f32 activations held per token and per embedding dimension while a layer runs: the
# residual stream, its norm, Q, K, V, the attention output and the FFN gate and up
# projections, with room to spare. Measured: 10-15 for Gemma 3 270M on llama.cpp's CPU backend.
ACTIVATION_FACTOR = 16

_BLOCK = re.compile(r"blk\.(\d+)\.")
# A block's MoE expert tensors, as llama.cpp's --cpu-moe matches them (LLM_FFN_EXPS_REGEX).
_EXPERTS = re.compile(r"\.ffn_(up|down|gate)_(ch)?exps")

# Head sizes that llama.cpp's CUDA and ROCm flash-attention kernels take with K and V alike
# (ggml-cuda/fattn.cu). For any other, "-fa auto" finds the op unsupported on the device
# and turns flash attention off, so the attention scores are materialized after all.
GPU_FLASH_ATTN_HEADS = frozenset({40, 64, 72, 80, 96, 112, 128, 256})
# (K, V) head sizes taken only with grouped-query attention whose ratio is a multiple of this.
GPU_FLASH_ATTN_GQA_HEADS = {(192, 128): 8, (320, 256): 32, (512, 512): 1, (576, 512): 1}
# llama.cpp turns flash attention off for this architecture whatever the flags say.
NO_FLASH_ATTN_ARCH = "grok"
# KV cache types those kernels read.
GPU_FLASH_ATTN_CACHE_TYPES = frozenset(
    {"f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"}
)


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


def _round_up(n: int, multiple: int) -> int:
    """Round ``n`` up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


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
    tensors: Sequence[TensorInfo], n_layer: int, n_gpu_layers: GpuLayers, n_cpu_moe: int = 0
) -> tuple[int, int]:
    """Return bytes of the offloaded tensors and the largest tensor left on the host.

    The second figure matters because llama.cpp copies host weights into the device's
    compute buffer to run big matrix products there (op offload). The experts of the first
    ``n_cpu_moe`` blocks stay on the host (``--n-cpu-moe``, ``--cpu-moe``).
    """
    first_block, output_on_device = offload_plan(n_layer, n_gpu_layers)
    names = {t.name for t in tensors}
    on_device = 0
    largest_left = 0
    for t in tensors:
        match = _BLOCK.match(t.name)
        if match:
            block = int(match.group(1))
            experts_kept = block < n_cpu_moe and _EXPERTS.search(t.name) is not None
            offloaded = block >= first_block and not experts_kept
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


def _gpu_heads(k: int, v: int, gqa_ratio: int) -> bool:
    """Whether CUDA's and ROCm's flash-attention kernels take K and V heads of these sizes."""
    if k == v and k in GPU_FLASH_ATTN_HEADS:
        return True
    multiple = GPU_FLASH_ATTN_GQA_HEADS.get((k, v))
    return multiple is not None and gqa_ratio >= 2 and gqa_ratio % multiple == 0


def _gpu_flash_attn(shape: ModelShape, args: LlamaArgs) -> bool:
    """Whether CUDA or ROCm runs flash attention for every layer's heads and the cache types."""
    if not {args.cache_type_k, args.cache_type_v} <= GPU_FLASH_ATTN_CACHE_TYPES:
        return False
    for il in range(shape.n_layer):
        n_head, n_kv = shape.n_head[il], shape.n_head_kv[il]
        if n_kv == 0:
            continue  # no attention here (a recurrent or linear layer of a hybrid model)
        sliding = bool(shape.is_swa) and shape.is_swa[il]
        k = (sliding and shape.head_dim_k_swa) or shape.head_dim_k
        v = (sliding and shape.head_dim_v_swa) or shape.head_dim_v
        if not _gpu_heads(k, v, n_head // n_kv if n_head % n_kv == 0 else 0):
            return False
    return True


def flash_attn_on(shape: ModelShape, args: LlamaArgs, *, on_device: bool) -> bool:
    """Whether llama.cpp will run flash attention, as ``llama_context`` resolves ``-fa``.

    "auto" is on where the attention runs on the CPU (every head size) or with a quantized
    V cache (which needs it, so llama.cpp forces it on); on a GPU, only where its kernels
    take every layer's heads. ``on_device`` says whether any layer is offloaded. Grok never
    runs it, whatever ``-fa`` says.
    """
    if shape.arch == NO_FLASH_ATTN_ARCH:
        return False
    if args.flash_attn != "auto":
        return args.flash_attn == "on"
    quantized_v = cache_type_block(args.cache_type_v)[0] > 1
    return quantized_v or not on_device or _gpu_flash_attn(shape, args)


def transposed_v_bytes(shape: ModelShape, layout: CacheLayout, args: LlamaArgs) -> int:
    """The copy of one layer's V that attention makes when "-fa auto" resolved off.

    llama.cpp lays the cache out for flash attention before it resolves "auto"; the plain
    attention then transposes V into the compute buffer, one layer at a time.
    """
    widest = max((shape.n_head_kv[il] for il in range(shape.n_layer)), default=0)
    return layout.stream_cells * cache_row_bytes(args.cache_type_v, widest * shape.head_dim_v)


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
