"""A split GGUF (model-00001-of-0000N.gguf) is estimated from all its files, as llama.cpp loads."""

from __future__ import annotations

from typing import TYPE_CHECKING

import gguf
import numpy as np

from swapd.estimate import LlamaArgs, estimate_for_args

if TYPE_CHECKING:
    from pathlib import Path


def _write(path: Path, split_max_tensors: int) -> None:
    writer = gguf.GGUFWriter(str(path), "llama", split_max_tensors=split_max_tensors)
    writer.add_block_count(4)
    writer.add_context_length(1024)
    writer.add_embedding_length(64)
    writer.add_head_count(8)
    writer.add_head_count_kv(2)
    writer.add_token_list([f"t{i}" for i in range(100)])
    writer.add_tensor("token_embd.weight", np.zeros((100, 64), np.float32))
    for i in range(4):
        writer.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((64, 64), np.float32))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", np.zeros((256, 64), np.float32))
    writer.add_tensor("output.weight", np.zeros((100, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_split_gguf_counts_the_weights_of_every_file(tmp_path: Path) -> None:
    """llama-server -m m-00001-of-00003.gguf loads all three files; the estimate must count them."""
    _write(tmp_path / "whole.gguf", 0)
    _write(tmp_path / "m.gguf", 4)  # gguf writes m-00001-of-00003.gguf ... m-00003-of-00003.gguf
    first = tmp_path / "m-00001-of-00003.gguf"
    assert first.is_file()
    args = LlamaArgs(n_ctx=1024)
    whole = estimate_for_args(tmp_path / "whole.gguf", args)
    split = estimate_for_args(first, args)
    assert split.weights == whole.weights
    assert split.total == whole.total
