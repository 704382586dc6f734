"""The files of a split GGUF: llama.cpp loads ``PREFIX-0000k-of-NNNNN.gguf`` beside the first."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

_SPLIT_FIRST = re.compile(r"(.+)-00001-of-(\d{5})\.gguf")


def split_parts(path: Path) -> list[Path]:
    """The files a model file stands for: every shard of a split GGUF, else the file itself."""
    found = _SPLIT_FIRST.fullmatch(path.name)
    if found is None:
        return [path]
    prefix, count = found[1], found[2]
    return [path.with_name(f"{prefix}-{no:05d}-of-{count}.gguf") for no in range(1, int(count) + 1)]
