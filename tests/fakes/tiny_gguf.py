"""A tiny llama GGUF with random weights that a real llama-server loads in a blink.

The vocabulary is byte-level (SentencePiece "llama" model with the 256 byte tokens), so
any text tokenizes; the answers are garbage, which is all a test of process management
needs. ``python tests/fakes/tiny_gguf.py OUT.gguf`` writes one.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
HEAD_DIM = 16


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Return tokens, scores and token types: the specials, then one token per byte."""
    tokens = [*SPECIAL_TOKENS, *(f"<0x{b:02X}>" for b in range(256))]
    scores = [0.0] * len(tokens)
    types = [
        gguf.TokenType.UNKNOWN,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
        *[gguf.TokenType.BYTE] * 256,
    ]
    return tokens, scores, [int(t) for t in types]


def write_tiny_llama_gguf(  # noqa: PLR0913 - each knob is one model dimension, all keyword-only
    path: Path,
    *,
    seed: int = 0,
    n_layers: int = 2,
    n_embd: int = 64,
    n_ctx_train: int = 512,
    q8: bool = False,
    head_dim: int = HEAD_DIM,
) -> Path:
    """Write a random-weight llama model to ``path`` and return the path.

    Heads are ``head_dim`` wide, so ``n_embd`` must be a multiple of twice that (the
    key/value heads are half the query heads: grouped-query attention, as in real models).
    With ``q8`` the matrices are Q8_0, which takes llama.cpp's quantized CPU kernels
    (the repacked and AMX paths among them) as real quantized models do.
    """
    if head_dim <= 0 or n_embd <= 0 or n_embd % (2 * head_dim):
        raise ValueError(f"n_embd must be a positive multiple of {2 * head_dim}, got {n_embd}")
    n_head = n_embd // head_dim
    tokens, scores, types = vocabulary()

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("swapd tiny test llama")
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(2 * n_embd)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head // 2)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8 else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(value=True)
    shape = _Shape(n_layers=n_layers, n_embd=n_embd, n_vocab=len(tokens), head_dim=head_dim)
    _add_tensors(writer, np.random.default_rng(seed), shape, q8=q8)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@dataclass(frozen=True)
class _Shape:
    n_layers: int
    n_embd: int
    n_vocab: int
    head_dim: int


def _add_tensors(
    writer: gguf.GGUFWriter, rng: np.random.Generator, shape: _Shape, *, q8: bool
) -> None:
    n_layers, n_embd, n_vocab = shape.n_layers, shape.n_embd, shape.n_vocab
    n_ff = 2 * n_embd
    n_kv = (n_embd // shape.head_dim // 2) * shape.head_dim

    def weight(rows: int, cols: int) -> np.ndarray:
        # numpy shape (rows, cols) is GGUF shape [cols, rows]: cols is the input size.
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)

    def matrix(name: str, rows: int, cols: int) -> None:
        data = weight(rows, cols)
        if q8:
            q8_0 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(data, q8_0), raw_dtype=q8_0)
        else:
            writer.add_tensor(name, data)

    def norm() -> np.ndarray:
        return np.ones(n_embd, dtype=np.float32)

    writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
    for i in range(n_layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        matrix(f"blk.{i}.attn_q.weight", n_embd, n_embd)
        matrix(f"blk.{i}.attn_k.weight", n_kv, n_embd)
        matrix(f"blk.{i}.attn_v.weight", n_kv, n_embd)
        matrix(f"blk.{i}.attn_output.weight", n_embd, n_embd)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        matrix(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        matrix(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        matrix(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    writer.add_tensor("output_norm.weight", norm())
    matrix("output.weight", n_vocab, n_embd)


def write_one_block_llama(path: Path, ffn_rows: int) -> None:
    """A one-block llama GGUF of zeros whose size is set by its FFN rows (4 KiB each).

    Not for llama-server: enough metadata for the estimate, and weights of a known size.
    """
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_head_count(8)
    writer.add_token_list([f"t{i}" for i in range(100)])
    writer.add_tensor("token_embd.weight", np.zeros((100, 64), np.float32))
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((ffn_rows, 1024), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    """Write a tiny model to the path given on the command line."""
    parser = argparse.ArgumentParser(description="Write a tiny random llama GGUF.")
    parser.add_argument("path", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--q8", action="store_true", help="Q8_0 matrices instead of F32")
    args = parser.parse_args()
    print(write_tiny_llama_gguf(args.path, seed=args.seed, q8=args.q8))


if __name__ == "__main__":
    main()
