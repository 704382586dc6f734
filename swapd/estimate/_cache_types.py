"""The KV cache types llama.cpp accepts, and the bytes their entries take."""

from __future__ import annotations

import math

# Bytes per 32-value block (or per value, block of 1) of each KV cache type llama.cpp accepts.
CACHE_TYPES: dict[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
    "iq4_nl": (32, 18),
}


def cache_type_block(cache_type: str) -> tuple[int, int]:
    """Return (values, bytes) of one block of a KV cache type, spelled as llama-server does."""
    try:
        return CACHE_TYPES[cache_type]
    except KeyError:
        known = ", ".join(CACHE_TYPES)
        raise ValueError(f"unknown KV cache type {cache_type!r}; known: {known}") from None


def cache_row_bytes(cache_type: str, n_values: int) -> int:
    """Bytes of ``n_values`` cache entries stored as ``cache_type`` (e.g. ``q8_0``)."""
    block, block_bytes = cache_type_block(cache_type)
    return math.ceil(n_values / block) * block_bytes
