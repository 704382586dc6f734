"""How many bytes of weights a model path holds, as the backends load them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from swapd.gguf_split import split_parts

if TYPE_CHECKING:
    from collections.abc import Sequence

# What vLLM's default loader globs at the folder's top for each --load-format, first
# match wins, and the index that then picks among the files
# (vllm/model_executor/model_loader/default_loader.py, _prepare_weights). "auto" is
# "mistral" where a consolidated file is there, else "hf". Other formats (dummy, gguf,
# the streamers) are sized as "auto": a dummy load allocates the same weights.
_Patterns: TypeAlias = tuple[tuple[str, str | None], ...]
_MISTRAL: _Patterns = (("consolidated*.safetensors", "consolidated.safetensors.index.json"),)
_SAFETENSORS: _Patterns = (("*.safetensors", "model.safetensors.index.json"),)
_HF: _Patterns = (*_SAFETENSORS, ("*.bin", None), ("*.pt", None))
_VLLM_WEIGHTS: dict[str, _Patterns] = {
    "auto": (*_MISTRAL, *_HF),
    "hf": _HF,
    "mistral": _MISTRAL,
    "safetensors": _SAFETENSORS,
    "fastsafetensors": _SAFETENSORS,
    "instanttensor": _SAFETENSORS,
    "pt": (("*.pt", None),),
    "npcache": (("*.bin", None), ("*.pt", None)),
}
# A trainer's checkpoint files beside the weights, which vLLM leaves out of a load.
_NOT_WEIGHTS = ("training_args.bin", "optimizer.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")


def weight_bytes(path: Path, load_format: str = "auto") -> int:
    """Bytes of a file (every shard of a split GGUF), or of the weights vLLM loads from a folder.

    By default vLLM reads the top-level ``consolidated*.safetensors`` where there are any
    (Mistral's format), else ``*.safetensors``, else ``*.bin``, else ``*.pt``: not a
    git-lfs clone's second copy under ``.git/lfs``, nor Meta's ``original/`` folder. A
    ``--load-format`` (``load_format``) narrows that: ``pt`` reads only ``*.pt``, say.
    """
    if path.is_file():
        return sum(part.stat().st_size for part in split_parts(path))
    for pattern, index in _VLLM_WEIGHTS.get(load_format, _VLLM_WEIGHTS["auto"]):
        if found := [p for p in path.glob(pattern) if p.is_file()]:
            loaded = _in_index(found, path / index) if index else _weights_only(found)
            return sum(p.stat().st_size for p in loaded)
    return sum(
        p.stat().st_size
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def _in_index(found: list[Path], index: Path) -> list[Path]:
    """The files of ``found`` that a safetensors index maps weights to; all without one.

    Mistral's repos hold every weight twice, as ``consolidated.safetensors`` and as
    ``model-*.safetensors`` shards: vLLM loads only what its format's index names.
    """
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        named = {str(name) for name in weight_map.values()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return found  # none there, or unreadable (vLLM itself then refuses the folder)
    return [p for p in found if p.name in named]


def _weights_only(found: list[Path]) -> list[Path]:
    """``found`` less a trainer's optimizer and scheduler states."""
    return [p for p in found if not p.name.endswith(_NOT_WEIGHTS)]


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
