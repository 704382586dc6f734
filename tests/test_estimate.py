"""Tests for swapd.estimate: memory estimates from GGUF metadata and llama-server flags."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from dataclasses import replace as dataclass_replace
from typing import TYPE_CHECKING

import gguf
import numpy as np
import pytest

from swapd.estimate import (
    ACTIVATION_FACTOR,
    AUTO_SLOTS,
    CPU_OVERHEAD,
    GPU_OVERHEAD,
    MAX_DECODED_ARRAY,
    MIB,
    Estimate,
    GGUFMetadataError,
    GpuLayers,
    LlamaArgs,
    ModelShape,
    estimate_for_args,
    estimate_gguf,
    flash_attn_on,
    parse_llama_args,
    read_gguf_header,
)

if TYPE_CHECKING:
    from pathlib import Path

N_EMBD = 64
N_HEAD = 8
N_HEAD_KV = 2
HEAD_DIM = N_EMBD // N_HEAD
N_VOCAB = 100
CTX_TRAIN = 1024

# Tensor sizes of the model write_model makes, in bytes.
EMBD_BYTES = N_VOCAB * N_EMBD * 4  # token_embd, f32
NORM_BYTES = N_EMBD * 4  # every norm, f32
Q_BYTES = N_EMBD * N_EMBD * 4  # blk.*.attn_q, f32
K_BYTES = N_HEAD_KV * HEAD_DIM * N_EMBD * 2  # blk.*.attn_k, f16
V_BYTES = N_HEAD_KV * HEAD_DIM * N_EMBD // 32 * 34  # blk.*.attn_v, q8_0
BLOCK_BYTES = NORM_BYTES + Q_BYTES + K_BYTES + V_BYTES
OUTPUT_NORM_BYTES = NORM_BYTES
OUTPUT_BYTES = N_VOCAB * N_EMBD * 2  # output, f16
OUTPUT_LAYER_BYTES = OUTPUT_NORM_BYTES + OUTPUT_BYTES


@dataclass(frozen=True)
class Spec:
    """What write_model puts in the file; None leaves a key out."""

    arch: str = "llama"
    n_layer: int = 2
    head_count_kv: int | list[int] | None = N_HEAD_KV
    key_length: int | None = None
    value_length: int | None = None
    tokens: int = N_VOCAB
    tied: bool = False
    endianess: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE
    extra: dict[str, int | list[bool]] = field(default_factory=dict)


def write_model(path: Path, spec: Spec | None = None) -> Path:
    """Write a small GGUF whose tensor sizes the constants above give exactly."""
    spec = spec or Spec()
    writer = gguf.GGUFWriter(str(path), spec.arch, endianess=spec.endianess)
    writer.add_block_count(spec.n_layer)
    writer.add_context_length(CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_head_count(N_HEAD)
    if spec.head_count_kv is not None:
        writer.add_head_count_kv(spec.head_count_kv)
    if spec.key_length is not None:
        writer.add_key_length(spec.key_length)
    if spec.value_length is not None:
        writer.add_value_length(spec.value_length)
    if spec.tokens:
        writer.add_token_list([f"t{i}" for i in range(spec.tokens)])
        writer.add_token_scores([0.0] * spec.tokens)
    for key, value in spec.extra.items():
        if isinstance(value, int):
            writer.add_uint32(key.format(arch=spec.arch), value)
        else:
            writer.add_array(key.format(arch=spec.arch), value)
    writer.add_tensor("token_embd.weight", np.zeros((N_VOCAB, N_EMBD), np.float32))
    for i in range(spec.n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((N_EMBD, N_EMBD), np.float32))
        k_shape = (N_HEAD_KV * HEAD_DIM, N_EMBD)
        writer.add_tensor(f"blk.{i}.attn_k.weight", np.zeros(k_shape, np.float16))
        v = gguf.quants.quantize(np.zeros(k_shape, np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(f"blk.{i}.attn_v.weight", v, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    if not spec.tied:
        writer.add_tensor("output.weight", np.zeros((N_VOCAB, N_EMBD), np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A two-block model with grouped-query attention (8 heads, 2 KV heads)."""
    return write_model(tmp_path / "model.gguf")


def kv_bytes(cells: int, layers: int, n_head_kv: int = N_HEAD_KV) -> int:
    """The f16 KV cache size: cells * layers * n_head_kv * (head_dim_k * 2 + head_dim_v * 2)."""
    return cells * layers * n_head_kv * (HEAD_DIM * 2 + HEAD_DIM * 2)


def compute_bytes(
    n_tokens: int,
    cells: int,
    *,
    flash_attn: bool,
    n_outputs: int = AUTO_SLOTS,
    mask_cells: int | None = None,
) -> int:
    """The compute heuristic spelled out: max(logits, scores) + masks + activations."""
    logits = min(n_outputs, n_tokens) * N_VOCAB * 4
    scores = 0 if flash_attn else n_tokens * cells * N_HEAD * 4
    mask = n_tokens * (mask_cells or cells) * (2 if flash_attn else 4)
    return max(logits, scores) + mask + ACTIVATION_FACTOR * n_tokens * N_EMBD * 4


@pytest.mark.parametrize(
    ("n_gpu_layers", "weights", "kv_layers"),
    [
        (None, 2 * BLOCK_BYTES + OUTPUT_LAYER_BYTES, 2),
        (-1, 2 * BLOCK_BYTES + OUTPUT_LAYER_BYTES, 2),
        ("all", 2 * BLOCK_BYTES + OUTPUT_LAYER_BYTES, 2),
        ("auto", 2 * BLOCK_BYTES + OUTPUT_LAYER_BYTES, 2),
        (99, 2 * BLOCK_BYTES + OUTPUT_LAYER_BYTES, 2),
        (3, 2 * BLOCK_BYTES + OUTPUT_LAYER_BYTES, 2),
        # The output layer is the first to go: -ngl 2 is blk.1 and output.
        (2, BLOCK_BYTES + OUTPUT_LAYER_BYTES, 1),
        (1, OUTPUT_LAYER_BYTES, 0),
        (0, 0, 0),
    ],
)
def test_weights_and_kv_follow_offload(
    model: Path, n_gpu_layers: GpuLayers, weights: int, kv_layers: int
) -> None:
    """Offloaded blocks count with their KV; token_embd never goes to the device."""
    est = estimate_gguf(model, n_ctx=512, n_gpu_layers=n_gpu_layers)
    assert est.weights == weights
    assert est.kv_cache == kv_bytes(512, kv_layers)
    assert est.overhead == GPU_OVERHEAD


def test_host_weights_stay_out_of_the_compute_buffer_only_when_all_is_offloaded(
    model: Path,
) -> None:
    """Partial offload adds the largest host weight, which op offload copies to the device."""
    full = estimate_gguf(model, n_ctx=512, n_gpu_layers=None, flash_attn=True)
    partial = estimate_gguf(model, n_ctx=512, n_gpu_layers=1, flash_attn=True)
    none = estimate_gguf(model, n_ctx=512, n_gpu_layers=0, flash_attn=True)
    assert partial.compute - full.compute == Q_BYTES
    assert none.compute - full.compute == Q_BYTES


def test_cpu_estimate_counts_every_tensor(model: Path) -> None:
    """On the CPU the mmapped file is resident: every tensor, every layer's KV, CPU overhead."""
    est = estimate_gguf(model, n_ctx=512, n_gpu_layers=0, on_gpu=False)
    assert est.weights == EMBD_BYTES + 2 * BLOCK_BYTES + OUTPUT_LAYER_BYTES
    assert est.kv_cache == kv_bytes(512, 2)
    assert est.overhead == CPU_OVERHEAD


def test_tied_embeddings_put_a_copy_of_token_embd_on_the_device(tmp_path: Path) -> None:
    """Without output.weight llama.cpp loads token_embd again as the output layer."""
    path = write_model(tmp_path / "tied.gguf", Spec(tied=True))
    full = estimate_gguf(path, n_ctx=512, n_gpu_layers=None)
    assert full.weights == 2 * BLOCK_BYTES + OUTPUT_NORM_BYTES + EMBD_BYTES
    host = estimate_gguf(path, n_ctx=512, n_gpu_layers=None, on_gpu=False)
    assert host.weights == EMBD_BYTES + 2 * BLOCK_BYTES + OUTPUT_NORM_BYTES


def test_kv_cache_uses_gqa_heads_and_cache_types(model: Path) -> None:
    """K and V are sized by the KV heads, each with its own cache type."""
    est = estimate_gguf(
        model, n_ctx=1024, n_gpu_layers=None, cache_type_k="q8_0", cache_type_v="f32"
    )
    # 2 KV heads * head_dim 8 = 16 values a row: one q8_0 block of 34 bytes, 64 bytes of f32.
    assert est.kv_cache == 1024 * 2 * (34 + 16 * 4)


def test_kv_cache_quantized_rows(tmp_path: Path) -> None:
    """Explicit key/value lengths set the head size; q8_0 and q4_0 cost 34 and 18 per 32."""
    path = write_model(tmp_path / "kl.gguf", Spec(key_length=64, value_length=32))
    est = estimate_gguf(
        path, n_ctx=256, n_gpu_layers=None, cache_type_k="q8_0", cache_type_v="q4_0"
    )
    k_row = N_HEAD_KV * 64 // 32 * 34
    v_row = N_HEAD_KV * 32 // 32 * 18
    assert est.kv_cache == 256 * 2 * (k_row + v_row)


def test_head_count_kv_defaults_to_head_count(tmp_path: Path) -> None:
    """Without head_count_kv every head has its own K and V."""
    path = write_model(tmp_path / "mha.gguf", Spec(head_count_kv=None))
    est = estimate_gguf(path, n_ctx=256, n_gpu_layers=None)
    assert est.kv_cache == kv_bytes(256, 2, n_head_kv=N_HEAD)


def test_head_count_kv_per_layer(tmp_path: Path) -> None:
    """A per-layer head_count_kv sums layer by layer; a layer with none has no cache."""
    path = write_model(tmp_path / "arr.gguf", Spec(head_count_kv=[4, 0]))
    assert estimate_gguf(path, n_ctx=256, n_gpu_layers=None).kv_cache == kv_bytes(256, 1, 4)
    # -ngl 2 offloads only blk.1, which has no KV heads.
    assert estimate_gguf(path, n_ctx=256, n_gpu_layers=2).kv_cache == 0


@pytest.mark.parametrize("n_ctx", [None, 0])
def test_n_ctx_defaults_to_the_trained_context(model: Path, n_ctx: int | None) -> None:
    """No context, or -c 0, means the model's context_length."""
    est = estimate_gguf(model, n_ctx=n_ctx, n_gpu_layers=None)
    assert est.kv_cache == kv_bytes(CTX_TRAIN, 2)


def test_n_ctx_is_padded_to_256_cells(model: Path) -> None:
    """llama.cpp rounds the context up to a multiple of 256 cells."""
    est = estimate_gguf(model, n_ctx=1000, n_gpu_layers=None)
    assert est.kv_cache == kv_bytes(1024, 2)


def test_each_slot_is_padded_on_its_own(model: Path) -> None:
    """Three slots of -c 4096 have caches of 1366 cells each, padded to 1536."""
    est = estimate_gguf(model, n_ctx=4096, n_gpu_layers=None, n_parallel=3)
    assert est.kv_cache == kv_bytes(3 * 1536, 2)
    # A unified cache is one stream of the whole context, however many slots share it.
    unified = estimate_gguf(model, n_ctx=4096, n_gpu_layers=None, n_parallel=3, kv_unified=True)
    assert unified.kv_cache == kv_bytes(4096, 2)


def test_compute_buffer_heuristic(model: Path) -> None:
    """Scores (without flash attention) or logits, whichever is larger, plus mask and more."""
    off = estimate_gguf(model, n_ctx=2048, n_gpu_layers=None, flash_attn=False)
    on = estimate_gguf(model, n_ctx=2048, n_gpu_layers=None, flash_attn=True)
    assert off.compute == compute_bytes(512, 2048, flash_attn=False)
    assert on.compute == compute_bytes(512, 2048, flash_attn=True)
    scores, logits = 512 * 2048 * N_HEAD * 4, AUTO_SLOTS * N_VOCAB * 4
    assert off.compute - on.compute == scores - logits + 512 * 2048 * (4 - 2)


def test_flash_attn_auto_on_a_gpu_follows_its_kernels(tmp_path: Path) -> None:
    """With -fa auto, the scores count where CUDA's kernels cannot take the heads (8 wide).

    llama.cpp turns flash attention off then, and its compute buffer holds the scores, and
    a transposed copy of one layer's V (the cache was laid out for flash attention): a
    random GGUF with 16-wide heads measured 2962 MiB on an H200 against an estimate of 1862
    that took "auto" for on.
    """
    narrow = write_model(tmp_path / "narrow.gguf")
    wide = write_model(tmp_path / "wide.gguf", Spec(key_length=64, value_length=64))
    auto = LlamaArgs(n_ctx=2048, flash_attn="auto")
    on = LlamaArgs(n_ctx=2048, flash_attn="on")
    off = LlamaArgs(n_ctx=2048, flash_attn="off")
    assert estimate_for_args(wide, auto) == estimate_for_args(wide, on)
    v_copy = 2048 * N_HEAD_KV * HEAD_DIM * 2  # cells x one layer's V row, f16
    resolved_off = estimate_for_args(narrow, auto)
    assert resolved_off.compute == estimate_for_args(narrow, off).compute + v_copy
    assert resolved_off.compute == compute_bytes(512, 2048, flash_attn=False) + v_copy
    for path in (narrow, wide):
        # On the CPU, every head size runs flash attention.
        on_cpu = estimate_for_args(path, auto, on_gpu=False)
        assert on_cpu == estimate_for_args(path, on, on_gpu=False)
    # With no layer on the GPU the attention runs on the CPU.
    cpu_layers = LlamaArgs(n_ctx=2048, flash_attn="auto", n_gpu_layers=0)
    on_cpu_layers = dataclass_replace(cpu_layers, flash_attn="on")
    assert estimate_for_args(narrow, cpu_layers) == estimate_for_args(narrow, on_cpu_layers)


def shape(head_k: int, head_v: int, n_head: int = 32, n_head_kv: int = 8) -> ModelShape:
    """A two-layer shape with the given head sizes and grouped-query ratio."""
    return ModelShape(
        n_layer=2,
        n_ctx_train=4096,
        n_embd=4096,
        n_vocab=32000,
        n_head=(n_head,) * 2,
        n_head_kv=(n_head_kv,) * 2,
        head_dim_k=head_k,
        head_dim_v=head_v,
    )


def sliding(full: ModelShape, k_swa: int, v_swa: int) -> ModelShape:
    """``full`` with a sliding-window first layer whose heads are ``k_swa`` / ``v_swa`` wide."""
    return dataclass_replace(
        full, n_swa=512, is_swa=(True, False), head_dim_k_swa=k_swa, head_dim_v_swa=v_swa
    )


@pytest.mark.parametrize(
    ("model_shape", "args", "expected"),
    [
        *[(shape(k, k), LlamaArgs(), True) for k in (40, 64, 72, 80, 96, 112, 128, 256)],
        (shape(16, 16), LlamaArgs(), False),
        (shape(160, 160), LlamaArgs(), False),
        (shape(128, 64), LlamaArgs(), False),
        # Unequal or wide heads need grouped-query attention, some of a given ratio.
        (shape(192, 128, 32, 4), LlamaArgs(), True),
        (shape(192, 128, 32, 8), LlamaArgs(), False),
        (shape(320, 256, 64, 2), LlamaArgs(), True),
        (shape(320, 256, 32, 2), LlamaArgs(), False),
        (shape(512, 512, 16, 8), LlamaArgs(), True),
        (shape(512, 512, 8, 8), LlamaArgs(), False),
        (shape(576, 512, 128, 1), LlamaArgs(), True),
        (shape(576, 512, 1, 1), LlamaArgs(), False),
        # Layers without attention (a hybrid's linear layers) do not count.
        (dataclass_replace(shape(576, 512, 16, 1), n_head_kv=(0, 1)), LlamaArgs(), True),
        # Sliding-window layers with heads of their own: each layer is checked.
        (sliding(shape(128, 128), 160, 160), LlamaArgs(), False),
        (sliding(shape(128, 128), 256, 256), LlamaArgs(), True),
        (sliding(shape(512, 512, 16, 8), 320, 256), LlamaArgs(), False),
        # A cache type the kernels cannot read; a quantized V cache forces it on.
        (shape(128, 128), LlamaArgs(cache_type_k="iq4_nl"), False),
        (shape(160, 160), LlamaArgs(cache_type_v="q8_0"), True),
        # Explicit settings are taken as given.
        (shape(16, 16), LlamaArgs(flash_attn="on"), True),
        (shape(128, 128), LlamaArgs(flash_attn="off"), False),
    ],
)
def test_flash_attn_on_a_gpu(model_shape: ModelShape, args: LlamaArgs, *, expected: bool) -> None:
    """Head sizes and cache types as ggml-cuda's flash attention takes them."""
    assert flash_attn_on(model_shape, args, on_device=True) is expected
    assert flash_attn_on(model_shape, args, on_device=False) is (args.flash_attn != "off")


def test_grok_never_runs_flash_attention() -> None:
    """llama.cpp forces it off for Grok whatever -fa says: the scores always count."""
    grok = dataclass_replace(shape(128, 128), arch="grok")
    for setting in ("auto", "on", "off"):
        args = LlamaArgs(flash_attn=setting)
        assert flash_attn_on(grok, args, on_device=True) is False
        assert flash_attn_on(grok, args, on_device=False) is False


def test_sliding_heads_of_their_own_are_read(tmp_path: Path) -> None:
    """key_length_swa / value_length_swa from the file decide "auto" for the sliding layers."""
    window: dict[str, int | list[bool]] = {"{arch}.attention.sliding_window": 512}
    narrow: dict[str, int | list[bool]] = {
        "{arch}.attention.key_length_swa": 16,
        "{arch}.attention.value_length_swa": 16,
    }
    auto = LlamaArgs(n_ctx=2048, flash_attn="auto")
    on = dataclass_replace(auto, flash_attn="on")
    for name, extra, expected in (("plain", window, True), ("narrow", window | narrow, False)):
        spec = Spec(arch="gemma3", n_layer=6, key_length=64, value_length=64, extra=extra)
        path = write_model(tmp_path / f"{name}.gguf", spec)
        assert (estimate_for_args(path, auto) == estimate_for_args(path, on)) is expected


def test_logit_rows_follow_slots_or_the_caller(model: Path) -> None:
    """One logits row per slot by default; older servers reserved a row per batch token."""
    one_slot = estimate_gguf(model, n_ctx=2048, n_gpu_layers=None, n_parallel=1, flash_attn=True)
    assert one_slot.compute == compute_bytes(512, 2048, flash_attn=True, n_outputs=1)
    old = estimate_gguf(model, n_ctx=2048, n_gpu_layers=None, flash_attn=True, n_outputs=512)
    assert old.compute == compute_bytes(512, 2048, flash_attn=True, n_outputs=512)


def test_compute_batch_is_capped_by_the_context(model: Path) -> None:
    """A micro-batch never holds more tokens than the cache has cells."""
    small = estimate_gguf(model, n_ctx=256, n_gpu_layers=None, n_ubatch=4096, flash_attn=True)
    assert small.compute == compute_bytes(256, 256, flash_attn=True)


def swa_model(
    tmp_path: Path, arch: str = "gemma3", extra: dict[str, int | list[bool]] | None = None
) -> Path:
    """Write a six-block model of ``arch`` with a 512-token sliding window unless told."""
    keys = {"{arch}.attention.sliding_window": 512, **(extra or {})}
    spec = Spec(arch=arch, n_layer=6, extra=keys)
    return write_model(tmp_path / f"{arch}.gguf", spec)


def test_sliding_window_layers_hold_only_the_window(tmp_path: Path) -> None:
    """Gemma 3's five sliding layers in six hold window * slots + ubatch cells, padded."""
    path = swa_model(tmp_path)
    est = estimate_gguf(path, n_ctx=8192, n_gpu_layers=None)
    swa_cells = 512 * AUTO_SLOTS + 512
    assert est.kv_cache == kv_bytes(8192, 1) + kv_bytes(swa_cells, 5)
    # One slot, a smaller batch: 512 + 128 rounds up to 768.
    small = estimate_gguf(path, n_ctx=8192, n_gpu_layers=None, n_parallel=1, n_ubatch=128)
    assert small.kv_cache == kv_bytes(8192, 1) + kv_bytes(768, 5)
    # Never more than the context itself, and all of it with --swa-full.
    assert estimate_gguf(path, n_ctx=1024, n_gpu_layers=None).kv_cache == kv_bytes(1024, 6)
    full = estimate_gguf(path, n_ctx=8192, n_gpu_layers=None, swa_full=True)
    assert full.kv_cache == kv_bytes(8192, 6)


def test_sliding_window_masks_add_to_compute(tmp_path: Path) -> None:
    """A sliding-window model holds a second mask over the window's cells."""
    path = swa_model(tmp_path)
    est = estimate_gguf(path, n_ctx=8192, n_gpu_layers=None, n_parallel=1, flash_attn=True)
    assert est.compute == compute_bytes(512, 8192, flash_attn=True, n_outputs=1, mask_cells=9216)


def test_sliding_window_layers_per_slot(tmp_path: Path) -> None:
    """Slots with caches of their own each hold one window plus a batch."""
    path = swa_model(tmp_path)
    est = estimate_gguf(path, n_ctx=8192, n_gpu_layers=None, n_parallel=2)
    assert est.kv_cache == kv_bytes(8192, 1) + kv_bytes(2 * 1024, 5)


@pytest.mark.parametrize(
    ("extra", "n_swa_layers"),
    [
        ({"{arch}.attention.sliding_window_pattern": 2}, 3),
        ({"{arch}.attention.sliding_window_pattern": [True, False] * 3}, 3),
        ({"{arch}.attention.sliding_window_pattern": [True] * 6}, 6),
        ({"{arch}.attention.sliding_window": 0}, 0),
    ],
)
def test_sliding_window_pattern_from_the_file(
    tmp_path: Path, extra: dict[str, int | list[bool]], n_swa_layers: int
) -> None:
    """A pattern in the file overrides the architecture's; a zero window slides nothing."""
    path = swa_model(tmp_path, extra=extra)
    est = estimate_gguf(path, n_ctx=8192, n_gpu_layers=None, n_parallel=1)
    expected = kv_bytes(8192, 6 - n_swa_layers) + kv_bytes(1024, n_swa_layers)
    assert est.kv_cache == expected


def test_sliding_window_only_for_known_architectures(tmp_path: Path) -> None:
    """A window on an architecture llama.cpp does not slide is ignored; Gemma 2 has a default."""
    llama = estimate_gguf(swa_model(tmp_path, "llama"), n_ctx=8192, n_gpu_layers=None)
    assert llama.kv_cache == kv_bytes(8192, 6)
    gemma2 = write_model(tmp_path / "g2.gguf", Spec(arch="gemma2", n_layer=6))
    est = estimate_gguf(gemma2, n_ctx=32768, n_gpu_layers=None, n_parallel=1)
    assert est.kv_cache == kv_bytes(32768, 3) + kv_bytes(4096 + 512, 3)


def test_sliding_window_with_partial_offload(tmp_path: Path) -> None:
    """Only offloaded layers' caches count, each at its own size."""
    path = swa_model(tmp_path)
    # -ngl 3: the output layer, blk.5 (full attention) and blk.4 (sliding).
    est = estimate_gguf(path, n_ctx=8192, n_gpu_layers=3, n_parallel=1)
    assert est.kv_cache == kv_bytes(8192, 1) + kv_bytes(1024, 1)


def test_vocab_from_token_embd_shape(tmp_path: Path) -> None:
    """Without a token list the vocabulary size comes from token_embd's shape."""
    with_tokens = estimate_gguf(write_model(tmp_path / "a.gguf"), n_ctx=256, n_gpu_layers=None)
    path = write_model(tmp_path / "b.gguf", Spec(tokens=0))
    without = estimate_gguf(path, n_ctx=256, n_gpu_layers=None)
    assert without.compute == with_tokens.compute


def test_overhead_parameter(model: Path) -> None:
    """An explicit overhead replaces the per-device default."""
    est = estimate_gguf(model, n_ctx=256, n_gpu_layers=None, overhead=300 * MIB)
    assert est.overhead == 300 * MIB
    assert est.total == est.weights + est.kv_cache + est.compute + 300 * MIB


@pytest.mark.parametrize("bad", ["q8", "F16", "q4_k"])
def test_unknown_cache_type_is_named(model: Path, bad: str) -> None:
    """An unknown cache type raises ValueError naming it."""
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        estimate_gguf(model, n_ctx=256, n_gpu_layers=None, cache_type_v=bad)


@pytest.mark.parametrize(
    "spec",
    [
        Spec(),
        Spec(tokens=MAX_DECODED_ARRAY + 1, head_count_kv=[1, 2], key_length=32),
        Spec(endianess=gguf.GGUFEndian.BIG),
    ],
    ids=["small", "long-arrays", "big-endian"],
)
def test_header_reader_agrees_with_gguf_reader(tmp_path: Path, spec: Spec) -> None:
    """The lean header reader sees the metadata and tensor sizes that gguf.GGUFReader sees."""
    path = write_model(tmp_path / "m.gguf", spec)
    header = read_gguf_header(path)
    reader = gguf.GGUFReader(path)
    assert [(t.name, t.n_bytes, t.shape) for t in header.tensors] == [
        (t.name, int(t.n_bytes), tuple(int(d) for d in t.shape)) for t in reader.tensors
    ]
    for key, reader_field in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # the reader's own bookkeeping, not metadata
        if key in header.array_lengths:
            assert header.array_lengths[key] == len(reader_field.data)
        if key in header.metadata:
            assert header.metadata[key] == reader_field.contents()
        else:
            assert header.array_lengths[key] > MAX_DECODED_ARRAY


def test_long_token_list_is_counted(tmp_path: Path) -> None:
    """A vocabulary too long to decode still sizes the logits."""
    path = write_model(tmp_path / "big.gguf", Spec(tokens=MAX_DECODED_ARRAY + 1))
    est = estimate_gguf(path, n_ctx=256, n_gpu_layers=None, flash_attn=True, n_outputs=256)
    vocab_growth = 256 * (MAX_DECODED_ARRAY + 1 - N_VOCAB) * 4
    assert est.compute == compute_bytes(256, 256, flash_attn=True, n_outputs=256) + vocab_growth


def test_not_a_gguf(tmp_path: Path) -> None:
    """A file that is not GGUF, or is cut short, raises ValueError naming the file."""
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf_header(junk)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(write_model(tmp_path / "whole.gguf").read_bytes()[:200])
    with pytest.raises(ValueError, match="malformed GGUF header"):
        read_gguf_header(cut)
    magic_only = tmp_path / "magic.gguf"
    magic_only.write_bytes(b"GGUF")  # cut before its version: was a bare struct.error
    with pytest.raises(ValueError, match="truncated GGUF header"):
        read_gguf_header(magic_only)


def test_missing_metadata_is_named(tmp_path: Path) -> None:
    """A GGUF without a required key raises an error naming the key."""
    writer = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFMetadataError, match=re.escape("llama.embedding_length")):
        estimate_gguf(tmp_path / "bad.gguf", n_ctx=256, n_gpu_layers=None)


def test_describe() -> None:
    """describe() sums the components in MiB; a whole overhead shows without decimals."""
    est = Estimate(
        weights=int(241.3 * MIB),
        kv_cache=12 * MIB,
        compute=int(18.5 * MIB),
        overhead=300 * MIB,
    )
    assert est.describe() == (
        "weights 241.3 MiB + KV 12.0 MiB + compute 18.5 MiB + overhead 300 MiB = 571.8 MiB"
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], LlamaArgs()),
        (["-m", "x.gguf", "--port", "8080"], LlamaArgs()),
        (["-c", "4096"], LlamaArgs(n_ctx=4096)),
        (["--ctx-size=8192"], LlamaArgs(n_ctx=8192)),
        (["-c", "0"], LlamaArgs(n_ctx=0)),
        (["-ngl", "99"], LlamaArgs(n_gpu_layers=99)),
        (["--n-gpu-layers", "-1"], LlamaArgs(n_gpu_layers=-1)),
        (["--gpu-layers=all"], LlamaArgs(n_gpu_layers="all")),
        (["-ngl", "auto"], LlamaArgs(n_gpu_layers="auto")),
        (["-np", "4"], LlamaArgs(n_parallel=4)),
        (["--parallel=-1"], LlamaArgs(n_parallel=-1)),
        (
            ["-ctk", "q8_0", "--cache-type-v=q4_0"],
            LlamaArgs(cache_type_k="q8_0", cache_type_v="q4_0"),
        ),
        (
            ["--cache-type-k", "bf16", "-ctv", "iq4_nl"],
            LlamaArgs(cache_type_k="bf16", cache_type_v="iq4_nl"),
        ),
        (["-fa"], LlamaArgs(flash_attn="on")),
        (["-fa", "-c", "512"], LlamaArgs(flash_attn="on", n_ctx=512)),
        (["-fa", "off"], LlamaArgs(flash_attn="off")),
        (["--flash-attn", "auto"], LlamaArgs(flash_attn="auto")),
        (["--flash-attn=on"], LlamaArgs(flash_attn="on")),
        (["-fa", "false"], LlamaArgs(flash_attn="off")),
        (["-ub", "256", "--ubatch-size=128"], LlamaArgs(n_ubatch=128)),
        (["-c", "1024", "-c", "2048"], LlamaArgs(n_ctx=2048)),
        (["-kvu", "--swa-full"], LlamaArgs(kv_unified=True, swa_full=True)),
        (["--kv-unified", "-no-kvu"], LlamaArgs(kv_unified=False)),
        (["--no-kv-unified"], LlamaArgs(kv_unified=False)),
        (["--alias", "m", "--unknown=3", "-c", "64"], LlamaArgs(n_ctx=64)),
    ],
)
def test_parse_llama_args(argv: list[str], expected: LlamaArgs) -> None:
    """Each flag spelling, both value forms, the bare -fa, and unknown flags skipped."""
    assert parse_llama_args(argv) == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-c"], "-c needs a value"),
        (["-c", "big"], "-c needs an integer"),
        (["-ngl", "most"], "-ngl needs an integer"),
        (["--flash-attn=maybe"], "--flash-attn takes on, off or auto"),
        (["-ctk", "q3"], "'q3'"),
    ],
)
def test_parse_llama_args_rejects_bad_values(argv: list[str], message: str) -> None:
    """A known flag with a missing or malformed value raises ValueError saying which."""
    with pytest.raises(ValueError, match=message):
        parse_llama_args(argv)


def test_estimate_for_args(model: Path) -> None:
    """Flags flow into the estimate."""
    argv = [
        "-c",
        "2048",
        "-ngl",
        "2",
        "-ctk",
        "bf16",
        "-np",
        "2",
        "-kvu",
        "-ub",
        "256",
        "-fa",
        "off",
    ]
    via_args = estimate_for_args(model, parse_llama_args(argv))
    direct = estimate_gguf(
        model,
        n_ctx=2048,
        n_gpu_layers=2,
        cache_type_k="bf16",
        n_parallel=2,
        kv_unified=True,
        n_ubatch=256,
        flash_attn=False,
    )
    assert via_args == direct
    no_fa = estimate_for_args(model, parse_llama_args(["-c", "2048", "-fa", "off"]), on_gpu=False)
    fa = estimate_for_args(model, parse_llama_args(["-c", "2048"]), on_gpu=False)
    assert no_fa.compute > fa.compute


def test_cache_type_is_checked_before_the_file_is_read(tmp_path: Path) -> None:
    """A bad cache type is reported even when the model file does not exist."""
    with pytest.raises(ValueError, match="'q2'"):
        estimate_gguf(tmp_path / "absent.gguf", n_ctx=None, n_gpu_layers=None, cache_type_k="q2")
