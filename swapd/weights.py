"""How many bytes of weights a model path holds, as the backends load them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from swapd.gguf_split import split_parts

if TYPE_CHECKING:
    from collections.abc import Sequence


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


def side_paths(args: Sequence[str]) -> list[Path]:
    """The files an argv names beside the model (a draft, a projector, a LoRA adapter).

    Any argument that reads as a path: a change to one changes what the launch uses.
    ``--flag=path`` counts by its value.
    """
    paths = []
    for arg in args:
        value = arg.partition("=")[2] if arg.startswith("-") else arg
        if "/" in value or value.endswith((".gguf", ".safetensors", ".bin")):
            paths.append(Path(value))
    return paths


def file_stamp(path: Path) -> tuple[int, int]:
    """Size and mtime of a file; ``(-1, -1)`` while it is not there."""
    try:
        st = path.stat()
    except (OSError, ValueError):  # ValueError: a NUL in the argument
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)
