"""The model dimensions a memory estimate needs, read from a GGUF header."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeGuard

from swapd.estimate._gguf_header import GGUFHeader

if TYPE_CHECKING:
    from pathlib import Path

# Architectures whose llama.cpp loader interleaves sliding-window layers, with the default
# group size: in each group of n layers the last one has full attention. A
# ``{arch}.attention.sliding_window_pattern`` key in the file overrides the default.
# Others get a full-size cache on every layer, which can only over-estimate.
SWA_PATTERNS = {"gemma2": 2, "gemma3": 6, "cohere2": 4, "gpt-oss": 2}
# Gemma 2 files may leave the window out; llama.cpp assumes this one.
SWA_DEFAULT_WINDOW = {"gemma2": 4096}

# The most blocks llama.cpp loads (LLAMA_MAX_LAYERS): it refuses a file with more.
MAX_LAYERS = 512

# The token embedding, and the output layer a model without tied embeddings has.
TOKEN_EMBD = "token_embd.weight"  # noqa: S105 - a tensor name, not a password
OUTPUT = "output.weight"


class GGUFMetadataError(ValueError):
    """A GGUF lacks a metadata key the estimate needs, or holds it in the wrong shape."""

    def __init__(self, path: Path, key: str, reason: str) -> None:
        self.path = path
        self.key = key
        super().__init__(f"{path}: GGUF metadata {key!r} {reason}")


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
    arch: str = ""  # general.architecture
    # Head sizes of the sliding-window layers where the file gives their own; 0: the same.
    head_dim_k_swa: int = 0
    head_dim_v_swa: int = 0


def _int_field(header: GGUFHeader, key: str, path: Path) -> int:
    """Return a required integer metadata value."""
    value = header.metadata.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise GGUFMetadataError(path, key, "is missing or not an integer")
    return value


def _per_layer(value: object, n_layer: int, key: str, path: Path) -> tuple[int, ...]:
    """Expand a scalar-or-array metadata value to one integer per layer."""
    if _count(value):
        return (value,) * n_layer
    if isinstance(value, list) and len(value) == n_layer and all(_count(v) for v in value):
        return tuple(value)
    raise GGUFMetadataError(path, key, f"must be an integer or a list of {n_layer} integers")


def _count(value: object) -> TypeGuard[int]:
    """Whether ``value`` is a whole number of something: an int, not a bool, not negative."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
    if not 0 <= n_layer <= MAX_LAYERS:
        raise GGUFMetadataError(path, f"{arch}.block_count", f"is {n_layer}, not 0 to {MAX_LAYERS}")
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
    k_swa = header.metadata.get(f"{arch}.attention.key_length_swa")
    v_swa = header.metadata.get(f"{arch}.attention.value_length_swa")
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
        arch=arch,
        head_dim_k_swa=k_swa if isinstance(k_swa, int) else 0,
        head_dim_v_swa=v_swa if isinstance(v_swa, int) else 0,
    )
