"""How many bytes of weights a model path holds, as the backends load them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from swapd.gguf_split import split_parts

if TYPE_CHECKING:
    from pathlib import Path


def weight_bytes(path: Path) -> int:
    """Bytes of a file (every shard of a split GGUF), or of the weights vLLM loads from a folder.

    vLLM reads the top-level ``*.safetensors``, else ``*.bin``, else ``*.pt``: not a
    git-lfs clone's second copy under ``.git/lfs``, nor Meta's ``original/`` folder.
    """
    if path.is_file():
        return sum(part.stat().st_size for part in split_parts(path))
    for pattern in ("*.safetensors", "*.bin", "*.pt"):
        if found := [p for p in path.glob(pattern) if p.is_file()]:
            return sum(p.stat().st_size for p in found)
    return sum(
        p.stat().st_size
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
